"""Attention maps (vit/explain.py, `python evaluate.py RUN --attention N`): the weights read from the
forward's cache are the softmax of the model's own queries and keys, the rollout multiplies the blocks
in the right order with the residual mixed in, and the command draws and saves what it computed."""

import contextlib
import io

import jax
import numpy as np
import pytest

import evaluate
import train
import vit
from vit import explain, layers

SMALL = ["--dataset", "digits", "--no-progress", "--set", "model.d_model=32", "--set", "model.heads=2",
         "--set", "model.mlp_dim=64", "--batch-size", "128"]


@pytest.mark.parametrize("blocks", [1, 2])
def test_the_weights_are_the_softmax_of_the_models_own_queries_and_keys(blocks):
    """Block 0's P, recomputed in float64 numpy from the embedded tokens and the packed [Q | K | V]
    projection (head h at columns h*Dh:(h+1)*Dh of each): with one block, block 0 is also the last,
    whose forward keeps only the CLS row after attention (its P must still be whole)."""
    config = vit.ViTConfig(image_size=8, patch_size=4, channels=1, d_model=16, heads=2, layers=blocks,
                           mlp_dim=32, num_classes=3)
    params = vit.init_params(jax.random.PRNGKey(blocks), config)
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    mean, std = np.float32([100.0]), np.float32([60.0])
    probs, logits = explain.attention_probs(params, config, images, mean, std)
    assert probs.shape == (blocks, 3, 2, 5, 5) and logits.shape == (3, 3)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)

    x = explain.model_input(images, mean, std)
    tokens, _ = layers.patch_embed_forward(params["patch"], x, config.patch_size)
    x0 = np.asarray(layers.embed_forward(params["embed"], tokens)[0], np.float64)
    qkv = params["blocks"][0]["attn"]["qkv"]
    packed = x0 @ np.asarray(qkv["w"], np.float64) + np.asarray(qkv["b"], np.float64)
    q, k = packed[..., :16], packed[..., 16:32]
    for h in range(2):
        s = q[..., 8 * h:8 * h + 8] @ np.swapaxes(k[..., 8 * h:8 * h + 8], -1, -2) / np.sqrt(8)
        p = np.exp(s - s.max(-1, keepdims=True))
        np.testing.assert_allclose(probs[0, :, h], p / p.sum(-1, keepdims=True), atol=2e-6)
    np.testing.assert_allclose(logits, np.asarray(vit.forward(params, x, config)), atol=1e-5)


def test_uniform_attention_rolls_out_to_the_closed_form():
    """P = 1/L everywhere in each of n blocks: U = P is a projection (U U = U), so
    ((U + I) / 2)^n = I / 2^n + (1 - 1 / 2^n) U, and the CLS row gives each patch (1 - 2^-n) / L."""
    n, length = 3, 5
    probs = np.full((n, 2, 4, length, length), 1.0 / length)
    np.testing.assert_allclose(explain.attention_rollout(probs), (1 - 2.0 ** -n) / length, rtol=1e-12)


def test_rollout_follows_the_blocks_in_order():
    """Block 1: every token attends to itself except token 2, which attends to token 3; block 2: the
    CLS (token 0) attends to token 2. Through the residual halves, the CLS ends half on itself and a
    quarter each on tokens 2 and 3; multiplied the other way round, token 3 would get nothing."""
    length = 5
    first, second = np.eye(length), np.eye(length)
    first[2] = np.eye(length)[3]
    second[0] = np.eye(length)[2]
    probs = np.stack([first, second])[:, None, None]  # (blocks, N = 1, H = 1, L, L)
    np.testing.assert_allclose(explain.attention_rollout(probs), [[0.0, 0.25, 0.25, 0.0]])
    # a second head attending to itself everywhere halves each block's move: A = P / 4 + 3 I / 4,
    # so the CLS keeps 3/4, token 2 gets 1/4 * 3/4 and token 3 1/4 * 1/4
    heads = np.stack([probs[:, :, 0], np.broadcast_to(np.eye(length), probs[:, :, 0].shape)], axis=2)
    np.testing.assert_allclose(explain.attention_rollout(heads), [[0.0, 0.1875, 0.0625, 0.0]])


def test_evaluate_draws_and_saves_the_attention_maps(tmp_path):
    """python evaluate.py RUN --attention 5 on a 2-block digits run: the PNG, and the npz holding every
    block's weights, the maps (their rollout, on the 2x2 patch grid) and the predictions."""
    run = tmp_path / "run"
    assert train.main([*SMALL, "--epochs", "1", "--set", "model.layers=2", "--out", str(run)]) == 0
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert evaluate.main([str(run), "--attention", "5", "--no-progress"]) == 0
    assert f"attention maps: {run / 'attention-best.png'} (5 validation images)" in out.getvalue()
    with np.load(run / "attention-best.npz") as saved:
        probs, maps, picked = saved["attention"], saved["maps"], saved["indices"]
        assert probs.shape == (2, 5, 2, 5, 5) and maps.shape == (5, 2, 2)
        np.testing.assert_allclose(maps.reshape(5, 4), explain.attention_rollout(probs), atol=1e-6)
        np.testing.assert_array_equal(picked, explain.pick_indices(360, 5))
        run_ = explain.load_run(run)
        logits = vit.forward(run_.params, explain.model_input(saved["images"], run_.mean, run_.std), run_.model)
        np.testing.assert_array_equal(saved["predictions"], np.asarray(logits).argmax(-1))
    assert (run / "attention-best.png").stat().st_size > 10_000
