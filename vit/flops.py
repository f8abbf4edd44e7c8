"""Parameter count and matmul FLOPs of a ViT configuration:  python -m vit.flops [CONFIG.toml ...]

FLOPs count 2 per multiply-add of every matrix multiplication of one image's forward pass (the
elementwise work, softmax, LayerNorm and GELU, is under 1% at these sizes and left out). With
N = patches, L = N + 1 tokens, D width, F FFN width, P = patch_size^2 * channels, K classes:

    patch embedding         2 N P D
    per block: QKV          2 L D (3D)
               Q K^T, P V   2 * 2 L L D          (all heads together: H * L * L * Dh = L * L * D)
               output proj  2 L D D
               FFN          2 * 2 L D F
    head                    2 D K

Papers quote multiply-adds under the name "FLOPs" (DeiT: ViT-B/16 at 224 px "17.6 G"), which is
half of the figure here; ``multiply_adds`` gives that one. A training step costs about 3x the
forward (the backward does two matmuls per forward matmul). ``cls_only_last=True`` counts what
vitfuse's model computes: its last block runs the output projection and FFN on the CLS row only,
the only row the head reads (vit/model.py).
"""

from __future__ import annotations

import re
import sys

from vit.config import ViTConfig


def forward_flops(c: ViTConfig, cls_only_last: bool = False) -> dict[str, int]:
    """Matmul FLOPs of one image's forward pass, per part (2 per multiply-add)."""
    n, l, d, f = c.num_patches, c.seq_len, c.d_model, c.mlp_dim
    block_qkv_attn = 2 * l * d * 3 * d + 2 * 2 * l * l * d
    rows_after = [l] * c.layers
    if cls_only_last:
        rows_after[-1] = 1
    parts = {
        "patch_embed": 2 * n * c.patch_dim * d,
        "qkv_and_attention": c.layers * block_qkv_attn,
        "out_proj": sum(2 * r * d * d for r in rows_after),
        "ffn": sum(2 * 2 * r * d * f for r in rows_after),
        "head": 2 * d * c.num_classes,
    }
    parts["total"] = sum(parts.values())
    return parts


def multiply_adds(c: ViTConfig) -> int:
    """Forward multiply-adds per image: the figure papers call "FLOPs"."""
    return forward_flops(c)["total"] // 2


def param_count(c: ViTConfig) -> int:
    """Parameters of vit.init_params(key, c), counted from the shapes alone (no arrays made)."""
    d, f = c.d_model, c.mlp_dim
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 2 * (2 * d)
    final_ln = 2 * d if c.norm == "pre" else 0
    patch, embed, head = c.patch_dim * d + d, d + c.seq_len * d, d * c.num_classes + c.num_classes
    return patch + embed + c.layers * block + final_ln + head


def _scaled(flops: float, places: int, scale: float) -> str:
    """flops in G, or in M where the model is too small for G to show it (digits)."""
    return f"{flops / 1e9:.{places}f} G" if scale >= 1e8 else f"{flops / 1e6:.{places}f} M"


def describe(c: ViTConfig) -> str:
    full = forward_flops(c)["total"]
    ours = forward_flops(c, cls_only_last=True)["total"]
    return (f"{c.image_size} px, {c.patch_size}x{c.patch_size} patches, L = {c.seq_len} tokens, "
            f"D = {c.d_model}, H = {c.heads} (Dh = {c.head_dim}), {c.layers} layers, F = {c.mlp_dim}, "
            f"{c.num_classes} classes\n"
            f"  parameters            {param_count(c):,}\n"
            f"  forward FLOPs/image   {_scaled(full, 2, full)} (2 per multiply-add; "
            f"{_scaled(multiply_adds(c), 2, full)} multiply-adds, the papers' \"FLOPs\")\n"
            f"  as vitfuse runs it    {_scaled(ours, 2, full)} (last block on the CLS row only); "
            f"train step ~{_scaled(3 * ours, 1, full)}/image")


def _as_written(d: dict) -> dict:
    """Config file d with its model checked at the model's own image size: a folder dataset
    without data.image_size brings 64 px images, which train.py's config check holds the patch
    size to, but a file for ViT-S/14 at 224 px (patch 14) is counted as written, and trains
    with --set data.image_size=224."""
    from vit.data import FOLDER_DATASETS  # noqa: PLC0415

    model, data = d.get("model", {}), d.get("data", {})
    if ("image_size" in model and "image_size" not in data and data.get("layout") != "tiny-imagenet"
            and data.get("dataset", "tiny-imagenet") in FOLDER_DATASETS):
        return {**d, "data": {**data, "image_size": model["image_size"]}}
    return d


def main(argv=None) -> int:
    from vit import runconfig  # noqa: PLC0415
    from vit.data import digits  # noqa: PLC0415

    paths = sys.argv[1:] if argv is None else argv
    if any(p in ("-h", "--help") for p in paths):
        print(__doc__)
        return 0
    flags = [p for p in paths if p.startswith("-")]
    if flags:  # it takes config files only: --set x would be read as a file named "--set"
        print(f"vit.flops: error: unknown option {flags[0]}; it takes config files (TOML) only: "
              "python -m vit.flops [CONFIG.toml ...]", file=sys.stderr)
        return 2
    if not paths:
        paths = sorted(str(p) for p in runconfig.CONFIG_DIR.glob("*.toml"))
    configs = []
    for path in paths:  # every one read before anything is printed
        try:
            configs.append((path, runconfig.from_dict(_as_written(runconfig.load_toml(path, path)), path)))
        except runconfig.ConfigError as err:
            # a hint in train.py's words (--set model.patch_size=5) is a key of the file here
            hint = re.sub(r"--set (\w+)\.(\w+)=([^\s)]+)", r"\2 = \3 in its [\1] section", str(err))
            print(f"vit.flops: error: {hint}", file=sys.stderr)
            return 2
    print("figures for each config's [model] section as written, at its [data] image_size where it "
          "has one (train.py then fits image_size, "
          "channels and num_classes to the dataset it loads; a digits config is shown so fitted)")
    for path, cfg in configs:
        model, fitted = cfg.model, ""
        if cfg.data.dataset == "digits":  # its images and classes are known without loading it
            model = model.replace(image_size=8, channels=1, num_classes=len(digits.CLASS_NAMES))
            fitted = f" (fitted to digits: 8x8x1, {model.num_classes} classes)"
        print(f"{path}{fitted}: {describe(model)}")
    return 0


if __name__ == "__main__":
    from vit.signals import exit_code_of_a_check

    sys.exit(exit_code_of_a_check(main, "python -m vit.flops"))
