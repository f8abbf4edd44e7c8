"""Bar chart of speedup vs the reference, per group and contender, from a results file.

    python bench/plot.py bench/results/cpu-2026-11-25.json -o /tmp/speedup.png

One panel per group (attention fwd, attention fwd+bwd, add+layernorm fwd, ...); within a panel, one
cluster of bars per (shape, dtype), one bar per timed contender, labelled with its speedup; the
dashed line at 1 is the reference. Rows without a timing (checked only, not run) are listed under
the panel instead of drawn. Needs only the json file and matplotlib (through vit/figures.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vit.figures import pyplot, save_png

# report.GROUP_ORDER without "device peak" (not plotted): a new group goes in both
GROUP_ORDER = ["attention fwd", "attention fwd+bwd", "add+layernorm fwd", "add+layernorm fwd+bwd", "train step"]


def load(path: Path):
    try:
        data = json.loads(path.read_text())
    except ValueError as e:  # not JSON, or not UTF-8
        raise ValueError(f"{path}: not a results file of the bench, which is JSON ({e})") from None
    if not isinstance(data, dict) or "rows" not in data:
        raise ValueError(f"{path}: not a vitfuse results file (no 'rows')")
    return data.get("meta", {}), data["rows"]


def plot(meta: dict, rows: list[dict], out: Path) -> int:
    plt = pyplot()
    groups = [g for g in GROUP_ORDER if any(r["group"] == g for r in rows)]
    groups += sorted({r["group"] for r in rows} - set(groups) - {"device peak"})
    if not groups:
        raise ValueError("no benchmark rows to plot")
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, 3.4 * len(groups)), squeeze=False)
    drawn = 0
    for ax, group in zip(axes[:, 0], groups):
        grows = [r for r in rows if r["group"] == group]
        clusters = list(dict.fromkeys((r["shape"], r["dtype"]) for r in grows if r.get("speedup_vs_reference")))
        contenders = list(dict.fromkeys(r["contender"] for r in grows if r.get("speedup_vs_reference")))
        width = 0.8 / max(1, len(contenders))
        for j, contender in enumerate(contenders):
            xs, ys = [], []
            for i, cluster in enumerate(clusters):
                for r in grows:
                    if (r["shape"], r["dtype"]) == cluster and r["contender"] == contender \
                            and r.get("speedup_vs_reference"):
                        xs.append(i - 0.4 + width * (j + 0.5))
                        ys.append(r["speedup_vs_reference"])
            bars = ax.bar(xs, ys, width, label=contender)
            ax.bar_label(bars, labels=[f"{y:.2f}x" for y in ys], fontsize=7)
            drawn += len(ys)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(clusters)), [f"{s}\n{d}" for s, d in clusters], fontsize=8)
        ax.set_ylabel("speedup vs reference")
        ax.set_title(group)
        if contenders:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        missing = sorted({f"{r['contender']} ({r['dtype']}): {r.get('status') or 'not timed'}"
                          for r in grows if not r.get("median_ms")})
        if missing:
            ax.text(0.0, -0.35, "not timed: " + "; ".join(missing), transform=ax.transAxes,
                    fontsize=7, va="top", wrap=True)
    info = meta.get("info", {})
    fig.suptitle(f"vitfuse: speedup vs reference on {info.get('device', '?')} ({meta.get('date', '?')})")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, out, dpi=120)
    return drawn


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, help="bench/results/<device>-<date>.json")
    ap.add_argument("-o", "--out", type=Path, default=None, help="png path (default: next to the json)")
    args = ap.parse_args(argv)
    try:
        meta, rows = load(args.results)
        out = args.out or args.results.with_suffix(".png")
        drawn = plot(meta, rows, out)
    except (OSError, ValueError) as e:  # OSError's text names the file
        print(f"plot.py: error: {e}", file=sys.stderr)
        return 2
    print(f"{out}: {drawn} bars")
    return 0


if __name__ == "__main__":
    sys.exit(main())
