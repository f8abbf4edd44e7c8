"""Independent oracles for checking the product, kept outside it on purpose.

The product (vit/, kernels/, train.py) never uses automatic differentiation: every gradient there
is written by hand. This package is where JAX autodiff is allowed, as an *oracle* to check those
gradients against and as the *baseline* the benchmarks beat, and where the check commands live:

    python -m oracle.gradcheck           every hand-written gradient in float64 vs finite
                                         differences and autodiff (oracle/gradcheck.py)
    python -m oracle.kernel_gradcheck    every fused kernel output and gradient vs the reference
    oracle/compare.py                    the one comparison and tolerance table of those checks

It imports the product (vit/, kernels/); no product module (vit/, kernels/, train.py, evaluate.py,
cmdline.py, resume.py) imports it (tests/test_layout.py).
"""

from __future__ import annotations

import jax

from vit import layers
from vit.model import forward as model_forward


def autodiff_vjp(fn, inputs, cotangent):
    """Gradient of <fn(inputs), cotangent> with respect to the pytree `inputs`, by jax.vjp."""
    _, pullback = jax.vjp(fn, inputs)
    (grads,) = pullback(cotangent)
    return grads


def autodiff_grad_fn(config, forward_fn=None):
    """(params, images, targets, key) -> (loss, grads, logits) by jax.value_and_grad of the
    reference forward: the step a user would get from plain JAX. Drop-in for
    vit.step.make_train_step(grad_fn=...)."""
    forward_fn = forward_fn or (lambda p, x, key: model_forward(p, x, config, key=key))

    def grad_fn(params, images, targets, key):
        def loss_fn(p):
            logits = forward_fn(p, images, key)
            value, _ = layers.cross_entropy_forward(logits, targets)
            return value, logits
        (value, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return value, grads, logits

    return grad_fn
