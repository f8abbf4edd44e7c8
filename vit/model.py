"""The ViT: encoder block, encoder stack, head and whole model, forward and hand-written backward.

images (B, S, S, C) -> patches (B, N, P*P*C) -> dense (B, N, D) -> [CLS; tokens] + pos (B, L, D)
-> `layers` encoder blocks -> CLS row -> (final LN if pre-norm) -> dense -> logits (B, K)

`ops` (vit/ops.py) supplies the attention core and the residual+LayerNorm: the reference jnp
functions or the fused Triton kernels; everything else is the same code either way.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vit import layers
from vit.config import ViTConfig
from vit.layers import apply_keep
from vit.ops import REFERENCE, Ops

# ----------------------------------------------------------------------------------------------
# parameters


def _xavier_uniform(key, fan_in, fan_out):
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, (fan_in, fan_out), jnp.float32, -limit, limit)


def _dense_init(key, fan_in, fan_out):
    return {"w": _xavier_uniform(key, fan_in, fan_out), "b": jnp.zeros((fan_out,), jnp.float32)}


def _ln_init(d):
    return {"gamma": jnp.ones((d,), jnp.float32), "beta": jnp.zeros((d,), jnp.float32)}


def init_params(key, config: ViTConfig) -> dict:
    """Xavier-uniform dense weights, zero biases, unit LN, N(0, 0.02) CLS and position embeddings.

    The QKV projection is one (D, 3D) matrix whose columns are [Q | K | V], each split into heads
    of Dh consecutive columns (the packed layout the fused attention kernel reads by strides)."""
    c = config
    d = c.d_model
    k_patch, k_cls, k_pos, k_head, k_blocks = jax.random.split(key, 5)
    blocks = []
    for kb in jax.random.split(k_blocks, c.layers):
        k_qkv, k_out, k_fc1, k_fc2 = jax.random.split(kb, 4)
        qkv = _dense_init(k_qkv, d, 3 * d)
        # Xavier over each of Q, K, V separately (fan_out = D each), as for three separate matrices.
        qkv["w"] = jnp.concatenate(
            [_xavier_uniform(k, d, d) for k in jax.random.split(k_qkv, 3)], axis=1)
        blocks.append({
            "ln1": _ln_init(d),
            "attn": {"qkv": qkv, "out": _dense_init(k_out, d, d)},
            "ln2": _ln_init(d),
            "ffn": {"fc1": _dense_init(k_fc1, d, c.mlp_dim), "fc2": _dense_init(k_fc2, c.mlp_dim, d)},
        })
    params = {
        "patch": _dense_init(k_patch, c.patch_dim, d),
        "embed": {
            "cls": 0.02 * jax.random.normal(k_cls, (d,), jnp.float32),
            "pos": 0.02 * jax.random.normal(k_pos, (c.seq_len, d), jnp.float32),
        },
        "blocks": blocks,
        "head": _dense_init(k_head, d, c.num_classes),
    }
    if c.norm == "pre":
        params["final_ln"] = _ln_init(d)
    return params


@functools.lru_cache(maxsize=16)
def param_shapes(config: ViTConfig) -> dict[str, tuple]:
    """{path: shape} of every array init_params makes for config (paths as jax.tree_util.keystr)."""
    tree = jax.eval_shape(functools.partial(init_params, config=config), jax.random.PRNGKey(0))
    return {jax.tree_util.keystr(path): leaf.shape
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_params(params, config: ViTConfig):
    """A ValueError unless params has the arrays and shapes init_params gives config: the model
    ran the blocks the params had (1 of layers=2) without a word, or failed deep inside."""
    want = param_shapes(config)
    got = {jax.tree_util.keystr(path): tuple(jnp.shape(leaf))
           for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    if got == want:
        return
    wrong = ([f"params{k} is missing" for k in want if k not in got]
             + [f"params{k} is not in it" for k in got if k not in want]
             + [f"params{k} is {got[k]}, not {want[k]}" for k in want if k in got and got[k] != want[k]])
    blocks = len(params.get("blocks", [])) if isinstance(params, dict) else 0
    if blocks != config.layers:
        wrong = [f"params hold {blocks} block{'s' * (blocks != 1)}, for layers={config.layers}"]
    more = f"; and {len(wrong) - 3} more" if len(wrong) > 3 else ""
    raise ValueError(f"params do not fit this ViTConfig: {'; '.join(wrong[:3])}{more}; give the "
                     "config the params were made with (init_params(key, config))")


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


# ----------------------------------------------------------------------------------------------
# dropout masks of one block (all None in evaluation or when every rate is 0)


def block_masks(key, config: ViTConfig, block_index, batch, rows, dtype):
    """Attention-weight, FFN-hidden and the two residual-branch masks, each already divided by
    its keep probability. A branch mask combines residual dropout (B, rows, D) and stochastic
    depth (one draw per example, rate drop_path * i / (layers - 1))."""
    c = config
    if key is None or not c.has_dropout:
        return None, None, None, None
    k_att, k_ffn, k_r1, k_r2, k_p1, k_p2 = jax.random.split(key, 6)
    attn = layers.dropout_scale(k_att, c.attn_dropout, (batch, c.heads, c.seq_len, c.seq_len), dtype)
    ffn = layers.dropout_scale(k_ffn, c.ffn_dropout, (batch, rows, c.mlp_dim), dtype)
    path_rate = c.drop_path * block_index / max(c.layers - 1, 1)

    def branch(k_res, k_path):
        res = layers.dropout_scale(k_res, c.dropout, (batch, rows, c.d_model), dtype)
        path = layers.dropout_scale(k_path, path_rate, (batch, 1, 1), dtype)
        if res is None:
            return path
        return res if path is None else res * path

    return attn, ffn, branch(k_r1, k_p1), branch(k_r2, k_p2)


# ----------------------------------------------------------------------------------------------
# encoder block


class BlockCache(NamedTuple):
    """What block_backward needs from block_forward."""

    mha: tuple                     # layers.mha_forward's cache
    ln1: tuple                     # the first add+LayerNorm's cache (ops.add_layernorm_forward)
    ffn: tuple                     # layers.ffn_forward's cache
    ln2: tuple                     # the second add+LayerNorm's cache
    keep_branch1: jax.Array | None  # residual-dropout / drop-path scale on the attention branch
    keep_branch2: jax.Array | None  # the same on the FFN branch
    length: int                    # L of the block's input (the output may be the CLS row only)


def block_forward(params, x, config: ViTConfig, ops: Ops = REFERENCE, key=None, block_index=0,
                  cls_only=False):
    """One encoder block on x (B, L, D).

    cls_only=True returns only the CLS row (B, 1, D): keys and values still come from every
    token, but the output projection, the FFN and the LayerNorms after attention run on one row
    (pre-norm's LN1, which feeds the keys and values, on every row): the last block of the
    encoder, whose other rows never reach the head."""
    c = config
    b, l, _ = x.shape
    rows = 1 if cls_only else l
    m_attn, m_ffn, m_branch1, m_branch2 = block_masks(key, c, block_index, b, rows, x.dtype)
    q_rows = 1 if cls_only else None
    x_res = x[:, :rows]
    if c.norm == "post":
        # x1 = LN1(x + drop(MHA(x))); x2 = LN2(x1 + drop(FFN(x1)))
        a, c_mha = layers.mha_forward(params["attn"], x, c.heads, ops, m_attn, q_rows)
        x1, c_ln1 = ops.add_layernorm_forward(params["ln1"], x_res, apply_keep(a, m_branch1), c.ln_eps)
        f, c_ffn = layers.ffn_forward(params["ffn"], x1, c.gelu, m_ffn)
        x2, c_ln2 = ops.add_layernorm_forward(params["ln2"], x1, apply_keep(f, m_branch2), c.ln_eps)
    else:
        # x1 = x + drop(MHA(LN1(x))); x2 = x1 + drop(FFN(LN2(x1)))
        h1, c_ln1 = ops.add_layernorm_forward(params["ln1"], x, None, c.ln_eps)
        a, c_mha = layers.mha_forward(params["attn"], h1, c.heads, ops, m_attn, q_rows)
        x1 = x_res + apply_keep(a, m_branch1)
        h2, c_ln2 = ops.add_layernorm_forward(params["ln2"], x1, None, c.ln_eps)
        f, c_ffn = layers.ffn_forward(params["ffn"], h2, c.gelu, m_ffn)
        x2 = x1 + apply_keep(f, m_branch2)
    return x2, BlockCache(c_mha, c_ln1, c_ffn, c_ln2, m_branch1, m_branch2, l)


def block_backward(params, cache: BlockCache, dy, config: ViTConfig, ops: Ops = REFERENCE):
    c = config
    c_mha, c_ln1, c_ffn, c_ln2, m_branch1, m_branch2, length = cache

    def to_full_length(d):  # gradient of x[:, :rows] back into (B, L, D)
        return d if d.shape[1] == length else jnp.pad(d, ((0, 0), (0, length - d.shape[1]), (0, 0)))

    if c.norm == "post":
        ds2, g_ln2 = ops.add_layernorm_backward(params["ln2"], c_ln2, dy)   # for x1 and the branch
        dx1_ffn, g_ffn = layers.ffn_backward(params["ffn"], c_ffn, apply_keep(ds2, m_branch2), c.gelu)
        dx1 = ds2 + dx1_ffn
        ds1, g_ln1 = ops.add_layernorm_backward(params["ln1"], c_ln1, dx1)  # for x_res and the branch
        dx_mha, g_mha = layers.mha_backward(params["attn"], c_mha, apply_keep(ds1, m_branch1), ops)
        dx = dx_mha + to_full_length(ds1)
    else:
        dh2, g_ffn = layers.ffn_backward(params["ffn"], c_ffn, apply_keep(dy, m_branch2), c.gelu)
        dx1_ln2, g_ln2 = ops.add_layernorm_backward(params["ln2"], c_ln2, dh2)
        dx1 = dy + dx1_ln2
        dh1, g_mha = layers.mha_backward(params["attn"], c_mha, apply_keep(dx1, m_branch1), ops)
        dx_ln1, g_ln1 = ops.add_layernorm_backward(params["ln1"], c_ln1, dh1)
        dx = dx_ln1 + to_full_length(dx1)
    return dx, {"ln1": g_ln1, "attn": g_mha, "ln2": g_ln2, "ffn": g_ffn}


# ----------------------------------------------------------------------------------------------
# encoder stack (a Python loop at trace time only: the compiled step has no loop)


def encoder_forward(blocks, x, config: ViTConfig, ops: Ops = REFERENCE, key=None, cls_only_last=False):
    keys = [None] * len(blocks) if key is None else list(jax.random.split(key, len(blocks)))
    caches = []
    for i, (p, k) in enumerate(zip(blocks, keys)):
        last = i == len(blocks) - 1
        x, cache = block_forward(p, x, config, ops, k, i, cls_only=cls_only_last and last)
        caches.append(cache)
    return x, caches


def encoder_backward(blocks, caches, dy, config: ViTConfig, ops: Ops = REFERENCE):
    grads = [None] * len(blocks)
    for i in reversed(range(len(blocks))):
        dy, grads[i] = block_backward(blocks[i], caches[i], dy, config, ops)
    return dy, grads


# ----------------------------------------------------------------------------------------------
# classification head on the CLS row: (final LN if pre-norm) then dense


def head_forward(params, x, config: ViTConfig, ops: Ops = REFERENCE):
    cls = x[:, 0]
    c_ln = None
    if config.norm == "pre":
        cls, c_ln = ops.add_layernorm_forward(params["final_ln"], cls, None, config.ln_eps)
    logits, c_dense = layers.dense_forward(params["head"], cls)
    return logits, (c_dense, c_ln, x.shape)


def head_backward(params, cache, dlogits, config: ViTConfig, ops: Ops = REFERENCE):
    c_dense, c_ln, x_shape = cache
    dcls, g_head = layers.dense_backward(params["head"], c_dense, dlogits)
    grads = {"head": g_head}
    if config.norm == "pre":
        dcls, grads["final_ln"] = ops.add_layernorm_backward(params["final_ln"], c_ln, dcls)
    dx = jnp.zeros(x_shape, dcls.dtype).at[:, 0].set(dcls)
    return dx, grads


# ----------------------------------------------------------------------------------------------
# whole model


def model_forward(params, images, config: ViTConfig, ops: Ops = REFERENCE, key=None):
    """images (B, S, S, C) float -> logits (B, K) float32, and the cache for model_backward.

    key: dropout / stochastic-depth randomness (training); None = evaluation (no masks)."""
    _check_images(images, config)
    check_params(params, config)
    tokens, c_patch = layers.patch_embed_forward(params["patch"], images, config.patch_size)
    x, _ = layers.embed_forward(params["embed"], tokens)
    x, c_enc = encoder_forward(params["blocks"], x, config, ops, key, cls_only_last=True)
    logits, c_head = head_forward(params, x, config, ops)
    return logits.astype(layers.stat_dtype(logits.dtype)), (c_patch, c_enc, c_head)


def model_backward(params, cache, dlogits, config: ViTConfig, ops: Ops = REFERENCE, need_dimages=False):
    """dlogits (B, K) -> (grads with the structure of params, dimages or None)."""
    c_patch, c_enc, c_head = cache
    dx, grads = head_backward(params, c_head, dlogits, config, ops)
    dx, grads["blocks"] = encoder_backward(params["blocks"], c_enc, dx, config, ops)
    dtokens, grads["embed"] = layers.embed_backward(params["embed"], None, dx)
    dimages, grads["patch"] = layers.patch_embed_backward(
        params["patch"], c_patch, dtokens, need_dx=need_dimages)
    return grads, dimages


def _check_images(images, config: ViTConfig):
    want = (config.image_size, config.image_size, config.channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
        raise ValueError(
            f"images must be (batch, {want[0]}, {want[1]}, {want[2]}) NHWC for this ViTConfig, "
            f"got shape {tuple(images.shape)}")
    if not jnp.issubdtype(images.dtype, jnp.floating):  # each layer computes in its input's dtype:
        raise ValueError(  # the weights cast to uint8 are 0, the logits all 0, without a word
            f"images must be floating point, normalised (vit.data.loader.normalize, or "
            f"vit.explain.model_input); got {images.dtype} (vit.make_train_step's step takes "
            "uint8 and normalises them)")


def _targets(labels, logits, config: ViTConfig, label_smoothing):
    """Integer labels (B,) -> (smoothed) one-hot; soft targets (B, K) pass through. A ValueError
    for another batch than the logits', and, when the labels are known (not traced under jit),
    for one outside 0..K-1: one_hot makes it a row of zeros, a loss of 0 without a word."""
    # Known labels are read with numpy: a jnp reduction inside a jit trace is a tracer even of a
    # concrete array closed over, and int() of it fails.
    known = None if isinstance(labels, jax.core.Tracer) else np.asarray(labels)
    labels, k = jnp.asarray(labels), config.num_classes
    if labels.ndim not in (1, 2) or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must be (batch,) class indices or (batch, {k}) soft targets for "
                         f"{logits.shape[0]} images, got shape {tuple(labels.shape)}")
    if labels.ndim == 1:
        if known is not None and known.size and (known.min() < 0 or known.max() >= k):
            raise ValueError(f"labels must be class indices from 0 to {k - 1} (num_classes {k}), "
                             f"got {int(known.min())} to {int(known.max())}")
        return layers.one_hot_targets(labels, k, label_smoothing)
    if labels.shape[-1] != k:
        raise ValueError(f"soft targets must be (batch, {k}), got {labels.shape}")
    return labels


# ----------------------------------------------------------------------------------------------
# public API


def forward(params, images, config: ViTConfig, *, ops: Ops = REFERENCE, key=None):
    """Logits (B, num_classes)."""
    logits, _ = model_forward(params, images, config, ops, key)
    return logits


def loss(params, images, labels, config: ViTConfig, *, label_smoothing=0.0,
         ops: Ops = REFERENCE, key=None):
    """Mean softmax cross-entropy. labels: int (B,) or soft targets (B, K)."""
    logits = forward(params, images, config, ops=ops, key=key)
    value, _ = layers.cross_entropy_forward(logits, _targets(labels, logits, config, label_smoothing))
    return value


def loss_and_grads(params, images, labels, config: ViTConfig, *, label_smoothing=0.0,
                   ops: Ops = REFERENCE, key=None):
    """(loss, grads) with grads the same pytree as params, from the hand-written backward."""
    logits, cache = model_forward(params, images, config, ops, key)
    value, c_loss = layers.cross_entropy_forward(logits, _targets(labels, logits, config, label_smoothing))
    grads, _ = model_backward(params, cache, layers.cross_entropy_backward(c_loss), config, ops)
    return value, grads


def image_gradient(params, images, labels, config: ViTConfig, *, label_smoothing=0.0):
    """d loss / d images (B, S, S, C): saliency maps from the same hand-written backward."""
    logits, cache = model_forward(params, images, config)
    _, c_loss = layers.cross_entropy_forward(logits, _targets(labels, logits, config, label_smoothing))
    _, dimages = model_backward(params, cache, layers.cross_entropy_backward(c_loss), config,
                                need_dimages=True)
    return dimages
