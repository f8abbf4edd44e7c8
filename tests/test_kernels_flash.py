"""Both fused attention kernels and the dispatcher (kernels/attention.py one-tile,
kernels/flash_attention.py key-blocked, kernels/dispatch.py) vs vit.layers.attention_forward /
attention_backward: O and dQ, dK, dV on awkward lengths and at block edges, with and without
the dropout scale, float32 and bf16/fp16, NaN-poisoned outputs; in Triton's interpreter on the
CPU or compiled on a GPU (tests/kernel_checks.py).

Error metric (oracle.compare.compare): rel = max|fused - ref| / max|ref| per tensor, and no
non-finite value (every output starts as NaN, so an element no program writes fails).
Tolerances: float32 with ieee dots 1e-5 (observed <= ~1e-6: summation order, and the online
softmax's rescaling); bf16/fp16 2e-2 against the float32 reference on the same rounded inputs
(observed <= ~4e-3: P and dS rounded to the input dtype before their dots).

Interpreter cost: the long lengths run with B=1 and small H/Dh (the kernels' loops and masks do
not depend on B or H; each (batch, head) is one more grid index).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import COMPILED, INTERPRETED, attention, dispatch, flash_attention
from kernels.flash_attention import Blocks
from oracle.compare import compare
from oracle.kernel_gradcheck import as_float32, attention_inputs, run_attention
from vit.ops import REFERENCE

from kernel_checks import (LAUNCHER, BlockedOps, assert_all_close, assert_lse_is_logsumexp_of_scores,
                           poisoned_fused_ops)

F32_TOL = 1e-5
HALF_TOL = 2e-2
KERNELS = ["one-tile", "key-blocked"]


@pytest.fixture(scope="module")
def kernel_ops():
    return {k: poisoned_fused_ops(k) for k in KERNELS + ["auto"]}


def skip_unless_runs(kernel, l, dh, dtype):
    if kernel == "one-tile" and not dispatch.one_tile_runs(l, dh, dtype, LAUNCHER, "ieee"):
        pytest.skip(f"the one-tile kernel does not run L={l} Dh={dh} {jnp.dtype(dtype).name} here "
                    "(MAX_LEN or, compiled, shared memory): the dispatcher sends it to key-blocked")


def check(ops, b, l, heads, dh, keep, dtype=jnp.float32, seed=0):
    inp = attention_inputs(jax.random.PRNGKey(seed * 1000 + l), b, l, heads, dh, keep, dtype)
    fused = run_attention(ops, inp)
    assert all(v.dtype == dtype for v in fused.values())
    tol = F32_TOL if dtype == jnp.float32 else HALF_TOL
    rows = compare(fused, run_attention(REFERENCE, as_float32(inp)), tol)
    assert [r[0] for r in rows] == ["o", "dq", "dk", "dv"]
    assert_all_close(rows, tol)
    return rows


# ----------------------------------------------------------------------------------------------
# both kernels at the awkward lengths


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    "b, l, heads, dh, keep",
    [
        (2, 1, 2, 16, True),  # one token: every block almost all padding
        (2, 17, 3, 16, True),  # one above a power of two; odd head count
        (2, 65, 2, 32, True),  # the product length and head dim
        (1, 127, 2, 16, False),  # one below 128
        (1, 128, 2, 16, True),  # exactly 128: nothing masked, two 64-key blocks
        (1, 129, 2, 32, False),  # one above: a 1-key tail block
        (1, 197, 2, 64, True),  # ViT-B/16 at 224 px
        (1, 577, 1, 64, True),  # ViT at 384 px (24x24 patches + CLS)
    ],
)
def test_both_kernels_at_awkward_lengths(kernel_ops, kernel, b, l, heads, dh, keep):
    skip_unless_runs(kernel, l, dh, jnp.float32)
    check(kernel_ops[kernel], b, l, heads, dh, keep)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype, l, dh, keep", [
    (jnp.bfloat16, 65, 32, True),  # the product shape in bf16
    (jnp.bfloat16, 197, 64, True),  # ViT-S/B at 224 px in bf16 (the GPU target shape)
    (jnp.float16, 129, 16, False),  # fp16, one key past 128
], ids=["bf16-65", "bf16-197", "fp16-129"])
def test_both_kernels_half_precision(kernel_ops, kernel, dtype, l, dh, keep):
    skip_unless_runs(kernel, l, dh, dtype)
    check(kernel_ops[kernel], 1, l, 2, dh, keep, dtype)


@pytest.mark.parametrize("kernel", KERNELS)
def test_head_dim_128(kernel_ops, kernel):
    skip_unless_runs(kernel, 70, 128, jnp.float32)
    check(kernel_ops[kernel], 1, 70, 1, 128, True)


# ----------------------------------------------------------------------------------------------
# the key-blocked kernel at its block edges


@pytest.mark.parametrize(
    "block_m, block_n, l, keep",
    [
        (16, 16, 15, True),  # L = BLOCK_N - 1: one partial key block and one partial query block
        (16, 16, 16, False),  # L = BLOCK_N: exactly one block, nothing masked
        (16, 16, 17, True),  # L = BLOCK_N + 1: a 1-key tail block
        (16, 16, 49, False),  # several key blocks (4) and a 1-row tail query block
        (32, 16, 33, True),  # BLOCK_M > BLOCK_N: 3 key blocks, 2 query blocks, both with a tail
        (16, 32, 31, False),  # BLOCK_M < BLOCK_N: one key block, two query blocks
        (16, 32, 97, True),  # BLOCK_M < BLOCK_N: 4 key blocks, 7 query blocks
    ],
)
def test_key_blocked_block_edges(block_m, block_n, l, keep):
    check(BlockedOps(Blocks(block_m, block_n, 4, 2)), 2, l, 2, 16, keep)


@pytest.mark.parametrize("dtype, dh", [(jnp.float32, 32), (jnp.bfloat16, 64)], ids=["fp32-dh32", "bf16-dh64"])
def test_key_blocked_default_blocks_at_their_edges(kernel_ops, dtype, dh):
    """L = BLOCK_N - 1, BLOCK_N + 1 and 2 BLOCK_N + 1 of the blocks the dispatcher would use
    (forward and backward blocks may differ; each gets its own edges)."""
    lengths = set()
    for direction in ("fwd", "bwd"):
        n = flash_attention.default_blocks(10**4, dh, dtype, "ieee", direction).block_n
        lengths |= {n - 1, n + 1, 2 * n + 1}
    for l in sorted(lengths):
        check(kernel_ops["key-blocked"], 1, l, 1, dh, l % 2 == 1, dtype)


def test_lengths_beyond_the_one_tile_limit(kernel_ops):
    """L = 1100 > attention.MAX_LEN (1024): the one-tile kernel refuses it, the fused ops (the
    dispatcher) run it on the key-blocked kernel, with dropout, and match the reference."""
    l = 1100
    assert l > attention.MAX_LEN
    with pytest.raises(ValueError, match="exceeds the one-tile limit"):
        attention.attention_forward(jnp.ones((1, l, 3 * 16)), 1, launcher=INTERPRETED)
    assert dispatch.plan(l, 16, jnp.float32, "ieee", "fwd", LAUNCHER).kernel == "key-blocked"
    check(kernel_ops["auto"], 1, l, 1, 16, True)


# ----------------------------------------------------------------------------------------------
# properties of the key-blocked kernel


def test_key_blocked_lse_is_float32_logsumexp_of_scores(kernel_ops):
    # large scores (qkv ~ N(0, 9)), several key blocks of an L that is no multiple of 16
    assert_lse_is_logsumexp_of_scores(kernel_ops["key-blocked"].attention_forward, 1, 70, 2, 16,
                                      scale=3.0, atol=1e-5)


def test_key_blocked_all_zero_keep_gives_zeros(kernel_ops):
    inp = attention_inputs(jax.random.PRNGKey(4), 1, 40, 2, 16, True, jnp.float32)
    inp["keep_scale"] = jnp.zeros_like(inp["keep_scale"])
    for name, v in run_attention(BlockedOps(Blocks(16, 16, 4, 2)), inp).items():
        assert np.all(np.asarray(v) == 0.0), name


# the key-blocked dK/dV programs compute inf and NaN in the rows of padded keys, which they
# never store (see kernels/flash_attention.py); numpy, running them here, says so
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("kernel", KERNELS)
def test_rows_of_very_negative_scores(kernel_ops, kernel):
    """Softmax does not care how negative a row's scores all are, and neither may the kernels.
    Here every score is about -100 (q ~ 5, k ~ -5: LSE between -98 and -92), so exp(-LSE)
    overflows float32: a padded key (k = 0, so s = 0) that the dQ programs did not mask to -inf
    would get P = exp(0 - LSE) = inf, and dS K = inf * 0 = NaN. L = 40 leaves padded keys in the
    last key block. The scores' own float32 rounding (~1e-5 of 100) and dQ's cancellation (every
    key shares the -5 component, and sum_j dS_ij = 0) cost accuracy, so 1e-4 here (observed
    <= 5e-5); what this catches is a non-finite value."""
    b, l, heads, dh = 1, 40, 2, 16
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(7), 4)
    d = heads * dh
    q = 5.0 + 0.3 * jax.random.normal(k1, (b, l, d))
    k = -5.0 + 0.3 * jax.random.normal(k2, (b, l, d))
    v = jax.random.normal(k3, (b, l, d))
    inp = {"qkv": jnp.concatenate([q, k, v], axis=-1), "heads": heads, "keep_scale": None,
           "do": jax.random.normal(k4, (b, l, d))}
    _, (_, _, lse, _) = kernel_ops[kernel].attention_forward(inp["qkv"], heads)
    assert float(jnp.max(lse)) < -88.8  # exp(-LSE) > float32's largest
    assert_all_close(compare(run_attention(kernel_ops[kernel], inp), run_attention(REFERENCE, inp), 1e-4), 1e-4)


def test_online_softmax_keeps_the_running_max_across_key_blocks():
    """Rows whose scores fall by ~800 from the first key block to the later ones (q . k = +-400
    after the 1/sqrt(Dh) scale): the online softmax must rescale by exp(m_old - m_new) <= 1, so
    the running max may never drop. A max taken over the current block only stays exact on the
    other checks' scores (their rescale factors stay finite either way) but here makes
    exp2(m_old - m_new) overflow: inf / inf = NaN. Forward only (o and LSE); 1e-4 as in the test
    above: float32 scores of magnitude 400 carry ~4e-5 rounding (observed 5e-5 on o)."""
    b, l, heads, dh = 1, 40, 1, 16
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(12), 3)
    q = 10.0 + 0.01 * jax.random.normal(k1, (b, l, dh))
    sign = jnp.where(jnp.arange(l) < 16, 1.0, -1.0)[None, :, None]  # key block 0 high, 1 and 2 low
    k = sign * (10.0 + 0.01 * jax.random.normal(k2, (b, l, dh)))
    v = jax.random.normal(k3, (b, l, dh))
    qkv = jnp.concatenate([q, k, v], axis=-1)
    o, (_, _, lse, _) = BlockedOps(Blocks(16, 16, 4, 2)).attention_forward(qkv, heads)
    o_ref, _ = REFERENCE.attention_forward(qkv, heads)
    lse_ref = jax.scipy.special.logsumexp(jnp.einsum("bid,bjd->bij", q, k) / 4.0, axis=-1)[:, None]
    assert_all_close(compare({"o": o, "lse": lse}, {"o": o_ref, "lse": lse_ref}, 1e-4), 1e-4)


def test_caches_are_interchangeable(kernel_ops):
    """Both forwards leave the same cache (qkv, o, lse, keep), so either backward takes either
    forward's cache: one-tile forward + key-blocked backward and the reverse match the reference."""
    inp = attention_inputs(jax.random.PRNGKey(5), 2, 40, 2, 16, True, jnp.float32)
    o_ref, c_ref = REFERENCE.attention_forward(inp["qkv"], 2, inp["keep_scale"])
    want = {"o": o_ref, "dqkv": REFERENCE.attention_backward(c_ref, inp["do"])}
    for fwd, bwd in (("one-tile", "key-blocked"), ("key-blocked", "one-tile")):
        o, cache = kernel_ops[fwd].attention_forward(inp["qkv"], 2, inp["keep_scale"])
        assert all(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(cache))
        dqkv = kernel_ops[bwd].attention_backward(cache, inp["do"])
        assert_all_close(compare({"o": o, "dqkv": dqkv}, want, F32_TOL), F32_TOL)


def test_key_blocked_backward_is_deterministic(kernel_ops):
    """No atomics: two backward runs give bitwise the same dQKV."""
    inp = attention_inputs(jax.random.PRNGKey(6), 2, 50, 2, 16, True, jnp.float32)
    ops = kernel_ops["key-blocked"]
    _, cache = ops.attention_forward(inp["qkv"], 2, inp["keep_scale"])
    first = np.asarray(ops.attention_backward(cache, inp["do"]))
    np.testing.assert_array_equal(first, np.asarray(ops.attention_backward(cache, inp["do"])))


def test_blocks_are_validated():
    with pytest.raises(ValueError, match="block_m must be a power of two >= 16"):
        Blocks(24, 16, 4, 2)
    with pytest.raises(ValueError, match="block_n must be a power of two >= 16"):
        Blocks(16, 8, 4, 2)
    with pytest.raises(ValueError, match="num_warps"):
        Blocks(16, 16, 3, 2)
    assert Blocks(128, 64, 8, 2).fit(17) == Blocks(32, 32, 8, 2)


def test_default_blocks_are_the_table_row_of_their_dot_kind_and_direction():
    """default_blocks: the forward entry of _DEFAULT_BLOCKS for the forward, the backward one for
    the backward, under the right dot kind (float32 ieee, tf32 or tf32x3; half), fitted to L
    down to the smallest tl.dot tile. A wrong row still computes the right numbers, so only
    this shows it (larger tiles than the compile figures allow spill registers on a GPU)."""
    f32, bf16, f16 = jnp.float32, jnp.bfloat16, jnp.float16
    assert [flash_attention.dot_kind(dt, p) for dt, p in (
        (f32, "ieee"), (f32, "tf32"), (f32, "tf32x3"), (bf16, "ieee"), (f16, "ieee"))] == [
        "ieee", "tf32", "tf32x3", "half", "half"]
    for (kind, dh), both in flash_attention._DEFAULT_BLOCKS.items():
        dtype, precision = {"ieee": (f32, "ieee"), "tf32": (f32, "tf32"), "tf32x3": (f32, "tf32x3"),
                            "half": (bf16, "ieee")}[kind]
        for direction, want in zip(("fwd", "bwd"), both):
            got = flash_attention.default_blocks(10**4, dh, dtype, precision, direction)
            assert got == want, (kind, dh, direction)
    # the table's directions differ, so a mix-up shows above
    assert flash_attention._DEFAULT_BLOCKS[("ieee", 32)][0] != flash_attention._DEFAULT_BLOCKS[("ieee", 32)][1]
    # fitted: no block larger than the sequence needs, none under 16
    assert flash_attention.default_blocks(5, 64, f32, "ieee", "fwd") == Blocks(16, 16, 8, 2)
    with pytest.raises(ValueError, match="direction must be one of"):
        flash_attention.default_blocks(5, 64, f32, "ieee", "backward")
    assert Blocks(128, 64, 8, 2).fit(1) == Blocks(16, 16, 8, 2)
    assert Blocks(128, 64, 8, 2).fit(100) == Blocks(128, 64, 8, 2)


# ----------------------------------------------------------------------------------------------
# the dispatcher


def test_dispatch_rule():
    f32 = jnp.float32
    assert dispatch.plan(65, 32, f32, "ieee", "fwd", INTERPRETED) == dispatch.Plan("one-tile", None, "rule")
    assert dispatch.plan(128, 32, f32, "ieee", "bwd", INTERPRETED).kernel == "one-tile"
    assert dispatch.plan(17, 16, f32, "ieee", "bwd", INTERPRETED).kernel == "one-tile"
    assert dispatch.plan(64, 64, f32, "ieee", "bwd", INTERPRETED).kernel == "key-blocked"  # Dh > 32
    assert dispatch.plan(1, 128, f32, "ieee", "fwd", INTERPRETED).kernel == "key-blocked"
    p = dispatch.plan(129, 64, f32, "ieee", "bwd", INTERPRETED)
    assert p.kernel == "key-blocked" and p.source == "rule"
    assert p.blocks == flash_attention.default_blocks(129, 64, f32, "ieee", "bwd")
    assert dispatch.plan(197, 64, jnp.bfloat16, "ieee", "fwd", INTERPRETED).kernel == "key-blocked"
    assert dispatch.plan(8192, 128, f32, "tf32", "fwd", INTERPRETED).kernel == "key-blocked"
    for precision in ("tf32", "tf32x3"):  # the row's own dot kind: its blocks differ from ieee's
        want = flash_attention.default_blocks(197, 64, f32, precision, "bwd")
        assert dispatch.plan(197, 64, f32, precision, "bwd", INTERPRETED).blocks == want, precision
        assert want != flash_attention.default_blocks(197, 64, f32, "ieee", "bwd")
    # compiled (no table row for this device) the rule is the same
    assert dispatch.plan(65, 32, f32, "ieee", "fwd", COMPILED).kernel == "one-tile"
    assert dispatch.plan(100, 32, jnp.bfloat16, "ieee", "bwd", COMPILED).kernel == "one-tile"
    assert dispatch.plan(100, 64, jnp.bfloat16, "ieee", "bwd", COMPILED).kernel == "key-blocked"
    # forcing
    assert dispatch.plan(65, 32, f32, "ieee", "fwd", INTERPRETED, kernel="key-blocked").kernel == "key-blocked"
    assert dispatch.plan(900, 32, f32, "ieee", "fwd", INTERPRETED, kernel="one-tile").kernel == "one-tile"
    with pytest.raises(ValueError, match="attention kernel must be one of"):
        dispatch.plan(65, 32, f32, "ieee", "fwd", INTERPRETED, kernel="flash")


def test_dispatch_table_overrides_the_rule(tmp_path):
    """A tuned row for this device wins over the rule (smallest max_len >= L); the interpreter
    never reads the table; a bad table file is an error naming it."""
    device = jax.devices()[0].device_kind
    row = dict(device=device, dtype="bfloat16", dh=32, direction="fwd", max_len=100,
               kernel="key-blocked", block_m=32, block_n=16, num_warps=4, num_stages=3)
    # another GPU's row, a closer fit for L <= 80 that this device must not take
    rows = [row, dict(row, max_len=4096, kernel="one-tile"),
            dict(row, device=f"not {device}", max_len=80, kernel="one-tile")]
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"rows": rows}))
    rows = dispatch.load_table(path)
    bf16 = jnp.bfloat16
    p = dispatch.plan(65, 32, bf16, "ieee", "fwd", COMPILED, rows=rows)
    assert p == dispatch.Plan("key-blocked", Blocks(32, 16, 4, 3), f"table {device}")
    assert dispatch.plan(101, 32, bf16, "ieee", "fwd", COMPILED, rows=rows).kernel == "one-tile"
    assert dispatch.plan(2000, 32, bf16, "ieee", "fwd", COMPILED, rows=rows).kernel == "key-blocked"  # > MAX_LEN
    assert dispatch.plan(65, 32, bf16, "ieee", "bwd", COMPILED, rows=rows).source == "rule"
    assert dispatch.plan(65, 32, jnp.float32, "ieee", "fwd", COMPILED, rows=rows).source == "rule"
    assert dispatch.plan(65, 32, bf16, "ieee", "fwd", INTERPRETED, rows=rows).source == "rule"
    # forcing key-blocked keeps the tuned blocks
    assert dispatch.plan(65, 32, bf16, "ieee", "fwd", COMPILED, "key-blocked", rows).blocks == Blocks(32, 16, 4, 3)
    path.write_text(json.dumps({"rows": [dict(row, block_m=24)]}))
    with pytest.raises(ValueError, match=f"{path.name}: row 0: Blocks.block_m"):
        dispatch.load_table(path)
    path.write_text(json.dumps({"rows": [dict(row, colour="red")]}))
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
        dispatch.load_table(path)
    for text in ('{"rows": [', '[{"device": "x"}]', '{"table": []}'):  # cut short; a list; no rows
        path.write_text(text)
        with pytest.raises(ValueError, match=f"{path.name}: not a tuned attention table"):
            dispatch.load_table(path)
    assert dispatch.load_table(tmp_path / "absent.json") == []


def test_dispatch_table_edges():
    """A row serves L up to and including its max_len; a forced key-blocked plan takes the
    nearest key-blocked row even where a one-tile row fits closer; a row's blocks are fitted to
    L as the rule's are (a 128-row tile for L = 20 would be 84% padding)."""
    device = jax.devices()[0].device_kind
    bf16 = jnp.bfloat16
    blocked = dict(device=device, dtype="bfloat16", dh=64, direction="fwd", max_len=197,
                   kernel="key-blocked", block_m=128, block_n=64, num_warps=8, num_stages=2)
    one_tile = dict(blocked, max_len=100, kernel="one-tile")
    rows = [blocked, one_tile]
    at_max = dispatch.plan(197, 64, bf16, "ieee", "fwd", COMPILED, rows=rows)
    assert at_max == dispatch.Plan("key-blocked", Blocks(128, 64, 8, 2), f"table {device}")
    assert dispatch.plan(198, 64, bf16, "ieee", "fwd", COMPILED, rows=rows).source == "rule"
    assert dispatch.plan(100, 64, bf16, "ieee", "fwd", COMPILED, rows=rows).kernel == "one-tile"
    forced = dispatch.plan(65, 64, bf16, "ieee", "fwd", COMPILED, "key-blocked", rows)
    assert forced == dispatch.Plan("key-blocked", Blocks(128, 64, 8, 2), f"table {device}")
    short = dispatch.plan(20, 64, bf16, "ieee", "fwd", COMPILED, "key-blocked", rows)
    assert short.blocks == Blocks(32, 32, 8, 2) and short.source == f"table {device}"


def test_dispatch_table_row_matches_head_dim_and_dot_precision(tmp_path):
    """A row serves only its own head dim and, for float32, its own dot precision (a tf32 row's
    blocks were measured with tf32 dots); a row naming the kernel "auto" or a direction other
    than fwd/bwd is refused when the table is read."""
    device = jax.devices()[0].device_kind
    row = dict(device=device, dtype="float32/tf32", dh=64, direction="fwd", max_len=256,
               kernel="key-blocked", block_m=64, block_n=32, num_warps=4, num_stages=2)
    rows = [row]
    f32 = jnp.float32
    tuned = dispatch.plan(65, 64, f32, "tf32", "fwd", COMPILED, rows=rows)
    assert tuned == dispatch.Plan("key-blocked", Blocks(64, 32, 4, 2), f"table {device}")
    assert dispatch.dtype_key(f32, "tf32") == "float32/tf32" and dispatch.dtype_key(f32, "ieee") == "float32/ieee"
    assert dispatch.dtype_key(jnp.bfloat16, "tf32") == "bfloat16"
    assert dispatch.plan(65, 64, f32, "ieee", "fwd", COMPILED, rows=rows).source == "rule"
    assert dispatch.plan(65, 32, f32, "tf32", "fwd", COMPILED, rows=rows) == dispatch.Plan("one-tile", None, "rule")
    path = tmp_path / "table.json"
    for bad in (dict(row, kernel="auto"), dict(row, direction="both")):
        path.write_text(json.dumps({"rows": [row, bad]}))
        with pytest.raises(ValueError, match=f"{path.name}: row 1: kernel must be one-tile or key-blocked"):
            dispatch.load_table(path)


def test_shipped_table_is_valid():
    assert isinstance(dispatch.load_table(), list)


def test_fused_ops_route_through_the_dispatcher(monkeypatch):
    """The model's ops call dispatch with the kernel they were built for; both kernels stay
    reachable, an unknown one is an error."""
    from kernels import fused_ops

    seen = []
    real = dispatch.plan

    def spy(*args, **kwargs):
        p = real(*args, **kwargs)
        seen.append(p.kernel)
        return p

    monkeypatch.setattr(dispatch, "plan", spy)
    qkv = jnp.ones((1, 20, 3 * 16))
    for kernel, want in (("auto", "one-tile"), ("one-tile", "one-tile"), ("key-blocked", "key-blocked")):
        seen.clear()
        ops = fused_ops(launcher=INTERPRETED, attention_kernel=kernel)
        assert ops.description.endswith(f"attention {kernel})")
        jax.eval_shape(lambda x: ops.attention_backward(ops.attention_forward(x, 1)[1], x[..., :16]), qkv)
        assert seen == [want, want]
    with pytest.raises(ValueError, match="attention kernel must be one of"):
        fused_ops(launcher=INTERPRETED, attention_kernel="flash")


def test_fused_ops_pass_their_dot_precision_to_both_directions(monkeypatch):
    """fused_ops(dot_precision=...) and its launcher reach the dispatcher (and so the kernels) in
    the forward and the backward alike: a tf32 op set whose forward ran ieee dots would pass every check on
    the CPU interpreter and be slow on a GPU."""
    from kernels import fused_ops

    seen = []
    real = dispatch.plan

    def spy(l, dh, dtype, dot_precision, direction, launcher, *args, **kwargs):
        seen.append((direction, dot_precision, launcher))
        return real(l, dh, dtype, dot_precision, direction, launcher, *args, **kwargs)

    monkeypatch.setattr(dispatch, "plan", spy)
    qkv = jnp.ones((1, 20, 3 * 16))
    for dot_precision in ("ieee", "tf32"):
        seen.clear()
        ops = fused_ops(launcher=INTERPRETED, dot_precision=dot_precision)
        jax.eval_shape(lambda x: ops.attention_backward(ops.attention_forward(x, 1)[1], x[..., :16]), qkv)
        assert seen == [("fwd", dot_precision, INTERPRETED), ("bwd", dot_precision, INTERPRETED)]
