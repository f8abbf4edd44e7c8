"""Attention core on the packed QKV projection: qkv (B, L, 3D) -> o (B, L, D), forward and
forward+backward, at the product shape (B=64 L=65 H=8 Dh=32), B=512, and the standard ViT sizes
(ViT-S/16 and ViT-B/16 at 224 px: L=197 Dh=64 with H=6 and H=12; ViT-B/16 at 384 px: L=577).

Contenders (each checked against vit.layers in float32 on the same inputs before it is timed):
  fused        kernels.fused_ops(): the kernel kernels/dispatch.py picks for the shape (the note
               says which), softmax statistics kept as LSE, P recomputed in the backward
               (fused-tf32: the same with tf32 dots; GPU only)
  fused-one-tile, fused-key-blocked
               each attention kernel forced (fused_ops(attention_kernel=...)): the one-tile kernel
               (one program per (batch, head), the whole sequence in one tile) and the
               key-blocked one (FlashAttention-2 style); the one-tile kernel does not run
               compiled where its K/V tile exceeds shared memory (fp32 at L=197 Dh=64)
  reference    vit.layers.attention_forward / attention_backward (hand-written jnp) under XLA
  autodiff     jax.vjp of the reference forward (oracle.autodiff_vjp); fwd+bwd only
  dpa-xla      jax.nn.dot_product_attention(implementation="xla"), what a JAX user would call; it
               takes (B, L, H, Dh) q, k, v, so splitting the packed qkv and merging the output are
               part of its timed call; backward by jax.vjp
  dpa-cudnn    the same with implementation="cudnn" (GPU only; bf16/fp16 only, so bf16 rows)

FLOPs: fwd 4*B*H*L^2*Dh; fwd+bwd 3.5x that (harness.attention_flops).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import oracle
from bench import harness
from vit import layers
from vit.ops import REFERENCE

FORCED = ["fused-one-tile", "fused-key-blocked"]
CONTENDERS = {
    ("fwd", "fp32"): ["reference", "fused", *FORCED, "fused-tf32", "dpa-xla"],
    ("fwd", "bf16"): ["reference", "fused", *FORCED, "dpa-xla", "dpa-cudnn"],
    ("fwd+bwd", "fp32"): ["reference", "fused", *FORCED, "fused-tf32", "autodiff", "dpa-xla"],
    ("fwd+bwd", "bf16"): ["reference", "fused", *FORCED, "autodiff", "dpa-xla", "dpa-cudnn"],
}

NOTES = {
    "fused": "Triton kernels, ieee dots, the dispatcher's kernel",
    "fused-one-tile": "Triton one-tile kernel forced, ieee dots",
    "fused-key-blocked": "Triton key-blocked kernel forced, ieee dots",
    "fused-tf32": "Triton kernels, tf32 dots (the reference keeps ieee fp32)",
    "reference": "vit.layers (jnp) under XLA",
    "autodiff": "jax.vjp of the reference forward",
    "dpa-xla": "jax.nn.dot_product_attention xla; qkv split to (B,L,H,Dh) and output merge included",
    "dpa-cudnn": "jax.nn.dot_product_attention cudnn; qkv split to (B,L,H,Dh) and output merge included",
}


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    cases = [harness.KernelCase(f"attention {mode}", "attention", mode, shape, contender, dtype)
             for shape in harness.shape_names(metafunc.config, "attention")
             for mode in ("fwd", "fwd+bwd")
             for dtype in ("fp32", "bf16")
             for contender in CONTENDERS[(mode, dtype)]]
    metafunc.parametrize("case", cases, ids=[c.id for c in cases])


def make_inputs(shape, dtype, key):
    """qkv and dO, unit normal (scores ~ N(0, 1) after the 1/sqrt(Dh) scale), in the row's dtype."""
    b, l, h, dh = harness.ATTN_SHAPES[shape]
    k1, k2 = jax.random.split(key)
    qkv = jax.random.normal(k1, (b, l, 3 * h * dh), jnp.float32).astype(dtype)
    do = jax.random.normal(k2, (b, l, h * dh), jnp.float32).astype(dtype)
    return qkv, do


def dpa_forward(implementation, heads):
    """Packed qkv (B, L, 3D) -> (B, L, D) through jax.nn.dot_product_attention."""
    def fwd(qkv):
        b, l, d3 = qkv.shape
        d = d3 // 3
        q, k, v = (qkv[..., i * d:(i + 1) * d].reshape(b, l, heads, d // heads) for i in range(3))
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation).reshape(b, l, d)
    return fwd


def ops_for(contender, launcher):
    if contender == "reference":
        return REFERENCE
    from kernels import fused_ops  # noqa: PLC0415  (needs triton; only the fused rows import it)

    dot_precision = "tf32" if contender == "fused-tf32" else "ieee"
    kernel = contender.removeprefix("fused-") if contender in FORCED else "auto"
    return fused_ops(launcher, dot_precision=dot_precision, attention_kernel=kernel)


def builder(mode, bench):
    def build(contender, shape):
        heads = harness.ATTN_SHAPES[shape][2]
        if contender in ("reference", "fused", "fused-tf32", *FORCED):
            ops = ops_for(contender, bench.launcher if contender != "reference" else None)
            if mode == "fwd":
                return lambda qkv, do: ops.attention_forward(qkv, heads)[0]

            def fwd_bwd(qkv, do):
                o, cache = ops.attention_forward(qkv, heads)
                return o, ops.attention_backward(cache, do)
            return fwd_bwd
        if contender == "autodiff":
            fwd = lambda qkv: layers.attention_forward(qkv, heads)[0]  # noqa: E731
        else:
            fwd = dpa_forward(contender.removeprefix("dpa-"), heads)
        if mode == "fwd":
            return lambda qkv, do: fwd(qkv)
        # XLA's CSE merges this forward with the one inside the vjp (checked: same dot count)
        return lambda qkv, do: (fwd(qkv), oracle.autodiff_vjp(fwd, qkv, do))
    return build


def work(mode):
    def flops(shape):
        return {"tflop": harness.attention_flops(*harness.ATTN_SHAPES[shape], mode) / 1e12}
    return flops


def skip_reason(case, bench):
    gpu = bench.backend == "gpu"
    if case.contender == "dpa-cudnn" and not gpu:
        return "cuDNN attention needs an NVIDIA GPU"
    if case.contender == "fused-tf32" and not gpu:
        return "tf32 dots are a GPU tensor-core mode"
    if case.contender == "fused-one-tile" and gpu:
        from kernels import COMPILED, dispatch  # noqa: PLC0415

        _, l, _, dh = harness.ATTN_SHAPES[case.shape]
        if not dispatch.one_tile_runs(l, dh, harness.DTYPES[case.dtype], COMPILED):
            return (f"the one-tile kernel does not run compiled at L={l} Dh={dh} {case.dtype} "
                    "(its K/V tile exceeds the shared-memory budget: attention.compiled_fits)")
    return None


def dispatch_note(case, bench) -> str:
    """Which kernel the dispatcher runs for a "fused" row, in both directions."""
    if case.contender not in ("fused", "fused-tf32"):
        return ""
    from kernels import dispatch  # noqa: PLC0415

    _, l, _, dh = harness.ATTN_SHAPES[case.shape]
    dot_precision = "tf32" if case.contender == "fused-tf32" else "ieee"
    plans = [dispatch.plan(l, dh, harness.DTYPES[case.dtype], dot_precision, d, bench.launcher)
             for d in (("fwd",) if case.mode == "fwd" else ("fwd", "bwd"))]
    return "; dispatcher: " + ", ".join(f"{d} {p.kernel} ({p.source})"
                                        for d, p in zip(("fwd", "bwd"), plans))


def untimed_reason(case, bench):
    if case.dtype == "bf16" and bench.backend == "cpu":
        return "bf16 rows are timed on a GPU only (they exist for the cuDNN comparison); checked here"
    return None


def test_attention(case, bench):
    harness.run_kernel_case(
        bench, case, make_inputs=make_inputs, build=builder(case.mode, bench),
        work=work(case.mode), note=NOTES[case.contender] + dispatch_note(case, bench),
        skip_reason=skip_reason(case, bench), untimed_reason=untimed_reason(case, bench),
        optional=case.contender == "dpa-cudnn")
