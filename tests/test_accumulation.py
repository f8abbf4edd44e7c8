"""Gradient accumulation (vit.step.accumulated_grads, train.accum_steps, train.py --accum-steps).

The batch's gradients taken in A micro-batches equal those of the whole batch (the loss and every
gradient are means over rows), so the step with accumulation is the step without it up to float
summation order; micro-batch j holds rows j, j + A, ... and draws its dropout masks with
fold_in(key, j). The 4-device and shard_map-ed (fused kernel) versions: tests/test_parallel.py.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train
import vit
from vit import layers, runconfig, training
from vit.step import accumulated_grads, hand_written_grads, make_train_step

from key_bias import adamw_noise_bound, qkv_bias_columns

ROWS = 12


def _tiny(**changes):
    cfg = vit.ViTConfig(image_size=8, patch_size=4, channels=3, d_model=16, heads=2, layers=2,
                        mlp_dim=32, num_classes=5, norm="pre").replace(**changes)
    return cfg, vit.init_params(jax.random.PRNGKey(0), cfg)


def _batch(rows=ROWS, classes=5):
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((rows, 8, 8, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, classes, rows), jnp.int32)
    return x, labels


def _assert_tree_close(got, want, rtol, what, key_bias_bound=None):
    """Every leaf to rtol of its largest magnitude; with key_bias_bound, the K columns of each
    QKV bias to that absolute bound instead (tests/key_bias.py)."""
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got),
                            jax.tree_util.tree_leaves(want)):
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        split = qkv_bias_columns(name, w.shape[-1] // 3) if key_bias_bound is not None else None
        if split is not None:
            keep, k_cols = split
            assert float(jnp.max(jnp.abs(g[k_cols] - w[k_cols]))) <= key_bias_bound, (what, name)
            g, w = g[keep], w[keep]
        scale = float(jnp.max(jnp.abs(w)))
        diff = float(jnp.max(jnp.abs(g - w)))
        assert diff <= rtol * scale + 1e-30, (what, jax.tree_util.keystr(path), diff, scale)


@pytest.fixture(scope="module")
def whole_batch():
    """The tiny model's loss, gradients and logits on the whole batch, and what produced them."""
    cfg, params = _tiny()
    x, labels = _batch()
    targets = layers.one_hot_targets(labels, cfg.num_classes, 0.1)
    grad_fn = hand_written_grads(cfg)
    return (grad_fn, params, x, targets), jax.jit(grad_fn)(params, x, targets, None)


@pytest.mark.parametrize("accum_steps", [3, ROWS])
def test_accumulated_grads_equal_the_whole_batch(whole_batch, accum_steps):
    """Loss, every gradient and the logits (in the batch's row order) of A micro-batches equal the
    whole batch's; ROWS micro-batches = one row each."""
    (grad_fn, params, x, targets), (loss, grads, logits) = whole_batch
    loss_a, grads_a, logits_a = jax.jit(accumulated_grads(grad_fn, accum_steps))(
        params, x, targets, None)
    assert float(loss_a) == pytest.approx(float(loss), rel=1e-6)
    _assert_tree_close(grads_a, grads, 1e-5, f"grads, {accum_steps} micro-batches")
    assert logits_a.shape == logits.shape
    np.testing.assert_allclose(logits_a, logits, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(logits))))


def test_micro_batch_j_holds_rows_j_mod_a_and_is_all_the_grad_fn_sees():
    """A stand-in grad_fn whose loss is not a mean over rows (the max) tells which rows each
    micro-batch held; it is traced with ROWS / A rows only."""
    accum_steps, seen = 3, []

    def fake(params, x, targets, key):
        seen.append(x.shape[0])
        return jnp.max(x[:, 0]), {"w": jnp.sum(x, axis=0)}, 2.0 * x

    x = jnp.asarray(np.random.default_rng(0).standard_normal((ROWS, 4)), jnp.float32)
    loss, grads, logits = accumulated_grads(fake, accum_steps)({"w": jnp.zeros(4)}, x, x, None)
    rows = np.asarray(x)
    want = np.mean([rows[j::accum_steps, 0].max() for j in range(accum_steps)])
    assert float(loss) == pytest.approx(want, rel=1e-6)
    np.testing.assert_allclose(grads["w"], rows.sum(axis=0) / accum_steps, rtol=1e-6)
    np.testing.assert_allclose(logits, 2.0 * rows, rtol=1e-6)  # back in row order
    assert set(seen) == {ROWS // accum_steps}


def test_micro_batch_j_draws_with_fold_in_key_j():
    """Dropout: each micro-batch its own key, fold_in(key, j); no key stays no key."""
    accum_steps, key = 4, jax.random.PRNGKey(3)

    def fake(params, x, targets, key):
        loss = jnp.zeros(()) if key is None else jax.random.uniform(key)
        return loss, {"w": jnp.zeros(1)}, x

    x = jnp.zeros((8, 1))
    got = accumulated_grads(fake, accum_steps)({"w": jnp.zeros(1)}, x, x, key)[0]
    draws = [float(jax.random.uniform(jax.random.fold_in(key, j))) for j in range(accum_steps)]
    assert len(set(draws)) == accum_steps
    assert float(got) == pytest.approx(np.mean(draws), rel=1e-6)
    assert float(accumulated_grads(fake, accum_steps)({"w": jnp.zeros(1)}, x, x, None)[0]) == 0.0


def test_one_micro_batch_is_the_grad_fn_itself():
    grad_fn = hand_written_grads(_tiny()[0])
    assert accumulated_grads(grad_fn, 1) is grad_fn


def test_step_with_accumulation_equals_the_step_without():
    """Two AdamW steps on uint8 images with crop, flip, mixup, label smoothing and clipping (the
    batch is augmented whole, then split): metrics, params and both moments agree."""
    cfg, params = _tiny()
    hp = vit.TrainHParams(lr=1e-3, clip_norm=0.5, label_smoothing=0.1, crop_pad=1, flip=True,
                          mixup_alpha=0.4, warmup_steps=1, total_steps=4, schedule="cosine")
    rng = np.random.default_rng(1)
    batches = [(rng.integers(0, 256, (ROWS, 8, 8, 3), dtype=np.uint8),
                rng.integers(0, 5, ROWS).astype(np.int32)) for _ in range(2)]
    states = {}
    for accum_steps in (1, 4):
        step = make_train_step(cfg, hp.replace(accum_steps=accum_steps), donate=False)
        p, opt, metrics = params, vit.adamw_init(params), []
        for s, (images, labels) in enumerate(batches):
            p, opt, m = step(p, opt, images, labels, jax.random.PRNGKey(s))
            metrics.append({k: float(v) for k, v in m.items()})
        states[accum_steps] = (p, opt, metrics)
    (p1, opt1, m1), (p4, opt4, m4) = states[1], states[4]
    for a, b in zip(m1, m4):
        for k in ("loss", "grad_norm", "lr"):
            assert b[k] == pytest.approx(a[k], rel=1e-5), k
        assert b["accuracy"] == a["accuracy"]
    assert m1[0]["grad_norm"] > hp.clip_norm  # clipping is part of the comparison
    _assert_tree_close(p4, p1, 1e-5, "params",
                       key_bias_bound=adamw_noise_bound(sum(m["lr"] for m in m1)))
    _assert_tree_close(opt4["m"], opt1["m"], 1e-5, "first moment")
    _assert_tree_close(opt4["v"], opt1["v"], 1e-5, "second moment")


def test_bad_accumulation_is_refused_naming_it():
    grad_fn = hand_written_grads(_tiny()[0])
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="accum_steps"):
            accumulated_grads(grad_fn, bad)
    cfg, params = _tiny()
    x, labels = _batch(rows=10)
    with pytest.raises(ValueError, match="accum_steps = 4"):
        accumulated_grads(grad_fn, 4)(params, x, layers.one_hot_targets(labels, 5, 0.0), None)
    base = {"train": {"batch_size": 64}}
    for value, flag, message in ((0, "--set train.accum_steps=0", "positive integer"),
                                 (True, "--set train.accum_steps=true", "must be an integer"),
                                 (3, "--accum-steps 3", "does not split"),
                                 (5, "--accum-steps 5", "multiple of 5 \\(e.g. 65\\) or "
                                  "accumulation steps that divide 64 \\(e.g. 4\\)")):
        with pytest.raises(runconfig.ConfigError, match=message) as err:
            runconfig.from_dict(runconfig.merge(base, "train", "accum_steps", value), "f.toml",
                                {"train.accum_steps": flag})
        assert str(err.value).startswith(flag)
    # an odd batch in 2: only 1 (no accumulation) divides it below 2, still a message
    with pytest.raises(runconfig.ConfigError, match=r"multiple of 2 \(e.g. 64\) or accumulation "
                                                    r"steps that divide 63 \(e.g. 1\)"):
        runconfig.from_dict({"train": {"batch_size": 63, "accum_steps": 2}})
    assert runconfig.from_dict(runconfig.merge(base, "train", "accum_steps", 4)) \
        .train.hparams.accum_steps == 4


def test_batch_must_split_over_devices_and_micro_batches():
    training.check_batch_split(64, 4, 2)  # 8 rows per device per micro-batch
    training.check_batch_split(64, 1, 64)
    # the value may come from the config file: named as the config's key, then the flags that fix it
    with pytest.raises(training.RunError, match=r"^train.batch_size 62 is not divisible by the 4 "
                                                r"devices in use; give --batch-size a multiple of 4, "
                                                r"or use fewer devices \(--devices 2\)"):
        training.check_batch_split(62, 4, 1)
    with pytest.raises(training.RunError, match=r"^train.batch_size 48 does not "
                                                r"split.*give --batch-size a multiple of 32"):
        training.check_batch_split(48, 4, 8)  # 48 / 8 = 6 rows a micro-batch: not over 4 devices


def test_train_py_accum_steps_trains_like_the_whole_batch(tmp_path, capsys, monkeypatch):
    """train.py --accum-steps 4: its step takes the gradients in 4 micro-batches, the config, run
    directory and log say so, and one epoch on the digits ends where the run without
    accumulation does (float summation order aside)."""
    from vit import step as step_module  # noqa: PLC0415

    asked = []

    def spy(grad_fn, accum_steps):
        asked.append(accum_steps)
        return accumulated_grads(grad_fn, accum_steps)
    monkeypatch.setattr(step_module, "accumulated_grads", spy)
    quick = ["--dataset", "digits", "--no-progress", "--set", "model.layers=1",
             "--set", "model.d_model=32", "--set", "model.mlp_dim=64", "--batch-size", "128",
             "--epochs", "1", "--set", "train.flip=true", "--set", "train.mixup_alpha=0.4"]
    assert train.main([*quick, "--out", str(tmp_path / "whole")]) == 0
    capsys.readouterr()
    assert train.main([*quick, "--accum-steps", "4", "--out", str(tmp_path / "accum")]) == 0
    assert "steps/epoch of 128 (4 micro-batches of 32)" in capsys.readouterr().out
    assert asked == [1, 4]  # the plain run's step, then the accumulating one
    runs = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
            for name in ("whole", "accum")}
    assert json.loads((tmp_path / "accum" / "config.json").read_text())["train"]["accum_steps"] == 4
    (whole,), (accum,) = runs["whole"], runs["accum"]
    for key in ("train_loss", "val_loss"):
        assert accum[key] == pytest.approx(whole[key], rel=1e-4), key
    lr_sum = whole["lr"] * whole["step"]  # the largest rate of the epoch, times its steps
    params = {}
    for name in ("whole", "accum"):
        with np.load(tmp_path / name / "last.npz") as data:
            params[name] = {k: data[k] for k in data.files if k.startswith("params/")}
    assert params["accum"].keys() == params["whole"].keys() and params["whole"]
    _assert_tree_close(params["accum"], params["whole"], 1e-4, "train.py params",
                       key_bias_bound=adamw_noise_bound(lr_sum))
