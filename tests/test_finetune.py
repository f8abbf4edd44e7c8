"""Fine-tuning (`train.py --init-from`, vit/finetune.py): a new run starts from a source run's
weights, with the source's architecture and normalisation, the position embeddings resized to a
new image size (checked against PIL's bicubic) and the head fitted to the new classes; what it
refuses names the flag."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import train
from vit import ViTConfig, checkpoint, init_params, runlock
from vit.finetune import resize_positions, transfer_params

# a tiny pre-norm model on 8x8 images of 4x4 patches (a 2x2 grid), every architecture key not
# the default config's; dropout, which a tuned run takes from its own config, not either
SOURCE = ["--set", "data.image_size=8", "--set", "model.patch_size=4", "--set", "model.d_model=16",
          "--set", "model.heads=2", "--set", "model.layers=1", "--set", "model.mlp_dim=32",
          "--set", "model.norm=\"pre\"", "--set", "model.gelu=\"erf\"", "--set", "model.ln_eps=1e-6",
          "--set", "model.dropout=0.1",
          "--batch-size", "4", "--no-progress",
          "--set", "data.workers=1", "--lr", "1e-2"]
QUIET = ["--batch-size", "4", "--no-progress", "--set", "data.workers=1"]


def folder(root, classes):
    """An image folder of 12x12 RGB images, 4 training and 2 validation images per class, each
    class its own brightness."""
    rng = np.random.default_rng(len(classes))
    for split, n in (("train", 4), ("val", 2)):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                level = 40 + 60 * (ord(name) - ord("a"))
                pixels = np.clip(level + rng.integers(-30, 30, (12, 12, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A run on classes a, b, c (one epoch): its directory and best.npz's (trees, meta)."""
    tmp = tmp_path_factory.mktemp("source")
    run = tmp / "run"
    assert train.main([*SOURCE, "--data-dir", str(folder(tmp / "abc", "abc")), "--epochs", "1",
                       "--out", str(run)]) == 0
    return run, checkpoint.load(run / "best.npz")


def started(argv):
    """train.start's Run for argv (nothing trained, no file written)."""
    try:
        return train.start(train.parse_args(argv))
    finally:
        runlock.release_all()


@pytest.mark.parametrize("old, new", [(2, 3), (4, 6), (6, 4), (5, 12), (3, 3)])
def test_positions_are_resized_bicubic_as_pil_and_the_cls_row_is_kept(old, new):
    rng = np.random.default_rng(old * 10 + new)
    pos = rng.normal(size=(1 + old * old, 5)).astype(np.float32)
    resized = resize_positions(pos, new)
    assert resized.shape == (1 + new * new, 5)
    np.testing.assert_array_equal(resized[0], pos[0])
    for d in range(5):  # PIL's BICUBIC on a float image: Keys' kernel, a = -0.5, antialiased
        grid = Image.fromarray(pos[1:, d].reshape(old, old), mode="F")
        want = np.asarray(grid.resize((new, new), Image.BICUBIC))
        np.testing.assert_allclose(resized[1:, d].reshape(new, new), want, atol=1e-5, rtol=0)
    if old == new:
        np.testing.assert_array_equal(resized, pos)


@pytest.mark.parametrize("classes, columns", [("ac", [1, 0]), ("abc", [1, 2, 0]), ("abd", None),
                                              ("b", [2])])
def test_the_head_takes_the_source_columns_by_class_name(classes, columns):
    """A source whose classes are c, a, b (an order a folder never gives, but a dataset's own
    list may: Tiny ImageNet's wnids.txt): each new class takes its own column, in the new order,
    the same names in another order too; as many classes with one new (a, b, d) start at zero."""
    source = ViTConfig(image_size=8, patch_size=4, d_model=16, heads=2, layers=1, mlp_dim=32,
                       num_classes=3)
    params = init_params(jax.random.PRNGKey(0), source)
    params["head"]["b"] = jnp.asarray([1.0, 2.0, 3.0])
    model = dataclasses.replace(source, num_classes=len(classes))
    got, said = transfer_params(params, source, model, ["c", "a", "b"], list(classes))
    want_w, want_b = np.asarray(params["head"]["w"]), np.asarray(params["head"]["b"])
    if columns is None:
        want_w, want_b = np.zeros((16, len(classes))), np.zeros(len(classes))
        assert said == ["head: zero (1 of these 3 classes are not among the source's 3)"]
    else:
        want_w, want_b = want_w[:, columns], want_b[columns]
    np.testing.assert_array_equal(got["head"]["w"], want_w)
    np.testing.assert_array_equal(got["head"]["b"], want_b)


def test_a_finetuned_run_starts_from_the_source(source, tmp_path, capsys):
    """Classes a and c of the source's a, b, c at 12 px (a 3x3 grid): every parameter is the
    source's but the positions (resized) and the head (columns 0 and 2), with the source's model
    (pre-norm, although the default config is post-norm) and normalisation; AdamW from zero."""
    run_dir, (trees, meta) = source
    capsys.readouterr()
    run = started([*QUIET, "--data-dir", str(folder(tmp_path / "ac", "ac")), "--set",
                   "data.image_size=12", "--init-from", str(run_dir), "--out", str(tmp_path / "ft")])
    out, err = capsys.readouterr()
    assert f"--init-from {run_dir}: the model is {run_dir / 'best.npz'}'s: model.patch_size = 4 " \
           "(the config has 8)" in err and "model.norm = 'pre' (the config has 'post')" in err
    assert f"starting from {run_dir / 'best.npz'} (position embeddings resized from a 2x2 to a " \
           "3x3 patch grid (bicubic), head: the columns of these 2 classes, of the source's 3" in out
    model = run.cfg.model
    assert (model.image_size, model.num_classes, model.dropout) == (12, 2, 0.0)
    assert {k: getattr(model, k) for k in ("patch_size", "d_model", "heads", "layers", "mlp_dim",
                                           "norm", "gelu", "ln_eps")} == \
           {"patch_size": 4, "d_model": 16, "heads": 2, "layers": 1, "mlp_dim": 32, "norm": "pre",
            "gelu": "erf", "ln_eps": 1e-6}
    assert run.cfg.train.init_from == str(run_dir.resolve())
    got, want = run.state.params, trees["params"]
    np.testing.assert_array_equal(np.asarray(got["embed"]["pos"]),
                                  resize_positions(want["embed"]["pos"], 3))
    np.testing.assert_array_equal(np.asarray(got["head"]["w"]), want["head"]["w"][:, [0, 2]])
    np.testing.assert_array_equal(np.asarray(got["head"]["b"]), want["head"]["b"][[0, 2]])
    for part in ("patch", "blocks", "final_ln"):
        assert _arrays(got[part]) == _arrays(want[part]), part
    np.testing.assert_array_equal(np.asarray(got["embed"]["cls"]), want["embed"]["cls"])
    np.testing.assert_array_equal(run.state.mean, np.float32(meta["mean"]))
    np.testing.assert_array_equal(run.state.std, np.float32(meta["std"]))
    assert not any(np.asarray(m).any() for m in _arrays(run.state.opt_state))
    assert (run.state.epoch, run.state.step_in_epoch, run.state.history) == (0, 0, [])


def test_the_same_classes_and_size_take_every_parameter_and_no_optimiser_state(source, tmp_path,
                                                                                capsys):
    """The source's own classes at its own size: every parameter as it is (head too), and
    AdamW's moments and step still at 0, although the source's checkpoint holds its own of
    the same shapes."""
    run_dir, (trees, _) = source
    assert np.asarray(trees["opt"]["step"]) > 0
    capsys.readouterr()
    run = started([*QUIET, "--data-dir", str(folder(tmp_path / "abc", "abc")), "--set",
                   "data.image_size=8", "--init-from", str(run_dir), "--out", str(tmp_path / "ft")])
    assert "(every parameter as it is; its normalisation statistics)" in capsys.readouterr().out
    assert _arrays(run.state.params) == _arrays(trees["params"])
    assert not any(np.asarray(m).any() for m in _arrays(run.state.opt_state))


def _arrays(tree):
    """A tree's arrays as lists of their exact values (to compare trees whole)."""
    import jax
    return [np.asarray(leaf, np.float64).ravel().tolist() for leaf in jax.tree_util.tree_leaves(tree)]


def test_a_class_the_source_lacks_gives_a_zero_head_and_the_run_resumes(source, tmp_path, capsys):
    """Classes a and d at the source's 8 px: the positions as they are, a zero head. The run
    trains, refuses another source on --resume, and resumes without its source (gone by then)."""
    run_dir, (trees, _) = source
    data, out, copy = folder(tmp_path / "ad", "ad"), tmp_path / "ft", tmp_path / "copy.npz"
    copy.write_bytes((run_dir / "best.npz").read_bytes())
    argv = [*QUIET, "--data-dir", str(data), "--init-from", str(copy), "--set", "data.image_size=8",
            "--out", str(out)]
    capsys.readouterr()
    run = started(argv)
    assert "head: zero (1 of these 2 classes are not among the source's 3)" in capsys.readouterr().out
    assert not np.asarray(run.state.params["head"]["w"]).any()
    assert not np.asarray(run.state.params["head"]["b"]).any()
    np.testing.assert_array_equal(np.asarray(run.state.params["embed"]["pos"]),
                                  trees["params"]["embed"]["pos"])  # the same 2x2 grid
    assert train.main([*argv, "--epochs", "2", "--stop-after-epoch", "1"]) == 130
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["init_from"] == str(copy.resolve())
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        train.main(["--resume", str(out), "--init-from", str(run_dir)])
    assert stop.value.code == 2
    assert "train.init_from fixes the weights it started from" in capsys.readouterr().err
    copy.unlink()  # a resume reads the run's own last.npz
    assert train.main(["--resume", str(out), "--no-progress"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def refusal(capsys, argv) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        started(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err


def test_what_init_from_refuses_names_it(source, tmp_path, capsys):
    run_dir, _ = source
    data = str(folder(tmp_path / "ab", "ab"))
    base = [*QUIET, "--data-dir", data, "--out", str(tmp_path / "ft")]
    err = refusal(capsys, [*base, "--init-from", str(tmp_path / "nowhere")])
    assert f"--init-from {tmp_path / 'nowhere'}: {tmp_path / 'nowhere'}: no such file or run " \
           "directory" in err
    (tmp_path / "empty").mkdir()
    checkpoint.save(tmp_path / "stopped" / "last.npz", {}, {"epoch": 0})
    assert "holds no best.npz (a run writes it at its first epoch's end); is it a run " \
           "directory?" in refusal(capsys, [*base, "--init-from", str(tmp_path / "empty")])
    assert f"to start from its last weights, give {tmp_path / 'stopped' / 'last.npz'}" in \
           refusal(capsys, [*base, "--init-from", str(tmp_path / "stopped")])
    assert "is not a checkpoint of train.py (its record has no config.model, mean and std)" in \
           refusal(capsys, [*base, "--init-from", str(tmp_path / "stopped" / "last.npz")])
    checkpoint.save(tmp_path / "no-std.npz", {}, {"config": {"model": {}}, "mean": [0.5] * 3})
    assert "no-std.npz is not a checkpoint of train.py" in \
           refusal(capsys, [*base, "--init-from", str(tmp_path / "no-std.npz")])
    (tmp_path / "notes.txt").write_text("hello")
    assert "notes.txt is not an .npz file" in refusal(capsys, [*base, "--init-from",
                                                               str(tmp_path / "notes.txt")])
    with_source = [*base, "--init-from", str(run_dir)]
    assert f"--set model.d_model=32 (the source has 16): --init-from {run_dir} starts from " \
           f"{run_dir / 'best.npz'}, whose weights fix model.d_model; leave it out" in \
           refusal(capsys, [*with_source, "--set", "model.d_model=32"])
    same = started([*with_source, "--set", "data.image_size=8", "--set", "model.d_model=16"])
    assert same.cfg.model.d_model == 16  # the source's own value is no clash
    assert "--set data.image_size=10: data.image_size = 10 is not a multiple of " \
           "model.patch_size = 4, which --init-from" in \
           refusal(capsys, [*with_source, "--set", "data.image_size=10"])
    assert "was trained on images of 3 channel(s), and this data's have 1" in refusal(
        capsys, ["--dataset", "digits", "--no-progress", "--init-from", str(run_dir),
                 "--out", str(tmp_path / "digits")])
    assert not (tmp_path / "ft").exists() and not (tmp_path / "digits").exists()


def test_a_relative_or_home_init_from_is_saved_absolute(source, tmp_path, monkeypatch):
    """--init-from given relative to the working folder, or (a config file's) with ~: the run
    reads the source there and saves its absolute path, which a resume from another folder still
    finds; the same relative path given again on --resume is the same source, not a change."""
    run_dir, _ = source
    data = str(folder(tmp_path / "ab", "ab"))
    monkeypatch.chdir(run_dir.parent)
    monkeypatch.setenv("HOME", str(run_dir.parent))
    config = tmp_path / "home.toml"
    config.write_text(f'[train]\ninit_from = "~/{run_dir.name}"\n')
    for given in (["--init-from", run_dir.name], ["--config", str(config)]):
        out = tmp_path / f"ft{len(given[1])}"
        run = started([*QUIET, "--data-dir", data, "--set", "data.image_size=8", *given,
                       "--out", str(out)])
        assert run.cfg.train.init_from == str(run_dir.resolve()), given
    assert train.main([*QUIET, "--data-dir", data, "--set", "data.image_size=8", "--init-from",
                       run_dir.name, "--epochs", "2", "--stop-after-epoch", "1",
                       "--out", str(tmp_path / "ft")]) == 130
    assert train.main(["--resume", str(tmp_path / "ft"), "--init-from", run_dir.name,
                       "--no-progress"]) == 0


def test_a_config_whose_data_is_no_table_is_named_with_init_from(source, tmp_path, capsys):
    """resolve_model reads [data] before the config is built: a [data] that is no table is still
    the config check's error naming the file, not an AttributeError."""
    run_dir, _ = source
    config = tmp_path / "bad.toml"
    config.write_text(f'data = 3\n[train]\ninit_from = "{run_dir}"\n')
    assert f"--config {config}: [data] must be a table of key = value" in \
        refusal(capsys, ["--config", str(config), "--out", str(tmp_path / "ft")])
