"""Configuration as plain data: the model (ViTConfig, validated on construction), the optimisation
and augmentation settings of a run (TrainHParams), and the compute dtypes a step may use.
vit/runconfig.py reads these from TOML files and the command line."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ViTConfig:
    """The ViT of the product page. Defaults: Tiny ImageNet, 64x64 RGB, 8x8 patches, 200 classes.

    norm="post": x = LN(x + MHA(x)); x = LN(x + FFN(x))           (the product page's layout)
    norm="pre":  x = x + MHA(LN(x)); x = x + FFN(LN(x)); final LN  (the ViT paper's layout)
    Dropout rates: attn_dropout on the attention weights, ffn_dropout on the FFN hidden activation,
    dropout on each residual branch output, drop_path the stochastic-depth rate of the last block
    (linearly increasing from 0 at the first block).
    """

    image_size: int = 64
    patch_size: int = 8
    channels: int = 3
    d_model: int = 256
    heads: int = 8
    layers: int = 8
    mlp_dim: int = 1024
    num_classes: int = 200
    norm: str = "post"
    ln_eps: float = 1e-5
    gelu: str = "tanh"
    dropout: float = 0.0
    attn_dropout: float = 0.0
    ffn_dropout: float = 0.0
    drop_path: float = 0.0

    def __post_init__(self):
        for name in ("image_size", "patch_size", "channels", "d_model", "heads", "layers",
                     "mlp_dim", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ViTConfig.{name} must be a positive integer, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"ViTConfig.image_size={self.image_size} is not divisible by "
                f"patch_size={self.patch_size}")
        if self.d_model % self.heads:
            near = sorted(sorted((h for h in range(1, self.d_model + 1) if self.d_model % h == 0),
                                 key=lambda h: abs(h - self.heads))[:2])
            raise ValueError(f"ViTConfig.d_model={self.d_model} is not divisible by heads={self.heads} "
                             f"(heads that divide it: e.g. {' or '.join(map(str, near))})")
        if self.norm not in ("post", "pre"):
            raise ValueError(f"ViTConfig.norm must be 'post' or 'pre', got {self.norm!r}")
        if self.gelu not in ("tanh", "erf"):
            raise ValueError(f"ViTConfig.gelu must be 'tanh' or 'erf', got {self.gelu!r}")
        if not (isinstance(self.ln_eps, (int, float)) and self.ln_eps > 0):
            raise ValueError(f"ViTConfig.ln_eps must be a positive number, got {self.ln_eps!r}")
        for name in ("dropout", "attn_dropout", "ffn_dropout", "drop_path"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise ValueError(f"ViTConfig.{name} must be in [0, 1), got {value!r}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def seq_len(self) -> int:
        return self.num_patches + 1

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.channels

    @property
    def has_dropout(self) -> bool:
        return any((self.dropout, self.attn_dropout, self.ffn_dropout, self.drop_path))

    def replace(self, **changes) -> "ViTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ViTConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


def patch_size_hint(side: int, images: str) -> str:
    """For an error: a patch size that divides the images' side, the one nearest side / 8
    (images: how they are described in the message)."""
    patch = min((p for p in range(1, side + 1) if side % p == 0), key=lambda p: abs(p - side / 8))
    return (f"the dataset's images are {images}; set a patch size that divides {side}, e.g. "
            f"--set model.patch_size={patch}")


@dataclass(frozen=True)
class TrainHParams:
    """Optimisation and augmentation settings of one run: what the training step reads (vit/step.py
    train_step_fn, as `hp`). The [train] section of a config holds these and the run-level values
    of vit.runconfig.TrainSection (epochs, batch_size, seed, ...), in one flat table."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    schedule: str = "constant"       # "constant" | "cosine"
    warmup_steps: int = 0
    total_steps: int = 1
    min_lr: float = 0.0
    clip_norm: float = 0.0           # 0 = no clipping
    label_smoothing: float = 0.0
    crop_pad: int = 0                # random crop after (reflect) padding by this many pixels
    flip: bool = False               # random horizontal flip
    mixup_alpha: float = 0.0         # 0 = off
    cutmix_alpha: float = 0.0        # 0 = off; with both on, each batch picks one (p = 0.5)
    random_erase: float = 0.0        # probability per image of a box of noise (0 = off; DeiT 0.25)
    rand_augment_ops: int = 0        # RandAugment: ops per image, each p = 0.5 (0 = off; DeiT 2)
    rand_augment_magnitude: float = 9.0  # their level, 0 .. 10 (DeiT 9)
    rand_augment_std: float = 0.5    # the level's noise per op, N(magnitude, std²) (DeiT 0.5)
    accum_steps: int = 1             # gradient accumulation: the batch in this many micro-batches
    trainable: str = "all"           # "all" | "head": what is trained (vit.optim.trainable_mask)
    layer_decay: float = 1.0         # layer-wise lr decay, (0, 1]: block i of L at lr * d^(L - i)

    def replace(self, **changes) -> "TrainHParams":
        return dataclasses.replace(self, **changes)


# The dtype of a step's activations and matmul inputs ("compute_dtype"); master weights, optimizer
# state, LayerNorm statistics, softmax and the loss stay float32 either way (vit/step.py).
COMPUTE_DTYPES = ("fp32", "bf16")

# what a run trains (TrainHParams.trainable, vit.optim.trainable_mask): every parameter, or the head
# alone (a linear probe of the features of a model it starts from, train.py --init-from)
TRAINABLE = ("all", "head")
