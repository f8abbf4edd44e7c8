"""A run's configuration: plain data in three sections, [model], [train], [data].

Loaded from a TOML file (configs/*.toml), then overridden on the command line (`--set
train.lr=3e-4`, or the named flags of train.py). An unknown section or key is an error naming it,
never a silent no-op, and every error names where the bad value came from: the flag that set it,
else the file.

To add a config key (no list of keys to extend: the dataclass fields are the keys):
  - [train], read by the training step: a field of TrainHParams (vit/config.py), which the step
    gets as `hp` and reads where it uses it (vit/step.py, train_step_fn: hp.<key>; nothing checks
    that a key is read); [train], about the run (length, batching, saving): a field of TrainSection;
    [data]: a field of DataSection. The field's annotation (int, float, bool, str, "| None") is
    its type check (_check_types); its range goes in _validate or _validate_data (for [train],
    often one name in _NON_NEGATIVE or _UNIT_INTERVAL), so the error names the flag or file.
  - [model]: a field of ViTConfig (vit/config.py), type and range checked in its __post_init__
    (the ValueError becomes a ConfigError naming the flag or file); a layer or activation behind
    it touches more: vit/layers.py's docstring, "To add a layer or an activation".
  - a named flag of its own: train.py, an entry in NAMED_FLAGS and its add_argument in
    build_parser (dest as in NAMED_FLAGS, help starting "section.key:"; tests/test_config.py's
    test_every_flag_that_sets_a_config_key_is_a_named_flag checks the pair); without one, --set
    section.key=value already works, and --help lists only the named ones.
  - config.json and the checkpoints' config follow from to_dict; a config.json or checkpoint
    written before the key existed reads back with the default.
  - --resume compares every key (resume.config_changes): a change is taken with a note unless the
    key is in resume.RESUME_FIXED (refused) or resume.RESUME_SAME_RUN (taken silently).
  - tests: a bad value of the key in tests/test_config.py's test_bad_train_values_are_errors or
    test_bad_data_values_are_errors (a float also in test_non_finite_numbers_are_refused_naming_the_key):
    they list cases by hand, so a key without one goes unchecked;
    README.md, "Training" (the [data] keys are listed there; [train] keys by example).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from vit.config import COMPUTE_DTYPES, TRAINABLE, TrainHParams, ViTConfig, patch_size_hint

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class TrainSection:
    """[train]: the run's length, batching and seed, plus every TrainHParams field except the
    step counts, which follow from epochs and warmup_epochs. In a config file and on the command
    line the two are one flat [train] section; from_dict sorts its keys into the two classes.

    checkpoint_minutes: besides at every epoch's end, save last.npz mid-epoch once this many
        minutes have passed since it was last saved, so that a crash (kill -9, power loss, an
        out-of-memory kill) loses at most that much training (0: at epoch ends only).
    repeat_augment: repeated augmentation (DeiT: 3): an epoch of as many rows as before visits
        1/repeat_augment of the images, each that many times in a row, each copy augmented
        apart (vit.data.loader.Batcher's `repeats`); 1: off.
    init_from: fine-tuning: a run directory (its best.npz) or checkpoint file whose weights the
        run starts from (vit/finetune.py); None: from init_params and train.seed.
    """

    epochs: int = 30
    batch_size: int = 64
    seed: int = 0
    compute_dtype: str = "fp32"     # "fp32" | "bf16": activations and matmul inputs
    warmup_epochs: float = 0.0
    eval_batch_size: int = 256
    checkpoint_minutes: float = 30.0
    repeat_augment: int = 1
    init_from: str | None = None
    hparams: TrainHParams = field(default_factory=TrainHParams)


@dataclass
class DataSection:
    """[data]: where the images come from and how they are prepared.

    dataset: "tiny-imagenet" or "image-folder" (a folder in data_dir) or "digits" (bundled).
    layout: how the folder is read: "auto" (detected), "tiny-imagenet" or "image-folder". Digits
        read no folder: a data_dir or a named layout beside them is an error.
    image_size: side of the cached square images of an image folder (default 64); the model's
        image_size follows it. Tiny ImageNet (64) and digits (8) come at their own size only.
    device_budget_mb: put the training set on the device if it fits in this many MiB, else
        stream it from the memory-mapped cache in chunks (0: always stream).
    cache_dir: a folder for the decoded images, each dataset in a sub-folder of its own (default:
        DATA_DIR/vitfuse-cache); for a data folder that cannot be written to (read-only, shared).
    """

    dataset: str = "tiny-imagenet"
    data_dir: str | None = None
    cache_dir: str | None = None
    workers: int | None = None
    skip_bad_images: bool = False
    layout: str = "auto"
    image_size: int | None = None
    device_budget_mb: int = 2048


@dataclass
class RunConfig:
    model: ViTConfig = field(default_factory=ViTConfig)
    train: TrainSection = field(default_factory=TrainSection)
    data: DataSection = field(default_factory=DataSection)

    def to_dict(self) -> dict:
        train = {k: v for k, v in dataclasses.asdict(self.train).items() if k != "hparams"}
        hp = dataclasses.asdict(self.train.hparams)
        for derived in DERIVED:
            hp.pop(derived)
        return {"model": self.model.to_dict(), "train": {**train, **hp},
                "data": dataclasses.asdict(self.data)}

    def hparams(self, steps_per_epoch: int) -> TrainHParams:
        """TrainHParams with the step counts of this run filled in."""
        return self.train.hparams.replace(
            total_steps=max(1, self.train.epochs * steps_per_epoch),
            warmup_steps=int(round(self.train.warmup_epochs * steps_per_epoch)))


_TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainSection)} - {"hparams"}
# TrainHParams' fields that the run derives, not a config: what to set instead
DERIVED = {"total_steps": "train.epochs", "warmup_steps": "train.warmup_epochs"}
_HPARAM_KEYS = {f.name for f in dataclasses.fields(TrainHParams)} - set(DERIVED)
_DATA_KEYS = {f.name for f in dataclasses.fields(DataSection)}
_MODEL_KEYS = {f.name for f in dataclasses.fields(ViTConfig)}
SECTIONS = {"model": _MODEL_KEYS, "train": _TRAIN_KEYS | _HPARAM_KEYS, "data": _DATA_KEYS}


class ConfigError(ValueError):
    pass


def _source(where: str, sources: dict | None):
    """source(*"section.key") -> the flags that set those values, else `where` (the file)."""
    def source(*keys):
        flags = [sources[k] for k in keys if sources and k in sources]
        return ", ".join(dict.fromkeys(flags)) if flags else where
    return source


def _check_keys(d: dict, source):
    for section, values in d.items():
        keys = [f"{section}.{k}" for k in values] if isinstance(values, dict) else []
        if section not in SECTIONS:
            raise ConfigError(f"{source(*keys)}: unknown section [{section}]; "
                              f"known: {sorted(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source()}: [{section}] must be a table of key = value")
        for key in values:
            if key not in SECTIONS[section]:
                instead = (f"{section}.{key} is derived from {DERIVED[key]} (set that); "
                           if section == "train" and key in DERIVED else "")
                raise ConfigError(f"{source(f'{section}.{key}')}: unknown key {section}.{key}; "
                                  f"{instead}known keys of [{section}]: {sorted(SECTIONS[section])}")


# keys renamed since a config or a run's config.json may have been written: old -> new
RENAMED = {("train", "precision"): "compute_dtype"}


def _renamed(d: dict, source) -> dict:
    """d with renamed keys under their new names, and a note on stderr for each."""
    out = {s: dict(v) if isinstance(v, dict) else v for s, v in d.items()}
    for (section, old), new in RENAMED.items():
        values = out.get(section)
        if isinstance(values, dict) and old in values:
            where = source(f"{section}.{old}")
            if new in values:
                raise ConfigError(f"{where}: {section}.{old} is the old name of {section}.{new}; "
                                  f"give {section}.{new} only")
            values[new] = values.pop(old)
            print(f"note: {where}: {section}.{old} is now called {section}.{new}",
                  file=sys.stderr)
    return out


def from_dict(d: dict, where: str = "config", sources: dict | None = None) -> RunConfig:
    """where: the file the values come from; sources: {"section.key": the flag that set it}."""
    source = _source(where, sources)
    d = _renamed(d, source)
    _check_keys(d, source)
    train = dict(d.get("train", {}))
    hp = {k: train.pop(k) for k in list(train) if k in _HPARAM_KEYS}
    built = {}
    for name, cls in (("data", DataSection), ("model", ViTConfig)):
        values = d.get(name, {})
        also, hint, checked = [], "", None
        if name == "model" and built["data"].image_size is not None:
            # the model follows the data: check the patch size against the images it will get
            values = {**values, "image_size": built["data"].image_size}
            also = ["data.image_size"]
            side = built["data"].image_size
            hint = f" ({patch_size_hint(side, f'{side}x{side} (data.image_size)')})"
        elif name == "model" and (native := _data_image_size(built["data"])) is not None:
            # digits (8 px), a folder (64 px without data.image_size): the model will follow
            # their images whatever model.image_size says, so the patch size is checked on them
            side, what = native
            checked = {**values, "image_size": side}
            hint = f" ({patch_size_hint(side, f'{side}x{side} ({what})')})"
        if checked is not None:
            try:
                cls(**checked)
            except (TypeError, ValueError) as err:
                raise _values_error(name, [k for k in values if k != "image_size"], err, source,
                                    also, hint) from None
            hint = ""
        try:
            built[name] = cls(**values)
        except (TypeError, ValueError) as err:
            if checked is None:
                raise _values_error(name, values, err, source, also, hint) from None
            built[name] = cls(**checked)  # only model.image_size failed, and the data's replaces it
        if name == "data":
            _validate_data(built["data"], source)
    model, data = built["model"], built["data"]
    section = TrainSection(**train, hparams=TrainHParams(**hp))
    _validate(section, source)
    return RunConfig(model, section, data)


def _values_error(section, keys, err, source, also, hint) -> ConfigError:
    """err of building a section, blaming the fields of keys that its message names (and those of
    also, and the hint, when it is about the image size)."""
    named = [f"{section}.{k}" for k in keys if re.search(rf"\b{k}\b", str(err))]
    about_size = "image_size" in str(err)
    return ConfigError(f"{source(*named, *(also if about_size else []))}: {err}"
                       f"{hint if about_size else ''}")


def _native_image_size(d: DataSection):
    """(side, dataset) of a dataset read at its own size only (a bundled one such as digits
    always, a folder dataset when data.layout names Tiny ImageNet's), else None."""
    from vit.data import FOLDER_DATASETS, NATIVE_IMAGE_SIZE  # noqa: PLC0415

    fixed = d.layout if d.dataset in FOLDER_DATASETS else d.dataset
    return (NATIVE_IMAGE_SIZE[fixed], fixed) if fixed in NATIVE_IMAGE_SIZE else None


def _data_image_size(d: DataSection):
    """(side, what) of the images a run of data section d gets when data.image_size leaves it
    unsaid: a fixed-size dataset's (_native_image_size), or 64 for a folder in any layout (Tiny
    ImageNet's size and an image folder's default); None where data.image_size gives it."""
    from vit.data import FOLDER_DATASETS  # noqa: PLC0415
    from vit.data.image_folder import DEFAULT_IMAGE_SIZE  # noqa: PLC0415

    if (native := _native_image_size(d)) is not None:
        return native
    if d.dataset in FOLDER_DATASETS and d.image_size is None:
        return DEFAULT_IMAGE_SIZE, "Tiny ImageNet, or an image folder without data.image_size"
    return None


def _validate_data(d: DataSection, source):
    from vit.data import BUNDLED_DATASETS, DATASETS, FOLDER_DATASETS, LAYOUTS, image_size_refusal  # noqa: PLC0415

    _check_types("data", d, source)  # types first: what follows compares values only
    if d.workers is not None and d.workers < 1:
        raise ConfigError(f"{source('data.workers')}: data.workers must be a positive integer, "
                          f"got {d.workers!r}")
    if d.dataset not in DATASETS:
        raise ConfigError(f"{source('data.dataset')}: data.dataset must be one of {DATASETS}, "
                          f"got {d.dataset!r}")
    if d.layout not in LAYOUTS:
        raise ConfigError(f"{source('data.layout')}: data.layout must be one of {LAYOUTS}, "
                          f"got {d.layout!r}")
    if d.image_size is not None and d.image_size < 1:
        raise ConfigError(f"{source('data.image_size')}: data.image_size must be a positive "
                          f"integer, got {d.image_size!r}")
    for key, value, unset in (("data_dir", d.data_dir, None), ("cache_dir", d.cache_dir, None),
                              ("layout", d.layout, "auto")):
        if d.dataset in BUNDLED_DATASETS and value != unset:
            raise ConfigError(f"{source(f'data.{key}')}: data.{key}={value!r}: "
                              f"{BUNDLED_DATASETS[d.dataset]} (leave data.{key} unset, or give "
                              f"the folder's dataset: {' or '.join(FOLDER_DATASETS)})")
    native = _native_image_size(d)
    if native is not None and (why := image_size_refusal(native[1], d.image_size)):
        raise ConfigError(f"{source('data.image_size')}: data.image_size={d.image_size}: "
                          f"{native[1]} {why} (leave data.image_size unset)")
    if d.device_budget_mb < 0:
        raise ConfigError(f"{source('data.device_budget_mb')}: data.device_budget_mb must be an "
                          f"integer >= 0, got {d.device_budget_mb!r}")


_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _type_ok(kind: str, value) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, str)


def _check_types(section: str, obj, source):
    """Every field of a [train]/[data] dataclass has its annotated type ("int", "float | None",
    ...): a TOML value of another type (a quoted number, `flip = "yes"`, or `--set
    train.flip=False`, which TOML reads as the string 'False') is an error naming the key."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        kinds = [k.strip() for k in str(f.type).split("|")]
        if dataclasses.is_dataclass(value) or (value is None and "None" in kinds):
            continue
        kind = kinds[0]
        if kind in _TYPE_NAMES and not _type_ok(kind, value):
            hint = (" (TOML writes them in lower case: true, false)" if kind == "bool"
                    and isinstance(value, str) and value.lower() in ("true", "false") else "")
            raise ConfigError(f"{source(f'{section}.{f.name}')}: {section}.{f.name} must be "
                              f"{_TYPE_NAMES[kind]}{hint}, got {value!r}")
        if kind == "float" and not math.isfinite(value):  # TOML's nan and inf are floats too
            raise ConfigError(f"{source(f'{section}.{f.name}')}: {section}.{f.name} must be a "
                              f"finite number, got {value!r}")


# [train] values that must not be negative (0 switches each off), and those in [0, 1)
_NON_NEGATIVE = ("weight_decay", "min_lr", "clip_norm", "crop_pad", "mixup_alpha", "cutmix_alpha",
                 "warmup_epochs", "checkpoint_minutes")
_UNIT_INTERVAL = ("b1", "b2")


def _validate(t: TrainSection, source):
    def bad(key, why):
        raise ConfigError(f"{source(f'train.{key}')}: train.{key} {why}, "
                          f"got {getattr(t, key, getattr(t.hparams, key, None))!r}")
    _check_types("train", t, source)  # types first: what follows compares values only
    _check_types("train", t.hparams, source)
    if t.epochs < 1:
        bad("epochs", "must be a positive integer")
    if t.batch_size < 1:
        bad("batch_size", "must be a positive integer")
    if t.eval_batch_size < 1:
        bad("eval_batch_size", "must be a positive integer")
    if t.seed < 0:
        bad("seed", "must be >= 0 (it seeds numpy's generator for the data order)")
    if t.repeat_augment < 1:
        bad("repeat_augment", "must be a positive integer (1: each image once per epoch)")
    if t.compute_dtype not in COMPUTE_DTYPES:
        bad("compute_dtype", f"must be one of {COMPUTE_DTYPES}")
    hp = t.hparams
    for key in _NON_NEGATIVE:
        if getattr(hp, key, getattr(t, key, 0)) < 0:
            bad(key, "must be >= 0")
    for key in _UNIT_INTERVAL:
        if not 0.0 <= getattr(hp, key) < 1.0:
            bad(key, "must be in [0, 1)")
    if not 0.0 <= hp.random_erase <= 1.0:
        bad("random_erase", "is a probability per image: it must be in [0, 1]")
    if hp.rand_augment_ops < 0:
        bad("rand_augment_ops", "is the number of RandAugment ops per image: it must be >= 0 "
                                "(0 = off)")
    if not 0.0 <= hp.rand_augment_magnitude <= 10.0:
        bad("rand_augment_magnitude", "is RandAugment's level: it must be in [0, 10]")
    if hp.rand_augment_std < 0:
        bad("rand_augment_std", "is the spread of RandAugment's level: it must be >= 0")
    if hp.eps <= 0:
        bad("eps", "must be positive")
    steps = hp.accum_steps
    if steps < 1:
        bad("accum_steps", "must be a positive integer")
    if t.batch_size % steps:
        up = -(-t.batch_size // steps) * steps
        divides = max(d for d in range(1, steps) if t.batch_size % d == 0)
        raise ConfigError(f"{source('train.batch_size', 'train.accum_steps')}: train.batch_size "
                          f"{t.batch_size} does not split into train.accum_steps = {steps} "
                          f"micro-batches of equal size; pick a batch size that is a multiple of "
                          f"{steps} (e.g. {up}) or accumulation steps that divide {t.batch_size} "
                          f"(e.g. {divides})")
    if hp.lr <= 0:
        raise ConfigError(f"{source('train.lr')}: train.lr must be positive, got {hp.lr!r}")
    if hp.min_lr > hp.lr:
        raise ConfigError(f"{source('train.min_lr', 'train.lr')}: train.min_lr = {hp.min_lr!r} is "
                          f"above train.lr = {hp.lr!r}: the schedule decays from lr to min_lr")
    if not 0.0 < hp.layer_decay <= 1.0:
        bad("layer_decay", "must be in (0, 1] (the lr factor per block towards the input)")
    if hp.trainable not in TRAINABLE:
        bad("trainable", f"must be one of {TRAINABLE} (what the run trains)")
    if hp.schedule not in ("constant", "cosine"):
        raise ConfigError(f"{source('train.schedule')}: train.schedule must be 'constant' or "
                          f"'cosine', got {hp.schedule!r}")
    if not 0.0 <= hp.label_smoothing < 1.0:
        raise ConfigError(f"{source('train.label_smoothing')}: train.label_smoothing must be in "
                          f"[0, 1), got {hp.label_smoothing!r}")


def image_size_notes(config, written: int, data, crop_pad: int = 0) -> list[str]:
    """A note when a config file's model.image_size (a preset's 224) is not the data's, which the
    model takes (such a run trained at 64 px without a word); crop_pad: the file's train.crop_pad
    (0 if a flag set it), rescaled in a second note (a preset's 16 is a quarter of 64 px)."""
    from vit.data import NATIVE_IMAGE_SIZE  # noqa: PLC0415
    from vit.data.image_folder import DEFAULT_IMAGE_SIZE  # noqa: PLC0415

    native = NATIVE_IMAGE_SIZE.get(data.dataset)
    size = native or data.image_size or DEFAULT_IMAGE_SIZE
    if size == written:
        return []
    how = (f"{data.dataset} comes at that size only" if native else
           f"for {written}-pixel images give --set data.image_size={written}")
    notes = [f"train.py: note: --config {config} has model.image_size = {written}, and the model "
             f"takes the data's size: {size}x{size} here ({how})"]
    if (scaled := crop_pad * size // written) != crop_pad:
        notes.append(f"train.py: note: --config {config} has train.crop_pad = {crop_pad}, for "
                     f"{written}-pixel images; --set train.crop_pad={scaled} keeps its proportion "
                     f"at {size}x{size}")
    return notes


def load_toml(path, what: str | None = None) -> dict:
    """The TOML file at path as a dict; errors name it as ``what`` (default "--config PATH",
    train.py's flag) and are ConfigErrors: no such file, unreadable, not UTF-8, not TOML."""
    path = Path(path)
    what = what or f"--config {path}"
    if not path.is_file():
        why = "a folder, not a file" if path.is_dir() else "no such file"
        raise ConfigError(f"{what}: {why} (shipped configs: "
                          f"{', '.join(str(p) for p in sorted(CONFIG_DIR.glob('*.toml')))})")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what}: cannot be read as UTF-8 text: {err}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{what}: not valid TOML: {err}") from None


def parse_override(text: str) -> tuple[str, str, object]:
    """'train.lr=3e-4' -> ('train', 'lr', 0.0003); values are read as TOML (strings may be bare)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. train.lr=3e-4")
    name, raw = text.split("=", 1)
    section, key = name.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word: a string
    return section, key, value


def merge(base: dict, section: str, key: str, value) -> dict:
    out = {s: dict(v) for s, v in base.items()}
    out.setdefault(section, {})[key] = value
    return out


def dumps(config: RunConfig) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)
