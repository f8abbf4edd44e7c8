"""Fine-tuning: a new run that starts from another run's weights (`train.py --init-from SOURCE`,
the config key train.init_from).

    python train.py --dataset digits --out runs/digits                    # any run
    python train.py --data-dir pets --set data.image_size=96 --init-from runs/digits ...

SOURCE is a run directory (its best.npz) or a checkpoint file train.py wrote (RUN/last.npz). From it
the new run takes:
  - the architecture: the source's ARCHITECTURE_KEYS replace the config's (resolve_model, before
    the config is built; a flag or --set giving one of them another value is refused, a config
    file's value is replaced with a note). The data still sets the image size and the classes,
    the config the dropout rates; the channels must be the source's (3 for every image folder,
    1 for digits).
  - every parameter (transfer_params), as it is, except two:
      embed.pos, when the patch grid differs (another image size): the CLS row is kept and the
        G x G grid of patch rows is resized to G' x G' (resize_positions: bicubic, Keys' kernel
        with a = -0.5 as in PIL and jax.image.resize, antialiased when shrinking), as DeiT
        fine-tunes its 224 px models at 384 px;
      head, when the classes differ: if every class of the new data is one of the source's (by
        name), its columns are gathered in the new order; otherwise the head starts at zero
        (weights and bias, as BiT and big_vision fine-tune: every class at 1/C, the loss at
        log C, where a random head would start from large logits on trained features).
  - the normalisation statistics: the source's mean and std, the scale its first layer was
    trained on (the new data's own are not measured).
AdamW's moments, the data position and the history start at 0. From there it is an ordinary run:
--resume continues it from its own last.npz, and refuses another train.init_from. With
train.trainable = "head" (vit.optim.trainable_mask) it is a linear probe of the source's features;
train.layer_decay (vit.optim.layer_lr_scales) lowers the learning rate block by block towards the
input.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vit.config import ViTConfig
from vit.runconfig import ConfigError

# the fields of [model] that the source's parameters fix: their shapes, or what they compute
ARCHITECTURE_KEYS = ("patch_size", "d_model", "heads", "layers", "mlp_dim", "norm", "gelu",
                     "ln_eps")
FLAG = "--init-from"  # how messages name train.init_from (also set by --set train.init_from=...)


class InitError(ConfigError):
    """train.init_from cannot be used; the message names it and says why."""


def checkpoint_path(init_from: str, where: str) -> Path:
    """The checkpoint file train.init_from names: a file, or a run directory's best.npz (where:
    the flag or file that gave it, for the message); ~ is the home folder, as in data.data_dir."""
    path = Path(init_from).expanduser()
    if path.is_dir():
        best = path / "best.npz"
        if best.is_file():
            return best
        last = path / "last.npz"
        raise InitError(f"{where}: {path} holds no best.npz (a run writes it at its first "
                        "epoch's end)" + (f"; to start from its last weights, give {last}"
                                          if last.is_file() else "; is it a run directory?"))
    if not path.is_file():
        raise InitError(f"{where}: {path}: no such file or run directory")
    return path


def read_source(init_from: str, where: str) -> tuple[Path, dict]:
    """(checkpoint file, its JSON record) of train.init_from, or an InitError naming it."""
    from vit import checkpoint  # noqa: PLC0415

    path = checkpoint_path(init_from, where)
    try:
        meta = checkpoint.read_meta(path)
    except checkpoint.CheckpointError as err:
        raise InitError(f"{where}: {err}") from None
    model = meta.get("config", {}).get("model") if isinstance(meta.get("config"), dict) else None
    if not isinstance(model, dict) or not all(k in meta for k in ("mean", "std")):
        raise InitError(f"{where}: {path} is not a checkpoint of train.py (its record has no "
                        "config.model, mean and std)")
    try:
        ViTConfig.from_dict(model)
    except (TypeError, ValueError) as err:
        raise InitError(f"{where}: {path}: its config.model is not a model of this version: "
                        f"{err}") from None
    return path, meta


def resolve_model(base: dict, sources: dict, where: str) -> tuple[dict, list[str]]:
    """A config dict (before runconfig.from_dict) with train.init_from's architecture, and its
    path made absolute; -> (config dict, notes). sources: {"section.key": flag} of the values
    set on the command line (one of those that disagrees with the source is an InitError naming
    it); where: the config file's name. Without train.init_from: base as it is."""
    train, model = base.get("train", {}), base.get("model", {})
    init_from = train.get("init_from") if isinstance(train, dict) else None
    if not isinstance(init_from, str) or not isinstance(model, dict):
        return base, []  # None, or a bad type that from_dict will name
    flag = sources.get("train.init_from", f"{where}: train.init_from = {init_from!r}")
    path, meta = read_source(init_from, flag)
    source, model = meta["config"]["model"], {**ViTConfig().to_dict(), **model}
    changes = {k: source[k] for k in ARCHITECTURE_KEYS if model[k] != source[k]}
    clash = [k for k in changes if f"model.{k}" in sources]
    if clash:
        said = ", ".join(f"{sources[f'model.{k}']} (the source has {source[k]!r})" for k in clash)
        raise InitError(f"{said}: {flag} starts from {path}, whose weights fix model.{clash[0]}; "
                        f"leave it out, or start without {FLAG}")
    data = base.get("data", {})
    side = data.get("image_size") if isinstance(data, dict) else None  # else from_dict names it
    if isinstance(side, int) and side % source["patch_size"]:
        raise InitError(f"{sources.get('data.image_size', where)}: data.image_size = {side} is "
                        f"not a multiple of model.patch_size = {source['patch_size']}, which "
                        f"{flag} fixes (its weights take patches of that size)")
    notes = [f"train.py: note: {flag}: the model is {path}'s: " + ", ".join(
        f"model.{k} = {v!r} (the config has {model[k]!r})" for k, v in changes.items())
             ] if changes else []
    base = {s: dict(v) if isinstance(v, dict) else v for s, v in base.items()}
    base.setdefault("model", {}).update(changes)
    base["train"]["init_from"] = os.path.abspath(os.path.expanduser(init_from))
    return base, notes


def resize_positions(pos: np.ndarray, grid: int) -> np.ndarray:
    """Position embeddings (1 + G*G, D), row 0 the CLS token's and rows 1.. the patch grid row by
    row, resized to (1 + grid*grid, D): the CLS row as it is, the grid bicubic in both axes."""
    import jax  # noqa: PLC0415

    old = round((pos.shape[0] - 1) ** 0.5)
    if old * old != pos.shape[0] - 1:
        raise InitError(f"position embeddings of {pos.shape[0]} rows are not 1 + a square grid")
    patches = np.asarray(pos[1:], np.float32).reshape(old, old, pos.shape[1])
    resized = jax.image.resize(patches, (grid, grid, pos.shape[1]), "cubic")
    return np.concatenate([np.asarray(pos[:1], np.float32),
                           np.asarray(resized).reshape(grid * grid, pos.shape[1])])


def transfer_params(source_params, source: ViTConfig, model: ViTConfig, source_classes,
                    classes) -> tuple[dict, list[str]]:
    """The new run's parameters: the source's (source_params, for config source), with the
    positions resized to the new grid and the head fitted to the new classes; -> (params, what
    was done), the params with model's shapes (an InitError if one is not)."""
    import jax  # noqa: PLC0415

    from vit.model import param_shapes  # noqa: PLC0415

    params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), source_params)
    said = []
    if source.num_patches != model.num_patches:
        grid, old = model.image_size // model.patch_size, source.image_size // source.patch_size
        params["embed"]["pos"] = resize_positions(params["embed"]["pos"], grid)
        said.append(f"position embeddings resized from a {old}x{old} to a {grid}x{grid} patch "
                    "grid (bicubic)")
    classes, source_classes = list(classes), list(source_classes or [])
    if classes != source_classes:
        if set(classes) <= set(source_classes):
            columns = [source_classes.index(c) for c in classes]
            params["head"] = {"w": params["head"]["w"][:, columns],
                              "b": params["head"]["b"][columns]}
            said.append(f"head: the columns of these {len(classes)} classes, of the source's "
                        f"{len(source_classes)}")
        else:
            new = sum(c not in source_classes for c in classes)
            params["head"] = {"w": np.zeros((model.d_model, len(classes)), np.float32),
                              "b": np.zeros(len(classes), np.float32)}
            said.append(f"head: zero ({new} of these {len(classes)} classes are not among the "
                        f"source's {len(source_classes)})")
    want = param_shapes(model)
    found = {jax.tree_util.keystr(path): np.shape(leaf)
             for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    if found != want:
        wrong = sorted(set(found.items()) ^ set(want.items()))[0][0]
        raise InitError(f"the source's parameter {wrong} is {found.get(wrong)}, and the model's "
                        f"{want.get(wrong)}")
    return params, said


def initial_state(cfg, class_names):
    """The RunState a run with train.init_from starts in (cfg: its RunConfig, the model fitted to
    the data; class_names: the training set's); prints what was carried over."""
    from vit import checkpoint  # noqa: PLC0415
    from vit.optim import adamw_init  # noqa: PLC0415
    from vit.runstate import RunState  # noqa: PLC0415

    path, meta = read_source(cfg.train.init_from, f"{FLAG} {cfg.train.init_from}")
    source = ViTConfig.from_dict(meta["config"]["model"])
    if source.channels != cfg.model.channels:
        raise InitError(f"{FLAG} {cfg.train.init_from}: {path} was trained on images of "
                        f"{source.channels} channel(s), and this data's have "
                        f"{cfg.model.channels}")
    try:
        trees, _ = checkpoint.load(path, trees=("params",))
    except checkpoint.CheckpointError as err:
        raise InitError(f"{FLAG} {cfg.train.init_from}: {err}") from None
    params, said = transfer_params(trees["params"], source, cfg.model, meta.get("class_names"),
                                   class_names)
    print(f"starting from {path} ({', '.join(said) or 'every parameter as it is'}; "
          "its normalisation statistics)")
    return RunState.fresh(params, adamw_init(params), meta["mean"], meta["std"])
