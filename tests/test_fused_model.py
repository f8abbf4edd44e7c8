"""The whole model with the fused kernels (Triton's interpreter on the CPU, compiled on a GPU:
tests/kernel_checks.py) against the reference path: loss and every gradient, both norm layouts,
with dropout on; and a tiny fused training run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train
import vit
from kernels import fused_ops
from vit.ops import FUNCTIONS, REFERENCE

from kernel_checks import LAUNCHER, fused_flags


def tiny(norm, **kw):
    return vit.ViTConfig(image_size=8, patch_size=4, channels=3, d_model=32, heads=2, layers=2,
                         mlp_dim=48, num_classes=5, norm=norm, **kw)


@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("dropout", [False, True], ids=["no-dropout", "dropout"])
def test_fused_model_matches_reference(norm, dropout):
    extra = dict(dropout=0.1, attn_dropout=0.2, ffn_dropout=0.1, drop_path=0.2) if dropout else {}
    cfg = tiny(norm, **extra)
    params = vit.init_params(jax.random.PRNGKey(0), cfg)
    images = jax.random.normal(jax.random.PRNGKey(1), (3, 8, 8, 3))
    labels = jnp.array([0, 3, 4])
    key = jax.random.PRNGKey(7) if dropout else None
    l_ref, g_ref = vit.loss_and_grads(params, images, labels, cfg, key=key)
    l_fused, g_fused = jax.jit(
        lambda p: vit.loss_and_grads(p, images, labels, cfg, ops=fused_ops(LAUNCHER), key=key)
    )(params)
    assert float(l_fused) == pytest.approx(float(l_ref), rel=1e-5)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(g_ref))
    for path, a in jax.tree_util.tree_flatten_with_path(g_fused)[0]:
        b = g_ref
        for p in path:
            b = b[getattr(p, "key", getattr(p, "idx", None))]
        err = float(jnp.max(jnp.abs(a - b)))
        assert err <= 1e-5 * scale, (jax.tree_util.keystr(path), err, scale)


def test_the_two_op_sets_differ_in_exactly_the_four_ops():
    ref, fused = REFERENCE, fused_ops(LAUNCHER)
    assert ref.name == "reference" and fused.name == "fused"
    assert ref.partitionable and not fused.partitionable
    for name in FUNCTIONS:
        assert getattr(ref, name) is not getattr(fused, name)


def test_fused_training_run(tmp_path):
    """python train.py --fused [--interpret] on digits with a tiny model: trains and validates.
    One head: the interpreter's time goes by attention programs (B x H a launch), and one head
    halves it (80 s -> 42 s for the command here); the tests above run the fused model with
    several heads against the reference."""
    out = tmp_path / "run"
    code = train.main(["--dataset", "digits", *fused_flags(), "--no-progress",
                       "--epochs", "1", "--batch-size", "256", "--set", "model.layers=1",
                       "--set", "model.d_model=32", "--set", "model.heads=1", "--set", "model.mlp_dim=32",
                       "--out", str(out)])
    assert code == 0
    import json
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["val_images"] == 360 and np.isfinite(record["val_loss"])
    assert record["val_top1"] > 0.2  # 10 classes: clearly above chance after one epoch
