"""The public API, the jitted training step, and the no-autograd rule."""

import ast
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vit
from oracle import autodiff_grad_fn
from vit.config import TrainHParams
from vit.step import make_train_step

ROOT = pathlib.Path(__file__).resolve().parents[1]


def small(norm="post", **kw):
    base = dict(image_size=16, patch_size=4, channels=3, d_model=32, heads=4, layers=2,
                mlp_dim=64, num_classes=10, norm=norm)
    base.update(kw)
    return vit.ViTConfig(**base)


def batch(cfg, n, seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    images = jax.random.randint(k1, (n, cfg.image_size, cfg.image_size, cfg.channels), 0, 256)
    return images.astype(jnp.uint8), jax.random.randint(k2, (n,), 0, cfg.num_classes)


def test_product_config_forward_and_grads_shapes():
    cfg = vit.ViTConfig()
    params = vit.init_params(jax.random.PRNGKey(0), cfg)
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
    logits = vit.forward(params, images, cfg)
    assert logits.shape == (2, 200) and bool(jnp.all(jnp.isfinite(logits)))
    loss, grads = vit.loss_and_grads(params, images, jnp.array([3, 199]), cfg)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    for g, p in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(params)):
        assert g.shape == p.shape and g.dtype == p.dtype
    assert float(loss) == pytest.approx(float(vit.loss(params, images, jnp.array([3, 199]), cfg)),
                                        rel=1e-6)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_train_step_learns_and_trains_cls_and_pos(norm):
    cfg = small(norm)
    params = vit.init_params(jax.random.PRNGKey(0), cfg)
    before = jax.tree_util.tree_map(np.asarray, params)
    state = vit.adamw_init(params)
    step = make_train_step(cfg, TrainHParams(lr=2e-3, weight_decay=0.0))
    images, labels = batch(cfg, 8)
    losses = []
    for i in range(60):
        params, state, m = step(params, state, images, labels, jax.random.PRNGKey(i))
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.2 * losses[0], losses          # memorises one batch
    assert float(m["accuracy"]) == 1.0
    for name in ("cls", "pos"):                           # both are parameters that train
        assert np.max(np.abs(np.asarray(params["embed"][name]) - before["embed"][name])) > 1e-3


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_float32_gradients_equal_autodiff(norm):
    """In float32 too (the float64 proof is in test_gradients.py): every gradient tensor agrees
    with autodiff to 1e-4 of the global gradient norm."""
    cfg = small(norm, dropout=0.1, drop_path=0.1)
    params = vit.init_params(jax.random.PRNGKey(0), cfg)
    images, labels = batch(cfg, 4, seed=1)
    x = images.astype(jnp.float32) / 255.0
    targets = vit.layers.one_hot_targets(labels, cfg.num_classes, 0.1)
    key = jax.random.PRNGKey(5)
    from vit.ops import REFERENCE
    from vit.step import hand_written_grads
    # jitted, as the training step runs them (op by op, each op's compilation took most of the time)
    l1, g1, _ = jax.jit(hand_written_grads(cfg, REFERENCE))(params, x, targets, key)
    l2, g2, _ = jax.jit(autodiff_grad_fn(cfg))(params, x, targets, key)
    assert float(l1) == pytest.approx(float(l2), rel=1e-6)
    scale = float(vit.optim.global_norm(g2))
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-4 * scale


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_hand_written_step_tracks_autodiff_step(norm):
    """The whole jitted step with either gradient: losses over 5 steps agree. (Parameters are not
    compared elementwise: Adam turns float32 rounding noise in an exactly-zero gradient, such as
    the key bias's, into a +-lr step, so those elements legitimately differ.)"""
    cfg = small(norm)
    hp = TrainHParams(lr=1e-3, weight_decay=0.01, clip_norm=1.0, label_smoothing=0.1)
    images, labels = batch(cfg, 4, seed=1)
    curves = []
    for grad_fn in (None, autodiff_grad_fn(cfg)):
        params = vit.init_params(jax.random.PRNGKey(0), cfg)
        state = vit.adamw_init(params)
        step = make_train_step(cfg, hp, grad_fn=grad_fn)
        losses = []
        for i in range(5):
            params, state, m = step(params, state, images, labels, jax.random.PRNGKey(i))
            losses.append(float(m["loss"]))
        curves.append(losses)
    np.testing.assert_allclose(curves[0], curves[1], rtol=1e-4)
    assert curves[0][-1] < curves[0][0]


def test_dropout_changes_with_key_and_is_off_in_eval():
    cfg = small(dropout=0.3, attn_dropout=0.3, ffn_dropout=0.3, drop_path=0.2)
    params = vit.init_params(jax.random.PRNGKey(0), cfg)
    images = jax.random.normal(jax.random.PRNGKey(1), (3, 16, 16, 3))
    eval_a = vit.forward(params, images, cfg)
    eval_b = vit.forward(params, images, cfg)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a = vit.forward(params, images, cfg, key=jax.random.PRNGKey(1))
    train_b = vit.forward(params, images, cfg, key=jax.random.PRNGKey(2))
    assert not np.allclose(train_a, train_b) and not np.allclose(train_a, eval_a)


def test_image_gradient_shape():
    cfg = small()
    params = vit.init_params(jax.random.PRNGKey(0), cfg)
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
    g = vit.image_gradient(params, images, jnp.array([1, 2]), cfg)
    assert g.shape == images.shape and float(jnp.max(jnp.abs(g))) > 0


def test_wrong_image_shape_is_a_clear_error():
    cfg = small()
    params = vit.init_params(jax.random.PRNGKey(0), cfg)
    with pytest.raises(ValueError, match=r"images must be \(batch, 16, 16, 3\).*\(2, 16, 16, 1\)"):
        vit.forward(params, jnp.zeros((2, 16, 16, 1)), cfg)
    # uint8 (or int) images: the weights cast to their dtype were 0, the logits all 0, no error
    for dtype in (jnp.uint8, jnp.int32):
        for fn, args in ((vit.forward, ()), (vit.loss_and_grads, (jnp.array([0, 1]),))):
            with pytest.raises(ValueError, match=f"images must be floating point, normalised .*got {dtype.__name__}"):
                fn(params, jnp.full((2, 16, 16, 3), 128, dtype), *args, cfg)


def test_params_made_for_another_config_are_a_clear_error():
    """A config that disagrees with the params ran the blocks the params had (1 of layers=2)
    without a word, or failed deep inside (KeyError 'final_ln', a broadcasting error)."""
    cfg = small(layers=1)
    params = vit.init_params(jax.random.PRNGKey(0), cfg)
    images = jnp.zeros((2, 16, 16, 3))
    for other, said in ((cfg.replace(layers=2), r"params hold 1 block, for layers=2"),
                        (cfg.replace(norm="pre"), r"params\['final_ln'\]\['beta'\] is missing"),
                        (cfg.replace(mlp_dim=48), r"params\['blocks'\]\[0\]\['ffn'\]\['fc1'\]\['b'\] is "
                                                  r"\(64,\), not \(48,\)")):
        for fn, args in ((vit.forward, ()), (vit.loss_and_grads, (jnp.array([0, 1]),))):
            with pytest.raises(ValueError, match=f"params do not fit this ViTConfig: {said}"):
                fn(params, images, *args, other)
    params["blocks"][0]["extra"] = jnp.zeros(3)
    with pytest.raises(ValueError, match=r"params\['blocks'\]\[0\]\['extra'\] is not in it"):
        vit.forward(params, images, cfg)


def test_product_config_train_step_runs():
    cfg = vit.ViTConfig()
    params = vit.init_params(jax.random.PRNGKey(0), cfg)
    state = vit.adamw_init(params)
    step = make_train_step(cfg, TrainHParams())
    images, labels = batch(cfg, 4)
    params, state, m = step(params, state, images, labels, jax.random.PRNGKey(0))
    assert np.isfinite(float(m["loss"])) and int(state["step"]) == 1


# JAX's automatic differentiation, by every name it goes under (jet: Taylor-mode autodiff)
FORBIDDEN = {"grad", "value_and_grad", "vjp", "jvp", "linearize", "linear_transpose", "jacfwd",
             "jacrev", "jacobian", "hessian", "custom_vjp", "custom_jvp", "custom_gradient",
             "custom_transpose", "jet"}


def _product_files():
    files = list((ROOT / "vit").rglob("*.py")) + list((ROOT / "kernels").rglob("*.py"))
    files += [ROOT / f"{name}.py" for name in ("train", "evaluate", "cmdline", "resume")]
    return files


def autodiff_uses(source: str, filename: str = "<snippet>") -> list[str]:
    """Where `source` uses or imports JAX autodiff (FORBIDDEN), or imports the oracle package."""
    offenders = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Attribute) and node.attr in FORBIDDEN:
            offenders.append(f"{filename}:{node.lineno}: .{node.attr}")
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "jax" and set(alias.name.split(".")) & FORBIDDEN:
                    offenders.append(f"{filename}:{node.lineno}: import {alias.name}")
        if isinstance(node, ast.ImportFrom) and node.module:
            names = {a.name for a in node.names}
            if node.module.split(".")[0] == "jax" and (names | set(node.module.split("."))) & FORBIDDEN:
                offenders.append(f"{filename}:{node.lineno}: from {node.module} import {names}")
            if node.module.split(".")[0] == "oracle":
                offenders.append(f"{filename}:{node.lineno}: imports the autodiff oracle")
    return offenders


def test_no_autograd_in_the_product():
    """No JAX autodiff (FORBIDDEN: jax.grad, vjp, jvp, jacfwd, hessian, custom_vjp, ...) is used or
    imported anywhere under vit/, kernels/, train.py, evaluate.py, cmdline.py or resume.py (the
    oracle package is where autodiff lives), and nothing there imports the oracle."""
    offenders = []
    for path in _product_files():
        offenders += autodiff_uses(path.read_text(), str(path))
    assert len(_product_files()) >= 8
    assert not offenders, "\n".join(offenders)


PLANTED = {
    "grad": "import jax\ng = jax.grad(f)(x)",
    "value_and_grad": "import jax as j\nj.value_and_grad(f)",
    "vjp": "from jax import vjp\nvjp(f, x)",
    "jvp": "import jax\njax.jvp(f, (x,), (t,))",
    "linearize": "import jax\ny, f_jvp = jax.linearize(f, x)",
    "jacfwd": "import jax\njax.jacfwd(f)(x)",
    "jacrev": "import jax\njax.jacrev(f)(x)",
    "hessian": "import jax\njax.hessian(f)(x)",
    "custom_vjp": "import jax\n@jax.custom_vjp\ndef f(x):\n    return x",
    "custom_jvp": "from jax import custom_jvp\n@custom_jvp\ndef f(x):\n    return x",
    "custom_gradient": "from jax import custom_gradient",
    "linear_transpose": "import jax\njax.linear_transpose(f, x)",
    "from-import": "from jax import grad as g\ng(f)",
    "from-import-jacrev": "from jax import jacrev, numpy",
    "from-import-hessian": "from jax import hessian",
    "jet": "from jax.experimental.jet import jet",
    "import-jet": "import jax.experimental.jet as taylor",
    "oracle": "from oracle import autodiff_vjp",
}


@pytest.mark.parametrize("snippet", PLANTED.values(), ids=PLANTED.keys())
def test_autodiff_guard_catches_planted_use(snippet):
    assert autodiff_uses(snippet), snippet


def test_autodiff_guard_passes_clean_code():
    clean = ("import jax\nimport jax.numpy as jnp\nfrom jax import lax, random\n"
             "y = jax.jit(f)(x)\nz = jnp.tanh(y)\nw = lax.dot_general(a, b, dims)\n")
    assert autodiff_uses(clean) == []


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_the_model_runs_every_function_of_its_op_set(norm):
    """Each of vit.ops.FUNCTIONS, swapped for a copy that counts its calls and scales its main
    output by 1.5, is called once per use (a block: one attention, two add+LayerNorms; pre-norm
    also the final LayerNorm) and what it returns is used: a forward changes the loss, a backward
    the gradients only. A model calling a layer directly, past `ops`, would fail here."""
    from vit.ops import FUNCTIONS, REFERENCE  # noqa: PLC0415
    ops = {name for name, f in REFERENCE._asdict().items() if callable(f)} - {"check_model"}
    assert set(FUNCTIONS) == ops  # (check_model asks about a config: the model never calls it)
    cfg = small(norm, layers=2)
    params = vit.init_params(jax.random.PRNGKey(0), cfg)
    images, labels = batch(cfg, 3)
    images = images.astype(jnp.float32) / 255.0
    loss0, grads0 = vit.loss_and_grads(params, images, labels, cfg)
    uses = {"attention": cfg.layers, "add_layernorm": 2 * cfg.layers + (norm == "pre")}
    for name in FUNCTIONS:
        calls = []

        def scaled(*args, f=getattr(REFERENCE, name), **kwargs):
            calls.append(name)
            out = f(*args, **kwargs)
            return (1.5 * out[0], *out[1:]) if isinstance(out, tuple) else 1.5 * out
        loss, grads = vit.loss_and_grads(params, images, labels, cfg,
                                         ops=REFERENCE._replace(**{name: scaled}))
        assert len(calls) == uses[name.rsplit("_", 1)[0]], (name, len(calls))
        grads_moved = any(not np.allclose(a, b) for a, b in
                          zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads0)))
        assert grads_moved, name
        assert (float(loss) != float(loss0)) == name.endswith("_forward"), (name, loss, loss0)


def test_init_is_what_init_params_documents():
    """Xavier-uniform dense weights (Q, K and V each its own D x D matrix), zero biases, unit
    LayerNorms, N(0, 0.02) CLS and position embeddings. (The tolerances are several standard
    errors of each sample's spread: 17 x 32 position entries, 32 CLS entries.)"""
    cfg = small("pre")
    params = jax.tree_util.tree_map(np.asarray, vit.init_params(jax.random.PRNGKey(0), cfg))
    d = cfg.d_model

    def xavier(w, fan_in, fan_out):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        assert np.abs(w).max() <= limit and np.abs(w).max() > 0.95 * limit
        assert w.std() == pytest.approx(limit / np.sqrt(3.0), rel=0.1)  # uniform(-a, a): a / sqrt 3
    block = params["blocks"][0]
    for j in range(3):
        xavier(block["attn"]["qkv"]["w"][:, j * d:(j + 1) * d], d, d)
    xavier(block["attn"]["out"]["w"], d, d)
    xavier(block["ffn"]["fc1"]["w"], d, cfg.mlp_dim)
    xavier(params["patch"]["w"], cfg.patch_dim, d)
    assert params["embed"]["cls"].std() == pytest.approx(0.02, rel=0.4)
    assert params["embed"]["pos"].std() == pytest.approx(0.02, rel=0.15)
    for leaf_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = getattr(leaf_path[-1], "key", None)
        if name in ("b", "beta"):
            assert not leaf.any(), leaf_path
        elif name == "gamma":
            assert (leaf == 1).all(), leaf_path


def test_each_dropout_rate_masks_its_own_activation():
    """block_masks: attn_dropout masks the attention weights, ffn_dropout the FFN hidden
    activation, dropout each residual branch, every one at its own rate (a quarter of the
    entries zeroed, the rest scaled by 4/3), and a rate of 0 draws no mask."""
    shapes = {"attn_dropout": 0, "ffn_dropout": 1, "dropout": 2}  # its mask among block_masks'
    block_masks = jax.jit(vit.model.block_masks, static_argnums=(1, 2, 3, 4, 5))  # one compile each
    for name, index in shapes.items():
        cfg = small(**{name: 0.25})
        masks = block_masks(jax.random.PRNGKey(0), cfg, 1, 64, cfg.seq_len, jnp.float32)
        drawn = [i for i, m in enumerate(masks) if m is not None]
        assert drawn == ([2, 3] if name == "dropout" else [index]), name
        mask = np.asarray(masks[index])
        assert set(np.unique(mask)) == {0.0, np.float32(4 / 3)}, name
        assert (mask == 0).mean() == pytest.approx(0.25, abs=0.02), name


def test_drop_path_grows_linearly_from_none_in_the_first_block_to_the_rate_in_the_last():
    """Stochastic depth: block i of n drops each example's branch with rate drop_path * i / (n - 1)
    (and scales the kept ones by 1 / (1 - rate)): none in the first block, drop_path in the last."""
    cfg = small(layers=3, drop_path=0.5)
    examples = 4000
    block_masks = jax.jit(vit.model.block_masks, static_argnums=(1, 2, 3, 4, 5))
    for i, rate in enumerate([0.0, 0.25, 0.5]):
        _, _, branch1, branch2 = block_masks(jax.random.PRNGKey(i), cfg, i, examples, 1, jnp.float32)
        if rate == 0.0:
            assert branch1 is None and branch2 is None
            continue
        for mask in (np.asarray(branch1), np.asarray(branch2)):
            assert mask.shape == (examples, 1, 1)  # one draw per example
            assert set(np.unique(mask)) == {0.0, np.float32(1 / (1 - rate))}
            assert (mask == 0).mean() == pytest.approx(rate, abs=0.03)


def test_label_smoothing_of_the_api_is_the_loss_against_smoothed_targets():
    """vit.loss_and_grads (vit.loss takes its targets the same way) with label_smoothing s on
    integer labels: the loss and gradients against the soft targets (1 - s) one_hot + s / K."""
    cfg = small()
    params = vit.init_params(jax.random.PRNGKey(0), cfg)
    images, labels = batch(cfg, 4, seed=1)
    x = images.astype(jnp.float32) / 255.0
    soft = 0.8 * np.eye(cfg.num_classes, dtype=np.float32)[np.asarray(labels)] + 0.2 / cfg.num_classes
    loss_and_grads = jax.jit(vit.loss_and_grads, static_argnums=3,
                             static_argnames="label_smoothing")
    smoothed = loss_and_grads(params, x, labels, cfg, label_smoothing=0.2)
    given = loss_and_grads(params, x, jnp.asarray(soft), cfg)
    assert float(smoothed[0]) == pytest.approx(float(given[0]), rel=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(smoothed[1]), jax.tree_util.tree_leaves(given[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("gelu", ["tanh", "erf"])
def test_config_gelu_reaches_every_blocks_ffn_forward_and_backward(norm, gelu, monkeypatch):
    """ViTConfig.gelu is the variant every block's FFN runs, forward and backward, in both block
    layouts: vit.layers.gelu_forward / gelu_backward, wrapped to record the `approximate` they get,
    are called once per block each way (the last block on the CLS row only), each with the
    configured variant; and the variant matters: the other one changes the logits and every
    block's FFN gradients. A model call that drops or hard-codes the variant fails here."""
    cfg = small(norm, layers=3, gelu=gelu)
    params = vit.init_params(jax.random.PRNGKey(0), cfg)
    images, labels = batch(cfg, 3)
    images = images.astype(jnp.float32) / 255.0
    seen = {"forward": [], "backward": []}
    gelu_forward, gelu_backward = vit.layers.gelu_forward, vit.layers.gelu_backward

    def recording_forward(x, approximate="tanh"):
        seen["forward"].append((approximate, x.shape[1]))
        return gelu_forward(x, approximate)

    def recording_backward(cache, dy, approximate="tanh"):
        seen["backward"].append((approximate, dy.shape[1]))
        return gelu_backward(cache, dy, approximate)
    monkeypatch.setattr(vit.layers, "gelu_forward", recording_forward)
    monkeypatch.setattr(vit.layers, "gelu_backward", recording_backward)
    logits = vit.forward(params, images, cfg)
    seen["forward"].clear()
    _, grads = vit.loss_and_grads(params, images, labels, cfg)
    rows = [cfg.seq_len] * (cfg.layers - 1) + [1]  # block order; the last block: the CLS row
    assert seen["forward"] == [(gelu, r) for r in rows], seen["forward"]
    assert seen["backward"] == [(gelu, r) for r in reversed(rows)], seen["backward"]
    other = cfg.replace(gelu="erf" if gelu == "tanh" else "tanh")
    assert not np.allclose(logits, vit.forward(params, images, other), rtol=0, atol=1e-5)
    _, other_grads = vit.loss_and_grads(params, images, labels, other)
    for i, (g, h) in enumerate(zip(grads["blocks"], other_grads["blocks"])):
        for w in ("fc1", "fc2"):
            assert not np.allclose(g["ffn"][w]["w"], h["ffn"][w]["w"], rtol=0, atol=1e-5), (i, w)


def test_labels_outside_the_classes_or_the_batch_are_errors():
    """jax.nn.one_hot makes a label of 10 (or -1) among 10 classes a row of zeros: that image's
    loss was 0 and its gradient none, without a word (1-based labels, say). Known labels are
    checked; under jit, where they are not, the data loader's labels are in range by building."""
    cfg = small(layers=1)
    params = vit.init_params(jax.random.PRNGKey(0), cfg)
    images, _ = batch(cfg, 2)
    x = images.astype(jnp.float32) / 255.0
    for labels, said in (([0, 10], "from 0 to 9 (num_classes 10), got 0 to 10"), ([-1, 3], "got -1 to 3"),
                         ([0, 1, 2], "for 2 images, got shape (3,)")):
        for fn in (vit.loss, vit.loss_and_grads, vit.image_gradient):
            with pytest.raises(ValueError, match=re.escape(said)):
                fn(params, x, jnp.asarray(labels), cfg)
    traced = jax.jit(lambda labels: vit.loss(params, x, labels, cfg))(jnp.asarray([0, 9]))
    assert traced == pytest.approx(float(vit.loss(params, x, jnp.asarray([0, 9]), cfg)), rel=1e-6)
    # Labels closed over by a jitted function are known: checked, and a jnp reduction of them
    # inside the trace would be a tracer (CI failed on int() of one).
    good, bad = jnp.asarray([0, 9]), jnp.asarray([0, 10])
    closed = jax.jit(lambda p: vit.loss_and_grads(p, x, good, cfg)[0])(params)
    assert closed == pytest.approx(float(traced), rel=1e-6)
    with pytest.raises(ValueError, match=re.escape("got 0 to 10")):
        jax.jit(lambda p: vit.loss(p, x, bad, cfg))(params)
