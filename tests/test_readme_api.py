"""The README's Public API block runs as written, on small made-up batches: every name, argument
and comment-promised behaviour it shows exists (a renamed function or keyword would leave the
first thing a user copies broken while every other test passes). On the CPU, `fused_ops()`
(compiled, for a GPU) is given Triton's interpreter, as the block's own comment says to do.
The block's last loss and grads are the fused ops' (float32): within 1e-4 of the reference's
(oracle.compare's "train step" row; observed 2e-6). About 12 s on the CPU."""

import functools
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
import vit
from kernel_checks import INTERPRET

README = Path(__file__).resolve().parents[1] / "README.md"


def public_api_block() -> str:
    text = README.read_text()
    section = text[text.index("\n## Public API\n"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md's section 'Public API' has no ```python block"
    return match.group(1)


def test_the_public_api_block_runs_and_its_fused_grads_match_the_reference(monkeypatch):
    if INTERPRET:  # fused_ops() is the compiled launcher, which needs a GPU
        monkeypatch.setattr(kernels, "fused_ops", functools.partial(kernels.fused_ops, kernels.INTERPRETED))
    rng = np.random.default_rng(0)
    uint8_images = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    names = {"images": jnp.asarray(uint8_images, jnp.float32) / 255.0, "uint8_images": uint8_images,
             "labels": jnp.asarray([3, 199]), "key": jax.random.PRNGKey(1)}
    exec(compile(public_api_block(), "README.md: Public API", "exec"), names)  # noqa: S102

    config, params = names["config"], names["params"]
    assert names["logits"].shape == (2, config.num_classes)
    assert np.isfinite(float(names["metrics"]["loss"]))
    with pytest.raises(ValueError):  # the block's comment: params for another config are refused
        vit.forward(params, names["images"], vit.ViTConfig(layers=config.layers + 1))
    # the block's last loss and grads are the fused ops' (at the params after one step)
    loss, grads = vit.loss_and_grads(params, names["images"], names["labels"], config)
    assert abs(float(names["loss"]) - float(loss)) <= 1e-5 * abs(float(loss))
    errors = jax.tree_util.tree_map(lambda got, want: float(jnp.max(jnp.abs(got - want))
                                                            / max(float(jnp.max(jnp.abs(want))), 1e-30)), names["grads"], grads)
    worst = max(jax.tree_util.tree_leaves_with_path(errors), key=lambda leaf: leaf[1])
    assert worst[1] <= 1e-4, f"fused grads{jax.tree_util.keystr(worst[0])}: rel error {worst[1]:.2e}"
