"""Which fused attention kernel runs for a shape, and with which blocks: the one dispatcher.

Two kernels compute the same attention, with the same signatures and the same cache
(qkv, o, lse, keep_scale), so either backward takes either forward's cache:

- "one-tile" (kernels/attention.py): one program per (batch, head) holding K and V of the whole
  sequence in one tile; L <= 1024, and on a GPU only while that tile fits shared memory
  (attention.compiled_fits: fp32 L=197 Dh=64 does not);
- "key-blocked" (kernels/flash_attention.py): FlashAttention-2 style, BLOCK_M x BLOCK_N tiles
  whatever L is; any length.

``plan(l, dh, dtype, dot_precision, direction, launcher)`` answers with a ``Plan``, in this order:

1. the tuned table, ``TABLE_PATH`` (kernels/attention_table.json): rows measured on a GPU by the
   GPU tune, matched on the device kind (jax.devices()[0].device_kind), dtype (with the dot
   dot_precision for float32), head dim and direction; the row with the smallest ``max_len`` >= L
   wins. Empty until a GPU run fills it; consulted only where the launcher runs on a GPU.
2. the rule, until GPU figures exist:

   one-tile  when L <= 128 and Dh <= 32 (the product shape, L=65 Dh=32, is one);
   key-blocked otherwise, with flash_attention.default_blocks.

   Why: up to 128 keys the one-tile kernel holds no more keys than the one or two key blocks
   the key-blocked kernel would step through, so blocking saves nothing, while the one-tile
   kernel does less work: its backward is one launch that forms delta inline and computes S and
   dP once per tile, where the key-blocked backward adds the delta launch and recomputes S and
   dP in both its dK/dV and its dQ programs (7 L x L x Dh matmuls against 5). It also keeps the
   product shape on the kernel it has been tuned and checked on (the README's target: the
   dispatcher's choice there is never slower than the one-tile kernel). Dh <= 32: the one-tile
   backward keeps dK and dV for the whole padded sequence next to its score tiles, and at
   Dh >= 64 it spills registers (kernels.compile_check, triton 3.9: L=32 Dh=128 fp32 1136 stack
   bytes on sm_90, L=100 Dh=64 fp32 192 on sm_90, L=64 Dh=64 bf16 with dropout 56 on sm_80), where
   the key-blocked kernel's default blocks do not spill on sm_90. Beyond 128 keys the one-tile kernel is
   the wrong shape: L=197 pads to 256 keys (23% wasted), its query step shrinks to 16 rows, and
   its grid (B x H) does not grow with L; the key-blocked grid is cdiv(L, BLOCK_M) x H x B.
   The GPU tune replaces this guess with measurements.

``attention_forward`` / ``attention_backward`` below route through ``plan``; ``kernel=`` forces
one kernel ("one-tile" or "key-blocked") for checks and benchmarks. ``kernels.fused_ops`` binds
them, so the model never knows which kernel runs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from kernels import attention, flash_attention
from kernels.flash_attention import Blocks
from kernels.launch import DIRECTIONS, Launcher

KERNELS = ("auto", "one-tile", "key-blocked")
ONE_TILE_MAX_LEN = 128  # the rule: above this the key-blocked kernel runs
ONE_TILE_MAX_DH = 32  # the rule: nor above this head dim
TABLE_PATH = Path(__file__).with_name("attention_table.json")
_TABLE_KEYS = {"device", "dtype", "dh", "direction", "max_len", "kernel", "block_m", "block_n",
               "num_warps", "num_stages"}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What runs for one direction of one shape: the kernel, the key-blocked kernel's blocks
    (None for one-tile, whose geometry is attention.geometry), and where the choice came from."""

    kernel: str
    blocks: Blocks | None
    source: str  # "rule", "forced", or "table <device>"


def check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel must be one of {KERNELS}, got {kernel!r}")
    return kernel


def dtype_key(dtype, dot_precision: str) -> str:
    """'float32/ieee', 'float32/tf32', 'float32/tf32x3', 'bfloat16', 'float16': how the table names a dtype."""
    name = np.dtype(dtype).name
    return f"{name}/{dot_precision}" if name == "float32" else name


def load_table(path=TABLE_PATH) -> list[dict]:
    """The tuned rows of ``path`` ({"rows": [...]}), validated; a bad file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text())["rows"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a tuned attention table ({{\"rows\": [...]}}): {err}") from None
    for i, row in enumerate(rows):
        missing, unknown = _TABLE_KEYS - set(row), set(row) - _TABLE_KEYS - {"note"}
        if missing or unknown:
            raise ValueError(f"{path}: row {i}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")
        if row["kernel"] not in KERNELS[1:] or row["direction"] not in DIRECTIONS:
            raise ValueError(f"{path}: row {i}: kernel must be one-tile or key-blocked and direction "
                             f"fwd or bwd, got {row['kernel']!r}, {row['direction']!r}")
        if row["kernel"] == "key-blocked":
            try:
                Blocks(row["block_m"], row["block_n"], row["num_warps"], row["num_stages"])
            except ValueError as err:
                raise ValueError(f"{path}: row {i}: {err}") from None
    return rows


_TABLE: list[dict] | None = None


def table() -> list[dict]:
    global _TABLE
    if _TABLE is None:
        _TABLE = load_table()
    return _TABLE


def one_tile_runs(l: int, dh: int, dtype, launcher: Launcher, dot_precision: str) -> bool:
    return l <= attention.MAX_LEN and (not launcher.on_gpu
                                       or attention.compiled_fits(l, dh, dtype, dot_precision))


def _tuned_row(l, dh, dtype, dot_precision, direction, rows, kernel=None) -> dict | None:
    """The table row for this shape on this GPU (smallest max_len >= l), or None."""
    device = jax.devices()[0].device_kind
    want = dtype_key(dtype, dot_precision)
    matches = [r for r in (table() if rows is None else rows)
               if r["device"] == device and r["dtype"] == want and r["dh"] == dh
               and r["direction"] == direction and r["max_len"] >= l
               and kernel in (None, r["kernel"])]
    return min(matches, key=lambda r: r["max_len"]) if matches else None


def plan(l: int, dh: int, dtype, dot_precision: str, direction: str, launcher: Launcher,
         kernel: str = "auto", rows: list[dict] | None = None) -> Plan:
    """The kernel and blocks for one direction ("fwd" or "bwd") of attention at length l, head
    dim dh. kernel="one-tile"/"key-blocked" forces one (the key-blocked kernel still takes its
    tuned blocks where the table has them); rows: the tuned table (default: TABLE_PATH's)."""
    check_kernel(kernel)
    if kernel == "one-tile":
        return Plan(kernel, None, "forced")
    row = (_tuned_row(l, dh, dtype, dot_precision, direction, rows, None if kernel == "auto" else kernel)
           if launcher.on_gpu else None)
    if row is not None and row["kernel"] == "key-blocked":
        blocks = Blocks(row["block_m"], row["block_n"], row["num_warps"], row["num_stages"])
        return Plan("key-blocked", blocks.fit(l), f"table {row['device']}")
    default = flash_attention.default_blocks(l, dh, dtype, dot_precision, direction)
    if kernel == "key-blocked":
        return Plan(kernel, default, "forced")
    if row is not None and one_tile_runs(l, dh, dtype, launcher, dot_precision):
        return Plan("one-tile", None, f"table {row['device']}")
    if l <= ONE_TILE_MAX_LEN and dh <= ONE_TILE_MAX_DH and one_tile_runs(l, dh, dtype, launcher,
                                                                          dot_precision):
        return Plan("one-tile", None, "rule")
    return Plan("key-blocked", default, "rule")


def attention_forward(qkv, heads, keep_scale=None, *, launcher: Launcher, dot_precision: str = "ieee",
                      kernel: str = "auto"):
    """qkv (B, L, 3D) -> (o (B, L, D), cache), by the kernel ``plan`` picks (or ``kernel``)."""
    b, l, d, dh, heads = attention.check_forward_inputs(qkv, heads, keep_scale)
    p = plan(l, dh, qkv.dtype, dot_precision, "fwd", launcher, kernel)
    if p.kernel == "one-tile":
        return attention.attention_forward(qkv, heads, keep_scale, launcher=launcher, dot_precision=dot_precision)
    return flash_attention.attention_forward(qkv, heads, keep_scale, launcher=launcher,
                                             dot_precision=dot_precision, blocks=p.blocks)


def attention_backward(cache, do, *, launcher: Launcher, dot_precision: str = "ieee", kernel: str = "auto"):
    """dO (B, L, D) -> dQKV (B, L, 3D), by the kernel ``plan`` picks (or ``kernel``); the cache
    of either forward."""
    qkv = cache[0]
    b, l, d, heads = attention.check_backward_inputs(cache, do)
    p = plan(l, d // heads, qkv.dtype, dot_precision, "bwd", launcher, kernel)
    if p.kernel == "one-tile":
        return attention.attention_backward(cache, do, launcher=launcher, dot_precision=dot_precision)
    return flash_attention.attention_backward(cache, do, launcher=launcher, dot_precision=dot_precision,
                                              blocks=p.blocks)
