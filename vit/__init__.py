"""vitfuse: a Vision Transformer with every gradient written by hand in jax.numpy.

Public API (stable):
    ViTConfig                                         model configuration (validated)
    init_params(key, config) -> params                nested dict of arrays
    forward(params, images, config) -> logits         images NHWC float
    loss(params, images, labels, config) -> scalar    mean softmax cross-entropy
    loss_and_grads(params, images, labels, config) -> (loss, grads)   hand-written backward
    make_train_step(...)                              one jit-compiled AdamW training step
    Ops, REFERENCE                                    the op set (ops=...) and the jnp one;
                                                      kernels.fused_ops() builds the Triton one
"""

from vit.config import TrainHParams, ViTConfig
from vit.model import count_params, forward, image_gradient, init_params, loss, loss_and_grads
from vit.ops import REFERENCE, Ops
from vit.optim import adamw_init, adamw_update, decay_mask
from vit.step import make_train_step

__all__ = [
    "ViTConfig", "init_params", "forward", "loss", "loss_and_grads", "image_gradient",
    "count_params", "adamw_init", "adamw_update", "decay_mask", "make_train_step", "TrainHParams",
    "Ops", "REFERENCE",
]
