"""One training run, the part of train.py that is not the command line: load the data, fit the
model to it, set up the state (fresh or from a checkpoint) and the data-parallel steps, then train
epoch by epoch with validation, checkpoints, metrics.jsonl and curves.png, stopping on a signal.

    run = start_run(cfg, run_dir, ops, devices, resumed, main_process, progress)
    with StopOnSignal(standalone) as stop:
        created = make_run_dir(run)                      # also takes its lock (vit/runlock.py)
        outcome = train(run, stop, stop_after_epoch)     # DONE | STOPPED | LEFT | NONFINITE

Errors a user can fix (data, devices, batch size, image size) are RunErrors whose message names
the file or flag at fault; train.py prints them and exits 2.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from shlex import quote
from typing import Any, Callable

from vit import runlock
from vit.config import patch_size_hint
from vit.curves import plot_curves
from vit.runstate import position_in_words
from vit.signals import Interrupted, InterruptedTwice, StopOnSignal

DONE, STOPPED, LEFT, NONFINITE = "done", "stopped", "left", "nonfinite"  # how train() ended
# curves.png is redrawn after an epoch once this long has passed since it was last drawn, and
# when training stops: a drawing takes about 0.2 s, which every epoch was half of a digits run
CURVES_SECONDS = 10.0
# a run of several processes checks whether any was signalled every this many steps, all at once
STOP_CHECK_STEPS = 10


class RunError(ValueError):
    """A run cannot start: the message says what to change."""


def fit_model_to_data(cfg, train_set):
    """The model follows the data: image size, channels and classes come from the dataset."""
    _, h, w, c = train_set.images.shape
    if h != w:
        raise RunError(f"images must be square, the dataset has {h}x{w}")
    cfg.model = fitted_model(cfg.model, f"{h}x{w}x{c}", image_size=h, channels=c,
                             num_classes=train_set.num_classes)
    return cfg


def fitted_model(model, images: str, **fields):
    """model with fields (image_size among them) replaced, or a RunError suggesting a patch size
    that divides the images' side (images: how they are described in the message)."""
    changes = {k: v for k, v in fields.items() if getattr(model, k) != v}
    if not changes:
        return model
    try:
        return model.replace(**changes)
    except ValueError as err:
        raise RunError(f"{err} ({patch_size_hint(fields['image_size'], images)})") from None


def write_metrics(path: Path, history: list[dict]):
    """metrics.jsonl as exactly the given records, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(record) + "\n" for record in history))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# the run: set up once, then epochs


@dataclass
class Run:
    """Everything a training run works with, set up by start_run."""

    cfg: Any  # vit.runconfig.RunConfig, fitted to the data
    run_dir: Path
    ops: Any  # vit.ops.Ops
    mesh: Any
    state: Any  # vit.runstate.RunState (params and optimizer state replicated on the mesh)
    batcher: Any
    val_batcher: Any
    train_step: Callable
    eval_step: Callable
    hparams: Any  # vit.config.TrainHParams with this run's step counts
    steps_per_epoch: int
    class_names: list
    train_images: int  # how many: a resume on another count would mean other batches
    main_process: bool
    progress: bool
    resumed: bool
    saved_at: float = field(default_factory=time.monotonic)  # when last.npz was last written
    drawn: int = 0  # how many epochs of the history curves.png shows (0: not drawn by this run)
    drawn_at: float = float("-inf")  # when it was drawn
    compiled: bool = False  # whether this process has run (and so compiled) the train step

    def checkpoint_due(self) -> bool:
        """Whether train.checkpoint_minutes have passed since last.npz was written (or the run
        started), so that a mid-epoch save is due (process 0 only: it alone writes)."""
        minutes = self.cfg.train.checkpoint_minutes
        return (self.main_process and minutes > 0
                and time.monotonic() - self.saved_at >= 60 * minutes)

    def draw_curves(self, force: bool = False):
        """curves.png from the history, if it shows fewer epochs: after an epoch once CURVES_SECONDS
        have passed since the last drawing, or at once with force (at the end). Process 0 only."""
        history = self.state.history
        if not self.main_process or not history or self.drawn == len(history):
            return
        if force or time.monotonic() - self.drawn_at >= CURVES_SECONDS:
            plot_curves(history, self.run_dir / "curves.png", self.cfg.train.hparams.clip_norm,
                        min(5, self.cfg.model.num_classes))
            self.drawn, self.drawn_at = len(history), time.monotonic()

    def save(self, name: str):
        """RUN_DIR/<name>.npz from the current state (process 0 writes; a no-op elsewhere)."""
        if not self.main_process:
            return
        from vit import checkpoint, parallel  # noqa: PLC0415

        host_params, host_opt = parallel.gather_to_host((self.state.params, self.state.opt_state))
        trees, meta = self.state.to_checkpoint(
            host_params, host_opt, self.steps_per_epoch, config=self.cfg.to_dict(),
            seed=self.cfg.train.seed, class_names=self.class_names, train_images=self.train_images)
        checkpoint.save(self.run_dir / f"{name}.npz", trees, meta)
        if name == "last":
            self.saved_at = time.monotonic()


def load_data(cfg, progress: bool):
    """(train, val) datasets of the config's [data], and the config with the model fitted to them."""
    from vit.data import DatasetError, load_dataset  # noqa: PLC0415

    d = cfg.data
    if d.image_size is not None:  # known before any image is decoded into the cache
        fitted_model(cfg.model, f"{d.image_size}x{d.image_size} (data.image_size)",
                     image_size=d.image_size)
    try:
        options = dict(workers=d.workers, skip_bad_images=d.skip_bad_images, progress=progress,
                       image_size=d.image_size, layout=d.layout, cache_dir=d.cache_dir)
        train_set = load_dataset(d.dataset, d.data_dir, "train", **options)
        val_set = load_dataset(d.dataset, d.data_dir, "val", **options)
    except DatasetError as err:
        raise RunError(str(err)) from None
    return train_set, val_set, fit_model_to_data(cfg, train_set)


def start_run(cfg, run_dir: Path, ops, devices: int | None, resumed, main_process: bool,
              progress: bool) -> Run:
    """Data, devices, state and the jitted steps of a run (resumed: (trees, meta) of the
    checkpoint to continue, or None): every check that can fail happens here, before the run
    directory is made; a failure is a RunError naming what is wrong."""
    from vit import parallel  # noqa: PLC0415

    train_set, val_set, cfg = load_data(cfg, progress)
    if resumed is not None:  # --data-dir may point elsewhere on --resume: the same data only
        check_same_data(resumed[1], train_set, f"{cfg.data.data_dir} (data.data_dir)", run_dir)
    pad, size = cfg.train.hparams.crop_pad, cfg.model.image_size
    if pad >= size:  # reflect padding repeats the image's inner pixels: it needs more than pad
        raise RunError(f"train.crop_pad {pad} needs images larger than {pad} pixels, and this "
                       f"data's are {size}x{size}; pick a smaller --set train.crop_pad")
    try:
        mesh = parallel.make_mesh(devices)
    except ValueError as err:
        raise RunError(f"--devices {devices}: {err}") from None
    check_batch_split(cfg.train.batch_size, mesh.devices.size, cfg.train.hparams.accum_steps)
    state = initial_state(cfg, train_set, resumed, run_dir)
    return build_run(cfg, run_dir, ops, mesh, state, train_set, val_set, main_process, progress,
                     resumed is not None)


def check_same_data(meta: dict, train_set, where: str, run_dir: Path):
    """A RunError unless the training set found (where: its folder, as the message names it)
    has the classes and the number of images the checkpoint (meta) was trained on (when it
    saved them): other classes would mean other labels, another count other batches."""
    from vit.data.common import DatasetError, check_same_classes, check_same_count  # noqa: PLC0415

    position = position_in_words(meta["epoch"], meta["step_in_epoch"])
    try:
        check_same_classes(meta.get("class_names"), train_set.class_names, where, run_dir)
        check_same_count(meta.get("train_images"), len(train_set.labels), where, run_dir,
                         f"its position ({position}) would mean other batches and another "
                         "schedule; give the --data-dir it was trained on, or start a new run on "
                         "these images")
    except DatasetError as err:
        raise RunError(str(err)) from None


def check_batch_split(batch_size: int, devices: int, accum_steps: int):
    """The global batch splits evenly over the devices and, on each, into accum_steps
    micro-batches (vit.step.accumulated_grads): a RunError naming what to change if not."""
    if batch_size % devices:
        fewer = max(d for d in range(1, devices) if batch_size % d == 0)
        raise RunError(f"train.batch_size {batch_size} is not divisible by the {devices} devices "
                       f"in use; give --batch-size a multiple of {devices}, or use fewer devices "
                       f"(--devices {fewer})")
    if batch_size % (devices * accum_steps):
        raise RunError(f"train.batch_size {batch_size} does not split into "
                       f"{accum_steps} micro-batches (train.accum_steps) spread over the {devices} "
                       f"devices in use; give --batch-size a multiple of {devices * accum_steps}")


def initial_state(cfg, train_set, resumed, run_dir):
    """The checkpoint's RunState, or a fresh one (init from the seed, the data's statistics)."""
    import jax  # noqa: PLC0415

    from vit import finetune  # noqa: PLC0415
    from vit.data.loader import channel_stats, usable_std  # noqa: PLC0415
    from vit.model import init_params  # noqa: PLC0415
    from vit.optim import adamw_init  # noqa: PLC0415
    from vit.runstate import RunState  # noqa: PLC0415

    if resumed is not None:
        state = RunState.from_checkpoint(*resumed)
        print(f"resuming {run_dir} at epoch {state.epoch + 1}, step {state.step_in_epoch} "
              f"(global step {resumed[1]['global_step']})")
        return state
    if cfg.train.init_from is not None:  # fine-tuning: another run's weights and statistics
        return finetune.initial_state(cfg, train_set.class_names)
    params = init_params(jax.random.PRNGKey(cfg.train.seed), cfg.model)
    mean, std = channel_stats(train_set.images)
    return RunState.fresh(params, adamw_init(params), mean, usable_std(std))


def build_run(cfg, run_dir, ops, mesh, state, train_set, val_set, main_process, progress,
              resumed) -> Run:
    """This process's Batchers, the data-parallel train and eval steps, the state on the mesh."""
    from vit import parallel  # noqa: PLC0415
    from vit.data.loader import Batcher  # noqa: PLC0415

    t, n_dev = cfg.train, mesh.devices.size
    budget = cfg.data.device_budget_mb << 20  # above it, stream from the memory-mapped cache
    # every process reads the same seeded global order and gathers only its rows of each batch
    batcher = Batcher(train_set.images, train_set.labels, t.batch_size, seed=t.seed,
                      rows=parallel.process_batch_slice(t.batch_size, mesh),
                      device_budget_bytes=budget, repeats=t.repeat_augment)
    # no larger than the validation set (padding rows cost as much as real ones), and a multiple
    # of the device count
    eval_bs = -(-min(t.eval_batch_size, max(len(val_set.labels), 1)) // n_dev) * n_dev
    val_batcher = Batcher(val_set.images, val_set.labels, eval_bs, seed=0, shuffle=False,
                          drop_last=False, rows=parallel.process_batch_slice(eval_bs, mesh),
                          device_budget_bytes=budget)
    spe = batcher.steps_per_epoch()
    if spe == 0:
        raise RunError(f"train.batch_size {t.batch_size} is larger than the training set "
                       f"({len(train_set.labels)} images); give a smaller --batch-size")
    common = dict(ops=ops, mean=state.mean, std=state.std, compute_dtype=t.compute_dtype)
    hp = cfg.hparams(spe)
    train_step = parallel.make_parallel_train_step(cfg.model, hp, mesh, **common)
    eval_step = parallel.make_parallel_eval_step(cfg.model, mesh, **common)
    state.params, state.opt_state = parallel.replicate((state.params, state.opt_state), mesh)
    print(f"data: {train_set.name}, {len(train_set)} train / {len(val_set)} val images of "
          f"{'x'.join(map(str, train_set.images.shape[1:]))}, {train_set.num_classes} classes"
          f"{'' if batcher.on_device else ' (streamed from the memory-mapped cache)'}")
    return Run(cfg=cfg, run_dir=run_dir, ops=ops, mesh=mesh, state=state, batcher=batcher,
               val_batcher=val_batcher, train_step=train_step, eval_step=eval_step, hparams=hp,
               steps_per_epoch=spe, class_names=list(train_set.class_names),
               train_images=len(train_set.labels),
               main_process=main_process, progress=progress, resumed=resumed)


def make_run_dir(run: Run) -> bool:
    """Make the run directory, lock it (runlock.Busy if another process has), write config.json
    (resuming, metrics.jsonl too): -> whether it was made now (removed if no checkpoint follows)."""
    from vit.runconfig import dumps  # noqa: PLC0415

    if not run.main_process:
        return False
    created = not run.run_dir.exists()
    run.run_dir.mkdir(parents=True, exist_ok=True)
    runlock.hold(run.run_dir)  # before config.json: a no-op if train.py holds it already
    (run.run_dir / "config.json").write_text(dumps(run.cfg) + "\n")
    if run.resumed:  # the checkpoint's history is the record: metrics.jsonl follows it
        write_metrics(run.run_dir / "metrics.jsonl", run.state.history)
    return created


def train_epoch(run: Run, stop: StopOnSignal):
    """The rest of the current epoch, from state.step_in_epoch; -> (last metrics, images, seconds).
    Saves last.npz at a step boundary whenever train.checkpoint_minutes have passed since it was
    written. Raises Interrupted at a step boundary when a signal asked for a stop."""
    import jax  # noqa: PLC0415

    from vit import parallel  # noqa: PLC0415
    from vit.progress import progress_bar  # noqa: PLC0415
    from vit.step import step_keys  # noqa: PLC0415

    s, t, spe = run.state, run.cfg.train, run.steps_per_epoch
    step_key = step_keys(t.seed)
    bar = progress_bar(total=spe, initial=s.step_in_epoch, desc=f"epoch {s.epoch + 1}/{t.epochs}",
                       disable=not (run.progress and run.main_process), unit="step", leave=True)
    pending, m = None, None  # metrics of the step in flight, read one step late (no stall)
    several, stopped = jax.process_count() > 1, False
    t0, images_done = time.perf_counter(), 0

    def count(metrics):  # one step's metrics into the epoch's running sums
        host = jax.device_get(metrics)
        s.account(float(host["loss"]), float(host["accuracy"]), float(host["grad_norm"]),
                  t.batch_size)
        bar.update(1)

    def show_means():  # the running means so far, beside the bar
        elapsed = time.perf_counter() - t0
        if bar.disable or not s.running["seen"] or elapsed <= 0:
            return
        loss, acc = s.train_means()
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{100 * acc:.1f}%",
                        grad_norm=f"{s.grad_norms()[0] or 0:.3g}", img_s=f"{images_done / elapsed:.0f}")
    for images, labels in run.batcher.epoch(s.epoch, s.step_in_epoch):
        images, labels = parallel.shard_batch(run.mesh, images, labels)
        key = step_key(s.epoch * spe + s.step_in_epoch)
        called = time.perf_counter()
        new_params, new_opt, m = run.train_step(s.params, s.opt_state, images, labels, key)
        if not run.compiled:  # the first call compiles the step before it dispatches it
            run.compiled, compiling = True, time.perf_counter() - called
            t0 += compiling  # images/s counts training, not compiling; so does the bar's clock
            bar.unpause()
            if run.main_process:
                bar.write(f"compiled the training step in {compiling:.1f} s (not counted in img/s or s/step)")
        if pending is not None:
            count(pending)
        s.params, s.opt_state, pending = new_params, new_opt, m
        s.step_in_epoch += 1
        images_done += t.batch_size
        if s.step_in_epoch < spe and run.checkpoint_due():  # (the epoch's end saves anyway)
            count(pending)  # the state as an interrupt saves it: every step so far counted
            pending, started = None, time.perf_counter()
            run.save("last")
            t0 += time.perf_counter() - started  # images/s counts training time only, and so
            bar.unpause()                        # does the bar's clock
            bar.write(f"saved {run.run_dir / 'last.npz'} at epoch {s.epoch + 1}, step "
                      f"{s.step_in_epoch} (train.checkpoint_minutes = {t.checkpoint_minutes:g})")
        if bar.n % 10 == 0:
            show_means()
        # several processes agree on a stop every STOP_CHECK_STEPS steps: one stopped alone
        # left the others waiting in the next step's all-reduce
        if (s.step_in_epoch % STOP_CHECK_STEPS == 0 if several else stop.requested) \
                and parallel.any_process(stop.requested):
            stopped = True
            break
    if pending is not None:
        count(pending)
    show_means()  # the bar's last frame shows the epoch's figures, as its line below
    bar.close()
    if stopped or parallel.any_process(stop.requested):  # (at the epoch's end: every process)
        raise Interrupted
    return m, images_done, time.perf_counter() - t0


def finish_epoch(run: Run, last_metrics, images_done: int, seconds: float) -> dict:
    """Validate, then checkpoints first and the metrics line after them (metrics.jsonl never
    gets ahead of last.npz; --resume rewrites it from last.npz's history), the plot when due
    (Run.draw_curves), one line."""
    from vit import parallel  # noqa: PLC0415
    from vit.step import evaluate_batches, scheduled_lr  # noqa: PLC0415

    s = run.state
    if last_metrics is not None:
        lr = float(last_metrics["lr"])
    else:  # resumed after the epoch's last step: no step ran, the schedule gives its lr
        lr = float(scheduled_lr(run.hparams, (s.epoch + 1) * run.steps_per_epoch - 1))
    batches = (parallel.shard_batch(run.mesh, *b) for b in run.val_batcher.eval_batches())
    val = evaluate_batches(run.eval_step, s.params, batches)
    train_loss, train_accuracy = s.train_means()
    grad_norm, grad_norm_max = s.grad_norms()
    record = {"epoch": s.epoch + 1, "step": (s.epoch + 1) * run.steps_per_epoch,
              "train_loss": train_loss, "train_accuracy": train_accuracy,
              "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
              "val_images": val["count"], "lr": lr, "grad_norm": grad_norm,
              "grad_norm_max": grad_norm_max,
              "images_per_s": images_done / seconds, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if s.finish_epoch(record):
        run.save("best")
    run.save("last")
    if run.main_process:
        with open(run.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        run.draw_curves()
        print(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f} "
              f"acc {100 * record['train_accuracy']:.2f}% | val loss {record['val_loss']:.4f} "
              f"top-1 {100 * record['val_top1']:.2f}% top-{min(5, run.cfg.model.num_classes)} "
              f"{100 * record['val_top5']:.2f}% | {record['images_per_s']:.0f} img/s", flush=True)
    return record


def _remedies(t) -> str:
    """What to try against a NaN/Inf loss: a lower lr, and clipping or warmup where not on yet."""
    tries = ["a lower --lr"]
    if not t.hparams.clip_norm:
        tries.append("gradient clipping (--set train.clip_norm=1.0)")
    if not t.warmup_epochs:
        tries.append("warmup (--set train.warmup_epochs=2)")
    return ", ".join(tries[:-1]) + " or " + tries[-1] if len(tries) > 1 else tries[0]


def _interrupted_twice(last: Path) -> str:
    kept = (f"{last} is as it was last saved" if last.exists()
            else "no checkpoint had been written yet")
    print(f"\ninterrupted twice: exiting without saving; {kept}", file=sys.stderr)
    return LEFT


def train(run: Run, stop: StopOnSignal, stop_after_epoch: int | None) -> str:
    """Epochs until the config's last; -> how it ended: DONE, STOPPED (last.npz saved, to be
    resumed: a signal or stop_after_epoch), LEFT (a second signal: no save) or NONFINITE (the
    loss became NaN/Inf)."""
    from vit import parallel  # noqa: PLC0415

    s, epochs, last = run.state, run.cfg.train.epochs, run.run_dir / "last.npz"
    try:
        while s.epoch < epochs:
            if parallel.any_process(stop.requested):  # came during the last epoch's end: stop here
                raise Interrupted
            finish_epoch(run, *train_epoch(run, stop))
            if stop_after_epoch is not None and stop_after_epoch <= s.epoch < epochs:
                run.draw_curves(force=True)
                print(f"stopping after epoch {s.epoch} as asked; continue with python train.py "
                      f"--resume {quote(str(run.run_dir))}")
                return STOPPED
    except FloatingPointError as err:
        run.draw_curves(force=True)
        kept = (f"the last good checkpoint ({last}) is untouched" if last.exists()
                else "no checkpoint had been written yet")
        print(f"\ntrain.py: the training loss became {err} at epoch {s.epoch + 1}, step "
              f"{s.step_in_epoch}. Training stopped; {kept}. Try {_remedies(run.cfg.train)}.",
              file=sys.stderr)
        return NONFINITE
    except Interrupted:  # first Ctrl-C / SIGTERM: the state is consistent at a step boundary
        try:
            run.save("last")
            run.draw_curves(force=True)
        except InterruptedTwice:  # during the save: checkpoint.save replaces last.npz whole
            return _interrupted_twice(last)
        where = position_in_words(s.epoch, s.step_in_epoch)
        how = "" if stop.requested else " (another process was stopped)"
        if run.main_process:
            print(f"\ninterrupted{how}: saved {last} at {where}; "
                  f"continue with python train.py --resume {quote(str(run.run_dir))}", file=sys.stderr)
        else:  # process 0 writes last.npz
            print(f"\ninterrupted{how} at {where}: process 0 saves last.npz", file=sys.stderr)
        return STOPPED
    except InterruptedTwice:  # a second Ctrl-C while stopping: leave without writing anything
        return _interrupted_twice(last)
    run.draw_curves(force=True)
    print(f"done: best val top-1 {100 * s.best_top1:.2f}%; run directory {run.run_dir}")
    return DONE
