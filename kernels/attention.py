"""Fused multi-head attention core on the packed QKV projection, forward and backward.

Must equal ``vit.layers.attention_forward`` / ``vit.layers.attention_backward``:

    S = Q K^T / sqrt(Dh);  P = softmax(S);  P' = P * keep_scale (attention dropout);  O = P' V

Shapes: B batch, L tokens, H heads, Dh head width (a power of two, 16..128), D = H * Dh.
qkv is (B, L, 3D) packed [Q | K | V] with head h at columns h*Dh:(h+1)*Dh of each third; O is
(B, L, D) with the same column layout. The kernels read and write those layouts by strides, so
the fused path has no head split/merge transposes.

One program per (batch, head) holds the whole sequence: K and V for all L tokens in one tile of
BLOCK_L = the next power of two >= L rows (at least 16, the smallest tl.dot), keys beyond L masked
with -inf; the query rows go through in steps of BLOCK_M (<= 64, so the BLOCK_M x BLOCK_L score
tile and its shared-memory layout conversions stay small), rows beyond L never stored. Softmax in
float32 with the row max subtracted; the forward saves the log-sum-exp per row,
LSE = m + log(sum exp(S - m)), (B, H, L) float32, and no L x L tensor. The backward recomputes
P = exp(S - LSE) from Q, K and LSE (as Triton tutorial 06-fused-attention does), accumulates dK
and dV over the query steps and writes dQ per step:

    dV = P'^T dO;  dP = (dO V^T) * keep_scale;  delta = rowsum(dO * O) = rowsum(P * dP);
    dS = P * (dP - delta) / sqrt(Dh);  dQ = dS K;  dK = dS^T Q

(rowsum(P * dP) = sum_j P_ij keep_ij sum_d dO_id V_jd = sum_d dO_id O_id, dropout included.)
dQ, dK, dV go straight into the packed dQKV (B, L, 3D).

Dtypes: float32, bfloat16 or float16 in; float32 softmax, statistics and dot accumulation;
outputs in the input dtype. Half-precision P and dS are rounded to the input dtype before their
dots, as the reference does.
"""

import math
import operator

import jax
import numpy as np
import triton
import triton.language as tl

from kernels.launch import Launcher, check_direction, check_dot_precision, check_dtype, next_power_of_2
from vit import layers

# what these kernels must equal (the checks in oracle/ compare against these very functions)
REFERENCE = (layers.attention_forward, layers.attention_backward)
HEAD_DIMS = (16, 32, 64, 128)  # the head widths Dh the kernels take (powers of two, 16..128)
MAX_LEN = 1024  # the whole sequence is one tile; beyond this a tiled (flash) kernel is needed
MAX_KV_TILE_BYTES = 32 * 1024  # compiled path only, see compiled_fits


# ----------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _attn_fwd(
    QKV,  # (B, L, 3D) packed projection [Q | K | V]
    KEEP,  # (B, H, L, L) attention-dropout scale, read only when HAS_KEEP
    O,  # (B, L, D) output, head h at columns h*DH:(h+1)*DH
    LSE,  # (B, H, L) float32 log-sum-exp of each row of S
    L: tl.constexpr,
    H: tl.constexpr,
    DH: tl.constexpr,
    D: tl.constexpr,
    stride_qkv_b: tl.constexpr,
    stride_qkv_l: tl.constexpr,
    stride_o_b: tl.constexpr,
    stride_o_l: tl.constexpr,
    sm_scale: tl.constexpr,  # 1/sqrt(DH)
    HAS_KEEP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision for float32 operands
    DOT_F32: tl.constexpr,  # upcast half dot operands (interpreter only; see kernels/interpreter.py)
    BLOCK_L: tl.constexpr,  # keys: the whole sequence, padded
    BLOCK_M: tl.constexpr,  # query rows per step (divides BLOCK_L)
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    d = tl.arange(0, DH)
    key = tl.arange(0, BLOCK_L)
    key_ok = key < L
    qkv_base = QKV + b * stride_qkv_b + h * DH
    o_base = O + b * stride_o_b + h * DH
    keep_base = KEEP + (b * H + h) * L * L
    lse_base = LSE + (b * H + h) * L

    kv_offs = key[:, None] * stride_qkv_l + d[None, :]
    kv_mask = key_ok[:, None] & (d[None, :] < DH)
    k = tl.load(qkv_base + D + kv_offs, mask=kv_mask, other=0.0)
    v = tl.load(qkv_base + 2 * D + kv_offs, mask=kv_mask, other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    kt = tl.trans(k)

    for m0 in range(0, L, BLOCK_M):
        row = m0 + tl.arange(0, BLOCK_M)
        row_ok = row < L
        row_mask = row_ok[:, None] & (d[None, :] < DH)
        q = tl.load(qkv_base + row[:, None] * stride_qkv_l + d[None, :], mask=row_mask, other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)

        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * sm_scale
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m = tl.max(s, axis=1)
        e = tl.exp(s - m[:, None])
        row_sum = tl.sum(e, axis=1)
        p = e / row_sum[:, None]
        lse = m + tl.log(row_sum)

        if HAS_KEEP:
            keep_mask = row_ok[:, None] & key_ok[None, :]
            keep = tl.load(keep_base + row[:, None] * L + key[None, :], mask=keep_mask, other=0.0)
            p = p * keep.to(tl.float32)
        p_used = p.to(QKV.dtype.element_ty)
        if DOT_F32:
            p_used = p_used.to(tl.float32)
        o = tl.dot(p_used, v, input_precision=DOT_PRECISION)

        tl.store(o_base + row[:, None] * stride_o_l + d[None, :], o.to(O.dtype.element_ty), mask=row_mask)
        tl.store(lse_base + row, lse, mask=row_ok)


@triton.jit
def _attn_bwd(
    QKV,  # (B, L, 3D) forward input
    O,  # (B, L, D) forward output
    DO,  # (B, L, D) upstream gradient
    LSE,  # (B, H, L) float32 forward log-sum-exp
    KEEP,  # (B, H, L, L) attention-dropout scale, read only when HAS_KEEP
    DQKV,  # (B, L, 3D) output [dQ | dK | dV], same layout as QKV
    L: tl.constexpr,
    H: tl.constexpr,
    DH: tl.constexpr,
    D: tl.constexpr,
    stride_qkv_b: tl.constexpr,
    stride_qkv_l: tl.constexpr,
    stride_o_b: tl.constexpr,
    stride_o_l: tl.constexpr,
    sm_scale: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    d = tl.arange(0, DH)
    key = tl.arange(0, BLOCK_L)
    key_ok = key < L
    qkv_base = QKV + b * stride_qkv_b + h * DH
    dqkv_base = DQKV + b * stride_qkv_b + h * DH
    o_offs_base = b * stride_o_b + h * DH
    keep_base = KEEP + (b * H + h) * L * L
    lse_base = LSE + (b * H + h) * L
    dt = QKV.dtype.element_ty

    kv_offs = key[:, None] * stride_qkv_l + d[None, :]
    kv_mask = key_ok[:, None] & (d[None, :] < DH)
    k = tl.load(qkv_base + D + kv_offs, mask=kv_mask, other=0.0)
    v = tl.load(qkv_base + 2 * D + kv_offs, mask=kv_mask, other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    kt = tl.trans(k)
    vt = tl.trans(v)
    dk = tl.zeros([BLOCK_L, DH], dtype=tl.float32)
    dv = tl.zeros([BLOCK_L, DH], dtype=tl.float32)

    for m0 in range(0, L, BLOCK_M):
        row = m0 + tl.arange(0, BLOCK_M)
        row_ok = row < L
        row_mask = row_ok[:, None] & (d[None, :] < DH)
        q = tl.load(qkv_base + row[:, None] * stride_qkv_l + d[None, :], mask=row_mask, other=0.0)
        o_offs = o_offs_base + row[:, None] * stride_o_l + d[None, :]
        do = tl.load(DO + o_offs, mask=row_mask, other=0.0)
        o = tl.load(O + o_offs, mask=row_mask, other=0.0)
        lse = tl.load(lse_base + row, mask=row_ok, other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)

        # recompute P from Q, K and the saved LSE; rows and columns beyond L are zero
        ll_mask = row_ok[:, None] & key_ok[None, :]
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * sm_scale
        p = tl.where(ll_mask, tl.exp(s - lse[:, None]), 0.0)
        if HAS_KEEP:
            keep = tl.load(keep_base + row[:, None] * L + key[None, :], mask=ll_mask, other=0.0)
            keep = keep.to(tl.float32)
            p_used = p * keep
        else:
            p_used = p

        # dV += P'^T dO
        p_used = p_used.to(dt)
        if DOT_F32:
            p_used = p_used.to(tl.float32)
        dv += tl.dot(tl.trans(p_used), do, input_precision=DOT_PRECISION)

        # dP = (dO V^T) * keep;  dS = P * (dP - delta) / sqrt(Dh),  delta = rowsum(dO * O)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        if HAS_KEEP:
            dp = dp * keep
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
        ds = p * (dp - delta[:, None]) * sm_scale
        ds = ds.to(dt)
        if DOT_F32:
            ds = ds.to(tl.float32)

        # dQ = dS K (rows of this step);  dK += dS^T Q
        dq = tl.dot(ds, k, input_precision=DOT_PRECISION)
        tl.store(dqkv_base + row[:, None] * stride_qkv_l + d[None, :], dq.to(DQKV.dtype.element_ty), mask=row_mask)
        dk += tl.dot(tl.trans(ds), q, input_precision=DOT_PRECISION)

    tl.store(dqkv_base + D + kv_offs, dk.to(DQKV.dtype.element_ty), mask=kv_mask)
    tl.store(dqkv_base + 2 * D + kv_offs, dv.to(DQKV.dtype.element_ty), mask=kv_mask)


# ----------------------------------------------------------------------------------------------
# forward / backward (same signatures as vit.layers, plus the launch settings)


def layout_constexprs(l, d, heads, dtype, launcher: Launcher, dot_precision):
    """The constexprs both attention kernels (this one and kernels/flash_attention.py) take: the
    sizes, the strides of qkv (B, L, 3D) and o (B, L, D), and how a dot is computed."""
    return dict(
        L=l,
        H=heads,
        DH=d // heads,
        D=d,
        stride_qkv_b=l * 3 * d,
        stride_qkv_l=3 * d,
        stride_o_b=l * d,
        stride_o_l=d,
        DOT_PRECISION=dot_precision,
        DOT_F32=launcher.half_dots_in_float32 and np.dtype(dtype).itemsize == 2,
    )


def geometry(l, d, heads, dtype, launcher: Launcher, dot_precision, *, direction: str):
    """Constexprs for the kernel of ``direction`` ("fwd" or "bwd"), and the number of warps.

    BLOCK_M (query rows per step) and the warps are chosen so that no kernel spills registers
    on sm_90 where a spill-free choice exists (``python -m kernels.compile_check`` prints
    registers and stack per kernel; sm_90, triton 3.9). The backward keeps five BLOCK_M x BLOCK_L
    float32 tiles (S, P, dP, dS, dropout) live next to the dK and dV accumulators: from
    BLOCK_L = 64 on it takes 16 rows per step over 8 warps (L=65, Dh=32, float32: 252 registers
    and no stack, against 255 registers and 528 stack bytes at 32 rows, in compile_check's
    compile before it aligned pointers as jax-triton does; aligned, 16 rows take 244 registers,
    no stack). The forward keeps
    fewer: 32 rows in float32 (16 once the K/V tile reaches 8192 elements), 64 in half precision.
    """
    dh = d // heads
    block_l = max(16, next_power_of_2(l))
    half = np.dtype(dtype) != np.float32
    if check_direction(direction) == "bwd":
        block_m = 16 if block_l >= 64 else 32
    elif half:
        block_m = 64
    else:
        block_m = 16 if block_l * dh >= 8192 else 32
    consts = dict(
        layout_constexprs(l, d, heads, dtype, launcher, dot_precision),
        sm_scale=1.0 / math.sqrt(dh),
        BLOCK_L=block_l,
        BLOCK_M=min(block_l, block_m),
    )
    num_warps = 8 if block_l >= 64 else 4
    return consts, num_warps


def kv_tile_budget(dot_precision: str) -> int:
    """Bytes the compiled kernels' K/V tile may take: MAX_KV_TILE_BYTES, halved for tf32x3
    dots, whose kernels need about twice the shared memory at the same tile (triton 3.6.0, L=65
    Dh=32 backward: 118,784 bytes against tf32's 63,488), so a 32 KiB tile takes 212,992 to
    233,472 bytes, over sm_80's limit and, at L=197 Dh=32, over sm_90's (compile_check)."""
    return MAX_KV_TILE_BYTES // 2 if dot_precision == "tf32x3" else MAX_KV_TILE_BYTES


def compiled_fits(l: int, dh: int, dtype, dot_precision: str) -> bool:
    """Whether the compiled kernels fit a GPU's shared memory: K and V for the whole sequence
    stay resident, so their tile (BLOCK_L x Dh) is capped at 32 KiB (16 KiB with tf32x3 dots:
    kv_tile_budget), which keeps the backward under the sm_80 limit of 163 KiB (measured by
    ``python -m kernels.compile_check``). The interpreter has no such limit."""
    block_l = max(16, next_power_of_2(l))
    return block_l * dh * np.dtype(dtype).itemsize <= kv_tile_budget(dot_precision)


def _check_qkv(qkv, heads):
    if qkv.ndim != 3:
        raise ValueError(f"attention_forward: qkv must be (B, L, 3D), got shape {tuple(qkv.shape)}")
    b, l, d3 = (int(s) for s in qkv.shape)
    try:
        n_heads = operator.index(heads)  # a Python or numpy int; a traced value is an error
    except TypeError:
        n_heads = 0
    if n_heads < 1:
        raise ValueError(f"attention_forward: heads must be a static positive int, got {heads!r}")
    heads = n_heads
    if d3 % (3 * heads) != 0 or d3 == 0:
        raise ValueError(
            f"attention_forward: qkv last axis must be 3 * heads * Dh = 3 * {heads} * Dh, got {d3}"
        )
    dh = d3 // (3 * heads)
    if dh not in HEAD_DIMS:
        raise ValueError(
            f"attention_forward: head dim Dh = 3D / (3 * heads) = {dh}; the kernel needs a power of "
            "two from 16 to 128"
        )
    if b < 1 or l < 1:
        raise ValueError(f"attention_forward: qkv must be non-empty, got shape {tuple(qkv.shape)}")
    check_dtype("attention_forward: qkv", qkv.dtype)
    return b, l, d3 // 3, dh, heads


def check_forward_inputs(qkv, heads, keep_scale):
    """Shapes and dtypes of an attention_forward call (shared with kernels/flash_attention.py);
    -> (B, L, D, Dh, heads) as Python ints."""
    b, l, d, dh, heads = _check_qkv(qkv, heads)
    if keep_scale is not None:
        if tuple(keep_scale.shape) != (b, heads, l, l):
            raise ValueError(
                f"attention_forward: keep_scale must have shape (B, H, L, L) = {(b, heads, l, l)}, "
                f"got {tuple(keep_scale.shape)}"
            )
        check_dtype("attention_forward: keep_scale", keep_scale.dtype)
    return b, l, d, dh, heads


def check_shape(b: int, l: int, heads: int, dh: int) -> None:
    """A ValueError, in attention_forward's words, for a (B, L, H, Dh) that no attention kernel
    takes (the check and tuning commands ask before they run anything)."""
    check_forward_inputs(jax.ShapeDtypeStruct((b, l, 3 * heads * dh), np.float32), heads, None)


def check_backward_inputs(cache, do):
    """-> (B, L, D, heads) of an attention_backward call, after checking dO against the cache."""
    _, o, lse, _ = cache
    b, l, d = (int(s) for s in o.shape)
    heads = int(lse.shape[1])
    if tuple(do.shape) != (b, l, d):
        raise ValueError(f"attention_backward: do must have shape (B, L, D) = {(b, l, d)}, got {tuple(do.shape)}")
    check_dtype("attention_backward: do", do.dtype)
    return b, l, d, heads


def check_one_tile(what: str, l: int, dh: int, dtype, launcher: Launcher, dot_precision: str) -> None:
    """Refuse, before any launch, a sequence the one-tile kernel cannot hold: over MAX_LEN, or
    compiled with a K/V tile over the shared-memory budget (``compiled_fits``); both directions
    check, since either backward takes either forward's cache."""
    if l > MAX_LEN:
        raise ValueError(
            f"{what}: sequence length {l} exceeds the one-tile limit {MAX_LEN} "
            "(kernels/attention.py holds the whole sequence in one tile; the key-blocked kernel, "
            "kernels/flash_attention.py, takes any length, and kernels.fused_ops sends it there)"
        )
    if launcher.on_gpu and not compiled_fits(l, dh, dtype, dot_precision):
        raise ValueError(
            f"{what}: L={l} (tile {max(16, next_power_of_2(l))}) x Dh={dh} in {np.dtype(dtype)} "
            f"needs more GPU shared memory than the single-tile kernel may use (K/V tile over "
            f"{kv_tile_budget(dot_precision) // 1024} KiB with {dot_precision} dots); use bfloat16, "
            "a smaller head dim, the key-blocked kernel, or the reference ops"
        )


def attention_forward(qkv, heads, keep_scale=None, *, launcher: Launcher, dot_precision: str = "ieee"):
    """qkv (B, L, 3D) -> (o (B, L, D), cache). keep_scale: optional (B, H, L, L) dropout scale."""
    dot_precision = check_dot_precision(dot_precision)
    b, l, d, dh, heads = check_forward_inputs(qkv, heads, keep_scale)
    check_one_tile("attention_forward", l, dh, qkv.dtype, launcher, dot_precision)
    consts, num_warps = geometry(l, d, heads, qkv.dtype, launcher, dot_precision, direction="fwd")
    o, lse = launcher.launch(
        _attn_fwd,
        grid=(b, heads),
        inputs=[qkv, qkv if keep_scale is None else keep_scale],
        outputs=[
            jax.ShapeDtypeStruct((b, l, d), qkv.dtype),
            jax.ShapeDtypeStruct((b, heads, l), np.float32),
        ],
        name="vitfuse_attn_fwd",
        num_warps=num_warps,
        HAS_KEEP=keep_scale is not None,
        **consts,
    )
    # everything the backward needs; heads is lse.shape[1], so the cache is arrays only
    return o, (qkv, o, lse, keep_scale)


def attention_backward(cache, do, *, launcher: Launcher, dot_precision: str = "ieee"):
    """dO (B, L, D) -> dQKV (B, L, 3D), packed like qkv."""
    dot_precision = check_dot_precision(dot_precision)
    qkv, o, lse, keep_scale = cache
    b, l, d, heads = check_backward_inputs(cache, do)
    # the cache may come from the key-blocked forward, which takes any length
    check_one_tile("attention_backward", l, d // heads, qkv.dtype, launcher, dot_precision)
    do = do.astype(qkv.dtype)
    consts, num_warps = geometry(l, d, heads, qkv.dtype, launcher, dot_precision, direction="bwd")
    (dqkv,) = launcher.launch(
        _attn_bwd,
        grid=(b, heads),
        inputs=[qkv, o, do, lse, qkv if keep_scale is None else keep_scale],
        outputs=[jax.ShapeDtypeStruct((b, l, 3 * d), qkv.dtype)],
        name="vitfuse_attn_bwd",
        num_warps=num_warps,
        HAS_KEEP=keep_scale is not None,
        **consts,
    )
    return dqkv
