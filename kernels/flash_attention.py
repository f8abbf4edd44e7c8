"""Key-blocked (FlashAttention-2 style) attention on the packed QKV projection, forward and backward.

Must equal ``vit.layers.attention_forward`` / ``vit.layers.attention_backward`` (as the one-tile
kernel of kernels/attention.py does, with the same signatures and cache), for any sequence length:

    S = Q K^T / sqrt(Dh);  P = softmax(S);  P' = P * keep (attention dropout);  O = P' V

Shapes: B batch, L tokens, H heads, Dh head width (a power of two, 16..128), D = H * Dh. qkv is
(B, L, 3D) packed [Q | K | V], head h at columns h*Dh:(h+1)*Dh of each third; O is (B, L, D).
Both are read and written by strides (no head split/merge transposes), exactly as attention.py.
keep is the (B, H, L, L) dropout scale of the reference (0 or 1/(1-rate)), read block by block.

Unlike the one-tile kernel, no program ever holds the whole sequence: tiles are BLOCK_M query rows
by BLOCK_N keys, whatever L is, so shared memory and registers do not grow with L.

Forward: one program per (query block of BLOCK_M rows, head, batch), looping over the key blocks
of BLOCK_N keys with an online softmax. For query row i, after key blocks 1..j (S_ij the scores
of row i against key block j, keys beyond L set to -inf):

    m_i(j)  = max(m_i(j-1), max_n S_ij[n])                             running max
    alpha   = exp(m_i(j-1) - m_i(j))                                   rescales what came before
    l_i(j)  = alpha * l_i(j-1) + sum_n exp(S_ij[n] - m_i(j))           running sum
    acc(j)  = alpha * acc(j-1) + (exp(S_ij - m_i(j)) * keep_ij) V_j    rescaled accumulator

with m_i(0) = -inf, l_i(0) = 0, acc(0) = 0 (alpha = 0 at the first block: exp(-inf)). By
induction l_i(j) = sum_{n in blocks 1..j} exp(S_in - m_i(j)) and acc(j) = sum_n exp(S_in - m_i(j))
keep_in V_n: the rescaling moves every earlier term to the new max. After the last block

    O_i = acc / l_i = sum_n P_in keep_in V_n        LSE_i = m_i + log(l_i)

and only O and LSE (B, H, L) float32 are written: no L x L tensor. Every exponent is <= 0, so
nothing overflows. The code works in base 2 (exp2 is the GPU's native exponential): with
qk_scale = log2(e) / sqrt(Dh), s = Q K^T * qk_scale = S * log2(e), so exp(S - m) = 2^(s - m2)
with m2 = m * log2(e); m_i holds that running max of s, and LSE_i = (m_i + log2(l_i)) * ln(2).

Backward (as vit.layers.sdpa_backward, with P recomputed, never stored):

    P_ij = exp(S_ij - LSE_i) = 2^(s_ij - LSE_i * log2(e))      (the forward's softmax, exactly)
    dV = (P * keep)^T dO
    dP = (dO V^T) * keep
    delta_i = sum_j P_ij dP_ij = sum_j P_ij keep_ij sum_d dO_id V_jd = sum_d dO_id O_id
    dS = P * (dP - delta[:, None]) / sqrt(Dh)         (softmax backward, the 1/sqrt(Dh) folded in)
    dQ = dS K        dK = dS^T Q

delta = rowsum(dO * O) needs only dO and O, so a small kernel (_flash_bwd_delta) writes it first,
(B, H, L) float32. Then one launch (_flash_bwd) with two kinds of programs, and no atomics (every
element of dQKV has exactly one writer, so the result is deterministic):

- dK/dV programs (the first cdiv(L, BLOCK_N) along grid axis 0): own BLOCK_N keys, keep dk and dv
  in registers and loop over all query blocks of BLOCK_M rows, working on the transposed tiles
  s^T = K Q^T (BLOCK_N x BLOCK_M): pT = P^T, dpT = V dO^T = dP^T, dsT = dS^T, so that
  dv += (pT * keep^T) dO and dk += dsT Q need no transposed operand;
- dQ programs (the next cdiv(L, BLOCK_M)): own BLOCK_M query rows and loop over all key blocks,
  dq += dS K.

Both recompute S and dP for their tile (FlashAttention-2: 7 matmuls of L x L x Dh instead of 5, in
exchange for no L x L storage and no atomics). Masking: a query row beyond L loads q = dO = 0 and
LSE = +inf, so its P is 0 and it adds nothing to dK/dV; a key beyond L gets s = -inf in the dQ
programs (P = 0); in the dK/dV programs a key beyond L only touches its own rows of dk/dv, which
are never stored.

Dtypes: float32, bfloat16 or float16 in; float32 scores, softmax, statistics and accumulators;
half-precision P and dS rounded to the input dtype before their dots (as the reference rounds
P' and dS); outputs in the input dtype. In the interpreter, DOT_F32 upcasts half operands after
every load (its bf16 arithmetic is not usable, see kernels/interpreter.py).

Long because: the derivation above, the three kernels and their launcher read top to bottom in
one file with the same names (Triton tutorial 06's shape); splitting them would separate each
kernel from the lines of maths it implements.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import triton
import triton.language as tl

from kernels.attention import check_backward_inputs, check_forward_inputs, layout_constexprs
from kernels.launch import Launcher, cdiv, check_direction, check_dot_precision, next_power_of_2
from vit import layers

# what these kernels must equal (the checks in oracle/ compare against these very functions)
REFERENCE = (layers.attention_forward, layers.attention_backward)
LOG2E = 1.4426950408889634  # log2(e); the kernels write it (and ln 2) as literals
# (triton.jit functions read module globals only as tl.constexpr; literals keep them plain)


# ----------------------------------------------------------------------------------------------
# forward


@triton.jit
def _flash_fwd(
    QKV,  # (B, L, 3D) packed projection [Q | K | V]
    KEEP,  # (B, H, L, L) attention-dropout scale, read only when HAS_KEEP
    O,  # (B, L, D) output, head h at columns h*DH:(h+1)*DH
    LSE,  # (B, H, L) float32 log-sum-exp (natural log) of each row of S
    L: tl.constexpr,
    H: tl.constexpr,
    DH: tl.constexpr,
    D: tl.constexpr,
    stride_qkv_b: tl.constexpr,
    stride_qkv_l: tl.constexpr,
    stride_o_b: tl.constexpr,
    stride_o_l: tl.constexpr,
    qk_scale: tl.constexpr,  # log2(e) / sqrt(DH): scores in base-2 units
    HAS_KEEP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision for float32 operands
    DOT_F32: tl.constexpr,  # upcast half dot operands (interpreter only; see kernels/interpreter.py)
    BLOCK_M: tl.constexpr,  # query rows of this program
    BLOCK_N: tl.constexpr,  # keys per step of the loop
):
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    dt = QKV.dtype.element_ty
    d = tl.arange(0, DH)
    row = start_m + tl.arange(0, BLOCK_M)
    row_ok = row < L
    qkv_base = QKV + b * stride_qkv_b + h * DH
    keep_base = KEEP + (b * H + h) * L * L

    q = tl.load(qkv_base + row[:, None] * stride_qkv_l + d[None, :], mask=row_ok[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DH], tl.float32)

    for start_n in range(0, L, BLOCK_N):
        key = start_n + tl.arange(0, BLOCK_N)
        key_ok = key < L
        kv_offs = key[:, None] * stride_qkv_l + d[None, :]
        k = tl.load(qkv_base + D + kv_offs, mask=key_ok[:, None], other=0.0)
        v = tl.load(qkv_base + 2 * D + kv_offs, mask=key_ok[:, None], other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if HAS_KEEP:
            keep = tl.load(keep_base + row[:, None] * L + key[None, :],
                           mask=row_ok[:, None] & key_ok[None, :], other=0.0)
            p = p * keep.to(tl.float32)
        p_used = p.to(dt)
        if DOT_F32:
            p_used = p_used.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p_used, v, input_precision=DOT_PRECISION)
        m_i = m_new

    o = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # ln(2): back to natural-log units
    tl.store(O + b * stride_o_b + h * DH + row[:, None] * stride_o_l + d[None, :],
             o.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + (b * H + h) * L + row, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# backward


@triton.jit
def _flash_bwd_delta(
    O,  # (B, L, D) forward output
    DO,  # (B, L, D) upstream gradient, dtype of O
    DELTA,  # (B, H, L) float32 output: rowsum(dO * O) per head
    L: tl.constexpr,
    H: tl.constexpr,
    DH: tl.constexpr,
    stride_o_b: tl.constexpr,
    stride_o_l: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    row = start_m + tl.arange(0, BLOCK_M)
    row_ok = row < L
    offs = b * stride_o_b + h * DH + row[:, None] * stride_o_l + tl.arange(0, DH)[None, :]
    o = tl.load(O + offs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + (b * H + h) * L + row, tl.sum(o * do, axis=1), mask=row_ok)


@triton.jit
def _bwd_dkdv(
    qkv_base, do_base, lse_base, delta_base, keep_base, dqkv_base,  # this (batch, head)'s origins
    start_n,  # first key of this program's block
    L: tl.constexpr,
    DH: tl.constexpr,
    D: tl.constexpr,
    stride_qkv_l: tl.constexpr,
    stride_o_l: tl.constexpr,
    qk_scale: tl.constexpr,
    sm_scale: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dK, dV of keys start_n : start_n + BLOCK_N, summed over every query block."""
    dt = qkv_base.dtype.element_ty
    d = tl.arange(0, DH)
    key = start_n + tl.arange(0, BLOCK_N)
    key_ok = key < L
    kv_offs = key[:, None] * stride_qkv_l + d[None, :]
    k = tl.load(qkv_base + D + kv_offs, mask=key_ok[:, None], other=0.0)
    v = tl.load(qkv_base + 2 * D + kv_offs, mask=key_ok[:, None], other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, DH], tl.float32)
    dv = tl.zeros([BLOCK_N, DH], tl.float32)

    for start_m in range(0, L, BLOCK_M):
        row = start_m + tl.arange(0, BLOCK_M)
        row_ok = row < L
        q = tl.load(qkv_base + row[:, None] * stride_qkv_l + d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + row[:, None] * stride_o_l + d[None, :], mask=row_ok[:, None], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        # rows beyond L: LSE = +inf, so their P^T column is 0
        lse2 = tl.load(lse_base + row, mask=row_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_base + row, mask=row_ok, other=0.0)

        # P^T = 2^(s^T - LSE * log2(e)),  s^T = K Q^T * qk_scale   (BLOCK_N x BLOCK_M)
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        pt = tl.exp2(st - lse2[None, :])
        if HAS_KEEP:
            keept = tl.load(keep_base + row[None, :] * L + key[:, None],
                            mask=row_ok[None, :] & key_ok[:, None], other=0.0).to(tl.float32)
            pt_used = pt * keept
        else:
            pt_used = pt

        # dV += (P * keep)^T dO
        pt_used = pt_used.to(dt)
        if DOT_F32:
            pt_used = pt_used.to(tl.float32)
        dv += tl.dot(pt_used, do, input_precision=DOT_PRECISION)

        # dP^T = (V dO^T) * keep^T;  dS^T = P^T * (dP^T - delta) / sqrt(Dh);  dK += dS^T Q
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if HAS_KEEP:
            dpt = dpt * keept
        dst = (pt * (dpt - delta[None, :]) * sm_scale).to(dt)
        if DOT_F32:
            dst = dst.to(tl.float32)
        dk += tl.dot(dst, q, input_precision=DOT_PRECISION)

    out_dt = dqkv_base.dtype.element_ty
    tl.store(dqkv_base + D + kv_offs, dk.to(out_dt), mask=key_ok[:, None])
    tl.store(dqkv_base + 2 * D + kv_offs, dv.to(out_dt), mask=key_ok[:, None])


@triton.jit
def _bwd_dq(
    qkv_base, do_base, lse_base, delta_base, keep_base, dqkv_base,  # this (batch, head)'s origins
    start_m,  # first query row of this program's block
    L: tl.constexpr,
    DH: tl.constexpr,
    D: tl.constexpr,
    stride_qkv_l: tl.constexpr,
    stride_o_l: tl.constexpr,
    qk_scale: tl.constexpr,
    sm_scale: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dQ of query rows start_m : start_m + BLOCK_M, summed over every key block."""
    dt = qkv_base.dtype.element_ty
    d = tl.arange(0, DH)
    row = start_m + tl.arange(0, BLOCK_M)
    row_ok = row < L
    q = tl.load(qkv_base + row[:, None] * stride_qkv_l + d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(do_base + row[:, None] * stride_o_l + d[None, :], mask=row_ok[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(lse_base + row, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_base + row, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, DH], tl.float32)

    for start_n in range(0, L, BLOCK_N):
        key = start_n + tl.arange(0, BLOCK_N)
        key_ok = key < L
        kv_offs = key[:, None] * stride_qkv_l + d[None, :]
        k = tl.load(qkv_base + D + kv_offs, mask=key_ok[:, None], other=0.0)
        v = tl.load(qkv_base + 2 * D + kv_offs, mask=key_ok[:, None], other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        # P = 2^(s - LSE * log2(e)); keys beyond L: s = -inf, P = 0
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(key_ok[None, :], s, float("-inf"))
        p = tl.exp2(s - lse2[:, None])

        # dP = (dO V^T) * keep;  dS = P * (dP - delta) / sqrt(Dh);  dQ += dS K
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_KEEP:
            keep = tl.load(keep_base + row[:, None] * L + key[None, :],
                           mask=row_ok[:, None] & key_ok[None, :], other=0.0)
            dp = dp * keep.to(tl.float32)
        ds = (p * (dp - delta[:, None]) * sm_scale).to(dt)
        if DOT_F32:
            ds = ds.to(tl.float32)
        dq += tl.dot(ds, k, input_precision=DOT_PRECISION)

    tl.store(dqkv_base + row[:, None] * stride_qkv_l + d[None, :],
             dq.to(dqkv_base.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _flash_bwd(
    QKV,  # (B, L, 3D) forward input
    DO,  # (B, L, D) upstream gradient, dtype of QKV
    LSE,  # (B, H, L) float32 forward log-sum-exp
    DELTA,  # (B, H, L) float32 rowsum(dO * O), from _flash_bwd_delta
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
    qk_scale: tl.constexpr,  # log2(e) / sqrt(DH)
    sm_scale: tl.constexpr,  # 1 / sqrt(DH)
    HAS_KEEP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
    N_KEY_BLOCKS: tl.constexpr,  # cdiv(L, BLOCK_N): programs below this do dK/dV, the rest dQ
    BLOCK_M: tl.constexpr,  # query rows per block
    BLOCK_N: tl.constexpr,  # keys per block
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    qkv_base = QKV + b * stride_qkv_b + h * DH
    dqkv_base = DQKV + b * stride_qkv_b + h * DH
    do_base = DO + b * stride_o_b + h * DH
    lse_base = LSE + (b * H + h) * L
    delta_base = DELTA + (b * H + h) * L
    keep_base = KEEP + (b * H + h) * L * L
    if pid < N_KEY_BLOCKS:
        _bwd_dkdv(qkv_base, do_base, lse_base, delta_base, keep_base, dqkv_base, pid * BLOCK_N,
                  L, DH, D, stride_qkv_l, stride_o_l, qk_scale, sm_scale, HAS_KEEP, DOT_PRECISION,
                  DOT_F32, BLOCK_M, BLOCK_N)
    else:
        _bwd_dq(qkv_base, do_base, lse_base, delta_base, keep_base, dqkv_base,
                (pid - N_KEY_BLOCKS) * BLOCK_M,
                L, DH, D, stride_qkv_l, stride_o_l, qk_scale, sm_scale, HAS_KEEP, DOT_PRECISION,
                DOT_F32, BLOCK_M, BLOCK_N)


# ----------------------------------------------------------------------------------------------
# launch geometry


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Launch geometry of one direction. Forward: a program owns block_m query rows and steps
    through the keys block_n at a time. Backward: a dK/dV program owns block_n keys and steps
    through the queries block_m rows at a time; a dQ program owns block_m rows and steps block_n
    keys. Either way every tile is block_m x block_n (or its transpose)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"Blocks.{name} must be a power of two >= 16 (the smallest tl.dot), got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"Blocks.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"Blocks.num_stages must be >= 1, got {self.num_stages}")

    def fit(self, l: int) -> "Blocks":
        """The same geometry with blocks no larger than the sequence needs (L=17 -> 32 rows)."""
        cap = max(16, next_power_of_2(l))
        return dataclasses.replace(self, block_m=min(self.block_m, cap), block_n=min(self.block_n, cap))


# Default launch geometry per (dot kind, head dim): (forward, backward). Dot kinds: "ieee" is
# float32 with exact dots (CUDA-core FMAs: operands and accumulators spread thinly over the
# threads, so the tiles are smallest), "tf32" float32 on tensor cores, "tf32x3" float32 on tensor
# cores in three passes (each operand split into a high part rounded to tf32 and the remainder, and
# every dot done as hi*hi + hi*lo + lo*hi: three times the tensor-core instructions of tf32, plus
# the splitting, and more live registers), "half" bf16/fp16. Each is the largest tile found with no
# register spill (stack 0) on sm_90, and none on sm_80 either where one was found, with shared
# memory within sm_80's 163 KiB, with and without dropout, at L = 65, 197, 577, 4096 and 8192
# (``python -m kernels.compile_check``, triton 3.9 and the ptxas in its wheel;
# bench/results/compile-check-2026-11-30.md). Rejected there, for example: ieee forward 64x64
# (spills kilobytes at Dh=64); ieee backward 64x32 with 8 warps (ptxas trades registers for
# occupancy at L=4096: 128 registers + 32 stack bytes); half backward 64x64 with 8 warps at Dh=64
# (255 registers + 40 bytes on sm_80) and Dh=128 (136 bytes on sm_90); tf32 backward 32x32 with 8
# warps at Dh=64 (24 bytes). tf32x3 (triton 3.6.0, the GPU image's compiler, sm_90, with dropout,
# at L = 197 and 4096, then every shape above on sm_80 and sm_90): smaller than tf32's except the
# forward at Dh 16 and 32; rejected, for example, forward 128x32 at Dh=64 (255 registers + 8
# bytes), backward 64x32 at Dh=64 (24 bytes), 64x64 at Dh=32 (408 bytes), 32x32 with 4 warps at
# Dh=32 (120 bytes); forward 64x32 at Dh=64 spills 8 bytes on sm_80, hence 64x16; at Dh=128 only
# 16x16 backward tiles are spill-free (but at L=1: 16-32 bytes). All of that was compile_check
# before it compiled as jax-triton does (16-byte aligned pointers, so vectorized loads; commit
# 0a94e4c). Compiled that way (bench/results/compile-check-2026-12-01.md) these blocks spill on sm_90
# only in the ieee backward with dropout at L=65 (16 bytes, triton 3.6.0; the dispatcher runs the
# one-tile kernel there), and on sm_80 in the tf32 backward at L=65 and the ieee backward with
# dropout at L=4096 and 8192, Dh=64 (8 bytes each); every tf32x3 block is spill-free with triton
# 3.6.0 and 3.9 (tests/test_kernels_spills.py checks L=197 at Dh 16 to 128). With the registers
# the alignment frees, larger tiles may now fit: a sweep again, or the GPU tune, would tell.
_DEFAULT_BLOCKS = {
    ("ieee", 16): (Blocks(64, 32, 8, 2), Blocks(32, 32, 4, 2)),
    ("ieee", 32): (Blocks(64, 32, 8, 2), Blocks(32, 16, 4, 2)),
    ("ieee", 64): (Blocks(64, 32, 8, 2), Blocks(32, 16, 4, 2)),
    ("ieee", 128): (Blocks(64, 32, 8, 2), Blocks(32, 16, 4, 2)),
    ("tf32", 16): (Blocks(128, 32, 8, 2), Blocks(64, 64, 8, 2)),
    ("tf32", 32): (Blocks(128, 32, 8, 2), Blocks(64, 64, 8, 2)),
    ("tf32", 64): (Blocks(128, 32, 8, 2), Blocks(64, 32, 8, 2)),
    ("tf32", 128): (Blocks(64, 32, 8, 2), Blocks(32, 32, 4, 2)),
    ("tf32x3", 16): (Blocks(128, 32, 8, 2), Blocks(32, 32, 4, 2)),
    ("tf32x3", 32): (Blocks(128, 32, 8, 2), Blocks(64, 16, 8, 2)),
    ("tf32x3", 64): (Blocks(64, 16, 8, 2), Blocks(64, 16, 8, 2)),
    ("tf32x3", 128): (Blocks(32, 32, 8, 2), Blocks(16, 16, 8, 2)),
    ("half", 16): (Blocks(128, 64, 8, 2), Blocks(64, 64, 8, 2)),
    ("half", 32): (Blocks(128, 64, 8, 2), Blocks(64, 64, 8, 2)),
    ("half", 64): (Blocks(128, 64, 8, 2), Blocks(64, 32, 8, 2)),
    ("half", 128): (Blocks(64, 64, 8, 2), Blocks(64, 32, 4, 2)),
}


def dot_kind(dtype, dot_precision: str) -> str:
    if np.dtype(dtype).itemsize == 2:
        return "half"
    return dot_precision  # "ieee", "tf32" or "tf32x3"


def default_blocks(l: int, dh: int, dtype, dot_precision: str, direction: str) -> Blocks:
    """The geometry of ``direction`` ("fwd" or "bwd") used until a GPU tune says otherwise
    (kernels/dispatch.py's table): from _DEFAULT_BLOCKS (chosen from compile figures, see there),
    shrunk to the sequence (Blocks.fit)."""
    forward_blocks, backward_blocks = _DEFAULT_BLOCKS[(dot_kind(dtype, dot_precision), dh)]
    return (forward_blocks if check_direction(direction) == "fwd" else backward_blocks).fit(l)


def _consts(l, d, heads, dtype, launcher: Launcher, dot_precision):
    """The layout constexprs both attention kernels share (attention.layout_constexprs), and the
    score scale in base 2 (exp2 below)."""
    return dict(layout_constexprs(l, d, heads, dtype, launcher, dot_precision),
                qk_scale=LOG2E / math.sqrt(d // heads))


# ----------------------------------------------------------------------------------------------
# forward / backward (same signatures as vit.layers and kernels/attention.py, plus the launch
# settings)


def attention_forward(qkv, heads, keep_scale=None, *, launcher: Launcher, dot_precision: str = "ieee",
                      blocks: Blocks | None = None):
    """qkv (B, L, 3D) -> (o (B, L, D), cache). keep_scale: optional (B, H, L, L) dropout scale.
    blocks: the launch geometry (default: ``default_blocks``)."""
    dot_precision = check_dot_precision(dot_precision)
    b, l, d, dh, heads = check_forward_inputs(qkv, heads, keep_scale)
    blocks = (blocks or default_blocks(l, dh, qkv.dtype, dot_precision, "fwd")).fit(l)
    consts = _consts(l, d, heads, qkv.dtype, launcher, dot_precision)
    o, lse = launcher.launch(
        _flash_fwd,
        grid=(cdiv(l, blocks.block_m), heads, b),
        inputs=[qkv, qkv if keep_scale is None else keep_scale],
        outputs=[
            jax.ShapeDtypeStruct((b, l, d), qkv.dtype),
            jax.ShapeDtypeStruct((b, heads, l), np.float32),
        ],
        name="vitfuse_flash_fwd",
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
        HAS_KEEP=keep_scale is not None,
        BLOCK_M=blocks.block_m,
        BLOCK_N=blocks.block_n,
        **consts,
    )
    # the one-tile kernel's cache, so either backward can take either forward's cache
    return o, (qkv, o, lse, keep_scale)


def attention_backward(cache, do, *, launcher: Launcher, dot_precision: str = "ieee",
                       blocks: Blocks | None = None):
    """dO (B, L, D) -> dQKV (B, L, 3D), packed like qkv. blocks: as for attention_forward."""
    dot_precision = check_dot_precision(dot_precision)
    qkv, o, lse, keep_scale = cache
    b, l, d, heads = check_backward_inputs(cache, do)
    dh = d // heads
    do = do.astype(qkv.dtype)
    blocks = (blocks or default_blocks(l, dh, qkv.dtype, dot_precision, "bwd")).fit(l)
    consts = _consts(l, d, heads, qkv.dtype, launcher, dot_precision)
    delta_rows = min(64, max(16, next_power_of_2(l)))
    (delta,) = launcher.launch(
        _flash_bwd_delta,
        grid=(cdiv(l, delta_rows), heads, b),
        inputs=[o, do],
        outputs=[jax.ShapeDtypeStruct((b, heads, l), np.float32)],
        name="vitfuse_flash_bwd_delta",
        num_warps=4,
        L=l, H=heads, DH=dh, stride_o_b=l * d, stride_o_l=d, BLOCK_M=delta_rows,
    )
    n_key_blocks = cdiv(l, blocks.block_n)
    (dqkv,) = launcher.launch(
        _flash_bwd,
        grid=(n_key_blocks + cdiv(l, blocks.block_m), heads, b),
        inputs=[qkv, do, lse, delta, qkv if keep_scale is None else keep_scale],
        outputs=[jax.ShapeDtypeStruct((b, l, 3 * d), qkv.dtype)],
        name="vitfuse_flash_bwd",
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
        sm_scale=1.0 / math.sqrt(dh),
        HAS_KEEP=keep_scale is not None,
        N_KEY_BLOCKS=n_key_blocks,
        BLOCK_M=blocks.block_m,
        BLOCK_N=blocks.block_n,
        **consts,
    )
    return dqkv
