"""Checkpoints without pickle: one .npz per checkpoint holding every array (params, optimizer
state, RNG key) under its path name, plus a JSON string with everything else (step, epoch, data
position, configs, metrics history).

Written atomically: to `<name>.npz.tmp`, flushed and fsync'd, then os.replace'd over the old file,
so the previous good checkpoint stays intact until the new one is complete, and a crash mid-write
leaves at most a stray .tmp file that is never read.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import jax
import numpy as np

META_KEY = "__meta__"


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
    """trees: {'params': ..., 'opt': ..., 'rng': ...} pytrees of arrays; meta: JSON-able dict."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, tree in trees.items():
        arrays.update(flatten(tree, prefix))
    arrays[META_KEY] = np.array(json.dumps(meta))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(buffer.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load(path) -> tuple[dict, dict]:
    """-> ({'params': ..., 'opt': ..., ...} as numpy pytrees, meta dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays.pop(META_KEY)))
    prefixes = sorted({k.split("/")[0] for k in arrays})
    return {p: unflatten(arrays, p) for p in prefixes}, meta
