"""Attention core on the packed QKV projection: qkv (B, L, 3D) -> o (B, L, D), forward and
forward+backward, at the product shape (B=64 L=65 H=8 Dh=32), B=512, and the standard ViT sizes
(ViT-S/16 and ViT-B/16 at 224 px: L=197 Dh=64 with H=6 and H=12; ViT-B/16 at 384 px: L=577).

Contenders (each checked against vit.layers in float32 on the same inputs before it is timed):
  fused        kernels.fused_ops(): the kernel kernels/dispatch.py picks for the shape (the note
               says which), softmax statistics kept as LSE, P recomputed in the backward
               (fused-tf32: the same with tf32 dots, held to the tf32 tolerance; fused-tf32x3:
               with 3xTF32 dots, each float32 operand split into two tf32 parts and each dot
               done in three tensor-core passes, which claims float32 accuracy and so is held to
               the fp32 tolerance, as fused is; both GPU only)
  fused-one-tile, fused-key-blocked
               each attention kernel forced (fused_ops(attention_kernel=...)): the one-tile kernel
               (one program per (batch, head), the whole sequence in one tile) and the
               key-blocked one (FlashAttention-2 style); the one-tile kernel does not run
               compiled where its K/V tile exceeds shared memory (fp32 at L=197 Dh=64)
  reference    vit.layers.attention_forward / attention_backward (hand-written jnp) under XLA
  autodiff     jax.vjp of the reference forward (as oracle.autodiff_vjp); fwd+bwd only
  dpa-xla      jax.nn.dot_product_attention(implementation="xla"), what a JAX user would call; it
               takes (B, L, H, Dh) q, k, v, so splitting the packed qkv and merging the output are
               part of its timed call; backward by jax.vjp
  dpa-cudnn    the same with implementation="cudnn" (GPU only; bf16/fp16 only, so bf16 rows).
               fwd+bwd rows pad an odd L to L+1 and pass query_seq_lengths and
               key_value_seq_lengths (= L for every batch row), so the padded key is masked and
               the padded query's output is sliced off; the pad and the slice are in the timed
               call. Why: jax's cuDNN path (jax/_src/cudnn/fused_attention_stablehlo.py, jax
               0.11.2) replaces bias=None by a zero-size placeholder before its training rule
               calls check_is_flash_attention(..., bias is not None, is_training=True), which
               then refuses odd T or S ("Unsupported sequence length Q 65, KV 65": the H200
               run of 2026-11-30); the seq lengths select the PADDING mask, which that check
               does not refuse. fwd rows (no training path) keep L unpadded.

FLOPs: fwd 4*B*H*L^2*Dh; fwd+bwd 3.5x that (harness.attention_flops).

To add a contender: its name in CONTENDERS for each (mode, dtype) it runs at (the list's order is
the order its rows run and are written in, after the target rows) and in NOTES (a KeyError
otherwise); its function in builder (a name builder does not know is a ValueError naming it);
skip_reason / untimed_reason where it cannot run or be timed, optional= if it may be
unavailable. Its name may give it a meaning (harness.py's docstring, "Rows").
Then: report.TARGETS if a verdict needs it, report.METHOD's list of contenders, and README.md's
"Benchmarks" (the contenders, and the row counts: `pytest bench/ --benchmark --collect-only`).
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from bench import harness, report
from oracle.compare import TOLERANCE, assert_close, exact_float32_dots
from vit import layers
from vit.ops import REFERENCE

FORCED = ["fused-one-tile", "fused-key-blocked"]
# the fused contenders whose kernels run other than ieee float32 dots, and their tl.dot precision
DOT_PRECISION = {"fused-tf32": "tf32", "fused-tf32x3": "tf32x3"}
DISPATCHED = ["fused", *DOT_PRECISION]  # the dispatcher picks their kernel
CONTENDERS = {
    ("fwd", "fp32"): ["reference", "fused", *FORCED, "fused-tf32", "dpa-xla", "fused-tf32x3"],
    ("fwd", "bf16"): ["reference", "fused", *FORCED, "dpa-xla", "dpa-cudnn"],
    ("fwd+bwd", "fp32"): ["reference", "fused", *FORCED, "fused-tf32", "autodiff", "dpa-xla",
                          "fused-tf32x3"],
    ("fwd+bwd", "bf16"): ["reference", "fused", *FORCED, "autodiff", "dpa-xla", "dpa-cudnn"],
}
# jax's cuDNN training path takes only sequence lengths that are a multiple of this (see above)
CUDNN_TRAINING_MULTIPLE = 2

NOTES = {
    "fused": "Triton kernels, ieee dots, the dispatcher's kernel",
    "fused-one-tile": "Triton one-tile kernel forced, ieee dots",
    "fused-key-blocked": "Triton key-blocked kernel forced, ieee dots",
    "fused-tf32": "Triton kernels, tf32 dots (the reference keeps ieee fp32)",
    "fused-tf32x3": "Triton kernels, 3xTF32 dots, checked at the fp32 tolerance",
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


def padded_length(l: int, multiple: int) -> int:
    """l rounded up to a multiple of ``multiple``."""
    return -(-l // multiple) * multiple


def dpa_forward(implementation, heads, multiple=1):
    """Packed qkv (B, L, 3D) -> (B, L, D) through jax.nn.dot_product_attention. multiple > 1: a
    sequence not a multiple of it is padded with zero tokens up to one, query_seq_lengths and
    key_value_seq_lengths (L for every batch row) mask the padded keys out of every softmax, and
    the output is sliced back to L; the pad and the slice are part of the function (and so of
    its vjp: the padded rows' gradients are dropped by the pad's transpose)."""
    def fwd(qkv):
        b, l, d3 = qkv.shape
        d = d3 // 3
        lp = padded_length(l, multiple)
        lengths = {}
        if lp != l:
            qkv = jnp.pad(qkv, ((0, 0), (0, lp - l), (0, 0)))
            lengths = dict(query_seq_lengths=jnp.full((b,), l, jnp.int32),
                           key_value_seq_lengths=jnp.full((b,), l, jnp.int32))
        q, k, v = (qkv[..., i * d:(i + 1) * d].reshape(b, lp, heads, d // heads) for i in range(3))
        o = jax.nn.dot_product_attention(q, k, v, implementation=implementation, **lengths)
        return o[:, :l].reshape(b, l, d)
    return fwd


def padding_multiple(mode: str, contender: str) -> int:
    """What a row's sequence is padded to a multiple of: CUDNN_TRAINING_MULTIPLE for dpa-cudnn's
    fwd+bwd rows (cuDNN's training path), 1 (no padding) for every other row."""
    return CUDNN_TRAINING_MULTIPLE if (mode, contender) == ("fwd+bwd", "dpa-cudnn") else 1


def vjp_outputs(fwd, qkv, do):
    """(fwd(qkv), the gradient of <fwd(qkv), do> with respect to qkv), from one jax.vjp."""
    o, pullback = jax.vjp(fwd, qkv)
    return o, pullback(do)[0]


def ops_for(contender, launcher):
    if contender == "reference":
        return REFERENCE
    from kernels import fused_ops  # noqa: PLC0415  (needs triton; only the fused rows import it)

    dot_precision = DOT_PRECISION.get(contender, "ieee")
    kernel = contender.removeprefix("fused-") if contender in FORCED else "auto"
    return fused_ops(launcher, dot_precision=dot_precision, attention_kernel=kernel)


def builder(mode, bench):
    def build(contender, shape):
        heads = harness.ATTN_SHAPES[shape][2]
        if contender in ("reference", *DISPATCHED, *FORCED):
            ops = ops_for(contender, bench.launcher if contender != "reference" else None)
            if mode == "fwd":
                return lambda qkv, do: ops.attention_forward(qkv, heads)[0]

            def fwd_bwd(qkv, do):
                o, cache = ops.attention_forward(qkv, heads)
                return o, ops.attention_backward(cache, do)
            return fwd_bwd
        if contender == "autodiff":
            fwd = lambda qkv: layers.attention_forward(qkv, heads)[0]  # noqa: E731
        elif contender in ("dpa-xla", "dpa-cudnn"):
            fwd = dpa_forward(contender.removeprefix("dpa-"), heads, padding_multiple(mode, contender))
        else:  # it used to fall through to dpa_forward and fail inside jax
            raise ValueError(f"builder: no function for contender {contender!r}: a new one needs its "
                             "branch here (see this file's docstring)")
        if mode == "fwd":
            return lambda qkv, do: fwd(qkv)
        # one jax.vjp gives the output and the gradients. A separate fwd(qkv) beside the vjp
        # costs the XLA contenders nothing (XLA's CSE merges the two forwards: the same kernels
        # and bytes on the CPU), but cuDNN's inference and training forwards are different
        # custom calls, so dpa-cudnn would run its forward twice
        return lambda qkv, do: vjp_outputs(fwd, qkv, do)
    return build


def work(mode):
    def flops(shape):
        return {"tflop": harness.attention_flops(*harness.ATTN_SHAPES[shape], mode) / 1e12}
    return flops


def skip_reason(case, bench):
    gpu = bench.backend == "gpu"
    if case.contender == "dpa-cudnn" and not gpu:
        return "cuDNN attention needs an NVIDIA GPU"
    if case.contender in DOT_PRECISION and not gpu:
        return f"{DOT_PRECISION[case.contender]} dots are a GPU tensor-core mode"
    if case.contender == "fused-one-tile" and gpu:
        from kernels import COMPILED, dispatch  # noqa: PLC0415

        _, l, _, dh = harness.ATTN_SHAPES[case.shape]
        if not dispatch.one_tile_runs(l, dh, harness.DTYPES[case.dtype], COMPILED, "ieee"):
            return (f"the one-tile kernel does not run compiled at L={l} Dh={dh} {case.dtype} "
                    "(its K/V tile exceeds the shared-memory budget: attention.compiled_fits)")
    return None


def dispatch_note(case, bench) -> str:
    """Which kernel the dispatcher runs for a "fused" row, in both directions."""
    if case.contender not in DISPATCHED:
        return ""
    from kernels import dispatch  # noqa: PLC0415

    _, l, _, dh = harness.ATTN_SHAPES[case.shape]
    dot_precision = DOT_PRECISION.get(case.contender, "ieee")
    plans = [dispatch.plan(l, dh, harness.DTYPES[case.dtype], dot_precision, d, bench.launcher)
             for d in (("fwd",) if case.mode == "fwd" else ("fwd", "bwd"))]
    return "; dispatcher: " + ", ".join(f"{d} {p.kernel} ({p.source})"
                                        for d, p in zip(("fwd", "bwd"), plans))


def padding_note(case) -> str:
    """dpa-cudnn's fwd+bwd rows at an odd L say that they ran padded, and why."""
    l = harness.ATTN_SHAPES[case.shape][1]
    if padded_length(l, padding_multiple(case.mode, case.contender)) == l:
        return ""
    return ("; padded to L+1 with seq lengths (pad and slice included): cuDNN's training path "
            "in jax refuses odd L")


def untimed_reason(case, bench):
    if case.dtype == "bf16" and bench.backend == "cpu":
        return "bf16 rows are timed on a GPU only (they exist for the cuDNN comparison); checked here"
    return None


def test_attention(case, bench):
    harness.run_kernel_case(
        bench, case, make_inputs=make_inputs, build=builder(case.mode, bench),
        work=work(case.mode),
        note=NOTES[case.contender] + dispatch_note(case, bench) + padding_note(case),
        skip_reason=skip_reason(case, bench), untimed_reason=untimed_reason(case, bench),
        optional=case.contender == "dpa-cudnn")


def test_fused_tf32x3_is_held_to_the_fp32_tolerance_and_is_no_target():
    """fused-tf32x3 (fp32 rows only) runs the dispatcher's kernels with 3xTF32 dots and is
    checked at the tolerance of the ieee fp32 rows, not at tf32's; no target needs its rows, so
    under --benchmark they run after the target rows."""
    from kernels import INTERPRETED  # noqa: PLC0415

    assert harness.tolerance("fp32", "fused-tf32x3") == harness.tolerance("fp32", "fused") \
        == TOLERANCE["float32 long sums"]
    assert harness.tolerance("fp32", "fused-tf32") == TOLERANCE["tf32"]
    for mode in ("fwd", "fwd+bwd"):
        assert "fused-tf32x3" in CONTENDERS[(mode, "fp32")]
        assert "fused-tf32x3" not in CONTENDERS[(mode, "bf16")]
    assert not [row for row in report.target_rows() if row[2] == "fused-tf32x3"]
    assert "dot precision tf32x3, attention auto" in ops_for("fused-tf32x3", INTERPRETED).description


def test_builder_has_a_function_for_every_contender_and_refuses_another(bench):
    """Every name in CONTENDERS builds (nothing runs here); a name builder does not know is a
    ValueError naming it, where it used to fall through to dot_product_attention."""
    for (mode, _), names in CONTENDERS.items():
        for name in names:
            assert callable(builder(mode, bench)(name, "quick")), (mode, name)
    for mode in ("fwd", "fwd+bwd"):
        with pytest.raises(ValueError, match="no function for contender 'dpa-flash'"):
            builder(mode, bench)("dpa-flash", "quick")


def test_each_rows_note_and_skip_follow_its_dot_precision_and_padding(monkeypatch, bench):
    """What a row says of itself: the dispatcher's plans in its note are asked with the row's own
    dot precision (a table row of tf32x3 is not one of ieee); the tf32 and tf32x3 rows are
    skipped without a GPU, each naming its dots; only dpa-cudnn's fwd+bwd rows (odd L at every
    shape) say they ran padded."""
    from kernels import dispatch  # noqa: PLC0415

    asked, real_plan = [], dispatch.plan
    monkeypatch.setattr(dispatch, "plan", lambda l, dh, dtype, dot_precision, *rest, **kw:
                        asked.append(dot_precision) or real_plan(l, dh, dtype, dot_precision, *rest, **kw))
    cpu, gpu = SimpleNamespace(backend="cpu"), SimpleNamespace(backend="gpu")
    for (mode, dtype), contenders in CONTENDERS.items():
        for shape in harness.ATTN_SHAPES:
            for contender in contenders:
                case = harness.KernelCase(f"attention {mode}", "attention", mode, shape, contender, dtype)
                asked.clear()
                note = dispatch_note(case, bench)
                precision = DOT_PRECISION.get(contender, "ieee")
                directions = 2 if mode == "fwd+bwd" else 1
                assert asked == ([precision] * directions if contender in DISPATCHED else []), (case, asked)
                if contender in DOT_PRECISION:
                    assert skip_reason(case, cpu) == f"{precision} dots are a GPU tensor-core mode", case
                if contender in DISPATCHED:
                    assert skip_reason(case, gpu) is None and note.startswith("; dispatcher: fwd "), case
                padded = contender == "dpa-cudnn" and mode == "fwd+bwd"
                assert ("padded to L+1" in padding_note(case)) is padded, case


# ----------------------------------------------------------------------------------------------
# dpa-cudnn's padding, checked on the CPU through implementation="xla", which takes the same
# query_seq_lengths / key_value_seq_lengths (jax/_src/nn/functions.py: a padding mask on the
# logits, and the padded queries' outputs zeroed)


@pytest.mark.parametrize("l,multiple", [(5, 2), (65, 2), (6, 4), (6, 2)],
                         ids=["odd-L", "product-L", "even-L-padded-by-2", "even-L-unpadded"])
def test_padded_dot_product_attention_equals_unpadded(bench, monkeypatch, l, multiple):
    """The padded call (dpa_forward(..., multiple)) gives the unpadded call's output and input
    gradients (jax.vjp) on fresh random float32 inputs, to 1e-6. Without the seq lengths (the
    padded zero key then takes part in every softmax) the same comparison fails: the check can
    see an unmasked pad."""
    b, h, dh = 3, 2, 32
    k1, k2 = jax.random.split(bench.key("dpa padding", str(l), str(multiple)))
    qkv = jax.random.normal(k1, (b, l, 3 * h * dh), jnp.float32)
    do = jax.random.normal(k2, (b, l, h * dh), jnp.float32)

    def out_and_grad(fwd):
        return dict(zip(("o", "dqkv"), jax.jit(lambda qkv, do: vjp_outputs(fwd, qkv, do))(qkv, do)))

    with exact_float32_dots():
        want = out_and_grad(dpa_forward("xla", h))
        got = out_and_grad(dpa_forward("xla", h, multiple))
        assert_close(got, want, 1e-6, f"padded to {padded_length(l, multiple)}")
        if padded_length(l, multiple) == l:
            return
        real = jax.nn.dot_product_attention
        monkeypatch.setattr(jax.nn, "dot_product_attention",
                            lambda *args, query_seq_lengths=None, key_value_seq_lengths=None,
                            **kwargs: real(*args, **kwargs))
        unmasked = out_and_grad(dpa_forward("xla", h, multiple))
    with pytest.raises(AssertionError, match="differs from the reference"):
        assert_close(unmasked, want, 1e-3, "padded, no seq lengths")


@pytest.mark.parametrize("shape", ["product", "vit-s"])
def test_cudnn_training_path_lowers_padded_and_refuses_odd_l(monkeypatch, bench, shape):
    """On the CPU, lowered for "cuda": jax's own checks of its cuDNN attention run at trace time,
    so they show here. Unpadded, the fwd+bwd of dpa-cudnn at an odd L is refused as on the H200
    ("Unsupported sequence length"); padded, the dpa-cudnn fwd+bwd row's own function (builder)
    lowers to exactly one cuDNN forward and one backward custom call (the row's single
    jax.vjp: a forward of its own beside it would be a third call), both with the PADDING mask
    and the two int32 (B,) seq-length operands; the fwd row's function stays unpadded (one
    forward, no mask, L itself). Only the cuDNN library's version is faked (there is none
    here)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa  # noqa: PLC0415

    if not hasattr(cudnn_fa, "check_cudnn_version"):
        pytest.skip("this jax has no fused_attention_stablehlo.check_cudnn_version to stand in for")
    monkeypatch.setattr(cudnn_fa, "check_cudnn_version", lambda: 91000)
    b, l, h, dh = harness.ATTN_SHAPES[shape]
    args = (jax.ShapeDtypeStruct((b, l, 3 * h * dh), jnp.bfloat16),
            jax.ShapeDtypeStruct((b, l, h * dh), jnp.bfloat16))

    def cudnn_calls(fn):
        """(name, mask type, operand types) of each cuDNN custom call fn lowers to."""
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        return re.findall(r"custom_call @(__cudnn\$fmha\w*)\(.*?mask_type\\22: \\22(\w+)\\22.*?: \((.*?)\)",
                          text)

    unpadded = dpa_forward("cudnn", h)
    with pytest.raises(NotImplementedError, match=f"Unsupported sequence length Q {l}, KV {l}"):
        cudnn_calls(lambda qkv, do: vjp_outputs(unpadded, qkv, do))  # if this lowers, the padding can go
    calls = cudnn_calls(builder("fwd+bwd", bench)("dpa-cudnn", shape))
    assert sorted(name for name, *_ in calls) == ["__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"], calls
    lp = padded_length(l, CUDNN_TRAINING_MULTIPLE)
    for name, mask, types in calls:
        assert mask == "PADDING", (name, mask)
        assert f"tensor<{b}x{lp}x{h}x{dh}xbf16>" in types and types.count(f"tensor<{b}xi32>") == 2, types
    ((name, mask, types),) = cudnn_calls(builder("fwd", bench)("dpa-cudnn", shape))
    assert (name, mask) == ("__cudnn$fmhaSoftmax", "NO_MASK") and "xi32>" not in types, (name, mask, types)
    assert types == ", ".join([f"tensor<{b}x{l}x{h}x{dh}xbf16>"] * 3), types
