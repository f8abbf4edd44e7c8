"""The cases the float64 gradient check runs (python -m oracle.gradcheck): one per layer type and
variant, the encoder block in both layouts (with dropout, drop-path, the CLS-row-only last block),
and the whole model. Each case is a forward, the hand-written backward, and float64 inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vit import layers, model
from vit.config import ViTConfig
from vit.ops import REFERENCE


@dataclass
class Case:
    """forward(inputs) -> (y, cache); backward(inputs, cache, dy) -> grads shaped like inputs."""

    name: str
    inputs: dict
    forward: Callable
    backward: Callable


def normal(key, shape, scale=1.0):
    """Standard normal draws (times `scale`) as float64, from numpy's generator seeded with the
    key's bits: jax.random.normal compiles once per shape, and those compilations were most of
    the time it took to build the cases."""
    rng = np.random.default_rng(np.asarray(key, np.uint32))
    return jnp.asarray(scale * rng.standard_normal(shape), jnp.float64)


def keys(seed, n):
    return list(jax.random.split(jax.random.PRNGKey(seed), n))


def _f64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def perturbed_params(config, seed):
    """init_params plus noise, so LN gammas/betas and biases are not all 1/0 (a stronger test)."""
    params = _f64(model.init_params(jax.random.PRNGKey(seed), config))
    leaves, tree = jax.tree_util.tree_flatten(params)
    ks = keys(seed + 1, len(leaves))
    leaves = [leaf + normal(k, leaf.shape, 0.1) for leaf, k in zip(leaves, ks)]
    return jax.tree_util.tree_unflatten(tree, leaves)


# ----------------------------------------------------------------------------------------------
# the cases: one per layer type (and variants), then the whole model


class _Dims(NamedTuple):
    """The sizes and random keys every layer case draws from."""

    B: int
    L: int
    D: int
    H: int
    F: int
    Dh: int
    k: list


def _dense_case(s):
    B, L, D, F, k = s.B, s.L, s.D, s.F, s.k
    inp = {"x": normal(k[0], (B, L, D)), "w": normal(k[1], (D, F), 0.3),
           "b": normal(k[2], (F,))}
    fwd = lambda i: layers.dense_forward({"w": i["w"], "b": i["b"]}, i["x"])  # noqa: E731

    def bwd(i, c, dy):
        dx, g = layers.dense_backward({"w": i["w"], "b": i["b"]}, c, dy)
        return {"x": dx, **g}
    return Case("dense", inp, fwd, bwd)


def _ln_case(s, with_residual):
    B, L, D, k = s.B, s.L, s.D, s.k
    inp = {"x": normal(k[3], (B, L, D)), "gamma": 1.0 + normal(k[4], (D,), 0.2),
           "beta": normal(k[5], (D,), 0.2)}
    if with_residual:
        inp["r"] = normal(k[6], (B, L, D))

    def fwd(i):
        return layers.add_layernorm_forward({"gamma": i["gamma"], "beta": i["beta"]}, i["x"],
                                            i.get("r"), 1e-5)

    def bwd(i, c, dy):
        ds, g = layers.add_layernorm_backward({"gamma": i["gamma"], "beta": i["beta"]}, c, dy)
        out = {"x": ds, **g}
        if with_residual:
            out["r"] = ds
        return out
    return Case("residual+layernorm" if with_residual else "layernorm", inp, fwd, bwd)


def _gelu_case(s, approx):
    B, L, F, k = s.B, s.L, s.F, s.k
    inp = {"x": normal(k[7], (B, L, F), 2.0)}
    fwd = lambda i: layers.gelu_forward(i["x"], approx)  # noqa: E731
    bwd = lambda i, c, dy: {"x": layers.gelu_backward(c, dy, approx)}  # noqa: E731
    return Case(f"gelu ({approx})", inp, fwd, bwd)


def _softmax_case(s):
    B, L, H, k = s.B, s.L, s.H, s.k
    inp = {"x": normal(k[8], (B, H, L, L), 2.0)}
    fwd = lambda i: layers.softmax_forward(i["x"])  # noqa: E731
    bwd = lambda i, c, dy: {"x": layers.softmax_backward(c, dy)}  # noqa: E731
    return Case("softmax", inp, fwd, bwd)


def _sdpa_case(s, dropout):
    B, L, H, Dh, k = s.B, s.L, s.H, s.Dh, s.k
    inp = {n: normal(kk, (B, H, L, Dh)) for n, kk in zip("qkv", k[9:12])}
    keep = layers.dropout_scale(k[12], 0.3, (B, H, L, L), jnp.float64) if dropout else None
    fwd = lambda i: layers.sdpa_forward(i["q"], i["k"], i["v"], keep)  # noqa: E731

    def bwd(i, c, dy):
        dq, dk, dv = layers.sdpa_backward(c, dy)
        return {"q": dq, "k": dk, "v": dv}
    return Case("attention (per head)" + (" + dropout" if dropout else ""), inp, fwd, bwd)


def _attention_core_case(s):
    B, L, D, H, k = s.B, s.L, s.D, s.H, s.k
    inp = {"qkv": normal(k[13], (B, L, 3 * D))}
    fwd = lambda i: layers.attention_forward(i["qkv"], H)  # noqa: E731
    bwd = lambda i, c, dy: {"qkv": layers.attention_backward(c, dy)}  # noqa: E731
    return Case("attention core (packed QKV)", inp, fwd, bwd)


def _mha_case(s):
    B, L, D, H, k = s.B, s.L, s.D, s.H, s.k
    p = {"qkv": {"w": normal(k[14], (D, 3 * D), 0.3), "b": normal(k[15], (3 * D,), 0.1)},
         "out": {"w": normal(k[16], (D, D), 0.3), "b": normal(k[17], (D,), 0.1)}}
    inp = {"x": normal(k[18], (B, L, D)), "params": p}
    fwd = lambda i: layers.mha_forward(i["params"], i["x"], H, REFERENCE)  # noqa: E731

    def bwd(i, c, dy):
        dx, g = layers.mha_backward(i["params"], c, dy, REFERENCE)
        return {"x": dx, "params": g}
    return Case("multi-head attention", inp, fwd, bwd)


def _ffn_case(s, approx, dropout):
    B, L, D, F, k = s.B, s.L, s.D, s.F, s.k
    p = {"fc1": {"w": normal(k[19], (D, F), 0.3), "b": normal(k[20], (F,), 0.1)},
         "fc2": {"w": normal(k[21], (F, D), 0.3), "b": normal(k[22], (D,), 0.1)}}
    inp = {"x": normal(k[23], (B, L, D)), "params": p}
    keep = layers.dropout_scale(k[24], 0.25, (B, L, F), jnp.float64) if dropout else None
    fwd = lambda i: layers.ffn_forward(i["params"], i["x"], approx, keep)  # noqa: E731

    def bwd(i, c, dy):
        dx, g = layers.ffn_backward(i["params"], c, dy, approx)
        return {"x": dx, "params": g}
    return Case(f"feed-forward ({approx})" + (" + dropout" if dropout else ""), inp, fwd, bwd)


def _patch_case(s):
    B, D, k = s.B, s.D, s.k
    P, S, C = 4, 8, 3
    inp = {"images": normal(k[25], (B, S, S, C)),
           "w": normal(k[26], (P * P * C, D), 0.2), "b": normal(k[27], (D,), 0.1)}
    fwd = lambda i: layers.patch_embed_forward({"w": i["w"], "b": i["b"]}, i["images"], P)  # noqa: E731

    def bwd(i, c, dy):
        dimg, g = layers.patch_embed_backward({"w": i["w"], "b": i["b"]}, c, dy, need_dx=True)
        return {"images": dimg, **g}
    return Case("patch embedding", inp, fwd, bwd)


def _embed_case(s):
    B, L, D, k = s.B, s.L, s.D, s.k
    inp = {"tokens": normal(k[28], (B, L - 1, D)), "cls": normal(k[29], (D,)),
           "pos": normal(k[30], (L, D))}
    fwd = lambda i: layers.embed_forward({"cls": i["cls"], "pos": i["pos"]}, i["tokens"])  # noqa: E731

    def bwd(i, c, dy):
        dt, g = layers.embed_backward(None, c, dy)
        return {"tokens": dt, **g}
    return Case("CLS token + position embedding", inp, fwd, bwd)


def _ce_case(s, smoothing, soft):
    B, k = s.B, s.k
    K = 7
    logits = normal(k[31], (B + 1, K), 3.0)
    labels = jnp.arange(B + 1) % K
    if soft:
        t = jax.nn.softmax(normal(k[0], (B + 1, K)))
    else:
        t = layers.one_hot_targets(labels, K, smoothing, jnp.float64)
    fwd = lambda i: layers.cross_entropy_forward(i["logits"], t)  # noqa: E731
    bwd = lambda i, c, dy: {"logits": layers.cross_entropy_backward(c, dy)}  # noqa: E731
    name = "cross-entropy" + (" (soft targets)" if soft else
                              f" (label smoothing {smoothing})" if smoothing else "")
    return Case(name, {"logits": logits}, fwd, bwd)


def layer_cases(seed=0, batch=2, length=5, d=12, heads=3, hidden=20):
    """Small shapes on purpose: odd sequence length, several heads, width not a power of two."""
    s = _Dims(batch, length, d, heads, hidden, d // heads, keys(seed, 32))
    return [_dense_case(s), _ln_case(s, False), _ln_case(s, True), _gelu_case(s, "tanh"),
            _gelu_case(s, "erf"), _softmax_case(s), _sdpa_case(s, False), _sdpa_case(s, True),
            _attention_core_case(s), _mha_case(s), _ffn_case(s, "tanh", False),
            _ffn_case(s, "erf", True), _patch_case(s), _embed_case(s), _ce_case(s, 0.0, False),
            _ce_case(s, 0.1, False), _ce_case(s, 0.0, True)]


def small_config(norm="post", **kw):
    base = dict(image_size=8, patch_size=4, channels=3, d_model=12, heads=3, layers=2, mlp_dim=20,
                num_classes=5, norm=norm)
    base.update(kw)
    return ViTConfig(**base)


def _key_keeping_every_branch(cfg, seed, batch, blocks=(1,)):
    """A dropout key whose drop-path draws keep at least one example on each residual branch of
    the given blocks (else that branch's gradient is identically zero and proves nothing).
    blocks=(1,): a lone block_forward(block_index=1); None: every block of the model, whose
    encoder splits the key into one key per block."""
    for i in range(1000):
        key = jax.random.PRNGKey(seed + 11 + i)
        if blocks is None:
            pairs = list(zip(range(cfg.layers), jax.random.split(key, cfg.layers)))
        else:
            pairs = [(b, key) for b in blocks]
        ok = True
        for index, k in pairs:
            *_, b1, b2 = model.block_masks(k, cfg, index, batch, cfg.seq_len, jnp.float64)
            ok &= all(b is None or bool(jnp.any(b.reshape(batch, -1).max(axis=1) > 0))
                      for b in (b1, b2))
        if ok:
            return key
    raise RuntimeError("no dropout key keeps every branch")


def block_cases(seed=0, batch=3):
    """Encoder block (both layouts, with and without dropout masks, full and CLS-only output),
    encoder stack and head."""
    cases = []
    for norm in ("post", "pre"):
        for dropout in (False, True):
            cfg = small_config(norm, **(dict(dropout=0.2, attn_dropout=0.2, ffn_dropout=0.2,
                                             drop_path=0.3) if dropout else {}))
            params = perturbed_params(cfg, seed)
            x = normal(jax.random.PRNGKey(seed + 7), (batch, cfg.seq_len, cfg.d_model))
            key = _key_keeping_every_branch(cfg, seed, batch) if dropout else None
            for cls_only in (False, True):
                def fwd(i, cfg=cfg, key=key, cls_only=cls_only):
                    return model.block_forward(i["params"], i["x"], cfg, REFERENCE, key, 1, cls_only)

                def bwd(i, c, dy, cfg=cfg):
                    dx, g = model.block_backward(i["params"], c, dy, cfg)
                    return {"x": dx, "params": g}
                name = (f"encoder block ({norm}-norm{', dropout+drop-path' if dropout else ''}"
                        f"{', CLS row only' if cls_only else ''})")
                cases.append(Case(name, {"x": x, "params": params["blocks"][1]}, fwd, bwd))
        cfg = small_config(norm)
        params = perturbed_params(cfg, seed)
        x = normal(jax.random.PRNGKey(seed + 3), (batch, cfg.seq_len, cfg.d_model))

        def stack_fwd(i, cfg=cfg):
            return model.encoder_forward(i["blocks"], i["x"], cfg)

        def stack_bwd(i, c, dy, cfg=cfg):
            dx, g = model.encoder_backward(i["blocks"], c, dy, cfg)
            return {"x": dx, "blocks": g}
        cases.append(Case(f"encoder stack ({norm}-norm)", {"x": x, "blocks": params["blocks"]},
                          stack_fwd, stack_bwd))

        head_params = {n: params[n] for n in ("head", "final_ln") if n in params}

        def head_fwd(i, cfg=cfg):
            return model.head_forward(i["params"], i["x"], cfg)

        def head_bwd(i, c, dy, cfg=cfg):
            dx, g = model.head_backward(i["params"], c, dy, cfg)
            return {"x": dx, "params": g}
        cases.append(Case(f"classification head ({norm}-norm)", {"x": x, "params": head_params},
                          head_fwd, head_bwd))
    return cases


def model_cases(seed=0, batch=3):
    """The whole model: every parameter and the input image, both layouts."""
    cases = []
    for norm, extra in (("post", {}), ("pre", {}),
                        ("post", dict(dropout=0.1, attn_dropout=0.1, ffn_dropout=0.1,
                                      drop_path=0.2, gelu="erf"))):
        cfg = small_config(norm, **extra)
        params = perturbed_params(cfg, seed)
        images = normal(jax.random.PRNGKey(seed + 5), (batch, cfg.image_size, cfg.image_size,
                                                         cfg.channels))
        key = _key_keeping_every_branch(cfg, seed, batch, None) if cfg.has_dropout else None

        def fwd(i, cfg=cfg, key=key):
            return model.model_forward(i["params"], i["images"], cfg, REFERENCE, key)

        def bwd(i, c, dy, cfg=cfg):
            g, dimg = model.model_backward(i["params"], c, dy, cfg, need_dimages=True)
            return {"params": g, "images": dimg}
        name = f"whole model ({norm}-norm{', dropout+drop-path, erf' if extra else ''})"
        cases.append(Case(name, {"params": params, "images": images}, fwd, bwd))
    return cases


def all_cases(seed=0):
    return layer_cases(seed) + block_cases(seed) + model_cases(seed)
