"""Train the ViT:  python train.py [--config FILE] [--dataset tiny-imagenet|image-folder|digits] ...

Every epoch: a progress bar (loss, accuracy, images/s, ETA), validation top-1/top-5/loss,
checkpoints RUN_DIR/last.npz (every epoch, and mid-epoch every train.checkpoint_minutes) and
RUN_DIR/best.npz (best validation top-1; of a tie, the lower val loss) written atomically, then a
line in RUN_DIR/metrics.jsonl and RUN_DIR/curves.png redrawn (at most every 10 s, and when training
stops). `--resume RUN_DIR` continues exactly where it stopped, and first rewrites metrics.jsonl
from the checkpoint's own history, so the two agree whatever moment a crash came at. The run directory is checked for writing
before any work; a start that fails leaves no run directory behind.

Exit codes:
    0    every epoch done
    130  stopped early with last.npz saved at the current step, to be continued with --resume:
         by Ctrl-C (SIGINT), SIGTERM, or --stop-after-epoch K (a stop asked for in advance is
         still a stop before the end, so a script can tell "finished" from "resume me")
    3    the training loss became NaN/Inf: stopped, last.npz is left as it was
    2    bad usage or input (a flag, config value, data or checkpoint file): the message names it
A second Ctrl-C while stopping leaves at once without saving (also 130), as does one while the
run starts (reading its checkpoint, loading its data), writing no checkpoint and no run directory.
A Ctrl-C during the first step, which compiles it, waits for that step and saves it like any other.

Called from Python (`train.main([...])`, as the tests do) rather than run as a script, a SIGINT or
SIGTERM still saves last.npz first, and is then passed on to the handler that was there before
(KeyboardInterrupt for SIGINT, termination for SIGTERM), so the calling program stops as it would
have without train.py.

This file is the command line: flags and config (build_parser, resolve_config), the run directory
and its checks (check_writable; resume.py: what --resume checks), the op set and processes
(cmdline.py); vit/training.py is the run itself (start_run, train), vit/signals.py its stops.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import sys
import tempfile
import time
from pathlib import Path
from shlex import quote

import cmdline
import resume

# vit.data.DATASETS, written out so that --help imports no jax (tests/test_config.py keeps the two
# equal)
DATASETS = ("tiny-imagenet", "image-folder", "digits")
EXIT_INTERRUPTED = 130  # stopped early, last.npz saved: Ctrl-C, SIGTERM or --stop-after-epoch
EXIT_NONFINITE = 3
# named flags: their argparse dest and the (section, key) of the config value each overrides; a
# new one also needs its p.add_argument(..., dest=...) in build_parser (any key works through --set)
NAMED_FLAGS = {"--dataset": ("dataset", "data", "dataset"),
               "--data-dir": ("data_dir", "data", "data_dir"),
               "--epochs": ("epochs", "train", "epochs"),
               "--batch-size": ("batch_size", "train", "batch_size"),
               "--accum-steps": ("accum_steps", "train", "accum_steps"),
               "--lr": ("lr", "train", "lr"),
               "--compute-dtype": ("compute_dtype", "train", "compute_dtype"),
               "--precision": ("old_precision", "train", "compute_dtype"),  # the old name
               "--seed": ("seed", "train", "seed"),
               "--init-from": ("init_from", "train", "init_from")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python train.py",
        description="Train the hand-differentiated ViT. Configs are TOML files with [model], "
                    "[train] and [data] sections (configs/*.toml); every value can be "
                    "overridden here, by a named flag or by --set section.key=value; a flag "
                    "left out keeps the config's value.",
        epilog="RUN_DIR/last.npz is written at every epoch's end and, within an epoch, every "
               "train.checkpoint_minutes (30 unless set); best.npz at the best val top-1. Exit "
               f"codes: 0 every epoch done; {EXIT_INTERRUPTED} stopped early with last.npz saved "
               "(Ctrl-C, SIGTERM, --stop-after-epoch: continue with --resume; a Ctrl-C before "
               "the first step saves nothing: run the same command again); "
               f"{EXIT_NONFINITE} the loss became NaN/Inf (last.npz left as it was); 2 a bad "
               "flag, config value, data or checkpoint file (the message names it).")
    p.add_argument("--config", default=None,
                   help="TOML config file (default: configs/seed.toml, or configs/digits.toml "
                        "with --dataset digits)")
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="data.dataset: a folder of images in --data-dir (Tiny ImageNet: download it "
                        "with `python -m vit.data download`; or any DIR/train/<class>/, "
                        "DIR/val/<class>/ tree) or scikit-learn's bundled 8x8 digits (no download)")
    p.add_argument("--data-dir", default=None,
                   help="data.data_dir: the folder holding tiny-imagenet-200/ (or that folder), or "
                        "an image folder with train/<class>/ and val/<class>/ (layout detected; "
                        "--set data.layout=image-folder to name it, --set data.image_size=N to "
                        "size the images and the model)")
    p.add_argument("--epochs", type=int, default=None, help="train.epochs: epochs in total")
    p.add_argument("--batch-size", type=int, default=None, help="train.batch_size: global batch")
    p.add_argument("--accum-steps", type=int, default=None,
                   help="train.accum_steps: take each batch's gradients in this many micro-batches, "
                        "one after another (gradient accumulation: the memory of batch/N rows, the "
                        "update of the whole batch)")
    p.add_argument("--lr", type=float, default=None, help="train.lr: peak learning rate")
    p.add_argument("--compute-dtype", choices=["fp32", "bf16"], default=None,
                   help="train.compute_dtype: bf16 = bf16 activations/matmuls, fp32 master weights")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, dest="old_precision",
                   help="the old name of --compute-dtype (still works, with a note)")
    p.add_argument("--seed", type=int, default=None, help="train.seed: init, data order, masks")
    p.add_argument("--init-from", default=None, metavar="RUN_OR_NPZ",
                   help="train.init_from: fine-tune: start from the weights of a run (its best.npz) "
                        "or checkpoint, with its architecture; positions resized to the images, "
                        "the head fitted to the classes (vit/finetune.py); with --set "
                        "train.trainable=head, a linear probe")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config value, e.g. --set model.layers=4 "
                        "--set train.mixup_alpha=0.8 (repeatable)")
    p.add_argument("--out", default=None,
                   help="run directory for checkpoints, metrics.jsonl and curves.png "
                        "(default: runs/<dataset>-<date>-<time>)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last checkpoint, exactly; its "
                        "config is used (--epochs may extend it; --lr and other training values "
                        "may change it, with a note; batch size, seed, model and data may not)")
    cmdline.add_ops_flags(p)
    p.add_argument("--devices", type=cmdline.positive_int, default=None,
                   help="data-parallel over this many devices (default: all; 1 = no sharding)")
    cmdline.add_distributed_flags(p)
    p.add_argument("--stop-after-epoch", type=cmdline.positive_int, default=None, metavar="K",
                   help="stop after epoch K with last.npz saved and exit 130, as Ctrl-C does; "
                        "continue later with --resume")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def fail(message: str, code: int = 2):
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(code)


# ----------------------------------------------------------------------------------------------
# configuration


def parse_args(argv) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.old_precision is not None:
        print("train.py: note: --precision is now called --compute-dtype (train.compute_dtype); "
              "the old name still works", file=sys.stderr)
        if args.compute_dtype not in (None, args.old_precision):
            fail(f"--precision {args.old_precision} and --compute-dtype {args.compute_dtype} "
                 "disagree; give --compute-dtype only")
    return args


def resolve_config(args, notes: list | None = None):
    """The run's RunConfig from --config or --resume's config.json, flags and --set; a
    ConfigError or resume.ResumeError (or a fail()) naming the flag at fault. notes: a list that takes the notes on what was given (--resume's
    on changed values, resume.check_changes; model fields the data sets), for start() to print
    once the run is known to go ahead; without it they are printed at once."""
    from vit import finetune, runconfig  # noqa: PLC0415

    said = []  # notes
    if args.resume:
        run_dir = Path(args.resume)
        if args.config is not None:  # it would be silently ignored: the run's own config is used
            fail(f"--config {args.config}: --resume {run_dir} continues that run with its own "
                 f"config ({run_dir / 'config.json'}); leave --config out (flags and --set may "
                 "still change its training values)")
        base, where, said = resume.saved_config(run_dir)
        saved_base = base  # merge() copies: this stays as saved
    else:
        path = args.config
        where = f"--config {path}"
        if path is None:
            name = "digits.toml" if args.dataset == "digits" else "seed.toml"
            path = runconfig.CONFIG_DIR / name
            where = f"the default config {path} (no --config given)"
        base = runconfig.load_toml(path, where)
    sources = {}  # "section.key" -> the flag that set it, so an error blames the right source
    for flag, (dest, section, key) in NAMED_FLAGS.items():
        value = getattr(args, dest)
        if value is not None:
            base = runconfig.merge(base, section, key, value)
            sources[f"{section}.{key}"] = f"{flag} {value}"
    for text in args.set:
        section, key, value = runconfig.parse_override(text)
        name = f"{section}.{key}"
        if name in sources and base[section][key] != value:  # the later would win in silence
            fail(f"{sources[name]} and --set {text} both set {name}, to different values; give "
                 "one of them")
        base = runconfig.merge(base, section, key, value)
        sources[name] = f"--set {text}"
    if args.resume and "train.accum_steps" in sources:
        # before from_dict, whose message would offer a batch size that --resume refuses
        resume.check_accum_steps(base, sources["train.accum_steps"], run_dir)
    if not args.resume or "train.init_from" in sources:  # fine-tuning: the source's model
        base, notes_ = finetune.resolve_model(base, sources, where)
        said += notes_
    cfg = runconfig.from_dict(base, where, sources)
    cfg.data = resolve_data(cfg.data, args.resume, sources, where)
    t = cfg.train
    if t.warmup_epochs > t.epochs:  # never leaves warmup: it peaks at lr * epochs / warmup
        said.append(f"train.py: note: train.warmup_epochs = {t.warmup_epochs:g} is above "
                    f"train.epochs = {t.epochs}: the learning rate rises all run long and peaks "
                    f"at {t.hparams.lr * t.epochs / t.warmup_epochs:.3g}, not train.lr = "
                    f"{t.hparams.lr:g}")
    if "model.drop_path" in sources and cfg.model.drop_path and cfg.model.layers == 1:
        # block i's rate: drop_path * i / (layers - 1)
        said.append(f"train.py: note: model.drop_path = {cfg.model.drop_path:g} drops nothing in "
                    "a model of one block: its rate rises from 0 at the first block to "
                    "model.drop_path at the last")
    written = base.get("model", {}).get("image_size")  # by --config's file (no flag set it)
    if args.config is not None and not args.resume and "model.image_size" not in sources and written:
        pad = 0 if "train.crop_pad" in sources else cfg.train.hparams.crop_pad
        said += runconfig.image_size_notes(args.config, written, cfg.data, pad)
    followed = [sources[k] for k in ("model.image_size", "model.channels", "model.num_classes")
                if k in sources]
    said += [f"train.py: note: {', '.join(followed)}: the model takes its image size, channels "
             "and classes from the data (data.image_size sizes an image folder's images)"] if followed else []
    if args.resume:
        said += resume.check_changes(runconfig.from_dict(saved_base, where), cfg, sources, run_dir)
        if "data.data_dir" not in sources:  # the run's own folder, which may have moved since
            from vit.data import DatasetError, check_run_data_dir  # noqa: PLC0415
            try:
                check_run_data_dir(cfg.data.dataset, cfg.data.data_dir, f"--resume {run_dir}")
            except DatasetError as err:
                fail(str(err))
    if notes is None:
        for note in said:
            print(note, file=sys.stderr)
    else:
        notes.extend(said)
    return cfg


def resolve_data(d, resuming: bool, sources: dict, where: str):
    """The run's [data] d (a runconfig.DataSection) with its folders as absolute paths and, for a
    new run, the dataset its folder holds (vit.data.folder_dataset); a fail() naming the flag or
    file that set a data.image_size the folder's dataset cannot take."""
    from vit.data import folder_dataset, found_image_size_refusal  # noqa: PLC0415

    for key in ("data_dir", "cache_dir"):  # as absolute paths: config.json names the same folders
        value = getattr(d, key)            # to evaluate.py and --resume from any directory
        if value is not None and (not resuming or f"data.{key}" in sources):
            d = dataclasses.replace(d, **{key: os.path.abspath(os.path.expanduser(value))})
    if resuming:
        return d
    if "data.dataset" not in sources:  # a Tiny ImageNet config, an image folder
        d = dataclasses.replace(d, dataset=folder_dataset(d.dataset, d.data_dir, d.layout))
    if why := found_image_size_refusal(d.dataset, d.data_dir, d.layout, d.image_size):
        fail(f"{sources.get('data.image_size', f'{where}: data.image_size={d.image_size}')}: "
             f"{why} (leave data.image_size unset)")
    return d


# ----------------------------------------------------------------------------------------------
# the run directory: checked before any work, made only once the run is about to start


def check_writable(run_dir: Path, flag: str):
    """Before any work: the run directory (or the folder it will be made in) takes files."""
    folder = run_dir
    try:
        if run_dir.exists() and not run_dir.is_dir():
            fail(f"{flag} {run_dir} is a file, not a directory")
        while not folder.exists():  # the nearest folder that exists: run_dir will be made there
            folder = folder.parent
        if not folder.is_dir():
            fail(f"{flag} {run_dir}: {folder} is a file, not a directory")
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        where = run_dir if folder == run_dir else f"{folder} (where {run_dir} would be made)"
        fix = "fix its permissions or " if e.errno in (errno.EACCES, errno.EPERM) else ""
        fail(f"{flag} {run_dir}: {where} is not writable ({e.strerror or e}); {fix}" +
             ("choose another --out" if flag == "--out" else "copy the run somewhere writable "
              "and --resume it there"))


def hold_run_dir(run_dir: Path):
    """One train.py at a time in a run directory (vit/runlock.py), or fail() naming the other."""
    from vit import runlock  # noqa: PLC0415
    try:
        runlock.hold(run_dir)
    except runlock.Busy as err:
        fail(str(err))


def choose_run_dir(args, cfg, main_process: bool) -> Path:
    if args.resume:
        run_dir = Path(args.resume)
        if main_process:
            check_writable(run_dir, "--resume")
            hold_run_dir(run_dir)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(args.out or f"runs/{cfg.data.dataset}-{stamp}")
        if main_process:
            check_writable(run_dir, "--out")
            if run_dir.is_dir():
                hold_run_dir(run_dir)
        if (run_dir / "last.npz").exists():
            fail(f"--out {run_dir} already holds a run (last.npz); continue it with --resume "
                 f"{run_dir} or choose another --out")
    if (run_dir / "last.npz").exists():
        return run_dir
    # no last.npz: a run starts from the beginning there, so it must not write over what an
    # earlier run kept (--resume of a run that stopped before its first checkpoint starts it)
    kept = [name for name in ("best.npz", "metrics.jsonl") if (run_dir / name).exists()]
    if kept and args.resume:
        best = run_dir / "best.npz"
        fail(f"--resume {run_dir}: no last.npz there to continue from, and starting again would "
             f"overwrite its {' and '.join(kept)}"
             + (f"; to continue from best.npz, cp {quote(str(best))} "
                f"{quote(str(run_dir / 'last.npz'))} and run again"
                if best.exists() else ""))
    if kept:
        fail(f"--out {run_dir} holds {' and '.join(kept)} of an earlier run (with no last.npz to "
             "continue it from), which a new run would overwrite; choose another --out, or move "
             "them away first")
    if args.resume:
        print(f"resuming {run_dir}: it has no last.npz (it stopped before its first checkpoint), "
              "so it starts from the beginning")
    return run_dir


def main(argv=None, *, standalone=False) -> int:
    """standalone: this process is `python train.py` itself, so a SIGINT/SIGTERM ends in exit
    code 130 after the checkpoint. Otherwise (called from Python) the signal is passed on to the
    handler that was there before, once the checkpoint is saved (see the module docstring)."""
    args = parse_args(argv)
    from vit import runlock  # noqa: PLC0415
    try:
        return _main(args, standalone)
    finally:
        runlock.release_all()  # train.main called from Python: the next call may take the run


def _main(args, standalone: bool) -> int:
    try:
        with cmdline.InterruptWhileStarting() as interrupt:
            started = start(args, interrupt.check)
    except KeyboardInterrupt:  # Ctrl-C while loading the checkpoint or data: nothing written yet
        if not standalone:
            raise  # the caller's KeyboardInterrupt, as without train.py
        print("\ntrain.py: interrupted while starting (loading the data), before the first "
              "step: no checkpoint was written" + (f", {args.resume} is as it was" if args.resume
                                                   else "") + "; run the same command again",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    if started is None:  # a finished run: nothing to train
        return 0
    return run_training(args, started, standalone=standalone)


def start(args, check_interrupt=lambda: None):
    """Config, processes, run directory, checkpoint, op set, data and steps of the run: -> the
    training.Run (None for a finished run: nothing to train, its data not even loaded), or
    fail() naming what is wrong. Writes no file of the run. check_interrupt() raises the
    KeyboardInterrupt of a Ctrl-C that a callback swallowed (before the data loads)."""
    from vit.runconfig import ConfigError  # noqa: PLC0415
    notes = []  # resolve_config's notes: printed (by process 0) once the run goes ahead
    try:
        cfg = resolve_config(args, notes)
    except (ConfigError, resume.ResumeError) as err:
        fail(str(err))
    import jax  # noqa: PLC0415

    from vit import parallel, training  # noqa: PLC0415
    try:
        cmdline.start_processes(args)  # before any other JAX call
        main_process = parallel.is_main_process()
        ops = cmdline.build_ops(args)  # a bad flag is refused before any note is printed
        cmdline.check_ops_run(ops, cfg.model)
        run_dir = choose_run_dir(args, cfg, main_process)
        resumed = resume.load_checkpoint(run_dir) if args.resume and (run_dir / "last.npz").exists() \
            else None
        if resumed is not None:
            notes += resume.check_config_json(run_dir, resumed[1], cfg)
        resume.check_position(resumed and resumed[1], cfg.train.epochs, args.stop_after_epoch, run_dir)
        if main_process:  # once per run, as the run's other output
            for note in notes:
                print(note, file=sys.stderr)
        if resumed is not None and resumed[1]["epoch"] >= cfg.train.epochs:
            if main_process:  # its files stay as they are (not config.json with new flags)
                print(f"resuming {run_dir}: all {cfg.train.epochs} epochs are done already, "
                      "nothing to train and nothing written (raise --epochs to train on)")
            return None
        check_interrupt()  # JAX has started: a Ctrl-C until now may have landed in its gc callback
        if args.dot_precision and cfg.train.compute_dtype != "fp32" and main_process:
            print(f"train.py: note: --dot-precision {args.dot_precision} sets the kernels' float32 "
                  f"dots; with train.compute_dtype = {cfg.train.compute_dtype} it changes nothing",
                  file=sys.stderr)
        run = training.start_run(cfg, run_dir, ops, args.devices, resumed, main_process,
                                 progress=not args.no_progress)
    except (cmdline.UsageError, training.RunError, ValueError) as err:
        fail(str(err))
    return run


def run_training(args, run, *, standalone: bool) -> int:
    import jax  # noqa: PLC0415

    from vit import runlock, training  # noqa: PLC0415

    with training.StopOnSignal(standalone) as stop:
        try:
            created = training.make_run_dir(run)
        except runlock.Busy as err:  # another run took this new folder while the data loaded
            fail(str(err))
        t = run.cfg.train
        accum = t.hparams.accum_steps
        micro = f" ({accum} micro-batches of {t.batch_size // accum})" if accum > 1 else ""
        print(f"run directory: {run.run_dir}\nmodel: {run.cfg.model}\ndevices: "
              f"{run.mesh.devices.size} x {jax.devices()[0].platform}, {run.steps_per_epoch} "
              f"steps/epoch of {t.batch_size}{micro}, compute dtype {t.compute_dtype}, ops: "
              f"{run.ops.description}")
        try:
            outcome = training.train(run, stop, args.stop_after_epoch)
        finally:
            if created and not (run.run_dir / "last.npz").exists():
                # stopped before its first checkpoint: leave no run directory holding only config.json
                runlock.release(run.run_dir)
                (run.run_dir / "config.json").unlink(missing_ok=True)
                try:
                    run.run_dir.rmdir()
                except OSError:
                    pass
    if outcome == training.LEFT and standalone:
        # a second signal may have unwound a JAX call half-way (a step compiling), after which
        # the interpreter's teardown crashed (SIGSEGV): leave without it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
    return {training.DONE: 0, training.STOPPED: EXIT_INTERRUPTED, training.LEFT: EXIT_INTERRUPTED,
            training.NONFINITE: EXIT_NONFINITE}[outcome]


if __name__ == "__main__":
    sys.exit(main(standalone=True))
