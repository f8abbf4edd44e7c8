"""Fused residual-add + LayerNorm, forward and backward, as Triton kernels.

Must equal ``vit.layers.add_layernorm_forward`` / ``add_layernorm_backward``:

    s = x + r (r optional)          y = gamma * (s - mean) * rstd + beta,  rstd = 1/sqrt(var + eps)

Shapes: M rows (every leading axis of x flattened), N the normalised width, BLOCK_N = the next
power of two >= N (columns beyond N masked), BLOCK_M rows per tile. Statistics in float32 whatever
the input dtype (float32, bfloat16, float16).

Forward: one program per tile of BLOCK_M rows; it saves mean and rstd per row (float32).
Backward: program p takes TILES consecutive row tiles, writes ds for them and its partial sums of
dgamma/dbeta to row p of a (G, N) buffer; a second kernel sums the G rows in a fixed order. No
atomics, so dgamma/dbeta are bitwise deterministic. (Triton tutorial 05-layer-norm does the same
with locks and atomics; we trade its lock for a second tiny launch.)

The cache keeps the inputs x and r (already alive in the model) plus mean and rstd; the
backward recomputes s and s_hat instead of storing them.
"""

from typing import NamedTuple

import jax
import numpy as np
import triton
import triton.language as tl

from kernels.launch import Launcher, cdiv, check_dtype, next_power_of_2
from vit import layers

# what these kernels must equal (the checks in oracle/ compare against these very functions)
REFERENCE = (layers.add_layernorm_forward, layers.add_layernorm_backward)
MAX_WIDTH = 16384  # one row lives in one tile (64 KiB of float32, tutorial 05's limit); model: 256


# ----------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _ln_fwd(
    X,  # (M, N) input x
    R,  # (M, N) residual r, read only when HAS_R (else any valid pointer)
    W,  # (N,) gamma
    B,  # (N,) beta
    Y,  # (M, N) output y = LN(x + r), dtype of x
    Mean,  # (M,) float32 row mean of s
    Rstd,  # (M,) float32 row 1/sqrt(var + eps)
    M: tl.constexpr,
    N: tl.constexpr,
    eps: tl.constexpr,
    HAS_R: tl.constexpr,  # add the residual r
    ROUND_S: tl.constexpr,  # round s = x + r to the input dtype (half inputs, as the reference)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]

    s = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_R:
        s += tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
        if ROUND_S:
            s = s.to(X.dtype.element_ty).to(tl.float32)
    mean = tl.sum(s, axis=1) / N
    centered = tl.where(mask, s - mean[:, None], 0.0)
    var = tl.sum(centered * centered, axis=1) / N
    rstd = tl.rsqrt(var + eps)
    s_hat = centered * rstd[:, None]

    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = s_hat * w[None, :] + b[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)


# Backward: the derivation is at vit.layers.add_layernorm_backward, with the same names as here
# (tutorial 05 calls them xhat = s_hat, wdy = g, c1 = mean_gs, c2 = mean_g):
#   g = dy * gamma;  ds = rstd * (g - mean_g - s_hat * mean_gs);  dgamma = sum dy * s_hat;  dbeta = sum dy


@triton.jit
def _ln_bwd(
    DY,  # (M, N) upstream gradient dy
    X,  # (M, N) forward input x
    R,  # (M, N) forward residual r, read only when HAS_R
    W,  # (N,) gamma
    Mean,  # (M,) float32 saved mean
    Rstd,  # (M,) float32 saved rstd
    DS,  # (M, N) output ds (for x and r), dtype of dy
    DWp,  # (G, N) float32 output: partial dgamma of each program
    DBp,  # (G, N) float32 output: partial dbeta of each program
    M: tl.constexpr,
    N: tl.constexpr,
    HAS_R: tl.constexpr,
    ROUND_S: tl.constexpr,
    TILES: tl.constexpr,  # row tiles per program
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(TILES):
        rows = (pid * TILES + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]

        s = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_R:
            s += tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
            if ROUND_S:
                s = s.to(X.dtype.element_ty).to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        s_hat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)

        g = dy * w[None, :]
        mean_g = tl.sum(g, axis=1) / N
        mean_gs = tl.sum(g * s_hat, axis=1) / N
        ds = rstd[:, None] * (g - mean_g[:, None] - s_hat * mean_gs[:, None])
        tl.store(DS + offs, ds.to(DS.dtype.element_ty), mask=mask)

        dw_acc += dy * s_hat
        db_acc += dy
    tl.store(DWp + pid * N + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
    tl.store(DBp + pid * N + cols, tl.sum(db_acc, axis=0), mask=col_ok)


@triton.jit
def _ln_bwd_reduce(
    DWp,  # (G, N) float32 partial dgamma
    DBp,  # (G, N) float32 partial dbeta
    DW,  # (N,) float32 output dgamma
    DB,  # (N,) float32 output dbeta
    G: tl.constexpr,
    N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    dw = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        rows = g0 + tl.arange(0, BLOCK_G)
        mask = (rows < G)[:, None] & col_ok[None, :]
        offs = rows[:, None] * N + cols[None, :]
        dw += tl.load(DWp + offs, mask=mask, other=0.0)
        db += tl.load(DBp + offs, mask=mask, other=0.0)
    tl.store(DW + cols, tl.sum(dw, axis=0), mask=col_ok)
    tl.store(DB + cols, tl.sum(db, axis=0), mask=col_ok)


# ----------------------------------------------------------------------------------------------
# geometry: how the launches tile M rows of width N, as large as the launcher says one program's
# tile should be (launch.Launcher: registers on a GPU, numpy calls in the interpreter)


class Geometry(NamedTuple):
    """One add+LN launch's tiling of M rows of width N (every tile holds whole rows).

    block_m, block_n, num_warps: the tile (BLOCK_M rows of BLOCK_N >= N columns) and the warps of
        the forward kernel, or of the backward's main kernel
    groups, tiles: the backward's main kernel runs `groups` programs of `tiles` row tiles each
        (groups * tiles * block_m >= M); each writes its partial dgamma/dbeta to one row of a
        (groups, N) buffer. The forward reads neither.
    reduce_n, reduce_g: the backward's reduction sums those rows with cdiv(N, reduce_n) programs
        of reduce_n columns, reduce_g rows at a time. The forward reads neither.
    """

    block_m: int
    block_n: int
    num_warps: int
    groups: int
    tiles: int
    reduce_n: int
    reduce_g: int


def make_geometry(m: int, n: int, block_m: int, num_warps: int, max_groups: int,
                  reduce_n: int) -> Geometry:
    """The geometry of BLOCK_M-row tiles, `num_warps` warps, at most `max_groups` backward programs
    and reduction programs of `reduce_n` columns (at most BLOCK_N); the rest follows."""
    block_n = next_power_of_2(n)
    n_tiles = cdiv(m, block_m)
    tiles = cdiv(n_tiles, max_groups)
    groups = cdiv(n_tiles, tiles)
    reduce_n = min(reduce_n, block_n)
    reduce_g = min(next_power_of_2(groups), max(1, 4096 // reduce_n))
    return Geometry(block_m, block_n, num_warps, groups, tiles, reduce_n, reduce_g)


def geometry(m: int, n: int, launcher: Launcher, direction: str) -> Geometry:
    """The geometry of the `direction` ("fwd" or "bwd") launches: tiles of at most
    launcher.tile_elements and launcher.tile_rows, 8 warps over 2048 elements (else 4), at most
    launcher.reduce_programs backward programs, reductions of 256 columns. Both directions take
    the same today; bench/tune_layernorm.py times others on a GPU, one direction at a time."""
    del direction
    block_n = next_power_of_2(n)
    block_m = max(1, min(launcher.tile_elements // block_n, next_power_of_2(m), launcher.tile_rows))
    num_warps = 4 if block_m * block_n <= 2048 else 8
    return make_geometry(m, n, block_m, num_warps, launcher.reduce_programs, 256)


# ----------------------------------------------------------------------------------------------
# forward / backward (same signatures as vit.layers, plus the launch settings)


def _check_params(params, n):
    for key in ("gamma", "beta"):
        if key not in params:
            raise ValueError(f"add_layernorm: params must have {key!r}")
        if tuple(params[key].shape) != (n,):
            raise ValueError(
                f"add_layernorm: params[{key!r}] must have shape ({n},), got {tuple(params[key].shape)}"
            )
        check_dtype(f"add_layernorm: params[{key!r}]", params[key].dtype)


def add_layernorm_forward(params, x, r, eps, *, launcher: Launcher):
    """y = LN(x + r) over the last axis; r may be None. Returns (y, cache)."""
    if x.ndim < 1 or x.size == 0:
        raise ValueError(f"add_layernorm_forward: x must be a non-empty (..., D) array, got {x.shape}")
    dtype = check_dtype("add_layernorm_forward: x", x.dtype)
    n = int(x.shape[-1])
    if n > MAX_WIDTH:
        raise ValueError(f"add_layernorm_forward: x width {n} exceeds the one-tile limit {MAX_WIDTH}")
    if r is not None and (tuple(r.shape) != tuple(x.shape) or r.dtype != x.dtype):
        raise ValueError(
            f"add_layernorm_forward: r must match x (shape {tuple(x.shape)}, dtype {x.dtype}), "
            f"got shape {tuple(r.shape)}, dtype {r.dtype}"
        )
    _check_params(params, n)
    try:
        eps = float(eps)
    except TypeError as e:  # a tracer
        raise ValueError("add_layernorm_forward: eps must be a static Python float") from e

    m = x.size // n
    g = geometry(m, n, launcher, "fwd")
    x2 = x.reshape(m, n)
    r2 = x2 if r is None else r.reshape(m, n)
    y, mean, rstd = launcher.launch(
        _ln_fwd,
        grid=(cdiv(m, g.block_m),),
        inputs=[x2, r2, params["gamma"], params["beta"]],
        outputs=[
            jax.ShapeDtypeStruct((m, n), dtype),
            jax.ShapeDtypeStruct((m,), np.float32),
            jax.ShapeDtypeStruct((m,), np.float32),
        ],
        name="vitfuse_ln_fwd",
        num_warps=g.num_warps,
        M=m,
        N=n,
        eps=eps,
        HAS_R=r is not None,
        ROUND_S=dtype != np.float32,
        BLOCK_M=g.block_m,
        BLOCK_N=g.block_n,
    )
    return y.reshape(x.shape), (x, r, mean, rstd)


def add_layernorm_backward(params, cache, dy, *, launcher: Launcher):
    """Returns (ds, {"gamma": dgamma, "beta": dbeta}); ds is the gradient of x and of r."""
    x, r, mean, rstd = cache
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(
            f"add_layernorm_backward: dy must have the shape of x {tuple(x.shape)}, got {tuple(dy.shape)}"
        )
    dy_dtype = check_dtype("add_layernorm_backward: dy", dy.dtype)
    n = int(x.shape[-1])
    _check_params(params, n)
    m = x.size // n
    g = geometry(m, n, launcher, "bwd")
    x2 = x.reshape(m, n)
    r2 = x2 if r is None else r.reshape(m, n)
    ds, dw_part, db_part = launcher.launch(
        _ln_bwd,
        grid=(g.groups,),
        inputs=[dy.reshape(m, n), x2, r2, params["gamma"], mean, rstd],
        outputs=[
            jax.ShapeDtypeStruct((m, n), dy_dtype),
            jax.ShapeDtypeStruct((g.groups, n), np.float32),
            jax.ShapeDtypeStruct((g.groups, n), np.float32),
        ],
        name="vitfuse_ln_bwd",
        num_warps=g.num_warps,
        M=m,
        N=n,
        HAS_R=r is not None,
        ROUND_S=np.dtype(x.dtype) != np.float32,
        TILES=g.tiles,
        BLOCK_M=g.block_m,
        BLOCK_N=g.block_n,
    )
    dgamma, dbeta = launcher.launch(
        _ln_bwd_reduce,
        grid=(cdiv(n, g.reduce_n),),
        inputs=[dw_part, db_part],
        outputs=[jax.ShapeDtypeStruct((n,), np.float32), jax.ShapeDtypeStruct((n,), np.float32)],
        name="vitfuse_ln_bwd_reduce",
        num_warps=4,
        G=g.groups,
        N=n,
        BLOCK_G=g.reduce_g,
        BLOCK_N=g.reduce_n,
    )
    return ds.reshape(dy.shape), {"gamma": dgamma, "beta": dbeta}
