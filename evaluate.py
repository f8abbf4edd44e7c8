"""Evaluate a checkpoint on the whole validation set:  python evaluate.py RUN_DIR [--per-class]

Every validation image is counted exactly once (the last partial batch is padded and masked).
Prints top-1, top-5 and mean loss; --per-class adds a table with the class names from words.txt.
Results are also written to RUN_DIR/eval-<checkpoint>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser():
    p = argparse.ArgumentParser(prog="python evaluate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory written by train.py")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"],
                   help="which checkpoint of the run (default: best)")
    p.add_argument("--data-dir", default=None, help="override the run's data.data_dir")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    p.add_argument("--per-class", action="store_true", help="print per-class accuracy")
    p.add_argument("--fused", action="store_true", help="use the fused Triton kernels")
    p.add_argument("--interpret", action="store_true",
                   help="with --fused and no GPU: Triton's CPU interpreter (slow)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def fail(message):
    print(f"evaluate.py: error: {message}", file=sys.stderr)
    sys.exit(2)


EVAL_META = ("config", "mean", "std", "epoch")


def load_checkpoint(run_dir: Path, name: str):
    """RUN_DIR/<name>.npz, or a CheckpointError naming what is wrong with it and offering the
    run's other checkpoint when that one is sound."""
    from vit import checkpoint  # noqa: PLC0415

    path = run_dir / f"{name}.npz"
    try:
        return checkpoint.load(path, meta_keys=EVAL_META, trees=("params",))
    except checkpoint.CheckpointError as err:
        message = str(err)
    other = "last" if name == "best" else "best"
    if (run_dir / f"{other}.npz").is_file():
        try:
            meta = checkpoint.load(run_dir / f"{other}.npz", meta_keys=EVAL_META,
                                   trees=("params",))[1]
            message += (f". The run's {other}.npz is sound (epoch {meta['epoch']}): evaluate it "
                        f"with python evaluate.py {run_dir} --checkpoint {other}")
        except checkpoint.CheckpointError:
            pass
    raise checkpoint.CheckpointError(message)


def evaluate(run_dir, checkpoint_name="best", data_dir=None, batch_size=256, fused=False,
             interpret=None, progress=True):
    """-> dict with top1, top5, loss, count, per_class (list of (name, correct, total))."""
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from tqdm import tqdm  # noqa: PLC0415

    from vit.config import ViTConfig  # noqa: PLC0415
    from vit.data import load_dataset  # noqa: PLC0415
    from vit.data.loader import eval_batches  # noqa: PLC0415
    from vit.step import make_eval_step  # noqa: PLC0415

    run_dir = Path(run_dir)
    path = run_dir / f"{checkpoint_name}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (is {run_dir} a run directory of "
                                "train.py that finished at least one epoch?)")
    trees, meta = load_checkpoint(run_dir, checkpoint_name)
    cfg = meta["config"]
    model = ViTConfig.from_dict(cfg["model"])
    data = cfg["data"]
    val = load_dataset(data["dataset"], data_dir or data["data_dir"], "val",
                       workers=data.get("workers"), progress=progress)
    step = make_eval_step(model, fused=fused, interpret=interpret, mean=meta["mean"],
                          std=meta["std"], precision=cfg["train"].get("precision", "fp32"))
    params = trees["params"]
    k = model.num_classes
    correct = np.zeros(k, np.int64)
    total = np.zeros(k, np.int64)
    sums = {"loss_sum": 0.0, "top1": 0.0, "top5": 0.0, "count": 0.0}
    n_batches = -(-len(val.labels) // batch_size)
    for images, labels, valid in tqdm(eval_batches(val.images, val.labels, batch_size),
                                      total=n_batches, desc="evaluating", disable=not progress):
        out = step(params, images, labels, valid)
        for key in sums:
            sums[key] += float(out[key])
        pred = np.asarray(jnp.argmax(out["logits"], axis=-1))
        lab, ok = np.asarray(labels), np.asarray(valid)
        np.add.at(total, lab[ok], 1)
        np.add.at(correct, lab[ok], (pred == lab)[ok])
    n = sums["count"]
    if int(n) != len(val.labels):
        raise AssertionError(f"evaluated {n} images, the validation set has {len(val.labels)}")
    return {"checkpoint": str(path), "epoch": meta["epoch"], "top1": sums["top1"] / n,
            "top5": sums["top5"] / n, "loss": sums["loss_sum"] / n, "count": int(n),
            "per_class": [(name, int(c), int(t)) for name, c, t in
                          zip(val.class_names, correct, total)]}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from vit.checkpoint import CheckpointError  # noqa: PLC0415
    from vit.data import DatasetError  # noqa: PLC0415
    try:
        result = evaluate(args.run_dir, args.checkpoint, args.data_dir, args.batch_size,
                          args.fused, True if args.interpret else None, not args.no_progress)
    except (FileNotFoundError, DatasetError, CheckpointError) as err:
        fail(str(err))
    print(f"{result['checkpoint']} (epoch {result['epoch']}): top-1 {100 * result['top1']:.2f}%"
          f"  top-5 {100 * result['top5']:.2f}%  loss {result['loss']:.4f}  "
          f"on {result['count']} validation images")
    if args.per_class:
        rows = sorted(result["per_class"], key=lambda r: r[1] / max(r[2], 1))
        print(f"\n{'class':<48} {'correct':>8} {'total':>6} {'acc':>7}")
        for name, c, t in rows:
            print(f"{name[:48]:<48} {c:>8} {t:>6} {100 * c / max(t, 1):>6.1f}%")
    out = Path(args.run_dir) / f"eval-{args.checkpoint}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
