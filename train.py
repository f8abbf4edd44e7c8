"""Train the ViT:  python train.py [--config FILE] [--dataset tiny-imagenet|digits] ...

Every epoch: a progress bar (loss, accuracy, images/s, ETA), validation top-1/top-5/loss, a line
in RUN_DIR/metrics.jsonl, RUN_DIR/curves.png redrawn, and checkpoints RUN_DIR/last.npz (every
epoch) and RUN_DIR/best.npz (best validation top-1), written atomically. Ctrl-C (or SIGTERM) saves
a checkpoint at the current step and exits; `--resume RUN_DIR` continues exactly where it stopped.
A NaN/Inf loss stops the run with a message and leaves the last good checkpoint untouched.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import cmdline

EXIT_INTERRUPTED = 130
EXIT_NONFINITE = 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python train.py",
        description="Train the hand-differentiated ViT. Configs are TOML files with [model], "
                    "[train] and [data] sections (configs/*.toml); every value can be "
                    "overridden here, by a named flag or by --set section.key=value.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None,
                   help="TOML config file (default: configs/seed.toml, or configs/digits.toml "
                        "with --dataset digits)")
    p.add_argument("--dataset", choices=["tiny-imagenet", "image-folder", "digits"], default=None,
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
    p.add_argument("--lr", type=float, default=None, help="train.lr: peak learning rate")
    p.add_argument("--compute-dtype", choices=["fp32", "bf16"], default=None,
                   help="train.compute_dtype: bf16 = bf16 activations/matmuls, fp32 master weights")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, dest="old_precision",
                   help="the old name of --compute-dtype (still works, with a note)")
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
    cmdline.add_ops_flags(p)
    p.add_argument("--devices", type=int, default=None,
                   help="data-parallel over this many devices (default: all; 1 = no sharding)")
    cmdline.add_distributed_flags(p)
    p.add_argument("--stop-after-epoch", type=int, default=None, metavar="K",
                   help="stop cleanly after epoch K (checkpoint saved) as if interrupted; "
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
    named = {("data", "dataset"): args.dataset, ("data", "data_dir"): args.data_dir,
             ("train", "epochs"): args.epochs, ("train", "batch_size"): args.batch_size,
             ("train", "lr"): args.lr, ("train", "compute_dtype"): args.compute_dtype,
             ("train", "seed"): args.seed}
    for (section, key), value in named.items():
        if value is not None:
            base = runconfig.merge(base, section, key, value)
    for text in args.set:
        section, key, value = runconfig.parse_override(text)
        base = runconfig.merge(base, section, key, value)
    return runconfig.from_dict(base, where)


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
            patch = min((p for p in range(1, h + 1) if h % p == 0), key=lambda p: abs(p - h / 8))
            fail(f"{err} (the dataset's images are {h}x{w}x{c}; set a patch size that divides "
                 f"{h}, e.g. --set model.patch_size={patch})")
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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.old_precision is not None:
        print("train.py: note: --precision is now called --compute-dtype (train.compute_dtype); "
              "the old name still works", file=sys.stderr)
        if args.compute_dtype not in (None, args.old_precision):
            fail(f"--precision {args.old_precision} and --compute-dtype {args.compute_dtype} "
                 "disagree; give --compute-dtype only")
        args.compute_dtype = args.old_precision

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
        cmdline.start_processes(args)
        ops = cmdline.build_ops(args)
    except (cmdline.UsageError, ValueError) as err:
        fail(str(err))
    main_process = parallel.is_main_process()

    # --- data -------------------------------------------------------------------------------
    d = cfg.data
    progress = not args.no_progress
    try:
        data_options = dict(workers=d.workers, skip_bad_images=d.skip_bad_images,
                            progress=progress, image_size=d.image_size, layout=d.layout)
        train_set = load_dataset(d.dataset, d.data_dir, "train", **data_options)
        val_set = load_dataset(d.dataset, d.data_dir, "val", **data_options)
    except DatasetError as err:
        fail(str(err))
    cfg = fit_model_to_data(cfg, train_set)
    t = cfg.train

    # --- run directory ----------------------------------------------------------------------
    if args.resume:
        run_dir = Path(args.resume)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(args.out or f"runs/{d.dataset}-{stamp}")
        if (run_dir / "last.npz").exists():
            fail(f"--out {run_dir} already holds a run (last.npz); continue it with --resume "
                 f"{run_dir} or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)

    # --- devices ------------------------------------------------------------------------------
    try:
        mesh = parallel.make_mesh(args.devices)
    except ValueError as err:
        fail(f"--devices {args.devices}: {err}")
    n_dev = mesh.devices.size
    if t.batch_size % n_dev:
        fail(f"--batch-size {t.batch_size} is not divisible by the {n_dev} devices in use; "
             f"pick a multiple of {n_dev} or pass --devices")

    # --- state: fresh or resumed ---------------------------------------------------------------
    history: list[dict] = []
    if args.resume and (run_dir / "last.npz").exists():
        trees, meta = checkpoint.load(run_dir / "last.npz")
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
    if main_process:
        from vit.runconfig import dumps  # noqa: PLC0415
        (run_dir / "config.json").write_text(dumps(cfg) + "\n")

    # every process reads the same seeded global order and gathers only its rows of each batch
    budget = d.device_budget_mb << 20  # above it, stream from the memory-mapped cache
    batcher = Batcher(train_set.images, train_set.labels, t.batch_size, seed=t.seed,
                      rows=parallel.process_batch_slice(t.batch_size, mesh),
                      device_budget_bytes=budget)
    eval_bs = -(-t.eval_batch_size // n_dev) * n_dev  # a multiple of the device count
    val_batcher = Batcher(val_set.images, val_set.labels, eval_bs, seed=0, shuffle=False,
                          drop_last=False, rows=parallel.process_batch_slice(eval_bs, mesh),
                          device_budget_bytes=budget)
    spe = batcher.steps_per_epoch()
    if spe == 0:
        fail(f"--batch-size {t.batch_size} is larger than the training set "
             f"({len(train_set.labels)} images)")
    hp = cfg.hparams(spe)
    common = dict(ops=ops, mean=mean, std=std, compute_dtype=t.compute_dtype)
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
                "class_names": list(train_set.class_names),
                "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        checkpoint.save(run_dir / f"{name}.npz", {"params": host_params, "opt": host_opt}, meta)

    # Ctrl-C / SIGTERM: finish the step in flight, save, exit.
    stop = {"signal": None}

    def on_signal(signum, _frame):
        if stop["signal"] is not None:  # a second Ctrl-C: the user insists
            raise KeyboardInterrupt
        stop["signal"] = signum
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    from tqdm import tqdm  # noqa: PLC0415

    print(f"data: {train_set.name}, {len(train_set)} train / {len(val_set)} val images of "
          f"{'x'.join(map(str, train_set.images.shape[1:]))}, {train_set.num_classes} classes"
          f"{'' if batcher.on_device else ' (streamed from the memory-mapped cache)'}")
    print(f"run directory: {run_dir}\nmodel: {cfg.model}\ndevices: {n_dev} x "
          f"{jax.devices()[0].platform}, {spe} steps/epoch of {t.batch_size}, "
          f"compute dtype {t.compute_dtype}, ops: {ops.description}")
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
            if main_process:
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                plot_curves(history, run_dir / "curves.png")
                print(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f} "
                      f"acc {100 * record['train_accuracy']:.2f}% | val loss "
                      f"{record['val_loss']:.4f} top-1 {100 * record['val_top1']:.2f}% top-5 "
                      f"{100 * record['val_top5']:.2f}% | {record['images_per_s']:.0f} img/s",
                      flush=True)
            if record["val_top1"] > best_top1:
                best_top1 = record["val_top1"]
                save("best", epoch, 0, running)
            save("last", epoch, 0, running)
            if args.stop_after_epoch is not None and epoch >= args.stop_after_epoch \
                    and epoch < t.epochs:
                print(f"stopping after epoch {epoch} as asked; continue with "
                      f"python train.py --resume {run_dir}")
                return 0
    except FloatingPointError as err:
        print(f"\ntrain.py: the training loss became {err} at epoch {epoch + 1}, step "
              f"{step_in_epoch}. Training stopped; the last good checkpoint "
              f"({run_dir / 'last.npz'}) is untouched. Try a lower --lr, gradient clipping "
              "(--set train.clip_norm=1.0) or warmup (--set train.warmup_epochs=2).",
              file=sys.stderr)
        return EXIT_NONFINITE
    except Interrupted:  # first Ctrl-C / SIGTERM: the state is consistent at a step boundary
        save("last", epoch, step_in_epoch, running)
        print(f"\ninterrupted: saved {run_dir / 'last.npz'} at epoch {epoch + 1}, step "
              f"{step_in_epoch}; continue with python train.py --resume {run_dir}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # a second Ctrl-C while stopping: leave without writing anything
        print(f"\ninterrupted twice: exiting without saving; {run_dir / 'last.npz'} holds the "
              "last completed epoch", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
    print(f"done: best val top-1 {100 * best_top1:.2f}%; run directory {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
