"""The model presets (configs/vit-ti16.toml, vit-s16.toml, vit-b16.toml, tiny-imagenet.toml):
their headers state the true parameter count and FLOPs, train.py and evaluate.py take them
unchanged, and a shrunken ViT-S/16 trains the same few steps with the fused kernels (Triton's
interpreter on the CPU, compiled on a GPU) as with the reference ops, at a sequence length that
runs on the key-blocked attention kernel."""

import dataclasses
import json
import re

import jax
import numpy as np
import pytest

import evaluate
import train
import vit
from kernels import dispatch, fused_ops
from vit import checkpoint, flops, runconfig, training
from vit.data.fake import write_fake_tiny_imagenet

from kernel_checks import INTERPRET, LAUNCHER
from key_bias import qkv_bias_columns

PRESETS = {  # file -> (image size, tokens L, heads, head dim) as the papers define the model
    "vit-ti16.toml": (224, 197, 3, 64),
    "vit-s16.toml": (224, 197, 6, 64),
    "vit-b16.toml": (224, 197, 12, 64),
    "tiny-imagenet.toml": (64, 65, 8, 32),
}


def load(name):
    return runconfig.from_dict(runconfig.load_toml(runconfig.CONFIG_DIR / name), name)


def header_number(text, pattern):
    match = re.search(pattern, text)
    assert match, f"header line {pattern!r} missing"
    return match.group(1).replace(",", "")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_header_states_the_computed_parameters_and_flops(name):
    """The numbers in each preset's header are the ones vit.flops computes, and the parameter
    count is also what vit.init_params makes (counted from shapes, no arrays)."""
    cfg = load(name).model
    text = (runconfig.CONFIG_DIR / name).read_text()
    image, l, heads, dh = PRESETS[name]
    assert (cfg.image_size, cfg.seq_len, cfg.heads, cfg.head_dim) == (image, l, heads, dh)
    shapes = jax.eval_shape(lambda: vit.init_params(jax.random.PRNGKey(0), cfg))
    assert vit.count_params(shapes) == flops.param_count(cfg)
    assert int(header_number(text, r"parameters: ([\d,]+)")) == flops.param_count(cfg)
    stated = float(header_number(text, r"forward FLOPs per image: ([\d.]+) G"))
    assert stated == pytest.approx(flops.forward_flops(cfg)["total"] / 1e9, abs=0.005)
    if image == 224:  # what train.py makes of it on 64 px Tiny ImageNet (it fits the model to the data)
        fitted = cfg.replace(image_size=64, num_classes=200)
        match = re.search(r"\(([\d,]+) parameters, ([\d.]+) G FLOPs/image\)", text)
        assert int(match.group(1).replace(",", "")) == flops.param_count(fitted)
        assert float(match.group(2)) == pytest.approx(flops.forward_flops(fitted)["total"] / 1e9, abs=0.005)


def header_text(name):
    """The comment lines above a preset's first section, as one line."""
    text = (runconfig.CONFIG_DIR / name).read_text()
    return " ".join(line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#"))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_header_states_the_layout_and_recipe_the_file_sets(name):
    """The model layout a preset's header names (pre/post-norm, erf/tanh GELU, LayerNorm eps)
    and, for the ViT-*/16 presets, the DeiT recipe it quotes (epochs, global batch, lr, weight
    decay, warmup + cosine, label smoothing, mixup / cutmix, RandAugment, random erasing,
    repeated augmentation, drop-path, bf16 compute) are the values the file sets: neither changes
    a parameter count or a FLOP figure, so nothing else would notice one drifting from the papers'."""
    cfg, header = load(name), header_text(name)
    norm, gelu, eps = re.search(r"(pre|post)-norm, (erf|tanh) GELU(?:, LayerNorm eps ([\d.e-]+))?",
                                header).groups()
    assert (cfg.model.norm, cfg.model.gelu) == (norm, gelu)
    if eps is not None:
        assert cfg.model.ln_eps == float(eps)
    if PRESETS[name][0] != 224:
        return
    t, hp = cfg.train, cfg.train.hparams
    epochs, batch, lr = re.search(r"\((\d+) epochs, global batch (\d+), AdamW lr ([\d.e-]+)", header).groups()
    assert (t.epochs, t.batch_size, hp.lr) == (int(epochs), int(batch), float(lr))
    wd, warmup, smoothing, mixup, cutmix, ops, magnitude, spread, erase, repeats, drop_path = map(
        float, re.search(
            r"weight decay ([\d.]+), (\d+) warmup epochs \+ cosine, label smoothing ([\d.]+), "
            r"mixup ([\d.]+) / cutmix ([\d.]+), RandAugment (\d+) ops at magnitude ([\d.]+) "
            r"std ([\d.]+) \(timm's rand-m9-mstd0.5-inc1\), random erasing ([\d.]+), "
            r"repeated augmentation (\d+), drop-path ([\d.]+)\);", header).groups())
    assert (hp.weight_decay, t.warmup_epochs, hp.schedule, hp.label_smoothing) == (wd, warmup, "cosine", smoothing)
    assert (hp.mixup_alpha, hp.cutmix_alpha, hp.random_erase, cfg.model.drop_path) == (mixup, cutmix, erase, drop_path)
    assert (hp.rand_augment_ops, hp.rand_augment_magnitude, hp.rand_augment_std) == (ops, magnitude, spread)
    assert (ops, magnitude, spread) == (2, 9, 0.5)  # what the quoted timm string says
    assert t.repeat_augment == repeats
    assert "bf16 compute" in header and t.compute_dtype == "bf16"


def test_a_header_that_says_every_model_field_is_spelled_out_is_right():
    claims = [name for name in PRESETS if "every model field spelled out" in header_text(name)]
    assert claims == ["tiny-imagenet.toml"]
    for name in claims:
        written = set(runconfig.load_toml(runconfig.CONFIG_DIR / name)["model"])
        fields = {f.name for f in dataclasses.fields(vit.ViTConfig)}
        assert written == fields, (f"configs/{name} says every model field is spelled out: add "
                                   f"{sorted(fields - written)} to its [model], remove {sorted(written - fields)}")


def test_flops_match_the_published_figures():
    """Forward multiply-adds, the figure the ViT/DeiT papers call FLOPs: Ti 1.3 G, S 4.6 G,
    B 17.6 G; parameters 5.7 M, 22.1 M, 86.6 M."""
    for name, gmacs, mparams in (("vit-ti16.toml", 1.3, 5.7), ("vit-s16.toml", 4.6, 22.1),
                                 ("vit-b16.toml", 17.6, 86.6)):
        cfg = load(name).model
        assert flops.multiply_adds(cfg) / 1e9 == pytest.approx(gmacs, abs=0.05), name
        assert flops.param_count(cfg) / 1e6 == pytest.approx(mparams, abs=0.05), name


def test_flops_command_prints_each_configs_figures_and_names_a_bad_one(tmp_path, capsys):
    """python -m vit.flops CONFIG...: the parameters, the full forward FLOPs and the smaller figure of
    vitfuse's CLS-only last block; a config it cannot read is exit 2 with the file named."""
    path = str(runconfig.CONFIG_DIR / "vit-b16.toml")
    assert flops.main([path]) == 0
    cfg = load("vit-b16.toml").model
    out = capsys.readouterr().out
    assert f"{path}: 224 px" in out and f"parameters            {flops.param_count(cfg):,}" in out
    assert f"forward FLOPs/image   {flops.forward_flops(cfg)['total'] / 1e9:.2f} G" in out
    assert f"as vitfuse runs it    {flops.forward_flops(cfg, cls_only_last=True)['total'] / 1e9:.2f} G" in out
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nd_model = 768\nheads = 7\n")
    assert flops.main([path, str(bad)]) == 2
    assert f"vit.flops: error: {bad}: ViTConfig.d_model=768" in capsys.readouterr().err
    assert flops.main(["--help"]) == 0 and "python -m vit.flops [CONFIG.toml ...]" in capsys.readouterr().out
    assert flops.main([path, "--set", "model.layers=2"]) == 2  # was read as a file named --set
    assert "vit.flops: error: unknown option --set; it takes config files" in capsys.readouterr().err


def test_flops_command_gives_a_digits_config_the_model_train_py_builds(capsys):
    """configs/digits.toml leaves model.image_size, channels and num_classes at the 64 px, RGB,
    200-class defaults, which train.py replaces by digits' 8x8x1 and 10 classes; vit.flops used to
    print the unfitted figures (99,592 parameters, L = 257) and FLOPs too small to show in G."""
    from vit.data import load_dataset

    path = str(runconfig.CONFIG_DIR / "digits.toml")
    assert flops.main([path]) == 0
    out = capsys.readouterr().out
    cfg = load("digits.toml")
    training.fit_model_to_data(cfg, load_dataset("digits", None, "train"))  # what train.py runs
    built = vit.count_params(vit.init_params(jax.random.PRNGKey(0), cfg.model))
    assert f"{path} (fitted to digits: 8x8x1, 10 classes): 8 px, 4x4 patches, L = 5 tokens" in out, out
    assert f"parameters            {built:,}\n" in out, out
    assert f"forward FLOPs/image   {flops.forward_flops(cfg.model)['total'] / 1e6:.2f} M" in out, out
    assert " 0.00 " not in out, out


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_param_count_is_what_init_params_makes_for_either_norm_layout(norm):
    """Pre-norm has a final LayerNorm, post-norm none: counted from the shapes init_params makes."""
    cfg = vit.ViTConfig(image_size=16, patch_size=4, channels=3, d_model=24, heads=2, layers=3,
                        mlp_dim=40, num_classes=7, norm=norm)
    shapes = jax.eval_shape(lambda: vit.init_params(jax.random.PRNGKey(0), cfg))
    assert flops.param_count(cfg) == vit.count_params(shapes)
    # the last block on the CLS row only: L - 1 fewer rows through its output projection and FFN
    full = flops.forward_flops(cfg)["total"]
    rows = cfg.seq_len - 1
    saved = 2 * rows * cfg.d_model ** 2 + 4 * rows * cfg.d_model * cfg.mlp_dim
    assert flops.forward_flops(cfg, cls_only_last=True)["total"] == full - saved


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    return write_fake_tiny_imagenet(tmp_path_factory.mktemp("data"), num_classes=3, train_per_class=2,
                                    val_images=3)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_train_resolves_every_preset(name):
    """train.py's own config resolution takes each preset as it is (and with --fused), and
    fits it to 64 px Tiny ImageNet as its header says."""
    from types import SimpleNamespace

    args = train.build_parser().parse_args(["--config", str(runconfig.CONFIG_DIR / name), "--fused"])
    cfg = train.resolve_config(args)
    assert cfg.model == load(name).model
    tiny_imagenet = SimpleNamespace(images=np.zeros((1, 64, 64, 3), np.uint8), num_classes=200)
    fitted = training.fit_model_to_data(cfg, tiny_imagenet).model
    assert (fitted.image_size, fitted.num_classes, fitted.d_model) == (64, 200, cfg.model.d_model)


@pytest.mark.parametrize("name", ["vit-ti16.toml"])
def test_train_and_evaluate_take_the_presets(name, fake_data, tmp_path):
    """python train.py --config configs/<preset> on (fake) Tiny ImageNet, one layer and one short
    epoch for time, then evaluate.py on the run with the reference and the fused ops (L = 17,
    Dh = 64: the key-blocked kernel): the model is fitted to the 64 px data. (The other presets
    differ only in widths, which test_train_resolves_every_preset covers.)"""
    out = tmp_path / "run"
    assert train.main(["--config", str(runconfig.CONFIG_DIR / name), "--data-dir", str(fake_data),
                       "--epochs", "1", "--batch-size", "3", "--set", "model.layers=1",
                       "--no-progress", "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["image_size"] == 64 and saved["model"]["num_classes"] == 3
    assert saved["model"]["d_model"] == load(name).model.d_model
    result = evaluate.evaluate(out, "last", progress=False)
    assert result["count"] == 3 and np.isfinite(result["loss"])
    # the preset computes in bf16: the two paths round differently (observed 0.5% apart here;
    # 2e-2 is the bf16 kernels' tolerance, oracle/compare.py)
    fused = evaluate.evaluate(out, "last", ops=fused_ops(launcher=LAUNCHER), progress=False)
    assert fused["count"] == 3 and fused["loss"] == pytest.approx(result["loss"], rel=2e-2)


def test_train_py_fused_agrees_with_reference_on_a_shrunken_vit_s16(tmp_path, monkeypatch):
    """The same through the command a user types: `python train.py --config configs/vit-s16.toml
    --fused --interpret` (compiled on a GPU: --fused) and the same command without --fused, on a
    synthetic image folder resized to 128 px (8x8 patches of 16: L = 65, 6 heads of 64: the
    key-blocked kernel, over 3 key blocks forward and 5 backward), one layer, fp32, attention
    dropout on, two epochs of the preset's augmentation and drop-path, at lr 1e-4 (the preset's 1e-3
    is for batches of 1024: with 3 images its loss climbed to 10.7 by epoch 2, where the two runs'
    rounding had grown to 2e-5 of it). Every metrics line agrees:
    train and validation losses within 1e-5 relative (or 2e-6 absolute: a loss near 0, like the
    first epoch's validation loss of 0.027, carries the logits' absolute rounding error; with jax
    0.11.2 the two runs differ by 3.2e-7 there), the same top-1. (Validation batches are no
    larger than the 3-image validation set: padded to the default 256 rows, the interpreter took
    six times as long.)

    The parameters the two runs end with (last.npz, after 4 AdamW steps of 3 images) agree too:
    each tensor within 1e-2 of its update, |fused - ref| / |ref - init| (2-norms; the QKV weights
    by thirds). Where a gradient is rounding noise in both runs, AdamW's normalisation turns it
    into steps of about lr either way: the key bias's gradient is exactly zero (it adds q_i . b_k
    to a whole row of scores, which the softmax ignores), so the key bias is not compared (its
    ratio is O(1): noise); and one element whose gradient is near zero is enough for a ratio near
    1e-3 (observed on 2026-12-03: the patch weights 1.9e-3, every other tensor within 5.2e-5).
    """
    from step_spy import batch_rows_seen
    from vit import parallel
    from vit.data.fake import write_fake_image_folder

    eval_rows = batch_rows_seen(monkeypatch, parallel, "make_parallel_eval_step")

    data = write_fake_image_folder(tmp_path / "folder", train_per_class=2, val_per_class=1)
    common = ["--config", str(runconfig.CONFIG_DIR / "vit-s16.toml"), "--data-dir", str(data),
              "--set", "data.image_size=128", "--set", "model.layers=1", "--compute-dtype", "fp32",
              "--set", "model.attn_dropout=0.1", "--set", "train.warmup_epochs=0",
              "--set", "train.crop_pad=8", "--epochs", "2", "--batch-size", "3", "--lr", "1e-4",
              "--no-progress"]
    fused_flags = ["--fused", "--interpret"] if INTERPRET else ["--fused"]
    runs = {"reference": tmp_path / "reference", "fused": tmp_path / "fused"}
    assert train.main([*common, "--out", str(runs["reference"])]) == 0
    assert train.main([*common, *fused_flags, "--out", str(runs["fused"])]) == 0
    saved = runconfig.from_dict(json.loads((runs["fused"] / "config.json").read_text()))
    assert (saved.model.image_size, saved.model.heads, saved.model.head_dim) == (128, 6, 64)
    for direction in ("fwd", "bwd"):
        plan = dispatch.plan(65, 64, np.float32, "ieee", direction, LAUNCHER)
        assert plan.kernel == "key-blocked" and -(-65 // plan.blocks.block_n) >= 3, plan
    lines = {name: [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
             for name, run in runs.items()}
    assert [m["epoch"] for m in lines["fused"]] == [m["epoch"] for m in lines["reference"]] == [1, 2]
    for f, r in zip(lines["fused"], lines["reference"]):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_top5"):
            assert f[key] == pytest.approx(r[key], rel=1e-5, abs=2e-6), (f["epoch"], key, f[key], r[key])
        assert f["val_top1"] == r["val_top1"], f["epoch"]
    assert lines["fused"][1]["train_loss"] != lines["fused"][0]["train_loss"]  # it trained
    assert eval_rows == [3] * 4  # 2 runs x 2 epochs, one batch of the 3 validation images each

    # the parameters train.py started from (vit.training: its seed, its model)
    init = checkpoint.flatten(vit.init_params(jax.random.PRNGKey(saved.train.seed), saved.model), "params")
    final = {name: checkpoint.flatten(checkpoint.load(run / "last.npz")[0]["params"], "params")
             for name, run in runs.items()}
    assert sorted(final["fused"]) == sorted(final["reference"]) == sorted(init)
    errors = update_ratios(final["fused"], final["reference"], init, saved.model.d_model)
    print({k: f"{v:.1e}" for k, v in errors.items()})
    assert all(v <= 1e-2 for v in errors.values()), errors


def update_ratios(fused: dict, ref: dict, init: dict, d: int) -> dict:
    """|fused - ref| / |ref - init| (2-norms) of every tensor of {name: array}, the QKV weights by
    thirds ("...[Q]", "...[K]", "...[V]") and the QKV bias without its K third (see above)."""
    def ratio(f, r, p0):
        return float(np.linalg.norm(f - r) / np.linalg.norm(r - p0))

    errors = {}
    for name, r in ref.items():
        f, p0 = fused[name], init[name]
        assert np.linalg.norm(r - p0) > 0, name  # every tensor was updated
        if name.endswith("attn/qkv/w"):
            for i, part in enumerate("QKV"):
                cols = slice(i * d, (i + 1) * d)
                errors[f"{name}[{part}]"] = ratio(f[:, cols], r[:, cols], p0[:, cols])
        elif (split := qkv_bias_columns(name, d)) is not None:
            keep, _ = split
            errors[f"{name}[Q,V]"] = ratio(f[keep], r[keep], p0[keep])
        else:
            errors[name] = ratio(f, r, p0)
    return errors


def test_a_preset_trains_on_an_image_folder_at_its_patch_grid(tmp_path):
    """The way a preset gets its own image size: an image folder resized by data.image_size (48 px
    here for time: 3x3 patches of 16, L = 10), one layer, one epoch; the run's model follows."""
    from vit.data.fake import write_fake_image_folder

    data = write_fake_image_folder(tmp_path / "folder", train_per_class=2, val_per_class=1)
    out = tmp_path / "run"
    assert train.main(["--config", str(runconfig.CONFIG_DIR / "vit-ti16.toml"), "--data-dir", str(data),
                       "--set", "data.image_size=48", "--set", "model.layers=1", "--epochs", "1",
                       "--batch-size", "4", "--no-progress", "--out", str(out)]) == 0
    model = json.loads((out / "config.json").read_text())["model"]
    assert (model["image_size"], model["patch_size"], model["d_model"]) == (48, 16, 192)
    assert evaluate.evaluate(out, "last", progress=False)["count"] > 0


@pytest.mark.parametrize("extra, said", [
    ([], "vit-ti16.toml has model.image_size = 224, and the model takes the data's size: 64x64 here "
         "(for 224-pixel images give --set data.image_size=224)"),
    (["--set", "data.image_size=224"], None),
    (["--dataset", "digits", "--set", "model.patch_size=4"],
     "the model takes the data's size: 8x8 here (digits comes at that size only)")])
def test_a_preset_whose_image_size_the_data_will_not_have_says_so(tmp_path, capsys, extra, said):
    """ViT-Ti/16 (224 px) on an image folder trained at the folder's default 64 px, with no word
    but the model line; a flag's change was noted, the file's not."""
    from vit.data.fake import write_fake_image_folder

    folder = [] if "digits" in extra else ["--data-dir", str(write_fake_image_folder(tmp_path / "f"))]
    train.resolve_config(train.parse_args(["--config", str(runconfig.CONFIG_DIR / "vit-ti16.toml"),
                                           *folder, *extra]))
    err = capsys.readouterr().err
    assert (said in err) if said else "model.image_size" not in err, err


@pytest.mark.parametrize("extra, said", [
    ([], "vit-ti16.toml has train.crop_pad = 16, for 224-pixel images; --set train.crop_pad=4 keeps "
         "its proportion at 64x64"),
    (["--set", "train.crop_pad=8"], None), (["--set", "data.image_size=224"], None)])
def test_a_presets_crop_pad_for_224_px_is_rescaled_in_a_note(tmp_path, capsys, extra, said):
    """At 64 px a preset's crop_pad 16 (a quarter of the image) was taken without a word."""
    from vit.data.fake import write_fake_image_folder

    folder = write_fake_image_folder(tmp_path / "f")
    train.resolve_config(train.parse_args(["--config", str(runconfig.CONFIG_DIR / "vit-ti16.toml"),
                                           "--data-dir", str(folder), *extra]))
    err = capsys.readouterr().err
    assert (said in err) if said else "crop_pad" not in err, err


def test_a_preset_image_size_overridden_by_a_flag_gets_no_note_from_the_file(tmp_path, capsys):
    """--set model.image_size replaces the file's 224 (in the merged config too): the note on the
    file's value is not given for the flag's (which has its own note: the model follows the data)."""
    from vit.data.fake import write_fake_image_folder

    folder = write_fake_image_folder(tmp_path / "f")
    train.resolve_config(train.parse_args(["--config", str(runconfig.CONFIG_DIR / "vit-ti16.toml"),
                                           "--data-dir", str(folder), "--set", "model.image_size=32"]))
    err = capsys.readouterr().err
    assert "--set model.image_size=32: the model takes its image size" in err, err
    assert "has model.image_size" not in err, err


@pytest.mark.parametrize("data", [{"dataset": "tiny-imagenet"}, {"dataset": "image-folder"},
                                  {"dataset": "image-folder", "layout": "image-folder"}])
def test_the_patch_size_of_a_folder_without_data_image_size_is_checked_against_64_px(data):
    """A folder dataset without data.image_size comes at 64 px (Tiny ImageNet's size, an image
    folder's default), whatever model.image_size says, so a preset's patch size is checked
    against 64: with configs/vit-s16.toml (model.image_size 224), --set model.patch_size=12 used
    to be told 'image_size=224 is not divisible by patch_size=12' with no hint (14, which divides
    224, then failed on the 64 px data), and --set model.patch_size=64 was refused though 64 px
    images take it."""
    sources = {"model.patch_size": "--set model.patch_size=12"}
    with pytest.raises(runconfig.ConfigError) as err:
        runconfig.from_dict({"model": {"image_size": 224, "patch_size": 12}, "data": data},
                            "c.toml", sources)
    assert str(err.value).startswith("--set model.patch_size=12: ViTConfig.image_size=64 is not "
                                     "divisible by patch_size=12"), err.value
    assert "images are 64x64" in str(err.value) and "--set model.patch_size=8" in str(err.value)
    cfg = runconfig.from_dict({"model": {"image_size": 224, "patch_size": 64}, "data": data}, "c.toml")
    assert cfg.model.patch_size == 64 and cfg.model.image_size % 64 == 0
    # one that divides both is taken with the model as written (train.py fits it on loading)
    cfg = runconfig.from_dict({"model": {"image_size": 224, "patch_size": 16}, "data": data}, "c.toml")
    assert (cfg.model.image_size, cfg.model.patch_size) == (224, 16)


def test_flops_command_suggests_a_patch_size_in_the_files_words_not_train_pys(tmp_path, capsys):
    """vit.flops takes no --set, so its error's hint for a patch size that does not divide the
    image gives the file's key (it said 'e.g. --set model.patch_size=10', which vit.flops refuses)."""
    mine = tmp_path / "mine.toml"
    mine.write_text('[model]\npatch_size = 16\n[data]\ndataset = "image-folder"\nimage_size = 100\n')
    assert flops.main([str(mine)]) == 2
    err = capsys.readouterr().err
    assert f"vit.flops: error: {mine}: ViTConfig.image_size=100 is not divisible by patch_size=16" in err
    assert "e.g. patch_size = 10 in its [model] section)" in err and "--set" not in err, err


def test_flops_counts_a_224_px_patch_14_file_as_written(tmp_path, capsys):
    """A ViT-S/14 file (224 px, patch 14, no [data] section): train.py holds its patch to the
    64 px images a folder without data.image_size brings, but vit.flops counts the model as
    written (it refused the file, suggesting patch 8)."""
    mine = tmp_path / "vit-s14.toml"
    mine.write_text("[model]\nimage_size = 224\npatch_size = 14\nd_model = 384\nheads = 6\n")
    assert flops.main([str(mine)]) == 0
    assert f"{mine}: 224 px, 14x14 patches, L = 257 tokens" in capsys.readouterr().out
    with pytest.raises(runconfig.ConfigError, match="image_size=64 is not divisible by patch_size=14"):
        runconfig.from_dict(runconfig.load_toml(mine, mine), str(mine))


def test_a_head_count_that_does_not_divide_the_width_gets_the_nearest_that_do():
    """ViT-B/16 with --set model.heads=5: the message named the flag but no head count that fits."""
    d = runconfig.load_toml(runconfig.CONFIG_DIR / "vit-b16.toml")
    d["model"]["heads"] = 5
    with pytest.raises(runconfig.ConfigError) as err:
        runconfig.from_dict(d, "vit-b16.toml", {"model.heads": "--set model.heads=5"})
    assert str(err.value).startswith("--set model.heads=5: ViTConfig.d_model=768 is not divisible by "
                                     "heads=5 (heads that divide it: e.g. 4 or 6)"), err.value
    with pytest.raises(ValueError, match=r"heads=7 \(heads that divide it: e.g. 6 or 8\)"):
        vit.ViTConfig(d_model=48, heads=7)


def test_flops_to_a_reader_that_went_away_ends_quietly():
    """python -m vit.flops | head: a BrokenPipeError traceback from print (or an "Exception
    ignored" at exit); it ends with 141, the shell's code for SIGPIPE, and nothing on stderr.
    The same exit_code_of_a_check runs oracle.gradcheck, kernel_gradcheck and compile_check."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # gone before the first line
    try:
        done = subprocess.run([sys.executable, "-m", "vit.flops"], stdout=write, stderr=subprocess.PIPE,
                              cwd=runconfig.CONFIG_DIR.parent)  # no time limit: load only slows it
    finally:
        os.close(write)
    assert (done.returncode, done.stderr.decode()) == (141, "")
