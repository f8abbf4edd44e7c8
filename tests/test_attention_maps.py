"""Attention maps (vit/explain.py, `python evaluate.py RUN --attention N`): the weights read from the
forward's cache are the softmax of the model's own queries and keys (in chunks as at once), the rollout
multiplies the blocks in the right order with the residual mixed in, the grid titles each image and map
with its own classes and max, and the command draws and saves what it computed."""

import contextlib
import io
from types import SimpleNamespace

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


def test_weights_in_chunks_equal_the_weights_at_once():
    """Chunks of 2 over 5 images (the last one short): each image keeps its own weights and logits,
    in order, as with one chunk."""
    config = vit.ViTConfig(image_size=8, patch_size=4, channels=1, d_model=16, heads=2, layers=2,
                           mlp_dim=32, num_classes=3)
    params = vit.init_params(jax.random.PRNGKey(5), config)
    images = np.random.default_rng(5).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    mean, std = np.float32([100.0]), np.float32([60.0])
    probs, logits = explain.attention_probs(params, config, images, mean, std)
    chunked = explain.attention_probs(params, config, images, mean, std, chunk=2)
    assert chunked[0].shape == probs.shape == (2, 5, 2, 5, 5) and chunked[1].shape == (5, 3)
    np.testing.assert_allclose(chunked[0], probs, atol=1e-6)
    np.testing.assert_allclose(chunked[1], logits, atol=1e-5)


def test_the_grid_titles_each_image_with_its_classes_and_each_map_with_its_own_max(tmp_path,
                                                                                  monkeypatch):
    """write_attention with made-up weights and logits (attention_probs stubbed, reading which image
    it got from its pixels): image n's CLS attends to patch n % 4 with weight n / 10, so its map holds
    n / 20 there (row-major on the 2x2 grid); the model predicts class n % 3, the label is the next.
    Each image's title names its true class, then the predicted one; each map's, its own max."""
    probs = np.broadcast_to(np.eye(5), (1, 6, 1, 5, 5)).copy()  # (blocks, N, H, L, L)
    for n in range(6):
        probs[0, n, 0, 0, :] = np.eye(5)[0] * (1 - n / 10) + np.eye(5)[1 + n % 4] * n / 10
    logits = np.eye(3)[np.arange(6) % 3]

    def made_up(params, model, images_u8, mean, std):
        shown = images_u8[:, 0, 0, 0].astype(int)  # image n is all n
        return probs[:, shown], logits[shown]
    monkeypatch.setattr(explain, "attention_probs", made_up)
    saved = {}
    monkeypatch.setattr(explain, "save_png", lambda fig, path, dpi: saved.update(fig=fig, path=path))
    names, labels = ["ant", "bee", "cat"], (np.arange(6) + 1) % 3
    images = np.broadcast_to(np.arange(6, dtype=np.uint8)[:, None, None, None], (6, 8, 8, 1))
    run = SimpleNamespace(params=None, model=SimpleNamespace(image_size=8, patch_size=4), mean=None, std=None)
    written = explain.write_attention(run, SimpleNamespace(images=images, labels=labels, class_names=names),
                                      4, tmp_path, "last")
    idx, maps = written["indices"], written["maps"]
    np.testing.assert_array_equal(idx, [0, 2, 3, 5])
    np.testing.assert_array_equal(written["predictions"], idx % 3)
    for i, n in enumerate(idx):
        want = np.zeros((2, 2), np.float32)
        want[divmod(n % 4, 2)] = n / 20
        np.testing.assert_allclose(maps[i], want, atol=1e-7)
    assert saved["path"] == tmp_path / "attention-last.png"
    assert written["npz"] == tmp_path / "attention-last.npz"
    titles = []
    for n in idx:
        titles += [f"true: {names[labels[n]]}\npred: {names[n % 3]}",
                   f"CLS attention rollout\nmax {n / 20:.2g}"]
    assert [ax.get_title() for ax in saved["fig"].axes][:len(titles)] == titles


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
    """python evaluate.py RUN --attention 5 --checkpoint last on a 2-block digits run: the PNG, and the
    npz holding every block's weights, the maps (their rollout, on the 2x2 patch grid) and the
    predictions, named after the checkpoint."""
    run = tmp_path / "run"
    assert train.main([*SMALL, "--epochs", "1", "--set", "model.layers=2", "--out", str(run)]) == 0
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert evaluate.main([str(run), "--attention", "5", "--checkpoint", "last", "--no-progress"]) == 0
    assert f"attention maps: {run / 'attention-last.png'} (5 validation images)" in out.getvalue()
    assert not (run / "attention-best.png").exists()
    with np.load(run / "attention-last.npz") as saved:
        probs, maps, picked = saved["attention"], saved["maps"], saved["indices"]
        assert probs.shape == (2, 5, 2, 5, 5) and maps.shape == (5, 2, 2)
        np.testing.assert_allclose(maps.reshape(5, 4), explain.attention_rollout(probs), atol=1e-6)
        np.testing.assert_array_equal(picked, explain.pick_indices(360, 5))
        run_ = explain.load_run(run, "last")
        logits = vit.forward(run_.params, explain.model_input(saved["images"], run_.mean, run_.std), run_.model)
        np.testing.assert_array_equal(saved["predictions"], np.asarray(logits).argmax(-1))
    assert (run / "attention-last.png").stat().st_size > 10_000
