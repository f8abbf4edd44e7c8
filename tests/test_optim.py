"""AdamW against optax.adamw (a test-only oracle). optax gets a decay mask built here from the
README's rule (the dense weight matrices: patch projection, QKV, attention output, FFN, head),
not the product's decay_mask, so a wrong mask in the product fails the comparison."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vit
from vit import optim


def _tiny():
    cfg = vit.ViTConfig(image_size=8, patch_size=4, channels=3, d_model=16, heads=2, layers=2,
                        mlp_dim=32, num_classes=5, norm="pre")
    return cfg, vit.init_params(jax.random.PRNGKey(0), cfg)


def test_decay_mask_is_dense_weights_only():
    _, params = _tiny()
    flat = jax.tree_util.tree_flatten_with_path(optim.decay_mask(params))[0]
    decayed = {"/".join(str(p.key) if hasattr(p, "key") else str(p.idx) for p in path)
               for path, m in flat if m}
    assert "patch/w" in decayed and "head/w" in decayed and "blocks/0/attn/qkv/w" in decayed
    assert not any(name.endswith(("/b", "gamma", "beta", "cls", "pos")) for name in decayed)
    assert len(decayed) == 2 + 4 * 2  # patch, head, and qkv/out/fc1/fc2 in each of 2 blocks


def independent_decay_mask(params):
    """True exactly for the dense weight matrices, listed by where they sit in the model."""
    weights = {"patch/w", "head/w"} | {
        f"blocks/{i}/{layer}/w" for i in range(len(params["blocks"]))
        for layer in ("attn/qkv", "attn/out", "ffn/fc1", "ffn/fc2")}

    def walk(node, path):
        if isinstance(node, dict):
            return {k: walk(v, f"{path}{k}/") for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{path}{i}/") for i, v in enumerate(node)]
        return path[:-1] in weights
    return walk(params, "")


def test_independent_mask_is_what_the_readme_says():
    _, params = _tiny()
    flat = jax.tree_util.tree_flatten_with_path(independent_decay_mask(params))[0]
    decayed = sorted(jax.tree_util.keystr(path) for path, m in flat if m)
    assert len(decayed) == 2 + 4 * 2 and len(flat) > 3 * len(decayed)
    assert all(p.endswith("['w']") for p in decayed)


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_adamw_matches_optax_over_several_steps(wd):
    _, params = _tiny()
    lr, b1, b2, eps = 3e-3, 0.9, 0.98, 1e-7
    tx = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd,
                     mask=independent_decay_mask(params))
    ref_params, ref_state = params, tx.init(params)
    ours, state = params, optim.adamw_init(params)

    # each jitted, as the train step runs adamw_update (op by op, every parameter shape cost XLA
    # a compilation per op: both cases took 11.2 s here, jitted 7.6 s)
    @jax.jit
    def gradients(k):
        return jax.tree_util.tree_map(
            lambda p: jax.random.normal(jax.random.PRNGKey(k), p.shape) * (1 + k), params)

    @jax.jit
    def optax_step(grads, ref_state, ref_params):
        updates, ref_state = tx.update(grads, ref_state, ref_params)
        return optax.apply_updates(ref_params, updates), ref_state

    @jax.jit
    def our_step(ours, grads, state):  # the product's own mask: decay_mask(params), as vit.step passes it
        return optim.adamw_update(ours, grads, state, lr, b1=b1, b2=b2, eps=eps, weight_decay=wd,
                                  mask=optim.decay_mask(ours))

    for step in range(6):
        grads = gradients(step)
        ref_params, ref_state = optax_step(grads, ref_state, ref_params)
        ours, state = our_step(ours, grads, state)
    assert int(state["step"]) == 6
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-7)
    # and the params really moved (a no-op optimizer would not pass the comparison above anyway)
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(ours),
                                                            jax.tree_util.tree_leaves(params))]
    assert min(moved) > 1e-3


def test_adamw_keeps_the_dtype_of_each_param():
    params = {"w": jnp.ones((2, 2), jnp.bfloat16), "b": jnp.ones((2,), jnp.float32)}
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.5), params)
    new, state = optim.adamw_update(params, grads, optim.adamw_init(params), jnp.float32(1e-2),
                                    weight_decay=0.1)
    assert new["w"].dtype == jnp.bfloat16 and new["b"].dtype == jnp.float32
    assert state["m"]["w"].dtype == jnp.float32  # moments in float32 whatever the param dtype
    assert float(new["b"][0]) < 1.0  # and the step was taken


def test_clip_by_global_norm():
    g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.0])}
    clipped, norm = optim.clip_by_global_norm(g, 1.0)
    assert float(norm) == pytest.approx(5.0)
    assert float(optim.global_norm(clipped)) == pytest.approx(1.0, rel=1e-6)
    same, _ = optim.clip_by_global_norm(g, 10.0)
    np.testing.assert_allclose(same["a"], g["a"])
    for off in (None, 0.0):  # clip_norm 0 or None: no clipping, and the norm still reported
        unclipped, norm = optim.clip_by_global_norm(g, off)
        np.testing.assert_array_equal(unclipped["a"], g["a"])
        assert float(norm) == pytest.approx(5.0)


def test_learning_rate_warmup_then_cosine():
    lr = lambda s: float(optim.learning_rate(s, base_lr=1.0, total_steps=110, warmup_steps=10,  # noqa: E731
                                             schedule="cosine", min_lr=0.1))
    assert lr(0) == pytest.approx(0.1) and lr(4) == pytest.approx(0.5) and lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0) and lr(60) == pytest.approx(0.55) and lr(110) == pytest.approx(0.1)
    assert all(lr(s) >= lr(s + 1) for s in range(10, 110))
    # past total_steps (a run extended with more epochs) the schedule stays at min_lr, it does not rise again
    assert lr(111) == pytest.approx(0.1) and lr(200) == pytest.approx(0.1) and lr(210) == pytest.approx(0.1)
    const = optim.learning_rate(50, base_lr=0.3, total_steps=100)
    assert float(const) == pytest.approx(0.3)


def test_the_train_step_applies_the_learning_rate_of_its_own_step():
    """Step t (0-based: t updates made before it) uses learning_rate(t): with 4 warmup steps to
    lr 1, the first three steps use 1/4, 2/4, 3/4 and move a decayed weight by lr * wd * w (the
    gradients are zero, so AdamW's own update is 0)."""
    from vit.config import TrainHParams
    from vit.step import train_step_fn

    cfg = vit.ViTConfig(image_size=8, patch_size=4, channels=3, d_model=16, heads=2, layers=1,
                        mlp_dim=32, num_classes=5)
    params = {"head": {"w": jnp.full((16, 5), 2.0), "b": jnp.ones(5)}}  # the grads below ignore the model
    hp = TrainHParams(lr=1.0, weight_decay=0.5, warmup_steps=4, total_steps=20, schedule="cosine")

    def zero_grads(p, x, targets, key):
        return jnp.float32(0.0), jax.tree_util.tree_map(jnp.zeros_like, p), jnp.zeros((x.shape[0], 5))

    step = jax.jit(train_step_fn(cfg, hp, grad_fn=zero_grads))
    images, labels = jnp.zeros((2, 8, 8, 3), jnp.float32), jnp.zeros((2,), jnp.int32)
    state, p = optim.adamw_init(params), params
    for t in range(3):
        before = np.asarray(p["head"]["w"])
        p, state, metrics = step(p, state, images, labels, jax.random.key(t))
        assert float(metrics["lr"]) == pytest.approx((t + 1) / 4)
        np.testing.assert_allclose(p["head"]["w"], before * (1 - (t + 1) / 4 * 0.5), rtol=1e-6)


def test_the_train_step_clips_what_adamw_sees_and_reports_the_norm_before():
    """Gradients of global norm 3 * sqrt(80) with clip_norm 1.5: the first moment AdamW keeps is
    (1 - b1) times the gradient scaled down to norm 1.5; the metrics report the unclipped norm.
    (Adam's first step is scale-free, so the moment is where clipping shows.)"""
    from vit.config import TrainHParams
    from vit.step import train_step_fn

    cfg = vit.ViTConfig(image_size=8, patch_size=4, channels=3, d_model=16, heads=2, layers=1,
                        mlp_dim=32, num_classes=5)
    params = {"head": {"w": jnp.ones((16, 5)), "b": jnp.ones(5)}}  # the grads below ignore the model

    def constant_grads(p, x, targets, key):
        grads = {"head": {"w": jnp.full((16, 5), 3.0), "b": jnp.zeros(5)}}
        return jnp.float32(0.0), grads, jnp.zeros((x.shape[0], 5))

    images, labels = jnp.zeros((2, 8, 8, 3), jnp.float32), jnp.zeros((2,), jnp.int32)
    norm = 3.0 * np.sqrt(80.0)
    for clip, scale in ((1.5, 1.5 / norm), (0.0, 1.0), (1000.0, 1.0)):
        hp = TrainHParams(lr=1e-3, clip_norm=clip)
        step = jax.jit(train_step_fn(cfg, hp, grad_fn=constant_grads))
        _, state, metrics = step(params, optim.adamw_init(params), images, labels, jax.random.key(0))
        assert float(metrics["grad_norm"]) == pytest.approx(norm, rel=1e-6)
        np.testing.assert_allclose(state["m"]["head"]["w"], (1 - hp.b1) * 3.0 * scale, rtol=1e-5)


def test_trainable_head_is_the_head_alone():
    _, params = _tiny()
    flat = jax.tree_util.tree_flatten_with_path(optim.trainable_mask(params, "head"))[0]
    assert sorted(jax.tree_util.keystr(path) for path, t in flat if t) == ["['head']['b']", "['head']['w']"]
    assert all(jax.tree_util.tree_leaves(optim.trainable_mask(params, "all")))
    with pytest.raises(ValueError, match="trainable must be one of"):
        optim.trainable_mask(params, "body")


def test_a_linear_probe_step_trains_the_head_alone_on_its_own_gradient():
    """trainable="head": the other parameters stay bitwise as they were (also with AdamW moments
    left by a step that trained them), and the head takes AdamW's step on its own hand-written
    gradient, clipped by that gradient's norm, which the metrics report."""
    from vit.config import TrainHParams
    from vit.step import make_train_step

    cfg, params = _tiny()
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32)
    labels = jnp.asarray([0, 1, 2, 4])
    hp = TrainHParams(lr=1e-2, weight_decay=0.1, clip_norm=0.05, trainable="head")
    _, trained_all, _ = make_train_step(cfg, hp.replace(trainable="all"), donate=False)(
        params, optim.adamw_init(params), images, labels, jax.random.key(0))  # moments everywhere
    _, grads = vit.loss_and_grads(params, images, labels, cfg)
    head_norm = float(optim.global_norm(grads["head"]))
    assert head_norm > hp.clip_norm  # so the clipping shows
    state = {**trained_all, "step": jnp.zeros((), jnp.int32)}
    new, _, metrics = make_train_step(cfg, hp, donate=False)(params, state, images, labels,
                                                             jax.random.key(1))
    assert float(metrics["grad_norm"]) == pytest.approx(head_norm, rel=1e-5)
    for part in [k for k in params if k != "head"]:
        for a, b in zip(jax.tree_util.tree_leaves(new[part]), jax.tree_util.tree_leaves(params[part])):
            np.testing.assert_array_equal(a, b)
    clipped = jax.tree_util.tree_map(lambda g: g * hp.clip_norm / head_norm, grads["head"])
    want, _ = optim.adamw_update({"head": params["head"]}, {"head": clipped},
                                 {"step": state["step"], "m": {"head": state["m"]["head"]},
                                  "v": {"head": state["v"]["head"]}},
                                 hp.lr, weight_decay=hp.weight_decay)
    for got, expected in zip(jax.tree_util.tree_leaves(new["head"]), jax.tree_util.tree_leaves(want["head"])):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(new["head"]["w"], params["head"]["w"])


def test_layer_decay_scales_the_lr_towards_the_input():
    _, params = _tiny()  # 2 blocks, pre-norm
    scales = optim.layer_lr_scales(params, 0.5)
    assert scales["head"] == {"w": 1.0, "b": 1.0} and scales["final_ln"] == {"gamma": 1.0, "beta": 1.0}
    assert set(jax.tree_util.tree_leaves(scales["blocks"][1])) == {0.5}
    assert set(jax.tree_util.tree_leaves(scales["blocks"][0])) == {0.25}
    assert scales["patch"] == {"w": 0.125, "b": 0.125} and scales["embed"] == {"cls": 0.125, "pos": 0.125}
    assert set(jax.tree_util.tree_leaves(optim.layer_lr_scales(params, 1.0))) == {1.0}


def test_a_step_with_layer_decay_moves_each_parameter_at_its_own_lr():
    """The step's AdamW update of every parameter is the one AdamW makes at lr times its
    layer's factor (its weight decay too), given the same gradients."""
    from vit.config import TrainHParams
    from vit.step import train_step_fn

    cfg, params = _tiny()
    rng = np.random.default_rng(1)
    grads = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)

    def fixed_grads(p, x, targets, key):
        return jnp.float32(0.0), grads, jnp.zeros((x.shape[0], 5))

    images, labels = jnp.zeros((2, 8, 8, 3), jnp.float32), jnp.zeros((2,), jnp.int32)
    hp = TrainHParams(lr=1e-2, weight_decay=0.1, layer_decay=0.6)
    new, _, _ = jax.jit(train_step_fn(cfg, hp, grad_fn=fixed_grads))(
        params, optim.adamw_init(params), images, labels, jax.random.key(0))
    scales = optim.layer_lr_scales(params, 0.6)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, p), g, s, got in zip(flat, jax.tree_util.tree_leaves(grads),
                                    jax.tree_util.tree_leaves(scales), jax.tree_util.tree_leaves(new)):
        decayed = getattr(path[-1], "key", None) == "w"
        want, _ = optim.adamw_update(p, g, optim.adamw_init(p), hp.lr * s,
                                     weight_decay=hp.weight_decay, mask=decayed)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8, err_msg=jax.tree_util.keystr(path))
    # the factors matter: the patch projection moved 0.6 ** 3 as far as at the full lr
    full, _, _ = jax.jit(train_step_fn(cfg, hp.replace(layer_decay=1.0), grad_fn=fixed_grads))(
        params, optim.adamw_init(params), images, labels, jax.random.key(0))
    moved = [np.abs(np.asarray(x["patch"]["w"]) - np.asarray(params["patch"]["w"])).max() for x in (new, full)]
    assert moved[0] == pytest.approx(0.6 ** 3 * moved[1], rel=1e-4)


@pytest.mark.parametrize("trainable, layer_decay", [("head", 1), ("all", 0.75), ("head", 1e-3)])
def test_a_config_file_sets_what_is_trained_and_the_layer_decay(trainable, layer_decay):
    """[train] trainable = "head" (the linear probe) and a layer_decay in (0, 1] are taken (the
    refusals: tests/test_config.py) and reach the step's TrainHParams as given."""
    from vit import runconfig

    cfg = runconfig.from_dict({"train": {"trainable": trainable, "layer_decay": layer_decay}},
                              "run.toml")
    hp = cfg.hparams(steps_per_epoch=3)
    assert (hp.trainable, hp.layer_decay) == (trainable, layer_decay)
