"""Which of the two folder layouts a data directory holds: Tiny ImageNet's, or an image folder (ImageFolder's).

    tiny-imagenet   wnids.txt (or val/val_annotations.txt) in DIR or in DIR/tiny-imagenet-200
    image-folder    DIR/train/ (with DIR/val/), one sub-folder per class

Tiny ImageNet is checked first: its train/<wnid>/images/ folders would also pass for an image folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from vit.data.common import DatasetError
from vit.data.image_folder import LAYOUT_HELP
from vit.data.tiny_imagenet import DATASET_DIRNAME

TINY_HELP = (f"Tiny ImageNet's layout (wnids.txt, words.txt, train/<wnid>/images/, val/val_annotations.txt "
             f"and val/images/, in DIR or in DIR/{DATASET_DIRNAME})")


def _is_tiny(folder: Path) -> bool:
    return (folder / "wnids.txt").is_file() or (folder / "val" / "val_annotations.txt").is_file()


def _found(folder: Path, limit: int = 8) -> str:
    """What folder holds, for an error message: 'a/, b/, notes.txt and 3 more' or 'nothing'."""
    try:
        entries = sorted(e.name + ("/" if e.is_dir() else "") for e in os.scandir(folder))
    except OSError as e:
        return f"nothing readable ({e})"
    if not entries:
        return "nothing (an empty folder)"
    shown = ", ".join(entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def detect_layout(data_dir: str | os.PathLike, hint: str = "") -> str:
    """'tiny-imagenet' or 'image-folder'; a DatasetError saying what was expected and what was found if
    data_dir is neither. hint: appended to the errors (how to get the data)."""
    root = Path(data_dir).expanduser()
    tail = f"; {hint}" if hint else ""
    if not root.exists():
        raise DatasetError(f"data directory {root} does not exist{tail}")
    if not root.is_dir():
        raise DatasetError(f"{root} is not a directory{tail}")
    if _is_tiny(root) or _is_tiny(root / DATASET_DIRNAME):
        return "tiny-imagenet"
    if (root / "train").is_dir():
        return "image-folder"
    tiny_root = root / DATASET_DIRNAME if (root / DATASET_DIRNAME).is_dir() else root
    nested = [p for p in sorted(root.iterdir()) if p.is_dir() and ((p / "train").is_dir() or _is_tiny(p))]
    if root.name in ("train", "val") and (root.parent / "train").is_dir():  # one level too deep
        nested = [root.parent]
    maybe = f" (did you mean --data-dir {nested[0]}?)" if nested else ""
    raise DatasetError(
        f"{root} is neither dataset layout{maybe}: expected {TINY_HELP}, or an image folder: {LAYOUT_HELP}. "
        f"Missing {tiny_root / 'wnids.txt'} and {root / 'train'}; found in {root}: {_found(root)}{tail}")
