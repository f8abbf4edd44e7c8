"""Evaluate a checkpoint on the whole validation set:  python evaluate.py RUN_DIR [--per-class]

Every validation image is counted exactly once (the last partial batch is padded and masked).
Prints top-1, top-5 and mean loss; --per-class adds a table with the class names (Tiny ImageNet's
words.txt, the folder names of an image folder) and RUN_DIR/confusion-<checkpoint>.png.
Results are also written to RUN_DIR/eval-<checkpoint>.json.

  --saliency N       RUN_DIR/saliency-<checkpoint>.png: N validation images beside |d loss / d pixel|
  --attention N      RUN_DIR/attention-<checkpoint>.png: N validation images beside the share of the CLS
                     token drawn from each patch (attention rollout over the blocks)
  --augment N        RUN_DIR/augment.png: the first N images of the run's first training batch as
                     stored, beside the same images as its first step trained on them (crop, flip,
                     RandAugment, random erasing, mixup/cutmix), titled with their soft targets
  --predict IMAGE..  top-5 classes of image files of any size (instead of evaluating)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from shlex import quote

import cmdline


def build_parser():
    p = argparse.ArgumentParser(prog="python evaluate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory written by train.py")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"],
                   help="which checkpoint of the run (default: best)")
    p.add_argument("--data-dir", default=None, help="override the run's data.data_dir")
    p.add_argument("--batch-size", type=cmdline.positive_int, default=256,
                   help="images per forward pass (of the evaluation, or of --predict)")
    p.add_argument("--per-class", action="store_true",
                   help="print per-class accuracy and write the confusion matrix PNG")
    p.add_argument("--saliency", type=cmdline.positive_int, default=0, metavar="N",
                   help="write a PNG grid of N validation images beside their saliency maps")
    p.add_argument("--attention", type=cmdline.positive_int, default=0, metavar="N",
                   help="write a PNG grid of N validation images beside their attention maps "
                        "(the CLS token's attention rollout)")
    p.add_argument("--augment", type=cmdline.positive_int, default=0, metavar="N",
                   help="write a PNG grid of the first N images of the run's first training "
                        "batch beside the same images as its first step augmented them")
    p.add_argument("--predict", nargs="+", default=None, metavar="IMAGE",
                   help="print the top-5 classes of these image files instead of evaluating")
    cmdline.add_ops_flags(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def fail(message):
    print(f"evaluate.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def load_run(run_dir, name: str):
    """RUN_DIR/<name>.npz (vit.explain.load_run), a damaged one offering the run's other
    checkpoint when that one is sound, a file given for RUN_DIR told what to give instead."""
    from vit import explain  # noqa: PLC0415

    if Path(run_dir).is_file():
        raise FileNotFoundError(_a_file_not_a_run(Path(run_dir)))

    def way_out(other, meta):
        return (f"The run's {other.name} is sound (epoch {meta['epoch']}): evaluate it with "
                f"python evaluate.py {quote(str(run_dir))} --checkpoint {other.stem}")
    return explain.load_run(run_dir, name, way_out=way_out)


def _a_file_not_a_run(path: Path) -> str:
    """What to give instead of a file where a run directory goes."""
    from vit.data.image_folder import is_image_file  # noqa: PLC0415

    if path.suffix == ".npz":
        which = f" --checkpoint {path.stem}" if path.stem in ("best", "last") else ""
        return (f"{path} is a checkpoint file; give the run directory that holds it: "
                f"python evaluate.py {quote(str(path.parent))}{which}")
    if is_image_file(path.name):
        return (f"{path} is an image file, not a run directory; to classify it: python "
                f"evaluate.py RUN_DIR --predict {quote(str(path))}")
    return f"{path} is a file, not a run directory (one that train.py wrote)"


def evaluate(run_dir, checkpoint_name="best", data_dir=None, batch_size=256, ops=None,
             progress=True):
    """-> evaluate_run's dict: checkpoint, epoch, step_in_epoch, top1, top5, loss, count,
    per_class (list of (name, correct, total)), confusion and class_names."""
    from vit import explain  # noqa: PLC0415

    run = load_run(run_dir, checkpoint_name)
    return evaluate_run(run, explain.load_split(run, data_dir, progress), batch_size, ops, progress)


def evaluate_run(run, val, batch_size=256, ops=None, progress=True):
    """A loaded run (vit.explain.Run) on its validation set, in the run's compute dtype."""
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from vit.data.loader import eval_batches  # noqa: PLC0415
    from vit.ops import REFERENCE  # noqa: PLC0415
    from vit.progress import progress_bar  # noqa: PLC0415
    from vit.step import evaluate_batches, make_eval_step  # noqa: PLC0415

    step = make_eval_step(run.model, ops=ops or REFERENCE, mean=run.mean, std=run.std,
                          compute_dtype=run.config.train.compute_dtype)
    k = run.model.num_classes
    confusion = np.zeros((k, k), np.int64)  # rows: true class, columns: predicted

    def count(out, labels, valid):
        pred = np.asarray(jnp.argmax(out["logits"], axis=-1))
        lab, ok = np.asarray(labels), np.asarray(valid)
        np.add.at(confusion, (lab[ok], pred[ok]), 1)

    batch_size = min(batch_size, max(len(val.labels), 1))  # padding rows cost as much as real ones
    n_batches = -(-len(val.labels) // batch_size)
    batches = progress_bar(eval_batches(val.images, val.labels, batch_size), total=n_batches,
                           desc="evaluating", disable=not progress)
    result = evaluate_batches(step, run.params, batches, on_batch=count)
    if result["count"] != len(val.labels):
        raise AssertionError(f"evaluated {result['count']} images, the validation set has "
                             f"{len(val.labels)}")
    correct, total = np.diag(confusion), confusion.sum(axis=1)
    return {"checkpoint": str(run.path), "epoch": run.meta["epoch"],
            "step_in_epoch": run.meta.get("step_in_epoch", 0), **result,
            "per_class": [(name, int(c), int(t)) for name, c, t in
                          zip(val.class_names, correct, total)],
            "confusion": confusion, "class_names": list(val.class_names)}


EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports a SIGINT


def main(argv=None, *, standalone=False) -> int:
    """standalone: this process is `python evaluate.py` itself, so a Ctrl-C ends in a message
    and exit code 130 instead of a KeyboardInterrupt traceback, and output to a reader that went
    away (`--predict ... | head`) quietly with 141 (called from Python, the caller gets its
    KeyboardInterrupt or BrokenPipeError)."""
    args = build_parser().parse_args(argv)
    written = []  # files written so far, named if a Ctrl-C stops the rest
    try:
        with cmdline.InterruptWhileStarting() as interrupt:
            code = evaluate_command(args, written, interrupt.check)
        if standalone:
            sys.stdout.flush()  # here, not at exit, where a closed pipe is an "Exception ignored"
        return code
    except BrokenPipeError:
        if not standalone:
            raise
        from vit.signals import after_broken_pipe  # noqa: PLC0415

        return after_broken_pipe()
    except KeyboardInterrupt:
        if not standalone:
            raise
        done = f"wrote only {', '.join(map(str, written))}" if written else "wrote nothing"
        print(f"\nevaluate.py: interrupted (Ctrl-C): {done}", file=sys.stderr)
        # the signal may have unwound a JAX call half-way, after which the interpreter's
        # teardown can crash (as train.py saw): leave without it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)


def shown(figure, asked: int) -> str:
    n = len(figure["labels"])
    return (f"{n} validation image{'s' * (n != 1)}"
            + (f": all there are ({asked} asked for)" if n < asked else ""))


def describe_position(meta) -> str:
    """Where in training a checkpoint was saved, as train.py says it: "epoch 3" after three
    epochs, "mid-epoch: epoch 2, step 4" for a last.npz saved 4 steps into epoch 2."""
    if meta.get("step_in_epoch", 0):
        return f"mid-epoch: epoch {meta['epoch'] + 1}, step {meta['step_in_epoch']}"
    return f"epoch {meta['epoch']}"


def evaluate_command(args, written, check_interrupt=lambda: None) -> int:
    """main without its Ctrl-C handling; appends each file it writes to `written`, and calls
    check_interrupt() (which raises KeyboardInterrupt after a Ctrl-C that was swallowed) between
    its stages."""
    from vit import explain  # noqa: PLC0415
    from vit.checkpoint import CheckpointError  # noqa: PLC0415
    from vit.data import DatasetError  # noqa: PLC0415
    from vit.runconfig import ConfigError  # noqa: PLC0415
    op_flags = [flag for flag, given in (("--fused", args.fused), ("--interpret", args.interpret),
                                         ("--dot-precision", args.dot_precision)) if given]
    if args.predict:
        ignored = [flag for flag, given in (("--per-class", args.per_class),
                                            ("--saliency", args.saliency),
                                            ("--attention", args.attention),
                                            ("--augment", args.augment)) if given]
        if ignored:
            print(f"evaluate.py: note: with --predict nothing else is evaluated: "
                  f"{' and '.join(ignored)} ignored", file=sys.stderr)
        if op_flags:
            print(f"evaluate.py: note: {' '.join(op_flags)} ignored: --predict runs the float32 "
                  "reference layers", file=sys.stderr)
        return predict(args)
    if op_flags and (args.saliency or args.attention):
        print(f"evaluate.py: note: {' '.join(op_flags)} applies to the evaluation; --saliency and "
              "--attention run the float32 reference layers", file=sys.stderr)
    try:
        ops = cmdline.build_ops(args)
        run = load_run(args.run_dir, args.checkpoint)
        cmdline.check_ops_run(ops, run.model)  # before the data loads
        check_interrupt()
        val = explain.load_split(run, args.data_dir, progress=not args.no_progress)
        check_interrupt()
        result = evaluate_run(run, val, args.batch_size, ops, not args.no_progress)
        check_interrupt()
    except (cmdline.UsageError, FileNotFoundError, DatasetError, CheckpointError,
            ConfigError) as err:
        fail(str(err))
    where = describe_position(result)
    top = min(5, run.model.num_classes)  # with fewer classes, top-5 is top-K: 100% always
    print(f"{result['checkpoint']} ({where}): top-1 "
          f"{100 * result['top1']:.2f}%  top-{top} {100 * result['top5']:.2f}%  loss "
          f"{result['loss']:.4f}  on {result['count']} validation images ({ops.description})")
    if args.per_class:
        # worst first; classes without validation images (no accuracy) last
        rows = sorted(result["per_class"], key=lambda r: (r[2] == 0, r[1] / max(r[2], 1)))
        w = min(48, max(len("class"), *(len(name) for name, _, _ in rows)))  # names cut at 48
        print(f"\n{'class':<{w}} {'correct':>8} {'total':>6} {'acc':>7}")
        for name, c, t in rows:
            print(f"{name[:w]:<{w}} {c:>8} {t:>6} " + (f"{100 * c / t:>6.1f}%" if t else f"{'-':>7}"))
    confusion = result.pop("confusion")
    if args.per_class:
        figure = explain.write_confusion(confusion, result["class_names"], args.run_dir,
                                         args.checkpoint)
        written.append(figure["png"])
        print(f"confusion matrix: {figure['png']} ({len(figure['shown'])} of "
              f"{len(confusion)} classes shown)")
    check_interrupt()
    if args.saliency > 0:
        figure = explain.write_saliency(run, val, args.saliency, args.run_dir, args.checkpoint)
        written.append(figure["png"])
        print(f"saliency maps: {figure['png']} ({shown(figure, args.saliency)})")
    check_interrupt()
    if args.attention > 0:
        figure = explain.write_attention(run, val, args.attention, args.run_dir, args.checkpoint)
        written.append(figure["png"])
        print(f"attention maps: {figure['png']} ({shown(figure, args.attention)})")
    check_interrupt()
    if args.augment > 0:
        figure = write_augmented(run, args, written)
        print(f"augmentation: {figure['png']} (the first {len(figure['rows'])} images of the "
              f"first batch)")
    check_interrupt()
    out = Path(args.run_dir) / f"eval-{args.checkpoint}.json"
    tmp = out.with_name(out.name + ".tmp")  # written whole or not at all, as the figures are
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    written.append(out)
    print(f"results: {out}")
    return 0


def write_augmented(run, args, written) -> dict:
    """--augment N: RUN_DIR/augment.png and .npz (vit.augment_figure), from the run's training
    set; an error naming the folder if it is not the set the run was trained on."""
    from vit import explain  # noqa: PLC0415
    from vit.augment_figure import write_augmented as write  # noqa: PLC0415
    from vit.data import DatasetError  # noqa: PLC0415
    from vit.data.common import check_same_count  # noqa: PLC0415

    try:
        train_set = explain.load_split(run, args.data_dir, not args.no_progress, split="train")
        check_same_count(run.meta.get("train_images"), len(train_set.labels),
                         args.data_dir or explain.run_data(run).data_dir, args.run_dir,
                         "its first batch was other images; give --data-dir the folder it was "
                         "trained on")
    except DatasetError as err:
        fail(f"--augment: {err}")
    figure = write(run, train_set, args.augment, args.run_dir)
    written.append(figure["png"])
    return figure


def predict(args) -> int:
    """--predict: top-5 classes of image files, named as the run's dataset names them; a file
    that cannot be read is named on stderr after the others' predictions (exit code 1), or, when
    none can, in the error (exit code 2)."""
    from vit import explain  # noqa: PLC0415
    from vit.checkpoint import CheckpointError  # noqa: PLC0415
    from vit.data import DatasetError  # noqa: PLC0415
    from vit.predict import format_predictions, predict_files  # noqa: PLC0415
    from vit.runconfig import ConfigError  # noqa: PLC0415
    try:
        run = load_run(args.run_dir, args.checkpoint)
        names = run.class_names or explain.load_split(run, args.data_dir,
                                                      not args.no_progress).class_names
        if len(names) != run.model.num_classes:
            data_dir = args.data_dir or explain.run_data(run).data_dir
            raise DatasetError(f"{data_dir} has {len(names)} classes and the model of {args.run_dir} "
                               f"{run.model.num_classes} classes: pass the --data-dir it was trained on")
        predictions, not_read = predict_files(run, args.predict, names,
                                              batch_size=args.batch_size)
    except (FileNotFoundError, DatasetError, CheckpointError, ConfigError) as err:
        fail(str(err))
    if not predictions:
        fail(not_read[0] if len(not_read) == 1
             else "\n  ".join(["none of the files given could be read:", *not_read]))
    # which model answered, on stderr: stdout stays the predictions alone, for scripts
    print(f"evaluate.py: the model of {run.path} ({describe_position(run.meta)}):", file=sys.stderr)
    print(format_predictions(predictions))
    if not_read:
        sys.stdout.flush()  # the predictions first, then what is missing from them
        print("\n  ".join([f"evaluate.py: {len(not_read)} of {len(args.predict)} files could "
                            "not be read:", *not_read]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(standalone=True))
