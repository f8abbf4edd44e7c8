"""train.py and evaluate.py on an image folder written on the fly, and what evaluate.py draws from the run:
the saliency grid (checked against finite differences of the loss), --predict, the confusion matrix."""

import contextlib
import io
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import evaluate
import train
import vit
from vit import explain
from vit.data.fake import (FAKE_FOLDER_CLASSES, fake_colour_image, save_as, write_fake_image_folder,
                           write_fake_tiny_imagenet)
from vit.data.image_folder import load_image

CLASSES = sorted(FAKE_FOLDER_CLASSES)
SIZE = 16
SMALL_MODEL = ["--set", "model.patch_size=8", "--set", "model.d_model=32", "--set", "model.heads=2",
               "--set", "model.layers=1", "--set", "model.mlp_dim=64", "--no-progress", "--set", "data.workers=1"]


def run_quietly(main, args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in args])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    """8 epochs of a 1-layer ViT on the fake colour folder at 16x16, streamed from the memory-mapped
    cache (device_budget_mb=0), as a user would run it."""
    base = tmp_path_factory.mktemp("colours")
    root = write_fake_image_folder(base / "folder")
    run = base / "run"
    code, out = run_quietly(train.main, ["--data-dir", root, "--out", run, "--set", f"data.image_size={SIZE}",
                                         "--set", "data.device_budget_mb=0", "--batch-size", 7, "--epochs", 8,
                                         "--lr", 3e-3, *SMALL_MODEL])
    assert code == 0, out
    return root, run, out


def test_image_folder_trains_streamed_and_evaluates(colour_run):
    root, run, out = colour_run
    assert "data: image-folder, 21 train / 9 val images of 16x16x3, 3 classes (streamed" in out
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["image_size"] == SIZE and config["model"]["num_classes"] == 3
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    best = max(x["val_top1"] for x in lines)
    assert len(lines) == 8 and best >= 8 / 9  # the colours are learnt
    result = evaluate.evaluate(run, "best", progress=False)
    assert result["count"] == 9 and result["top1"] == pytest.approx(best, abs=1e-6)
    assert result["class_names"] == CLASSES
    assert explain.load_run(run).class_names == CLASSES  # kept in the checkpoint


# --- saliency ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saliency_run(colour_run):
    """python evaluate.py RUN --saliency 5"""
    _, run, _ = colour_run
    code, out = run_quietly(evaluate.main, [run, "--saliency", 5, "--no-progress"])
    assert code == 0 and f"saliency maps: {run / 'saliency-best.png'} (5 validation images)" in out, out
    return run


def test_saliency_grid_and_maps(saliency_run):
    run = saliency_run
    with Image.open(run / "saliency-best.png") as png:
        assert png.size == explain.saliency_figure_size(5)
        assert np.asarray(png.convert("L")).std() > 10  # not a blank page
    s = np.load(run / "saliency-best.npz")
    assert s["indices"].tolist() == explain.pick_indices(9, 5).tolist() == [0, 2, 4, 6, 8]
    assert s["images"].shape == (5, SIZE, SIZE, 3) and s["images"].dtype == np.uint8
    assert s["maps"].shape == (5, SIZE, SIZE) and s["grads"].shape == (5, SIZE, SIZE, 3)
    assert np.isfinite(s["maps"]).all() and (s["maps"] >= 0).all() and (s["maps"].max(axis=(1, 2)) > 0).all()
    np.testing.assert_array_equal(s["maps"], np.abs(s["grads"]).max(axis=-1))
    assert s["labels"].tolist() == [0, 0, 1, 2, 2]  # val is sorted by class, 3 images each
    assert set(s["predictions"].tolist()) <= {0, 1, 2}
    r = explain.load_run(run)  # the predictions are the model's top class of each image
    logits = np.asarray(vit.forward(r.params, explain.model_input(s["images"], r.mean, r.std), r.model))
    np.testing.assert_array_equal(s["predictions"], logits.argmax(-1))


def test_saliency_map_is_the_gradient_of_each_images_loss(saliency_run):
    """The map against central finite differences of the loss in float64, pixel by pixel.

    float64 (jax.enable_x64): the hand-written image gradient, scaled to one image's loss and to pixel
    units, matches the differences to 1e-6 (step 1e-4 in [0, 1] pixel units: truncation ~1e-8).
    The map evaluate.py drew was computed in float32: it matches to 1e-3 of its largest value, the
    float32 rounding of a forward/backward pass (~1e-6 relative per op) with a wide margin."""
    run = saliency_run
    s = np.load(run / "saliency-best.npz")
    r = explain.load_run(run)
    rng = np.random.default_rng(0)
    h = 1e-4
    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), r.params)
        mean, std = r.mean.astype(np.float64), r.std.astype(np.float64)
        _, grads64, _ = explain.saliency(params, r.model, s["images"], s["labels"], mean, std)
        loss = jax.jit(lambda pixels, label: vit.loss(params, (pixels - mean) / std, label, r.model))
        checked = 0
        for i in range(3):
            pixels = s["images"][i : i + 1].astype(np.float64) / 255.0
            label = jnp.asarray(s["labels"][i : i + 1])
            spots = [np.unravel_index(np.argmax(s["maps"][i]), s["maps"][i].shape), *rng.integers(0, SIZE, (2, 2))]
            for y, x in spots:
                fd = np.zeros(3)
                for c in range(3):
                    step = np.zeros_like(pixels)
                    step[0, y, x, c] = h
                    fd[c] = (float(loss(pixels + step, label)) - float(loss(pixels - step, label))) / (2 * h)
                scale = np.abs(grads64[i]).max()
                np.testing.assert_allclose(grads64[i, y, x], fd, rtol=1e-6, atol=1e-6 * scale)
                assert s["maps"][i, y, x] == pytest.approx(np.abs(fd).max(), rel=1e-3, abs=1e-3 * float(s["maps"][i].max()))
                checked += 1
    assert checked == 9


def test_saliency_in_chunks_equals_saliency_at_once():
    """Chunks of 2 over 5 images (the last one short) give each image's own gradient, as one chunk does."""
    cfg = vit.ViTConfig(image_size=8, patch_size=4, channels=3, d_model=8, heads=2, layers=1, mlp_dim=8,
                        num_classes=4)
    params, mean, std = vit.init_params(jax.random.key(2), cfg), np.full(3, .5, np.float32), np.full(3, .25, np.float32)
    images, labels = np.random.default_rng(1).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8), np.array([0, 3, 1, 2, 0])
    whole = explain.saliency(params, cfg, images, labels, mean, std)
    for a, b in zip(explain.saliency(params, cfg, images, labels, mean, std, chunk=2), whole, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())


def test_saliency_titles_name_true_and_predicted_classes(monkeypatch, tmp_path):
    saved = {}
    monkeypatch.setattr(explain, "save_png", lambda fig, path, dpi: saved.setdefault("fig", fig))
    images = np.zeros((3, 8, 8, 1), np.uint8)
    maps = np.random.default_rng(0).random((3, 8, 8))
    explain.plot_saliency(images, maps, ["cat", "dog", "cat"], ["cat", "cat", "cat"], tmp_path / "x.png")
    titles = [ax.get_title() for ax in saved["fig"].axes]
    assert "true: dog\npred: cat" in titles and titles.count("true: cat\npred: cat") == 2
    assert sum("d loss / d pixel" in t for t in titles) == 3


# --- predict -----------------------------------------------------------------------------------------------------


def parse_predictions(text):
    blocks, current = {}, None
    for line in text.splitlines():
        if not line.startswith("  "):
            current = blocks.setdefault(line, [])
        else:
            rank, percent, name = line.split(None, 2)
            current.append((int(rank[:-1]), float(percent[:-1]), name))
    return blocks


def test_predict_names_the_class_of_images_of_any_size(colour_run, tmp_path, capsys):
    _, run, _ = colour_run
    rng = np.random.default_rng(5)
    red = tmp_path / "a red thing.jpg"
    fake_colour_image(FAKE_FOLDER_CLASSES["red fish (ñ)"], 123, 45, rng).save(red, quality=90)
    blue = tmp_path / "blue.png"
    save_as(fake_colour_image(FAKE_FOLDER_CLASSES["blue.v2"], 31, 77, rng), blue, "PNG", "RGBA")
    assert evaluate.main([str(run), "--predict", str(red), str(blue)]) == 0
    blocks = parse_predictions(capsys.readouterr().out)
    assert list(blocks) == [str(red), str(blue)]
    assert blocks[str(red)][0][2] == "red fish (ñ)" and blocks[str(blue)][0][2] == "blue.v2"
    r = explain.load_run(run)
    for path, rows in blocks.items():
        assert [k for k, _, _ in rows] == [1, 2, 3]  # 3 classes: all of them, best first
        assert sorted(name for _, _, name in rows) == CLASSES
        assert sum(p for _, p, _ in rows) == pytest.approx(100, abs=0.02)
        # the same numbers straight from the model, on the image resized as the cache resizes
        x = explain.model_input(load_image(path, SIZE)[None], r.mean, r.std)
        logits = np.asarray(vit.forward(r.params, x, r.model))[0]
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        assert [name for _, _, name in rows] == [CLASSES[k] for k in np.argsort(-probs)]
        np.testing.assert_allclose([p for _, p, _ in rows], 100 * np.sort(probs)[::-1], atol=0.006)


def test_predict_bad_file_is_named(colour_run, tmp_path, capsys):
    _, run, _ = colour_run
    (bad := tmp_path / "broken.png").write_bytes(b"\x89PNG nope")
    for given, said in ((bad, str(bad)), (tmp_path, f"{tmp_path}: a folder, not an image file")):
        with pytest.raises(SystemExit):
            evaluate.main([str(run), "--predict", str(given)])
        assert said in capsys.readouterr().err, given


def test_predict_with_a_data_dir_of_other_classes_is_an_error(colour_run, tmp_path, capsys, monkeypatch):
    """A checkpoint without class names (older runs) takes them from --data-dir: one with another
    number of classes is an error naming both counts, not a traceback."""
    import shutil

    root, run, _ = colour_run
    other = shutil.copytree(root, tmp_path / "other", ignore=shutil.ignore_patterns("vitfuse-cache*"))
    for split in ("train", "val"):
        shutil.rmtree(other / split / CLASSES[0])
    monkeypatch.setattr(explain.Run, "class_names", property(lambda self: None))
    image = next(p for p in (root / "val" / CLASSES[1]).iterdir() if p.is_file())
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(run), "--predict", str(image), "--data-dir", str(other), "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "evaluate.py: error:" in err and "2 class" in err and "3 classes" in err, err


def test_a_run_without_best_npz_offers_its_last_npz(colour_run, tmp_path, capsys):
    """A run stopped within its first epoch has last.npz only (best.npz comes at an epoch's end)."""
    (run := tmp_path / "run").mkdir()
    (run / "last.npz").write_bytes((colour_run[1] / "last.npz").read_bytes())
    with pytest.raises(SystemExit):
        evaluate.main([str(run), "--no-progress"])
    assert "but the run's last.npz does: evaluate that one with --checkpoint last" in capsys.readouterr().err


def test_predict_uses_tiny_imagenet_words(tmp_path, capsys, monkeypatch):
    root = write_fake_tiny_imagenet(tmp_path / "data")
    run = tmp_path / "run"
    code, _ = run_quietly(train.main, ["--data-dir", root, "--out", run, "--batch-size", 4, "--epochs", 1,
                                       *SMALL_MODEL])
    assert code == 0
    words = [f"class {i}, fake thing {i}" for i in range(3)]
    image = root / "val" / "images" / "val_1.JPEG"
    assert evaluate.main([str(run), "--predict", str(image)]) == 0
    rows = parse_predictions(capsys.readouterr().out)[str(image)]
    assert sorted(name for _, _, name in rows) == words
    r = explain.load_run(run)
    logits = np.asarray(vit.forward(r.params, explain.model_input(load_image(image, 64)[None], r.mean, r.std),
                                    r.model))[0]
    assert rows[0][2] == words[int(np.argmax(logits))]
    # A checkpoint without the names (older runs): read from the dataset, the same answer.
    monkeypatch.setattr(explain.Run, "class_names", property(lambda self: None))
    assert evaluate.main([str(run), "--predict", str(image), "--no-progress"]) == 0
    assert parse_predictions(capsys.readouterr().out)[str(image)] == rows


# --- confusion matrix --------------------------------------------------------------------------------------------


def test_per_class_writes_the_confusion_matrix(colour_run):
    _, run, _ = colour_run
    code, out = run_quietly(evaluate.main, [run, "--per-class", "--no-progress"])
    assert code == 0 and "confusion matrix:" in out
    with Image.open(run / "confusion-best.png") as png:
        assert png.size == explain.confusion_figure_size(3)
    c = np.load(run / "confusion-best.npz")
    assert c["matrix"].shape == (3, 3) and c["matrix"].sum() == 9  # every val image once
    assert sorted(c["shown"].tolist()) == [0, 1, 2] and c["class_names"].tolist() == CLASSES
    per_class = json.loads((run / "eval-best.json").read_text())["per_class"]
    assert [[name, int(c["matrix"][k, k]), int(c["matrix"][k].sum())] for k, name in enumerate(CLASSES)] == per_class


def test_evaluating_the_last_checkpoint_writes_eval_last_json(colour_run, tmp_path):
    import shutil

    _, run, _ = colour_run
    run = shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("eval-*.json"))
    code, out = run_quietly(evaluate.main, [run, "--checkpoint", "last", "--no-progress"])
    assert code == 0, out
    result = json.loads((run / "eval-last.json").read_text())
    assert result["checkpoint"] == str(run / "last.npz") and result["count"] == 9
    assert not (run / "eval-best.json").exists()


def run_that_answers(colour_run, tmp_path, k: int) -> Path:
    """A copy of the colour run whose model answers class k whatever it sees (head weights
    zeroed, bias towards k)."""
    import shutil

    from vit import checkpoint

    _, run, _ = colour_run
    run = shutil.copytree(run, tmp_path / "run")
    trees, meta = checkpoint.load(run / "best.npz")
    head = trees["params"]["head"]
    head["w"] = np.zeros_like(head["w"])
    head["b"] = np.where(np.arange(head["b"].shape[0]) == k, 5.0, 0.0).astype(head["b"].dtype)
    checkpoint.save(run / "best.npz", trees, meta)
    return run


def test_confusion_rows_are_the_true_classes(colour_run, tmp_path):
    """A model that answers the last class whatever it sees (head weights zeroed, bias towards
    it): every image lands in that column, in the row of its true class, and per-class totals are
    the images of each class, not the answers given."""
    run = run_that_answers(colour_run, tmp_path, 2)
    result = evaluate.evaluate(run, "best", progress=False)
    true = np.bincount(explain.load_split(explain.load_run(run), progress=False).labels, minlength=3)
    assert true.min() > 0 and true.sum() == 9
    want = np.zeros((3, 3), np.int64)
    want[:, 2] = true
    np.testing.assert_array_equal(result["confusion"], want)
    assert result["per_class"] == [(name, 0 if k < 2 else int(true[k]), int(true[k]))
                                   for k, name in enumerate(CLASSES)]
    assert result["top1"] == pytest.approx(true[2] / 9)


def test_per_class_table_lists_the_least_accurate_classes_first(colour_run, tmp_path, monkeypatch):
    """A model that answers the first class whatever it sees: that class is 100% right, the others
    0%, so the table (worst first) puts the first class last."""
    run = run_that_answers(colour_run, tmp_path, 0)
    monkeypatch.setattr(explain, "write_confusion", lambda *a: {"png": "-", "shown": [0, 1, 2]})  # no PNG
    code, out = run_quietly(evaluate.main, [run, "--per-class", "--no-progress"])
    assert code == 0, out
    lines = out.splitlines()
    table = lines[lines.index(next(l for l in lines if l.startswith("class "))) + 1:][:3]
    assert [line.rsplit(None, 3)[0] for line in table] == [CLASSES[1], CLASSES[2], CLASSES[0]], out
    assert table[-1].endswith("100.0%") and table[0].endswith("0.0%")


def test_evaluate_reads_the_data_dir_given_and_evaluates_in_the_runs_compute_dtype(colour_run, tmp_path,
                                                                                   monkeypatch):
    """A run moved from where it was trained: --data-dir stands in for the run's data_dir, and the
    eval step computes in the dtype the run trained in (train.compute_dtype, or the old name
    train.precision of an older run)."""
    import shutil

    from vit import checkpoint
    from vit import step as step_module

    root, run, _ = colour_run
    run = shutil.copytree(run, tmp_path / "run")
    trees, meta = checkpoint.load(run / "best.npz")
    meta["config"]["data"]["data_dir"] = str(tmp_path / "moved away")
    dtypes = []

    class Built(Exception):
        pass

    def spy(*args, compute_dtype="fp32", **kwargs):
        dtypes.append(compute_dtype)
        raise Built  # what follows is checked elsewhere

    monkeypatch.setattr(step_module, "make_eval_step", spy)
    train_section = meta["config"]["train"]
    for key in ("compute_dtype", "precision"):
        train_section.pop("compute_dtype")
        train_section[key] = "bf16"
        checkpoint.save(run / "best.npz", trees, meta)
        with pytest.raises(Built):
            evaluate.evaluate(run, "best", data_dir=root, progress=False)
        train_section["compute_dtype"] = train_section.pop(key)
    assert dtypes == ["bf16", "bf16"]


def test_evaluate_batches_no_larger_than_the_validation_set(colour_run, monkeypatch):
    """9 validation images are one batch of 9, not 9 real rows padded to the default 256 (which
    cost as much as 256 real ones); a smaller batch size still splits them."""
    from step_spy import batch_rows_seen
    from vit import step as step_module

    rows = batch_rows_seen(monkeypatch, step_module, "make_eval_step")
    _, run, _ = colour_run
    assert evaluate.evaluate(run, "best", progress=False)["count"] == 9 and rows == [9]
    rows.clear()
    assert evaluate.evaluate(run, "best", batch_size=4, progress=False)["count"] == 9 and rows == [4, 4, 4]


def test_confusion_colours_are_shares_of_every_image_of_the_true_class(tmp_path, monkeypatch):
    """With only some classes shown, a row's colour is its share of all the images of that class,
    not of those that landed in the shown columns."""
    import matplotlib.axes

    drawn = []
    original = matplotlib.axes.Axes.imshow
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow",
                        lambda self, x, *a, **kw: drawn.append(np.asarray(x)) or original(self, x, *a, **kw))
    rng = np.random.default_rng(1)
    m = rng.integers(0, 5, (6, 6)) + np.diag(np.full(6, 10))
    shown = explain.plot_confusion(m, [f"c{i}" for i in range(6)], tmp_path / "c.png", max_classes=3)
    assert len(shown) == 3
    (rates,) = drawn
    np.testing.assert_allclose(rates, m[np.ix_(shown, shown)] / m[shown].sum(axis=1, keepdims=True))


def test_confusion_order_follows_confusions_both_ways():
    """Class 1 is placed first (most confusions: 5 and 2 are taken for it); next comes the class
    most confused with it either way, 5 (5 -> 1, never 1 -> 5), ahead of 3 and 4, which have more
    confusions than 5 but none with 1."""
    m = np.diag(np.full(6, 50))
    for true, pred, n in [(5, 1, 40), (2, 1, 30), (3, 4, 60)]:
        m[true, pred] += n
    order = explain.confusion_classes(m).tolist()
    assert order[:2] == [1, 5] and sorted(order) == list(range(6))


def test_classes_without_validation_images_come_after_every_seen_class():
    """An image folder's val may lack some classes: their rows are empty, which is no accuracy at
    all, not 0%. With 40 classes, 12 of them unseen, the 30 shown are the 28 seen ones first
    (the least accurate of them ahead), never 12 unseen ones in place of the worst seen ones."""
    k, unseen = 40, list(range(28, 40))
    m = np.diag(np.full(k, 50))
    m[unseen, unseen] = 0
    for c in range(28):  # seen class c right 50 - c times, taken for class (c + 1) % 28 otherwise
        m[c, c] -= c
        m[c, (c + 1) % 28] += c
    shown = explain.confusion_classes(m).tolist()
    assert len(shown) == 30
    assert set(range(28)) <= set(shown)  # every seen class, the 2 others are unseen ones
    assert len(set(shown) & set(unseen)) == 2


def test_200_classes_show_the_worst_and_their_confusions_side_by_side(tmp_path):
    k = 200
    m = np.diag(np.full(k, 50))
    planted = {17: (103, 40), 42: (150, 30), 5: (6, 20)}  # true class: (taken for, how often)
    for true, (pred, n) in planted.items():
        m[true, true] -= n
        m[true, pred] += n
    rng = np.random.default_rng(0)
    for _ in range(60):  # a little noise elsewhere
        a, b = rng.integers(0, k, 2)
        if a != b and m[a, a] > 45:
            m[a, a] -= 1
            m[a, b] += 1
    shown = explain.confusion_classes(m)
    assert len(shown) == explain.CONFUSION_MAX_CLASSES == 30 and len(set(shown.tolist())) == 30
    order = shown.tolist()
    assert order[0] in (17, 103)  # the biggest confusion leads
    for true, (pred, _) in planted.items():
        assert abs(order.index(true) - order.index(pred)) == 1, (true, pred, order)
    written = explain.write_confusion(m, [f"class {i}" for i in range(k)], tmp_path)
    with Image.open(written["png"]) as png:
        assert png.size == explain.confusion_figure_size(30)
    c = np.load(written["npz"])
    assert c["matrix"].sum() == 50 * k and c["shown"].tolist() == order
