"""Every layer of the ViT as a forward/backward pair, written by hand in jax.numpy.

Convention (llm.c style): ``*_forward(params, x, ...) -> (y, cache)`` returns what the backward
needs; ``*_backward(params, cache, dy) -> (dx, grads)`` returns the input gradient and a dict of
parameter gradients with the same structure as ``params``. A layer without parameters drops both
``params`` and ``grads``: ``*_backward(cache, dy) -> dx`` (gelu, softmax, attention,
cross-entropy), and where its forward takes several inputs it returns one gradient per input, in
the forward's order (``sdpa_backward -> (dq, dk, dv)``). No autodiff is used anywhere here.

Shapes: B batch, L tokens (patches + CLS), D model width, H heads, Dh = D / H head width,
F FFN hidden width, K classes. Activations are (B, L, D); dense weights are (D_in, D_out).

Precision: matmuls accumulate in float32 when their inputs are half precision (bf16/fp16) and in
the input dtype otherwise (float32, or float64 for the gradient checks). LayerNorm statistics,
softmax and the loss are computed in at least float32.

To add a layer or an activation (say SiLU beside GELU), or change one:
  - here: its ``*_forward`` / ``*_backward`` pair in the convention above, the derivative in its
    docstring. An activation: a pair of its own or a branch of gelu_forward/gelu_backward's
    ``approximate``; ffn_forward/ffn_backward take the model's choice as an argument (today
    ``approximate``), so their signature and their calls in vit/model.py change with it.
  - its proof: a ``_*_case`` in oracle/gradient_cases.py, listed in layer_cases (all_cases runs
    those, then the block and model cases; a model option also belongs in model_cases, one config
    per block layout, "post" and "pre": one layout's alone leaves the other's backward unproven);
    then ``python -m oracle.gradcheck`` (float64 finite differences and
    autodiff; ``--only NAME``). tests/test_gradients.py reruns layer_cases at other shapes.
  - README.md: the gradcheck's new 'N tensors in M cases' line over the excerpt's in "The proof",
    and that N in the "Two commands" timing row (tests/test_gradients.py checks both).
  - the model: vit/model.py's block_forward and block_backward, both layouts (norm "post" and
    "pre"), forward and backward; new parameters in init_params. tests/test_model.py's
    test_config_gelu_reaches_every_blocks_ffn_forward_and_backward shows how to check that a
    choice reaches every block, both ways; README.md's "The model" and Layout describe the layers.
  - a choice: a ViTConfig field, checked in its __post_init__ (vit/config.py; a bad value in
    tests/test_config.py's test_invalid_config_names_field_and_value). It is then a [model]
    config key (vit/runconfig.py's docstring; --resume refuses a [model] change);
    configs/tiny-imagenet.toml spells out every model field, so it goes there too
    (tests/test_presets.py checks), and other configs/*.toml name it where a preset wants it
    (vit-*16.toml: gelu = "erf").
  - fused kernels: vit/ops.py's Ops holds only attention and add+LayerNorm, so an FFN or
    activation change runs the same under --fused. A layer given a kernel becomes an Ops field
    (REFERENCE, kernels.fused_ops, kernels/, and kernels/__init__.py's "To change a kernel").
  - vit/flops.py, if it adds or resizes a matmul.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import erf

# ----------------------------------------------------------------------------------------------
# helpers


def _acc_dtype(dtype):
    """Accumulation dtype: float32 for half types, the dtype itself otherwise."""
    dtype = jnp.dtype(dtype)
    return jnp.float32 if dtype.itemsize < 4 else dtype


def stat_dtype(dtype):
    """Dtype for statistics (LN mean/var, softmax, loss): at least float32."""
    return _acc_dtype(dtype)


def matmul(a, b):
    """a @ b with accumulation in at least float32, result in a's dtype."""
    out = jnp.matmul(a, b, preferred_element_type=_acc_dtype(a.dtype))
    return out.astype(a.dtype)


def _flat(x):
    """(..., n) -> (prod(...), n): turns batched dense layers into one 2-D GEMM."""
    return x.reshape(-1, x.shape[-1])


# ----------------------------------------------------------------------------------------------
# dense: y = x W + b


def dense_forward(params, x):
    y = matmul(x, params["w"].astype(x.dtype)) + params["b"].astype(x.dtype)
    return y, x


def dense_backward(params, cache, dy, need_dx=True):
    """dW = x^T dy (summed over every leading axis), db = sum dy, dx = dy W^T."""
    x = cache
    acc = _acc_dtype(dy.dtype)
    # One contraction over every leading axis. Written as an einsum over (B, L) rather than
    # flatten-then-transpose: XLA:CPU runs this form 15-30% faster at the product shapes.
    dw = jnp.einsum("...i,...j->ij", x, dy, preferred_element_type=acc)
    db = jnp.sum(_flat(dy), axis=0, dtype=acc)
    dx = matmul(dy, params["w"].astype(dy.dtype).T) if need_dx else None
    return dx, {"w": dw, "b": db}


# ----------------------------------------------------------------------------------------------
# LayerNorm over the last axis, with the residual add fused in: y = LN(x + r)


def add_layernorm_forward(params, x, r, eps):
    """s = x + r (r may be None); y = gamma * (s - mean) * rstd + beta, rstd = 1/sqrt(var + eps).

    Cache: (s_hat, rstd) with s_hat = (s - mean) * rstd, in at least float32.
    """
    s = x if r is None else x + r
    sd = stat_dtype(s.dtype)
    s32 = s.astype(sd)
    mean = jnp.mean(s32, axis=-1, keepdims=True)
    centered = s32 - mean
    var = jnp.mean(centered * centered, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(var + eps)
    s_hat = centered * rstd
    y = s_hat * params["gamma"].astype(sd) + params["beta"].astype(sd)
    return y.astype(x.dtype), (s_hat, rstd)


def add_layernorm_backward(params, cache, dy):
    """ds is the gradient for both x and r (s = x + r copies the gradient to each input).

    Derivation, per row of width N (kernels/layernorm.py uses the same names):
        s_hat = (s - mean) * rstd,  y = gamma * s_hat + beta,  g = dL/ds_hat = dy * gamma
        mean and var depend on s, so  ds_hat_i/ds_j = rstd * (delta_ij - 1/N - s_hat_i s_hat_j / N)
        ds_j = sum_i g_i ds_hat_i/ds_j = rstd * (g_j - mean_g - s_hat_j * mean_gs)
            with mean_g = sum_i g_i / N  and  mean_gs = sum_i g_i s_hat_i / N
        dgamma = sum over rows of dy * s_hat,  dbeta = sum over rows of dy
    """
    s_hat, rstd = cache
    sd = s_hat.dtype
    dy32 = dy.astype(sd)
    g = dy32 * params["gamma"].astype(sd)
    mean_g = jnp.mean(g, axis=-1, keepdims=True)
    mean_gs = jnp.mean(g * s_hat, axis=-1, keepdims=True)
    ds = rstd * (g - mean_g - s_hat * mean_gs)
    dgamma = jnp.sum(_flat(dy32 * s_hat), axis=0)
    dbeta = jnp.sum(_flat(dy32), axis=0)
    return ds.astype(dy.dtype), {"gamma": dgamma, "beta": dbeta}


# ----------------------------------------------------------------------------------------------
# GELU, two flavours

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715


def gelu_forward(x, approximate="tanh"):
    """tanh: 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3);  erf: x Phi(x)."""
    if approximate == "tanh":
        u = _SQRT_2_OVER_PI * (x + _GELU_C * x * x * x)
        y = 0.5 * x * (1.0 + jnp.tanh(u))
    elif approximate == "erf":
        y = 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
    else:
        raise ValueError(f"gelu: approximate must be 'tanh' or 'erf', got {approximate!r}")
    return y, x


def gelu_backward(cache, dy, approximate="tanh"):
    """tanh: 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2);
    erf: Phi(x) + x phi(x) with phi the standard normal density."""
    x = cache
    if approximate == "tanh":
        t = jnp.tanh(_SQRT_2_OVER_PI * (x + _GELU_C * x * x * x))
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * x * x)
        dydx = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
    elif approximate == "erf":
        cdf = 0.5 * (1.0 + erf(x / math.sqrt(2.0)))
        pdf = jnp.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
        dydx = cdf + x * pdf
    else:
        raise ValueError(f"gelu: approximate must be 'tanh' or 'erf', got {approximate!r}")
    return dy * dydx


# ----------------------------------------------------------------------------------------------
# softmax over the last axis


def softmax_forward(x):
    """p = exp(x - max x) / sum exp(x - max x), computed in at least float32."""
    x32 = x.astype(stat_dtype(x.dtype))
    e = jnp.exp(x32 - jnp.max(x32, axis=-1, keepdims=True))
    p = e / jnp.sum(e, axis=-1, keepdims=True)
    return p, p


def softmax_backward(cache, dp):
    """dx = p * (dp - sum(dp * p))."""
    p = cache
    dp = dp.astype(p.dtype)
    return p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True))


# ----------------------------------------------------------------------------------------------
# dropout-style masks: y = x * keep / (1 - rate), the scaled mask kept for the backward


def dropout_scale(key, rate, shape, dtype):
    """A keep mask already divided by (1 - rate); None when there is nothing to drop."""
    if key is None or rate <= 0.0:
        return None
    keep = jax.random.bernoulli(key, 1.0 - rate, shape)
    return keep.astype(dtype) / jnp.asarray(1.0 - rate, dtype)


def apply_keep(x, keep_scale):
    """x * keep_scale (a dropout mask from dropout_scale), or x itself when there is no mask; the
    backward of this product is the same product applied to the gradient."""
    return x if keep_scale is None else x * keep_scale.astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# scaled dot-product attention, per head: inputs (B, H, L, Dh)


class SdpaCache(NamedTuple):
    q: jax.Array
    k: jax.Array
    v: jax.Array
    p: jax.Array                  # softmax(S), float32 for half inputs
    keep_scale: jax.Array | None  # attention-dropout scale, or None


def sdpa_forward(q, k, v, keep_scale=None):
    """S = Q K^T / sqrt(Dh); P = softmax(S); P' = P * keep_scale (attention dropout); O = P' V."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    # scores stay in the accumulation dtype (float32 for bf16 inputs) up to the softmax
    s = jnp.matmul(q, jnp.swapaxes(k, -1, -2), preferred_element_type=_acc_dtype(q.dtype)) * scale
    p, _ = softmax_forward(s)
    p_used = apply_keep(p, keep_scale).astype(v.dtype)
    o = matmul(p_used, v)
    return o, SdpaCache(q, k, v, p, keep_scale)


def sdpa_backward(cache, do):
    """dV = P'^T dO; dP' = dO V^T; dP = dP' * keep_scale; dS = softmax_backward(P, dP);
    dQ = dS K / sqrt(Dh); dK = dS^T Q / sqrt(Dh)."""
    q, k, v, p, keep_scale = cache
    scale = 1.0 / math.sqrt(q.shape[-1])
    p_used = apply_keep(p, keep_scale).astype(v.dtype)
    dv = matmul(jnp.swapaxes(p_used, -1, -2), do)
    dp = apply_keep(matmul(do, jnp.swapaxes(v, -1, -2)), keep_scale)
    ds = (softmax_backward(p, dp) * scale).astype(q.dtype)
    dq = matmul(ds, k)
    dk = matmul(jnp.swapaxes(ds, -1, -2), q)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# attention core on the packed QKV projection: (B, L, 3D) -> (B, L, D)
# This is the unit the fused Triton kernels replace: kernels/dispatch.py picks the one-tile
# kernel (kernels/attention.py) or the key-blocked one (kernels/flash_attention.py).


def split_heads(qkv, heads):
    """(B, L, 3D) packed as [Q | K | V], head h at columns h*Dh:(h+1)*Dh of each -> 3 x (B, H, L, Dh)."""
    b, l, d3 = qkv.shape
    dh = d3 // (3 * heads)
    t = qkv.reshape(b, l, 3, heads, dh).transpose(2, 0, 3, 1, 4)
    return t[0], t[1], t[2]


def merge_heads(x):
    """(B, H, L, Dh) -> (B, L, H*Dh); the inverse column layout of split_heads."""
    b, h, l, dh = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, l, h * dh)


def pack_qkv(dq, dk, dv):
    """Inverse of split_heads: 3 x (B, H, L, Dh) -> (B, L, 3D)."""
    b, h, l, dh = dq.shape
    return jnp.stack([dq, dk, dv], axis=0).transpose(1, 3, 0, 2, 4).reshape(b, l, 3 * h * dh)


def attention_forward(qkv, heads, keep_scale=None):
    """Multi-head attention core. keep_scale: optional (B, H, L, L) attention-dropout mask."""
    q, k, v = split_heads(qkv, heads)
    o, cache = sdpa_forward(q, k, v, keep_scale)
    return merge_heads(o), cache


def attention_backward(cache, do):
    """dO (B, L, D) -> dQKV (B, L, 3D): head split of dO, sdpa backward, packed concat."""
    heads = cache.q.shape[1]
    b, l, d = do.shape
    do_heads = do.reshape(b, l, heads, d // heads).transpose(0, 2, 1, 3)
    return pack_qkv(*sdpa_backward(cache, do_heads))


# ----------------------------------------------------------------------------------------------
# multi-head self-attention: x -> QKV projection -> attention core -> output projection


def mha_forward(params, x, heads, ops, keep_scale=None, query_rows=None):
    """query_rows=n keeps only the first n output rows after the attention core (the last block
    of the encoder only needs the CLS row; keys and values still come from every token)."""
    qkv, c_qkv = dense_forward(params["qkv"], x)
    o, c_att = ops.attention_forward(qkv, heads, keep_scale)
    if query_rows is not None:
        o = o[:, :query_rows]
    y, c_out = dense_forward(params["out"], o)
    return y, (c_qkv, c_att, c_out, x.shape[1])


def mha_backward(params, cache, dy, ops):
    c_qkv, c_att, c_out, length = cache
    do, g_out = dense_backward(params["out"], c_out, dy)
    if do.shape[1] != length:  # query_rows: the dropped rows get no gradient
        do = jnp.pad(do, ((0, 0), (0, length - do.shape[1]), (0, 0)))
    dqkv = ops.attention_backward(c_att, do)
    dx, g_qkv = dense_backward(params["qkv"], c_qkv, dqkv)
    return dx, {"qkv": g_qkv, "out": g_out}


# ----------------------------------------------------------------------------------------------
# feed-forward: y = GELU(x W1 + b1) W2 + b2, optional dropout on the hidden activation


def ffn_forward(params, x, approximate="tanh", keep_scale=None):
    h, c1 = dense_forward(params["fc1"], x)
    a, c_gelu = gelu_forward(h, approximate)
    a = apply_keep(a, keep_scale)
    y, c2 = dense_forward(params["fc2"], a)
    return y, (c1, c_gelu, c2, keep_scale)


def ffn_backward(params, cache, dy, approximate="tanh"):
    c1, c_gelu, c2, keep_scale = cache
    da, g2 = dense_backward(params["fc2"], c2, dy)
    dh = gelu_backward(c_gelu, apply_keep(da, keep_scale), approximate)
    dx, g1 = dense_backward(params["fc1"], c1, dh)
    return dx, {"fc1": g1, "fc2": g2}


# ----------------------------------------------------------------------------------------------
# patch embedding: image (B, H, W, C) -> patches (B, N, P*P*C) -> dense (B, N, D)


def image_to_patches(images, patch):
    """Row-major over the patch grid; inside a patch the order is (row, column, channel)."""
    b, h, w, c = images.shape
    gh, gw = h // patch, w // patch
    x = images.reshape(b, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * gw, patch * patch * c)


def patches_to_image(patches, patch, image_hw, channels):
    """The exact inverse of image_to_patches (a permutation, so it also maps gradients back)."""
    b = patches.shape[0]
    h, w = image_hw
    gh, gw = h // patch, w // patch
    x = patches.reshape(b, gh, gw, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, channels)


def patch_embed_forward(params, images, patch):
    patches = image_to_patches(images, patch)
    y, c = dense_forward(params, patches)
    return y, (c, images.shape, patch)


def patch_embed_backward(params, cache, dy, need_dx=False):
    """The image gradient (need_dx=True) is the patch gradient put back in place."""
    c, image_shape, patch = cache
    dpatches, grads = dense_backward(params, c, dy, need_dx=need_dx)
    dimages = None
    if need_dx:
        _, h, w, ch = image_shape
        dimages = patches_to_image(dpatches, patch, (h, w), ch)
    return dimages, grads


# ----------------------------------------------------------------------------------------------
# CLS token and learned position embeddings: (B, N, D) -> (B, N + 1, D)


def embed_forward(params, tokens):
    """x = concat(cls, tokens) + pos."""
    b, _, d = tokens.shape
    cls = jnp.broadcast_to(params["cls"].astype(tokens.dtype), (b, 1, d))
    x = jnp.concatenate([cls, tokens], axis=1) + params["pos"].astype(tokens.dtype)
    return x, None


def embed_backward(params, cache, dx):
    """dcls = sum over batch of dx[:, 0]; dpos = sum over batch of dx; dtokens = dx[:, 1:]."""
    acc = _acc_dtype(dx.dtype)
    dcls = jnp.sum(dx[:, 0], axis=0, dtype=acc)
    dpos = jnp.sum(dx, axis=0, dtype=acc)
    return dx[:, 1:], {"cls": dcls, "pos": dpos}


# ----------------------------------------------------------------------------------------------
# softmax cross-entropy from logits, stable via log-sum-exp


def one_hot_targets(labels, num_classes, smoothing=0.0, dtype=jnp.float32):
    """(1 - s) * onehot + s / K."""
    t = jax.nn.one_hot(labels, num_classes, dtype=dtype)
    return t * (1.0 - smoothing) + smoothing / num_classes


def cross_entropy_forward(logits, targets):
    """Mean over the batch of -sum_k t_k log softmax(z)_k = lse(z) * sum_k t_k - sum_k t_k z_k.

    targets: (B, K) probabilities (one-hot, smoothed, or mixed)."""
    z = logits.astype(stat_dtype(logits.dtype))
    t = targets.astype(z.dtype)
    m = jnp.max(z, axis=-1, keepdims=True)
    lse = m[:, 0] + jnp.log(jnp.sum(jnp.exp(z - m), axis=-1))
    per_example = lse * jnp.sum(t, axis=-1) - jnp.sum(t * z, axis=-1)
    return jnp.mean(per_example), (z, t, lse)


def cross_entropy_backward(cache, dloss=1.0):
    """dz = dloss * (softmax(z) * sum(t) - t) / B  (dloss: the gradient of the mean loss, 1 for
    the loss itself)."""
    z, t, lse = cache
    p = jnp.exp(z - lse[:, None])
    return dloss * (p * jnp.sum(t, axis=-1, keepdims=True) - t) / z.shape[0]
