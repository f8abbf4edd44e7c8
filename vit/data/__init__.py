"""Datasets for vitfuse: folders of images (Tiny ImageNet's layout, or any ImageFolder-style
train/<class>/, val/<class>/ tree), decoded once into a memory-mapped cache; and sklearn's 8x8 digits.

    from vit.data import load_dataset
    train = load_dataset("tiny-imagenet", "data", "train")   # Dataset(images uint8 (N,64,64,3), labels int32 (N,))
    pets = load_dataset("image-folder", "pets", "val", image_size=96)   # uint8 (N, 96, 96, 3)
    val = load_dataset("digits", None, "val")                # no download needed

Batching and augmentation run on the device and need jax: import them from vit.data.loader and
vit.data.augment. This module and the dataset modules use numpy only (the `vit` package they sit
in imports jax on its own, see vit/data/common.py).

A dataset (data.dataset) and a layout (data.layout) are not the same thing: "tiny-imagenet" and
"image-folder" are both FOLDER_DATASETS, and either reads whichever layout data.layout names or
detect_layout finds in the folder (the dataset's name picks the download hint and the run's
name). A dataset outside FOLDER_DATASETS is one of BUNDLED_DATASETS (digits), its own kind:
resolve_layout returns its name, and a data.data_dir or a named data.layout for it is refused.

To add a dataset kind (say a folder of .npz files):
  - a module here whose loader returns a common.Dataset (images uint8 (N, S, S, C), labels int32,
    class_names, name = the kind), and its branch in load_dataset (a kind without one is a
    DatasetError there); NATIVE_IMAGE_SIZE if its images come at one size only (a bundled kind
    always: without it a data.image_size is recorded and not used); FOLDER_DATASETS if it is read
    from data_dir in a layout, else BUNDLED_DATASETS, whose value is the reason a folder is
    refused, as error messages quote it (the rules below follow those two; DATASETS is the two
    together). load_dataset hands data_dir on as
    given (None when unset; only its Tiny ImageNet branch puts in DEFAULT_DATA_DIR).
  - the rules that name datasets: vit/runconfig.py _native_image_size and _validate_data,
    check_run_data_dir here and vit/explain.py load_split go by FOLDER_DATASETS/BUNDLED_DATASETS;
    "digits" is named outright only where its size is known without loading (vit/flops.py main,
    which a kind with a config of its own joins, or `python -m vit.flops` shows it at 64 px and 200
    classes). `python -m vit.data prepare` (__main__.py) builds the cache of the two folder layouts
    only.
  - train.py: DATASETS (the --dataset choices, written out so that --help imports no jax;
    tests/test_config.py keeps it equal to this one), the --dataset and --data-dir help, and
    its default config: a configs/<kind>.toml picked in resolve_config, as digits.toml is (else
    configs/seed.toml's 6.4 M-parameter model trains on it). evaluate.py has no dataset flag:
    load_split reads the run's.
  - tests: the fake data writers live in vit/data/fake.py (write_fake_tiny_imagenet,
    write_fake_image_folder); tests/test_data_<kind>.py, tests/test_config.py for the config
    rules (its fixed-size refusals are written for digits' 8 px and Tiny ImageNet's 64 px: a new
    NATIVE_IMAGE_SIZE joins them there).
  - README.md, "Data" and the [data] keys under "Training"; runconfig.DataSection's docstring.
"""

from __future__ import annotations

import os
from pathlib import Path

from vit.data.common import DOWNLOAD_HINT, Dataset, DatasetError

FOLDER_DATASETS = ("tiny-imagenet", "image-folder")  # read from data_dir, in the layout named or found there
# datasets that read no folder, each with the words that refuse a folder or a layout for it
BUNDLED_DATASETS = {"digits": "digits come with scikit-learn and read no folder"}
DATASETS = (*FOLDER_DATASETS, *BUNDLED_DATASETS)
LAYOUTS = ("auto", "tiny-imagenet", "image-folder")
DEFAULT_DATA_DIR = "data"  # where `python -m vit.data download` puts tiny-imagenet-200/
NATIVE_IMAGE_SIZE = {"tiny-imagenet": 64, "digits": 8}  # datasets that are not resized

__all__ = ["BUNDLED_DATASETS", "DATASETS", "FOLDER_DATASETS", "DEFAULT_DATA_DIR", "DOWNLOAD_HINT", "Dataset", "DatasetError", "LAYOUTS",
           "check_run_data_dir", "folder_dataset", "load_dataset", "resolve_layout"]


def resolve_layout(name: str, data_dir: str | os.PathLike | None, layout: str = "auto",
                   image_size: int | None = None) -> str:
    """The layout to read dataset `name` with: 'tiny-imagenet' or 'image-folder' for a folder dataset
    (layout "auto": the one found in data_dir), or the name itself ('digits'). image_size: the
    one asked for, if any: an image folder's (Tiny ImageNet's is fixed), so a folder that is not
    there is not met with Tiny ImageNet's download hint."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    if layout not in LAYOUTS:
        raise DatasetError(f"data.layout must be one of {LAYOUTS}, got {layout!r}")
    if name not in FOLDER_DATASETS:
        return name
    if layout != "auto":
        return layout
    if data_dir is None:
        if name == "image-folder":
            raise DatasetError("an image-folder dataset needs its folder: --data-dir DIR (data.data_dir), "
                               "holding DIR/train/<class>/ and DIR/val/<class>/")
        if not Path(DEFAULT_DATA_DIR).exists():  # `python train.py` with no flags, the first time
            raise DatasetError(f"no --data-dir given, and the default data directory {DEFAULT_DATA_DIR}/ "
                               "does not exist: download Tiny ImageNet there with `python -m vit.data "
                               "download`, or give --data-dir DIR (or train on `--dataset digits`, which "
                               "needs no download)")
        data_dir = DEFAULT_DATA_DIR
    from vit.data.layout import detect_layout

    # an image size given is for an image folder (Tiny ImageNet's is fixed): no download hint
    return detect_layout(data_dir, DOWNLOAD_HINT if name == "tiny-imagenet" and image_size is None else "")


def image_size_refusal(kind: str, image_size: int | None) -> str | None:
    """Why a dataset read as `kind` (resolve_layout's answer) cannot be read at image_size, as
    the rest of a sentence about `kind`, or None where it can (None: its own size): Tiny ImageNet
    and digits come at their own size only. The caller names what asked for the size."""
    native = NATIVE_IMAGE_SIZE.get(kind)
    if image_size is None or native is None or image_size == native:
        return None
    return f"comes at its own {native}x{native} only; resizing is for image-folder datasets"


def found_image_size_refusal(name: str, data_dir, layout: str, image_size: int | None) -> str | None:
    """image_size_refusal of the layout `name` is read with in data_dir (resolve_layout), for a
    caller that names what asked for the size before anything is loaded; None also where no
    layout is found (loading says what is wrong)."""
    if image_size is None:
        return None
    try:
        kind = resolve_layout(name, data_dir, layout, image_size)
    except DatasetError:
        return None
    why = image_size_refusal(kind, image_size)
    return None if why is None else f"{data_dir or DEFAULT_DATA_DIR} holds {kind}, which {why}"


def folder_dataset(name: str, data_dir, layout: str = "auto") -> str:
    """The dataset a new run of `name` on data_dir records: "image-folder" for "tiny-imagenet"
    (the default config's, the presets') when data_dir holds an image folder, as --dataset
    image-folder would (the name picks the run's folder name and the download hint); else name.
    A folder that is missing or neither layout leaves name: loading it says what is wrong."""
    if name != "tiny-imagenet" or data_dir is None:
        return name
    try:
        return "image-folder" if resolve_layout(name, data_dir, layout) == "image-folder" else name
    except DatasetError:
        return name


def check_run_data_dir(name: str, data_dir, who: str) -> None:
    """Before a run's data is loaded again from its own data.data_dir (evaluate.py, train.py
    --resume, no --data-dir): a folder that is not there (moved, deleted, or a relative path
    given from another working directory) is a DatasetError asking for --data-dir, not the
    download hint meant for a first run. who: what the message starts with (the run, the flag)."""
    where = DEFAULT_DATA_DIR if data_dir is None else data_dir
    if name in FOLDER_DATASETS and not Path(where).exists():
        raise DatasetError(f"{who}: the run's data directory {where} (its data.data_dir) does not "
                           "exist here; give the folder that holds its images now with --data-dir DIR")


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None,
    split: str,
    *,
    workers: int | None = None,
    skip_bad_images: bool = False,
    progress: bool = True,
    image_size: int | None = None,
    layout: str = "auto",
    cache_dir: str | os.PathLike | None = None,
) -> Dataset:
    """One split ("train" or "val") of dataset `name` ("tiny-imagenet", "image-folder" or "digits").

    data_dir: for the folder datasets, the folder holding the data (for Tiny ImageNet, the folder with
    wnids.txt or its parent holding tiny-imagenet-200/; default "data"); ignored by digits, which ships
    with scikit-learn.
    layout: how the folder is read: "auto" (detected: Tiny ImageNet's layout if wnids.txt is there, else
    train/<class>/ + val/<class>/), "tiny-imagenet" or "image-folder" (see vit.data.image_folder).
    image_size: the side S of the cached (N, S, S, 3) images of an image folder (default 64); Tiny
    ImageNet (64) and digits (8) come at their own size only.
    workers, skip_bad_images, progress: see vit.data.tiny_imagenet.load_tiny_imagenet.
    cache_dir: a folder for the decoded images of folder datasets, each in a sub-folder of its
    own (cache.dataset_cache_dir); default DIR/vitfuse-cache.
    """
    kind = resolve_layout(name, data_dir, layout, image_size)
    if cache_dir is not None and kind in FOLDER_DATASETS:
        from vit.data.cache import dataset_cache_dir

        cache_dir = dataset_cache_dir(cache_dir, DEFAULT_DATA_DIR if data_dir is None else data_dir)
    if (why := image_size_refusal(kind, image_size)) is not None:
        raise DatasetError(f"data.image_size={image_size}: {kind} {why} (leave data.image_size unset)")
    if kind == "tiny-imagenet":
        from vit.data.tiny_imagenet import load_tiny_imagenet

        return load_tiny_imagenet(
            DEFAULT_DATA_DIR if data_dir is None else data_dir,
            split,
            workers=workers,
            skip_bad_images=skip_bad_images,
            progress=progress,
            cache_dir=cache_dir,
        )
    if kind == "image-folder":
        from vit.data.image_folder import load_image_folder

        return load_image_folder(data_dir, split, image_size=image_size, workers=workers,
                                 skip_bad_images=skip_bad_images, progress=progress,
                                 cache_dir=cache_dir)
    if kind == "digits":
        from vit.data.digits import load_digits_split

        return load_digits_split(split)
    raise DatasetError(f"dataset {kind!r} has no loader in vit.data.load_dataset")
