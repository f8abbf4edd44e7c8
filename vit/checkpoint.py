"""Checkpoints without pickle: one .npz per checkpoint holding every array (params and optimizer
state) under its path name, plus a JSON string with everything else (step, epoch, data
position, configs, metrics history). No random key is stored: a run derives each step's key from
its seed and the global step (vit/training.py), so a resume draws the same numbers.

Written atomically: to `<name>.npz.tmp`, flushed and fsync'd, then os.replace'd over the old file,
so the previous good checkpoint stays intact until the new one is complete; a write stopped by an
exception (a second Ctrl-C) removes its .tmp, and a crash mid-write leaves at most a stray .tmp
file that is never read.

Read back by load(), which turns every way a file can fail to be a checkpoint (truncated or
damaged, not an .npz at all, an .npz of something else) into a CheckpointError naming the file
and what is wrong with it.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
import zlib
from pathlib import Path

import jax
import numpy as np

META_KEY = "__meta__"
ZIP_MAGIC = b"PK\x03\x04"  # every .npz is a zip file and starts with this


class CheckpointError(ValueError):
    """A file that cannot be read as a checkpoint; the message names it and says why."""


def flatten(tree, prefix: str) -> dict[str, np.ndarray]:
    """{'a': {'b': [x, y]}} -> {'prefix/a/b/0': x, 'prefix/a/b/1': y} (host numpy arrays)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        parts = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
        out["/".join([prefix, *parts])] = np.asarray(jax.device_get(leaf))
    return out


def unflatten(arrays: dict[str, np.ndarray], prefix: str):
    """Inverse of flatten: nested dicts, with all-integer keys turned back into lists."""
    root: dict = {}
    for name, value in arrays.items():
        if name == prefix:  # the tree was a single array
            return value
        parts = name.split("/")
        if parts[0] != prefix:
            continue
        node = root
        for part in parts[1:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value

    def listify(node):
        if not isinstance(node, dict):
            return node
        node = {k: listify(v) for k, v in node.items()}
        if node and all(k.isdigit() for k in node):
            return [node[str(i)] for i in range(len(node))]
        return node
    return listify(root)


def save(path, trees: dict, meta: dict) -> Path:
    """trees: {'params': ..., 'opt': ...} pytrees of arrays; meta: JSON-able dict."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, tree in trees.items():
        arrays.update(flatten(tree, prefix))
    arrays[META_KEY] = np.array(json.dumps(meta))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load(path, *, meta_keys=(), trees=()) -> tuple[dict, dict]:
    """-> ({'params': ..., 'opt': ..., ...} as numpy pytrees, meta dict).

    meta_keys / trees: what the caller needs the checkpoint to hold; a checkpoint without one of
    them is a CheckpointError too (an .npz written by something else)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(len(ZIP_MAGIC))
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {e}") from None
    if head != ZIP_MAGIC:
        raise CheckpointError(f"{path} is not an .npz file (a checkpoint is a zip archive; this "
                              f"file starts with {head!r}, {path.stat().st_size:,} bytes)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} is damaged: truncated or corrupted ({path.stat().st_size:,} "
                              f"bytes; {type(e).__name__}: {e})") from None
    if META_KEY not in arrays:
        names = ", ".join(sorted(arrays)[:5]) + (", ..." if len(arrays) > 5 else "")
        raise CheckpointError(f"{path} is an .npz file but not a checkpoint: it has no {META_KEY} "
                              f"record (it holds {names or 'nothing'})")
    try:
        meta = json.loads(str(arrays.pop(META_KEY)))
    except ValueError as e:
        raise CheckpointError(f"{path} is damaged: its {META_KEY} record is not JSON ({e})") from None
    prefixes = sorted({k.split("/")[0] for k in arrays})
    missing = [f"meta '{k}'" for k in meta_keys if not isinstance(meta, dict) or k not in meta]
    missing += [f"arrays '{t}/...'" for t in trees if t not in prefixes]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of this kind: it lacks "
                              f"{', '.join(missing)}")
    return {p: unflatten(arrays, p) for p in prefixes}, meta


def read_meta(path) -> dict:
    """A checkpoint's JSON record (a dict) alone, without reading its arrays; a file whose
    record cannot be read that way raises the CheckpointError load() gives it."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            if META_KEY in data.files:
                meta = json.loads(str(data[META_KEY]))
                if isinstance(meta, dict):
                    return meta
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError):
        pass
    return load(path, meta_keys=("config",))[1]  # not a readable checkpoint: load says why


def load_from_run(run_dir, name: str, *, meta_keys=(), trees=(), way_out=None) -> tuple[dict, dict]:
    """RUN_DIR/<name>.npz (a run of train.py keeps last.npz and best.npz), or a CheckpointError
    saying what is wrong with it and, when the run's other checkpoint is sound, how to use that
    one instead: way_out(other_path, other_meta) -> a sentence (the caller's command for it)."""
    run_dir = Path(run_dir)
    path = run_dir / f"{name}.npz"
    try:
        return load(path, meta_keys=meta_keys, trees=trees)
    except CheckpointError as err:
        message = str(err)
    other = run_dir / ("last.npz" if name == "best" else "best.npz")
    if other.is_file() and way_out is not None:
        try:
            message += ". " + way_out(other, load(other, meta_keys=meta_keys, trees=trees)[1])
        except CheckpointError as err:
            message += f". No way out through {other} either: {err}"
    raise CheckpointError(message)
