"""Train the ViT:  python train.py [--config FILE] [--dataset tiny-imagenet|digits] ...

Every epoch: a progress bar (loss, accuracy, images/s, ETA), validation top-1/top-5/loss,
checkpoints RUN_DIR/last.npz (every epoch) and RUN_DIR/best.npz (best validation top-1) written
atomically, then a line in RUN_DIR/metrics.jsonl and RUN_DIR/curves.png redrawn. `--resume RUN_DIR`
continues exactly where it stopped, and first rewrites metrics.jsonl from the checkpoint's own
history, so the two agree whatever moment a crash came at. The run directory is checked for
writing before any work; a start that fails leaves no run directory behind.

Exit codes:
    0    every epoch done
    130  stopped early with last.npz saved at the current step, to be continued with --resume:
         by Ctrl-C (SIGINT), SIGTERM, or --stop-after-epoch K (a stop asked for in advance is
         still a stop before the end, so a script can tell "finished" from "resume me")
    3    the training loss became NaN/Inf: stopped, last.npz is left as it was
    2    bad usage or input (a flag, config value, data or checkpoint file): the message names it
A second Ctrl-C while stopping leaves at once without saving (also 130).

Called from Python (`train.main([...])`, as the tests do) rather than run as a script, a SIGINT or
SIGTERM still saves last.npz first, and is then passed on to the handler that was there before
(KeyboardInterrupt for SIGINT, termination for SIGTERM), so the calling program stops as it would
have without train.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

EXIT_INTERRUPTED = 130  # stopped early, last.npz saved: Ctrl-C, SIGTERM or --stop-after-epoch
EXIT_NONFINITE = 3
# what a resumable checkpoint holds besides params/opt
RESUME_META = ("epoch", "step_in_epoch", "global_step", "history", "running", "best_top1",
               "mean", "std")
# named flags: (section, key) of the config value each overrides
NAMED_FLAGS = {"--dataset": ("data", "dataset"), "--data-dir": ("data", "data_dir"),
               "--epochs": ("train", "epochs"), "--batch-size": ("train", "batch_size"),
               "--lr": ("train", "lr"), "--precision": ("train", "precision"),
               "--seed": ("train", "seed")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python train.py",
        description="Train the hand-differentiated ViT. Configs are TOML files with [model], "
                    "[train] and [data] sections (configs/*.toml); every value can be "
                    "overridden here, by a named flag or by --set section.key=value; a flag "
                    "left out keeps the config's value.")
    p.add_argument("--config", default=None,
                   help="TOML config file (default: configs/seed.toml, or configs/digits.toml "
                        "with --dataset digits)")
    p.add_argument("--dataset", choices=["tiny-imagenet", "digits"], default=None,
                   help="data.dataset: Tiny ImageNet (download it with `python -m vit.data "
                        "download`) or scikit-learn's bundled 8x8 digits (no download)")
    p.add_argument("--data-dir", default=None,
                   help="data.data_dir: the folder holding tiny-imagenet-200/ (or that folder)")
    p.add_argument("--epochs", type=int, default=None, help="train.epochs: epochs in total")
    p.add_argument("--batch-size", type=int, default=None, help="train.batch_size: global batch")
    p.add_argument("--lr", type=float, default=None, help="train.lr: peak learning rate")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="train.precision: bf16 = bf16 activations/matmuls, fp32 master weights")
    p.add_argument("--seed", type=int, default=None, help="train.seed: init, data order, masks")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config value, e.g. --set model.layers=4 "
                        "--set train.mixup_alpha=0.8 (repeatable)")
    p.add_argument("--out", default=None,
                   help="run directory for checkpoints, metrics.jsonl and curves.png "
                        "(default: runs/<dataset>-<date>-<time>)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last checkpoint, exactly; its "
                        "config is used (--epochs may extend it)")
    p.add_argument("--fused", action="store_true",
                   help="use the fused Triton kernels for attention and residual+LayerNorm")
    p.add_argument("--interpret", action="store_true",
                   help="with --fused on a machine without a GPU: run the kernels in Triton's "
                        "(slow) CPU interpreter")
    p.add_argument("--devices", type=int, default=None,
                   help="data-parallel over this many devices (default: all; 1 = no sharding)")
    p.add_argument("--coordinator", default=None,
                   help="multi-host: address host:port of process 0 (jax.distributed)")
    p.add_argument("--num-processes", type=int, default=None, help="multi-host: process count")
    p.add_argument("--process-id", type=int, default=None, help="multi-host: this process's id")
    p.add_argument("--stop-after-epoch", type=int, default=None, metavar="K",
                   help="stop after epoch K with last.npz saved and exit 130, as Ctrl-C does; "
                        "continue later with --resume")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def fail(message: str, code: int = 2):
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(code)


# ----------------------------------------------------------------------------------------------
# configuration


def resolve_config(args):
    from vit import runconfig  # noqa: PLC0415

    if args.resume:
        run_dir = Path(args.resume)
        saved = run_dir / "config.json"
        if not saved.is_file():
            fail(f"--resume {run_dir}: no config.json there; is it a run directory?")
        base = json.loads(saved.read_text())
        where = str(saved)
    else:
        path = args.config
        if path is None:
            name = "digits.toml" if args.dataset == "digits" else "seed.toml"
            path = runconfig.CONFIG_DIR / name
        base = runconfig.load_toml(path)
        where = f"--config {path}"
    sources = {}  # "section.key" -> the flag that set it, so an error blames the right source
    for flag, (section, key) in NAMED_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            base = runconfig.merge(base, section, key, value)
            sources[f"{section}.{key}"] = f"{flag} {value}"
    for text in args.set:
        section, key, value = runconfig.parse_override(text)
        base = runconfig.merge(base, section, key, value)
        sources[f"{section}.{key}"] = f"--set {text}"
    return runconfig.from_dict(base, where, sources)


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
        fail(f"{flag} {run_dir}: {where} is not writable ({e.strerror or e}); fix its "
             "permissions or choose another --out")


def load_resume_checkpoint(run_dir: Path):
    """last.npz of run_dir, or fail() naming what is wrong with it, offering best.npz if sound."""
    from vit import checkpoint  # noqa: PLC0415

    last, best = run_dir / "last.npz", run_dir / "best.npz"
    try:
        return checkpoint.load(last, meta_keys=RESUME_META, trees=("params", "opt"))
    except checkpoint.CheckpointError as err:
        message = f"--resume {run_dir}: {err}."
    if best.is_file():
        try:
            meta = checkpoint.load(best, meta_keys=RESUME_META, trees=("params", "opt"))[1]
            message += (f" {best} is sound (end of epoch {meta['epoch']}): to continue from it, "
                        f"cp {best} {last} and run python train.py --resume {run_dir} again.")
        except checkpoint.CheckpointError as err2:
            message += f" No way out through {best} either: {err2}."
    fail(message)


def write_metrics(path: Path, history: list[dict]):
    """metrics.jsonl as exactly the given records, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(record) + "\n" for record in history))
    os.replace(tmp, path)


def fit_model_to_data(cfg, train_set):
    """The model follows the data: image size, channels and classes come from the dataset."""
    _, h, w, c = train_set.images.shape
    if h != w:
        fail(f"images must be square, the dataset has {h}x{w}")
    model = cfg.model
    changes = {k: v for k, v in dict(image_size=h, channels=c,
                                     num_classes=train_set.num_classes).items()
               if getattr(model, k) != v}
    if changes:
        try:
            cfg.model = model.replace(**changes)
        except ValueError as err:
            fail(f"{err} (the dataset's images are {h}x{w}x{c}; set a patch size that divides "
                 f"{h}, e.g. --set model.patch_size={max(1, h // 8)})")
    return cfg


# ----------------------------------------------------------------------------------------------
# curves


def plot_curves(history: list[dict], path: Path):
    """Train vs val accuracy and loss per epoch, written atomically."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    epochs = [h["epoch"] for h in history]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    ax_acc.plot(epochs, [100 * h["train_accuracy"] for h in history], "o-", label="train")
    ax_acc.plot(epochs, [100 * h["val_top1"] for h in history], "o-", label="val top-1")
    ax_acc.plot(epochs, [100 * h["val_top5"] for h in history], "--", label="val top-5")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# the run


class Interrupted(Exception):
    pass


class InterruptedTwice(Exception):
    pass


def main(argv=None, *, standalone=False) -> int:
    """standalone: this process is `python train.py` itself, so a SIGINT/SIGTERM ends in exit
    code 130 after the checkpoint. Otherwise (called from Python) the signal is passed on to the
    handler that was there before, once the checkpoint is saved (see the module docstring)."""
    args = build_parser().parse_args(argv)
    if args.interpret and not args.fused:
        fail("--interpret only makes sense with --fused")

    from vit.runconfig import ConfigError  # noqa: PLC0415
    try:
        cfg = resolve_config(args)
    except ConfigError as err:
        fail(str(err))

    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from vit import checkpoint, parallel  # noqa: PLC0415
    from vit.data import DatasetError, load_dataset  # noqa: PLC0415
    from vit.data.loader import Batcher, channel_stats  # noqa: PLC0415
    from vit.model import init_params  # noqa: PLC0415
    from vit.optim import adamw_init  # noqa: PLC0415

    try:
        parallel.init_distributed(args.coordinator, args.num_processes, args.process_id)
    except ValueError as err:
        fail(str(err))
    main_process = parallel.is_main_process()

    # --- run directory: checked before any work; made only once the run is about to start ----
    d = cfg.data
    if args.resume:
        run_dir = Path(args.resume)
        if main_process:
            check_writable(run_dir, "--resume")
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(args.out or f"runs/{d.dataset}-{stamp}")
        if main_process:
            check_writable(run_dir, "--out")
        if (run_dir / "last.npz").exists():
            fail(f"--out {run_dir} already holds a run (last.npz); continue it with --resume "
                 f"{run_dir} or choose another --out")
    resumed = None
    if args.resume and (run_dir / "last.npz").exists():
        resumed = load_resume_checkpoint(run_dir)

    interpret = None
    if args.fused:
        if jax.default_backend() != "gpu" and not args.interpret:
            fail("--fused needs a GPU for compiled Triton kernels, and this machine has none "
                 f"(JAX backend: {jax.default_backend()}). Add --interpret to run the same "
                 "kernels in Triton's CPU interpreter: correct but very slow, for tiny runs.")
        interpret = True if args.interpret else None

    # --- data -------------------------------------------------------------------------------
    progress = not args.no_progress
    try:
        train_set = load_dataset(d.dataset, d.data_dir, "train", workers=d.workers,
                                 skip_bad_images=d.skip_bad_images, progress=progress)
        val_set = load_dataset(d.dataset, d.data_dir, "val", workers=d.workers,
                               skip_bad_images=d.skip_bad_images, progress=progress)
    except DatasetError as err:
        fail(str(err))
    cfg = fit_model_to_data(cfg, train_set)
    t = cfg.train

    # --- devices ------------------------------------------------------------------------------
    mesh = parallel.make_mesh(args.devices)
    n_dev = mesh.devices.size
    if t.batch_size % n_dev:
        fail(f"--batch-size {t.batch_size} is not divisible by the {n_dev} devices in use; "
             f"pick a multiple of {n_dev} or pass --devices")

    # --- state: fresh or resumed ---------------------------------------------------------------
    history: list[dict] = []
    if resumed is not None:
        trees, meta = resumed
        params, opt_state = trees["params"], trees["opt"]
        mean, std = np.asarray(meta["mean"], np.float32), np.asarray(meta["std"], np.float32)
        epoch, step_in_epoch = meta["epoch"], meta["step_in_epoch"]
        history = meta["history"]
        running = meta["running"]
        best_top1 = meta["best_top1"]
        print(f"resuming {run_dir} at epoch {epoch + 1}, step {step_in_epoch} "
              f"(global step {meta['global_step']})")
    else:
        params = init_params(jax.random.PRNGKey(t.seed), cfg.model)
        opt_state = adamw_init(params)
        mean, std = channel_stats(train_set.images)
        epoch, step_in_epoch = 0, 0
        running = {"loss": 0.0, "correct": 0.0, "seen": 0}
        best_top1 = -1.0

    # every process reads the same seeded global order and gathers only its rows of each batch
    batcher = Batcher(train_set.images, train_set.labels, t.batch_size, seed=t.seed,
                      rows=parallel.process_batch_slice(t.batch_size, mesh))
    eval_bs = -(-t.eval_batch_size // n_dev) * n_dev  # a multiple of the device count
    val_batcher = Batcher(val_set.images, val_set.labels, eval_bs, seed=0, shuffle=False,
                          drop_last=False, rows=parallel.process_batch_slice(eval_bs, mesh))
    spe = batcher.steps_per_epoch()
    if spe == 0:
        fail(f"--batch-size {t.batch_size} is larger than the training set "
             f"({len(train_set.labels)} images)")
    hp = cfg.hparams(spe)
    common = dict(fused=args.fused, interpret=interpret, mean=mean, std=std, precision=t.precision)
    train_step = parallel.make_parallel_train_step(cfg.model, hp, mesh, **common)
    eval_step = parallel.make_parallel_eval_step(cfg.model, mesh, **common)
    params, opt_state = parallel.replicate((params, opt_state), mesh)
    base_key = jax.random.PRNGKey(t.seed)

    def save(name, epoch_, step_in_epoch_, running_):
        if not main_process:
            return
        host_params, host_opt = parallel.gather_to_host((params, opt_state))
        meta = {"epoch": epoch_, "step_in_epoch": step_in_epoch_,
                "global_step": epoch_ * spe + step_in_epoch_, "history": history,
                "running": running_, "best_top1": best_top1, "mean": [float(x) for x in mean],
                "std": [float(x) for x in std], "config": cfg.to_dict(), "seed": t.seed,
                "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        checkpoint.save(run_dir / f"{name}.npz", {"params": host_params, "opt": host_opt}, meta)

    # Ctrl-C / SIGTERM: finish the step in flight, save, exit.
    stop = {"signal": None}

    def on_signal(signum, _frame):
        if stop["signal"] is not None:  # a second Ctrl-C: the user insists
            raise InterruptedTwice
        stop["signal"] = signum
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    from tqdm import tqdm  # noqa: PLC0415

    # --- the run directory, made now that nothing more can fail before training --------------
    created_run_dir = main_process and not run_dir.exists()
    if main_process:
        from vit.runconfig import dumps  # noqa: PLC0415
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(dumps(cfg) + "\n")
        if resumed is not None:  # the checkpoint's history is the record: metrics.jsonl follows it
            write_metrics(run_dir / "metrics.jsonl", history)

    print(f"run directory: {run_dir}\nmodel: {cfg.model}\ndevices: {n_dev} x "
          f"{jax.devices()[0].platform}, {spe} steps/epoch of {t.batch_size}, "
          f"precision {t.precision}, {'fused' if args.fused else 'reference'} ops")
    try:
        while epoch < t.epochs:
            bar = tqdm(total=spe, initial=step_in_epoch, desc=f"epoch {epoch + 1}/{t.epochs}",
                       disable=not (progress and main_process), unit="step", leave=True)
            pending = None  # metrics of the step in flight, read one step late (no stall)
            t0, images_done = time.perf_counter(), 0

            def account(m, n_images):
                loss = float(m["loss"])
                if not math.isfinite(loss):
                    raise FloatingPointError(loss)
                running["loss"] += loss * n_images
                running["correct"] += float(m["accuracy"]) * n_images
                running["seen"] += n_images
                return loss

            for images, labels in batcher.epoch(epoch, step_in_epoch):
                gstep = epoch * spe + step_in_epoch
                images, labels = parallel.shard_batch(mesh, images, labels)
                key = jax.random.fold_in(base_key, gstep)
                new_params, new_opt, m = train_step(params, opt_state, images, labels, key)
                if pending is not None:
                    account(*pending)
                    bar.update(1)
                params, opt_state = new_params, new_opt
                pending = (m, t.batch_size)
                step_in_epoch += 1
                images_done += t.batch_size
                if bar.n % 10 == 0 and running["seen"]:
                    rate = images_done / (time.perf_counter() - t0)
                    bar.set_postfix(loss=f"{running['loss'] / running['seen']:.3f}",
                                    acc=f"{100 * running['correct'] / running['seen']:.1f}%",
                                    img_s=f"{rate:.0f}")
                if stop["signal"] is not None:
                    break
            if pending is not None:
                account(*pending)
                bar.update(1)
            bar.close()
            if stop["signal"] is not None:
                raise Interrupted
            # --- end of epoch: validate, log, plot, checkpoint ---------------------------------
            sums = {"loss_sum": 0.0, "top1": 0.0, "top5": 0.0, "count": 0.0}
            for images, labels, valid in val_batcher.eval_batches():
                images, labels, valid = parallel.shard_batch(mesh, images, labels, valid)
                out = eval_step(params, images, labels, valid)
                for k in sums:
                    sums[k] += float(out[k])
            n = max(sums["count"], 1.0)
            record = {"epoch": epoch + 1, "step": (epoch + 1) * spe,
                      "train_loss": running["loss"] / max(running["seen"], 1),
                      "train_accuracy": running["correct"] / max(running["seen"], 1),
                      "val_loss": sums["loss_sum"] / n, "val_top1": sums["top1"] / n,
                      "val_top5": sums["top5"] / n, "val_images": int(sums["count"]),
                      "lr": float(m["lr"]), "images_per_s": images_done / (time.perf_counter() - t0),
                      "time": time.strftime("%Y-%m-%d %H:%M:%S")}
            history.append(record)
            epoch, step_in_epoch = epoch + 1, 0
            running = {"loss": 0.0, "correct": 0.0, "seen": 0}
            # checkpoints first, then the metrics line: metrics.jsonl never gets ahead of last.npz
            # (and --resume rewrites it from last.npz's history)
            if record["val_top1"] > best_top1:
                best_top1 = record["val_top1"]
                save("best", epoch, 0, running)
            save("last", epoch, 0, running)
            if main_process:
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                plot_curves(history, run_dir / "curves.png")
                print(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f} "
                      f"acc {100 * record['train_accuracy']:.2f}% | val loss "
                      f"{record['val_loss']:.4f} top-1 {100 * record['val_top1']:.2f}% top-5 "
                      f"{100 * record['val_top5']:.2f}% | {record['images_per_s']:.0f} img/s",
                      flush=True)
            if args.stop_after_epoch is not None and epoch >= args.stop_after_epoch \
                    and epoch < t.epochs:
                print(f"stopping after epoch {epoch} as asked (exit code {EXIT_INTERRUPTED}); "
                      f"continue with python train.py --resume {run_dir}")
                return EXIT_INTERRUPTED
    except FloatingPointError as err:
        kept = (f"the last good checkpoint ({run_dir / 'last.npz'}) is untouched"
                if (run_dir / "last.npz").exists() else "no checkpoint had been written yet")
        print(f"\ntrain.py: the training loss became {err} at epoch {epoch + 1}, step "
              f"{step_in_epoch}. Training stopped; {kept}. Try a lower --lr, gradient clipping "
              "(--set train.clip_norm=1.0) or warmup (--set train.warmup_epochs=2).",
              file=sys.stderr)
        return EXIT_NONFINITE
    except Interrupted:  # first Ctrl-C / SIGTERM: the state is consistent at a step boundary
        save("last", epoch, step_in_epoch, running)
        print(f"\ninterrupted: saved {run_dir / 'last.npz'} at epoch {epoch + 1}, step "
              f"{step_in_epoch}; continue with python train.py --resume {run_dir}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except InterruptedTwice:  # a second Ctrl-C while stopping: leave without writing anything
        kept = (f"{run_dir / 'last.npz'} holds the last completed epoch"
                if (run_dir / "last.npz").exists() else "no checkpoint had been written yet")
        print(f"\ninterrupted twice: exiting without saving; {kept}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if created_run_dir and not (run_dir / "last.npz").exists():
            # stopped before its first checkpoint: leave no run directory holding only config.json
            (run_dir / "config.json").unlink(missing_ok=True)
            try:
                run_dir.rmdir()
            except OSError:
                pass
        if stop["signal"] is not None and not standalone:
            # called from Python: with last.npz saved, the caller's own handler gets the signal
            # it would have got without train.py (KeyboardInterrupt, termination, ...)
            signal.raise_signal(stop["signal"])
    print(f"done: best val top-1 {100 * best_top1:.2f}%; run directory {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(standalone=True))
