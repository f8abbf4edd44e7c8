"""The top classes of image files, as `python evaluate.py RUN --predict IMAGE...` prints them.

    predictions, not_read = predict_files(run, paths, class_names)   # run: vit.explain.load_run(...)
    print(format_predictions(predictions))

Each file is made the model's input as the image-folder cache makes its images
(vit.data.image_folder.load_image: any size and mode, shorter side resized, centre crop), then
normalised with the run's statistics. Files go through the model batch_size at a time (evaluate.py's
--batch-size), so thousands of them take no more memory than one batch; a file that cannot be read
(missing, a folder, not an image) is named in not_read and the others are still predicted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vit.data.cache import BadImage
from vit.data.image_folder import printable
from vit.explain import Run, jitted_forward, model_input

BATCH = 64  # images per forward pass by default (the last one padded to it: one compile)


def read_image(path, model) -> tuple[np.ndarray | None, str | None]:
    """-> (uint8 image as the model takes it, None), or (None, why it cannot be read: a folder,
    missing, or vit.data.cache.BadImage's message)."""
    from vit.data.image_folder import load_image  # noqa: PLC0415

    if Path(path).is_dir():
        return None, f"{path}: a folder, not an image file; give the images in it (e.g. DIR/*.jpg)"
    if not Path(path).is_file():
        return None, f"{path}: no such image file"
    try:
        return load_image(path, model.image_size, model.channels), None
    except BadImage as err:
        return None, str(err)


def predict_files(run: Run, paths, class_names: list[str], k: int = 5, batch_size: int = BATCH):
    """-> (predictions, not_read): predictions [(path, [(class name, probability), ...top k])]
    for the files that could be read, in the order given; not_read, a message naming each file
    that could not (read_image's)."""
    if len(class_names) != run.model.num_classes:
        raise ValueError(f"{len(class_names)} class names for a model of {run.model.num_classes} classes")
    k = min(k, run.model.num_classes)
    predictions, not_read = [], []
    batch = min(batch_size, len(paths))
    for start in range(0, len(paths), batch):
        read, images = [], []
        for path in paths[start : start + batch]:
            image, why = read_image(path, run.model)
            if why is not None:
                not_read.append(why)
            else:
                read.append(str(path))
                images.append(image)
        if not read:
            continue
        padded = np.zeros((batch, *images[0].shape), np.uint8)
        padded[: len(images)] = images
        logits = jitted_forward(run.params, model_input(padded, run.mean, run.std), run.model)
        logits = np.asarray(logits, np.float64)[: len(read)]
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        for path, p in zip(read, probs):
            top = np.argsort(-p, kind="stable")[:k]
            predictions.append((path, [(class_names[i], float(p[i])) for i in top]))
    return predictions, not_read


def format_predictions(predictions) -> str:
    lines = []
    for path, top in predictions:
        lines.append(printable(path))  # a name that is not UTF-8 would stop a strict stdout
        lines += [f"  {rank}. {100 * prob:6.2f}%  {name}" for rank, (name, prob) in enumerate(top, 1)]
    return "\n".join(lines)
