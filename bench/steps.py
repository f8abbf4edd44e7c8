"""The train-step contenders the benchmark times (bench/test_bench_train_step.py) and
bench/profile_step.py profiles: the same step, built one way, in both.

    reference   vit.make_train_step(): the hand-written jnp forward/backward
    fused       the same step with the fused Triton kernels (kernels.fused_ops) as its ops
    autodiff    grad_fn=oracle.autodiff_grad_fn(config): jax.value_and_grad of the reference forward
    fused-attn, fused-ln
                the reference op set with one kernel pair swapped in: where the fused step's time goes
    reference-bf16, fused-bf16
                compute_dtype="bf16" (bf16 activations and matmul inputs, fp32 master weights)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import oracle
import vit
from vit.ops import REFERENCE

CONTENDERS = ["reference", "fused", "autodiff", "fused-attn", "fused-ln", "reference-bf16", "fused-bf16"]
HPARAMS = vit.TrainHParams()  # lr 1e-4, no clipping, no augmentation: the step's own cost
TINY = vit.ViTConfig(image_size=16, patch_size=8, d_model=64, heads=2, layers=2, mlp_dim=128,
                     num_classes=10)  # quick checks: L=5, Dh=32
SWAPPED = {"fused-attn": ("attention_forward", "attention_backward"),
           "fused-ln": ("add_layernorm_forward", "add_layernorm_backward")}


def ops_for(contender: str, launcher=None):
    """The op set of a contender: the reference, the fused kernels (launched by ``launcher``,
    kernels.COMPILED or kernels.INTERPRETED), or one pair swapped in."""
    if not contender.startswith("fused"):
        return REFERENCE
    if launcher is None:
        raise ValueError(f"bench.steps: the {contender!r} contender needs a launcher "
                         "(kernels.COMPILED or kernels.INTERPRETED)")
    from kernels import fused_ops  # noqa: PLC0415  (needs triton; only fused rows)

    fused = fused_ops(launcher)
    if contender in SWAPPED:
        return REFERENCE._replace(name=contender, description=f"reference with {contender}",
                                  **{name: getattr(fused, name) for name in SWAPPED[contender]})
    return fused


def make_step(contender: str, config, launcher=None):
    """The jitted train step of a contender; launcher: the fused contenders' (ops_for)."""
    compute_dtype = "bf16" if contender.endswith("-bf16") else "fp32"
    if contender == "autodiff":
        return vit.make_train_step(config, HPARAMS, grad_fn=oracle.autodiff_grad_fn(config))
    return vit.make_train_step(config, HPARAMS, ops=ops_for(contender, launcher),
                               compute_dtype=compute_dtype)


def config_for(shape):
    """The model of a step shape: the tiny ViT (checks), the product ViT, or the ViT-S/16 preset
    (configs/vit-s16.toml) at 224 px."""
    if shape == "quick":
        return TINY
    if shape == "vit-s16":
        from vit import runconfig  # noqa: PLC0415

        preset = runconfig.CONFIG_DIR / "vit-s16.toml"
        return runconfig.from_dict(runconfig.load_toml(preset, str(preset)), str(preset)).model
    return vit.ViTConfig()


def make_batch(config, batch, key):
    k1, k2 = jax.random.split(key)
    images = jax.random.randint(k1, (batch, config.image_size, config.image_size, config.channels),
                                0, 256, jnp.int32).astype(jnp.uint8)
    labels = jax.random.randint(k2, (batch,), 0, config.num_classes, jnp.int32)
    return images, labels


def model_flops_per_image(c: vit.ViTConfig) -> float:
    """Training FLOPs of one image for model FLOP utilisation (MFU): 3 x the forward's matmul
    FLOPs (backward = 2 x forward), counting every block in full.
    Forward: patch projection 2*N*(P*P*C)*D; per block QKV 2*L*D*3D, output 2*L*D*D,
    FFN 2*2*L*D*F, attention QK^T and PV 2*2*L*L*D; head 2*D*K."""
    n, l, d, f = c.num_patches, c.seq_len, c.d_model, c.mlp_dim
    block = 2 * l * d * 3 * d + 2 * l * d * d + 4 * l * d * f + 4 * l * l * d
    forward = 2 * n * c.patch_dim * d + c.layers * block + 2 * d * c.num_classes
    return 3.0 * forward


def copy_tree(tree):
    return jax.tree_util.tree_map(jnp.copy, tree)


def observed(opt_state, metrics):
    """What the check compares: the loss and every gradient (AdamW's m after one step / (1 - b1))."""
    return {"loss": metrics["loss"],
            "grads": jax.tree_util.tree_map(lambda m: m / (1.0 - HPARAMS.b1), opt_state["m"])}
