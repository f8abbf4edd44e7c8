"""What every figure vitfuse draws shares: matplotlib's pyplot without a screen (the Agg backend,
chosen on first use, so importing vit needs no matplotlib), and a PNG written whole or not at all.
Used by vit/curves.py (curves.png), vit/explain.py (saliency and attention maps) and bench/plot.py
(the speedup plot)."""

from __future__ import annotations

import os
from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    return plt


def save_png(fig, path: Path, dpi: int) -> None:
    """Write fig to path atomically (a temporary file beside it, renamed into place: a run
    stopped mid-write leaves the previous picture) and close it."""
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    pyplot().close(fig)
    os.replace(tmp, path)
