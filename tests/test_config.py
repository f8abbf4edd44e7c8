import re

import pytest

from vit import ViTConfig


def test_defaults_are_the_product_model():
    c = ViTConfig()
    assert (c.image_size, c.patch_size, c.channels, c.d_model, c.heads, c.layers, c.mlp_dim,
            c.num_classes, c.norm, c.gelu) == (64, 8, 3, 256, 8, 8, 1024, 200, "post", "tanh")
    assert (c.num_patches, c.seq_len, c.head_dim, c.patch_dim) == (64, 65, 32, 192)


def test_a_config_that_leaves_values_out_gets_the_original_projects_settings():
    """The built-in defaults of [model] and [train] are configs/seed.toml's, the original
    project's (which states its values anyway): a config file that leaves out the learning rate,
    the weight decay, the schedule or the epochs trains as that project did."""
    from vit import runconfig

    seed = runconfig.from_dict(runconfig.load_toml(runconfig.CONFIG_DIR / "seed.toml"), "seed.toml")
    default = runconfig.from_dict({})
    assert default.model == seed.model
    assert default.train == seed.train
    assert default.data == seed.data


@pytest.mark.parametrize("changes, field, value", [
    (dict(d_model=250), "d_model", "250"),            # not divisible by heads=8
    (dict(image_size=60), "image_size", "60"),        # not divisible by patch 8
    (dict(heads=0), "heads", "0"),
    (dict(layers=-1), "layers", "-1"),
    (dict(mlp_dim=0), "mlp_dim", "0"),
    (dict(num_classes=2.5), "num_classes", "2.5"),
    (dict(norm="middle"), "norm", "middle"),
    (dict(gelu="relu"), "gelu", "relu"),
    (dict(ln_eps=0.0), "ln_eps", "0.0"),
    (dict(dropout=1.0), "dropout", "1.0"),
    (dict(drop_path=-0.1), "drop_path", "-0.1"),
    (dict(layers=True), "layers", "True"),              # a bool is not a count
])
def test_invalid_config_names_field_and_value(changes, field, value):
    with pytest.raises(ValueError) as err:
        ViTConfig(**changes)
    assert field in str(err.value) and value in str(err.value)


def test_any_dropout_rate_alone_makes_the_step_draw_a_dropout_key():
    """has_dropout decides whether the train step hands the model a key: each rate on its own
    needs one (without it that dropout would silently never happen)."""
    assert not ViTConfig().has_dropout
    for name in ("dropout", "attn_dropout", "ffn_dropout", "drop_path"):
        assert ViTConfig(**{name: 0.1}).has_dropout, name


def test_round_trip_and_unknown_keys():
    c = ViTConfig(norm="pre", layers=2)
    assert ViTConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="d_modle"):
        ViTConfig.from_dict({"d_modle": 3})
    from vit import runconfig  # TrainHParams' derived fields are not keys: what to set instead

    with pytest.raises(runconfig.ConfigError, match=r"unknown key train.warmup_steps; "
                                                    r"train.warmup_steps is derived from train.warmup_epochs \(set that\)"):
        runconfig.from_dict({"train": {"warmup_steps": 100}}, "w.toml")


def test_the_old_precision_key_still_works_with_a_note(capsys):
    """train.precision was renamed train.compute_dtype; a config or a run's config.json written
    before still loads (with a note), and giving both names is an error naming them."""
    from vit import runconfig

    cfg = runconfig.from_dict({"train": {"precision": "bf16"}}, "old.toml")
    assert cfg.train.compute_dtype == "bf16"
    assert "old.toml: train.precision is now called train.compute_dtype" in capsys.readouterr().err
    with pytest.raises(runconfig.ConfigError, match="train.precision is the old name of train.compute_dtype"):
        runconfig.from_dict({"train": {"precision": "bf16", "compute_dtype": "fp32"}}, "both.toml")


def test_the_old_precision_flag_still_works_with_a_note(capsys):
    import train

    args = train.parse_args(["--dataset", "digits", "--precision", "bf16"])
    assert train.resolve_config(args).train.compute_dtype == "bf16"
    assert "--precision is now called --compute-dtype" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--precision", "bf16", "--compute-dtype", "fp32"])
    assert "disagree" in capsys.readouterr().err


def test_every_flag_that_sets_a_config_key_is_a_named_flag():
    """A flag whose help names a config key ("train.lr: ...") reaches it only through
    train.NAMED_FLAGS: added to build_parser alone, it was parsed and then ignored without a
    word; and every named flag is one build_parser has, with that dest."""
    import train

    actions = {a.option_strings[0]: a for a in train.build_parser()._actions if a.option_strings}
    for flag, action in actions.items():
        key = re.match(r"(model|train|data)\.(\w+):", action.help or "")
        if key:
            assert flag in train.NAMED_FLAGS, f"{flag} sets {key[1]}.{key[2]}: add it to train.NAMED_FLAGS"
            assert train.NAMED_FLAGS[flag] == (action.dest, key[1], key[2]), flag
    for flag, (dest, _, _) in train.NAMED_FLAGS.items():
        assert flag in actions and actions[flag].dest == dest, f"{flag}: no add_argument with dest {dest!r}"


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "1", "--set", "train.epochs=2"], "--epochs 1 and --set train.epochs=2 both set train.epochs"),
    (["--set", "train.lr=0.1", "--lr", "0.2"], "--lr 0.2 and --set train.lr=0.1 both set train.lr"),
    (["--precision", "bf16", "--set", 'train.compute_dtype="fp32"'],
     "--precision bf16 and --set train.compute_dtype=\"fp32\" both set train.compute_dtype"),
    (["--set", "model.layers=2", "--set", "model.layers=3"],
     "--set model.layers=2 and --set model.layers=3 both set model.layers")])
def test_two_flags_setting_one_key_to_different_values_are_refused(capsys, flags, message):
    """The later one won in silence (a named flag and --set, in either order, or two --set)."""
    import train

    with pytest.raises(SystemExit):
        train.resolve_config(train.parse_args(["--dataset", "digits", *flags]))
    err = capsys.readouterr().err
    assert message + ", to different values; give one of them" in err, err
    same = train.resolve_config(train.parse_args(["--dataset", "digits", "--epochs", "2",
                                                  "--set", "train.epochs=2"]))
    assert same.train.epochs == 2  # the same value twice is no conflict


def test_errors_blame_the_flag_that_set_the_value_else_the_file():
    """A bad value set by a flag names that flag; one from the file names the file."""
    import train
    from vit import runconfig

    args = train.parse_args(["--dataset", "digits", "--lr", "-1", "--set", "model.heads=7"])
    with pytest.raises(runconfig.ConfigError, match=r"^--set model\.heads=7: ViTConfig\.d_model=64"):
        train.resolve_config(args)
    args = train.parse_args(["--dataset", "digits", "--lr", "-1"])
    with pytest.raises(runconfig.ConfigError, match=r"^--lr -1\.0: train\.lr must be positive"):
        train.resolve_config(args)
    with pytest.raises(runconfig.ConfigError, match=r"^old\.toml: train\.lr must be positive"):
        runconfig.from_dict({"train": {"lr": -1}}, "old.toml")


def test_step_counts_follow_epochs_and_fractional_warmup_epochs():
    from vit import runconfig

    cfg = runconfig.from_dict({"train": {"epochs": 3, "warmup_epochs": 0.5}})
    hp = cfg.hparams(steps_per_epoch=10)
    assert (hp.total_steps, hp.warmup_steps) == (30, 5)
    assert cfg.hparams(steps_per_epoch=3).warmup_steps == 2  # 1.5 rounds to 2
    assert cfg.hparams(steps_per_epoch=0).total_steps == 1  # never a zero-length schedule


@pytest.mark.parametrize("key, value", [
    ("epochs", 0), ("epochs", 2.5), ("batch_size", 0), ("compute_dtype", "fp16"), ("lr", 0.0),
    ("schedule", "linear"), ("label_smoothing", 1.0), ("trainable", "body"), ("trainable", 1),
    # types: a value TOML read as another type than the field's
    ("flip", "False"), ("flip", "yes"), ("flip", 1), ("clip_norm", "x"), ("lr", True), ("layer_decay", 0.0),
    ("seed", 1.5), ("seed", -1), ("mixup_alpha", "0.8"), ("compute_dtype", 16), ("init_from", 3),
    # ranges: negative where 0 switches a feature off, the Adam betas, eps, the eval batch
    ("warmup_epochs", -3), ("weight_decay", -0.1), ("clip_norm", -1.0), ("crop_pad", -1), ("layer_decay", 1.5),
    ("mixup_alpha", -0.2), ("cutmix_alpha", -1.0), ("min_lr", -1e-5), ("b1", 1.0), ("b2", -0.5),
    ("eps", 0.0), ("eval_batch_size", 0), ("checkpoint_minutes", -5), ("checkpoint_minutes", "30"),
    ("repeat_augment", 0), ("repeat_augment", 1.5), ("rand_augment_ops", 2.0), ("rand_augment_std", "0.5")])
def test_bad_train_values_are_errors(key, value):
    """A bad [train] value is an error naming the file, or the flag when one set it (each check
    blames the source of its own key)."""
    from vit import runconfig

    with pytest.raises(runconfig.ConfigError, match=rf"^run\.toml: train\.{key} must be"):
        runconfig.from_dict({"train": {key: value}}, "run.toml")
    flag = f"--set train.{key}={value}"
    with pytest.raises(runconfig.ConfigError, match=rf"^{re.escape(flag)}: train\.{key} must be"):
        runconfig.from_dict({"train": {key: value}}, "run.toml", {f"train.{key}": flag})


@pytest.mark.parametrize("key, value", [("skip_bad_images", "False"), ("workers", 0),
                                        ("workers", "4"), ("device_budget_mb", 1.5),
                                        ("data_dir", 3), ("image_size", "64")])
def test_bad_data_values_are_errors(key, value):
    from vit import runconfig

    with pytest.raises(runconfig.ConfigError, match=rf"^run\.toml: data\.{key} must be"):
        runconfig.from_dict({"data": {key: value}}, "run.toml")


def test_train_py_offers_every_dataset_and_only_those():
    """train.py spells the dataset names out (--help imports no jax): a kind added to
    vit.data.DATASETS alone would be refused by --dataset, one added to train.py alone by the
    config check."""
    import train
    from vit.data import DATASETS

    (action,) = [a for a in train.build_parser()._actions if "--dataset" in a.option_strings]
    assert tuple(action.choices) == train.DATASETS == DATASETS


def test_a_capitalised_boolean_is_refused_with_the_toml_spelling():
    """`--set train.flip=False` is not TOML's false: TOML reads the bare word as the string
    'False', which is truthy; it used to switch flipping on."""
    from vit import runconfig

    section, key, value = runconfig.parse_override("train.flip=False")
    with pytest.raises(runconfig.ConfigError, match="lower case: true, false") as err:
        runconfig.from_dict({section: {key: value}}, "f.toml", {"train.flip": "--set train.flip=False"})
    assert str(err.value).startswith("--set train.flip=False: train.flip must be true or false")


def test_good_values_of_every_type_are_taken():
    from vit import runconfig

    cfg = runconfig.from_dict({"train": {"lr": 1, "flip": True, "warmup_epochs": 2, "clip_norm": 0,
                                         "b1": 0.0, "crop_pad": 4},
                               "data": {"workers": 2, "data_dir": None, "skip_bad_images": False}})
    assert (cfg.train.hparams.lr, cfg.train.hparams.flip, cfg.data.workers) == (1, True, 2)


def test_set_reads_the_value_after_the_first_equals_sign_as_toml():
    """--set section.key=value: the value is TOML (a bare word a string) and may itself hold '='."""
    from vit import runconfig

    assert runconfig.parse_override("train.lr=3e-4") == ("train", "lr", 3e-4)
    assert runconfig.parse_override("data.skip_bad_images=true") == ("data", "skip_bad_images", True)
    assert runconfig.parse_override("train.schedule=cosine") == ("train", "schedule", "cosine")
    assert runconfig.parse_override("data.data_dir=/data/run=2") == ("data", "data_dir", "/data/run=2")
    assert runconfig.parse_override('data.data_dir="a b"') == ("data", "data_dir", "a b")
    for bad in ("train.lr", "lr=3e-4"):
        with pytest.raises(runconfig.ConfigError, match="expected section.key=value"):
            runconfig.parse_override(bad)


def test_a_config_file_that_cannot_be_read_is_a_config_error_naming_it(tmp_path):
    """load_toml: a missing file, bytes that are not UTF-8 and text that is not TOML are each a
    ConfigError naming the file as the caller calls it (train.py: "--config PATH"), never a
    UnicodeDecodeError or TOMLDecodeError traceback."""
    from vit import runconfig

    latin1, broken = tmp_path / "latin1.toml", tmp_path / "broken.toml"
    latin1.write_bytes(b"[model]\n# caf\xe9\nheads = 2\n")
    broken.write_text("[model\n")
    cases = [(tmp_path / "missing.toml", "no such file"), (latin1, "cannot be read as UTF-8 text"),
             (broken, "not valid TOML"), (tmp_path, "a folder, not a file")]
    for path, message in cases:
        with pytest.raises(runconfig.ConfigError, match=f"^--config {path}: {message}"):
            runconfig.load_toml(path)
        with pytest.raises(runconfig.ConfigError, match=f"^{path}: {message}"):
            runconfig.load_toml(path, str(path))
    good = tmp_path / "good.toml"
    good.write_text("[model]\nheads = 2  # café\n", encoding="utf-8")
    assert runconfig.load_toml(good) == {"model": {"heads": 2}}


def test_the_patch_size_is_checked_against_data_image_size_not_the_models_placeholder():
    """The model follows data.image_size, so a patch size dividing it is taken even where it does
    not divide the config's model.image_size (64 by default; 48 px in 12 px patches used to be
    refused as 'image_size=64 is not divisible by patch_size=12'); one that does not divide it
    is an error naming both flags and suggesting one."""
    from vit import runconfig

    sources = {"model.patch_size": "--set model.patch_size=12", "data.image_size": "--set data.image_size=48"}
    cfg = runconfig.from_dict({"model": {"patch_size": 12}, "data": {"image_size": 48}}, "c.toml", sources)
    assert (cfg.model.image_size, cfg.model.patch_size) == (48, 12)
    with pytest.raises(runconfig.ConfigError) as err:
        runconfig.from_dict({"data": {"image_size": 50}}, "c.toml", {"data.image_size": "--set data.image_size=50"})
    assert str(err.value).startswith("--set data.image_size=50: ViTConfig.image_size=50 is not divisible")
    assert "e.g. --set model.patch_size=5" in str(err.value)


@pytest.mark.parametrize("data, side", [({"dataset": "digits"}, 8),
                                        ({"dataset": "tiny-imagenet", "layout": "tiny-imagenet"}, 64)])
def test_the_patch_size_of_a_fixed_size_dataset_is_checked_against_its_images(data, side):
    """Digits (8 px) and a named Tiny ImageNet layout (64 px): the model follows their images, so
    a patch size is checked against those, not model.image_size's placeholder 64 (digits with
    --set model.patch_size=3 used to be told 'image_size=64 is not divisible by patch_size=3')."""
    from vit import runconfig

    sources = {"model.patch_size": "--set model.patch_size=5"}
    with pytest.raises(runconfig.ConfigError) as err:
        runconfig.from_dict({"model": {"patch_size": 5}, "data": data}, "c.toml", sources)
    assert str(err.value).startswith(f"--set model.patch_size=5: ViTConfig.image_size={side} is "
                                     "not divisible by patch_size=5"), err.value
    assert f"images are {side}x{side} ({data['dataset']})" in str(err.value), err.value
    # a patch size that fits is taken, and the model's fields stay as written (fitted on loading)
    cfg = runconfig.from_dict({"model": {"patch_size": 4}, "data": data}, "c.toml")
    assert (cfg.model.image_size, cfg.model.patch_size) == (64, 4)


def test_digits_refuses_a_patch_larger_than_its_images_before_any_data_is_read():
    from vit import runconfig

    with pytest.raises(runconfig.ConfigError, match=r"image_size=8 is not divisible by patch_size=16 "
                                                    r"\(the dataset's images are 8x8 \(digits\)"):
        runconfig.from_dict({"model": {"patch_size": 16}, "data": {"dataset": "digits"}}, "c.toml")


@pytest.mark.parametrize("data", [{"dataset": "digits", "image_size": 30},
                                  {"dataset": "tiny-imagenet", "layout": "tiny-imagenet", "image_size": 32}])
def test_data_image_size_of_a_dataset_with_a_fixed_size_is_refused_with_the_config(data):
    """Digits (8 px) and a named Tiny ImageNet layout (64 px) are never resized: data.image_size
    is refused before any data is read, saying so (digits at 30 px used to be told its images
    were 30x30 and to pick a patch size dividing 30)."""
    from vit import runconfig

    with pytest.raises(runconfig.ConfigError, match=r"^d\.toml: data\.image_size=\d+: .* comes at its "
                                                    r"own (8x8|64x64) only"):
        runconfig.from_dict({"data": data}, "d.toml")
    assert runconfig.from_dict({"data": {**data, "image_size": 8 if data["dataset"] == "digits" else 64}})


def test_a_data_dir_for_digits_is_refused_not_ignored():
    """Digits come with scikit-learn: a data.data_dir beside them would be silently unused (the
    user meant another dataset, or a folder that is not read), so it is refused, naming the flag
    or the file that set it."""
    import train
    from vit import runconfig

    args = train.parse_args(["--dataset", "digits", "--data-dir", "my_images"])
    with pytest.raises(runconfig.ConfigError, match=r"^--data-dir my_images: data\.data_dir='my_images': "
                                                    r"digits come with scikit-learn and read no folder"):
        train.resolve_config(args)
    with pytest.raises(runconfig.ConfigError, match=r"^d\.toml: data\.data_dir='x': digits"):
        runconfig.from_dict({"data": {"dataset": "digits", "data_dir": "x"}}, "d.toml")
    assert runconfig.from_dict({"data": {"dataset": "image-folder", "data_dir": "x"}}).data.data_dir == "x"
    assert train.resolve_config(train.parse_args(["--dataset", "digits"])).data.data_dir is None


def test_a_named_layout_for_digits_is_refused_not_ignored():
    """data.layout says how a folder is read; digits read none, so a named layout beside them
    (the user meant a folder dataset) is refused like a data_dir, naming its flag or file."""
    import train
    from vit import runconfig

    args = train.parse_args(["--dataset", "digits", "--set", "data.layout=image-folder"])
    with pytest.raises(runconfig.ConfigError, match=r"^--set data\.layout=image-folder: data\.layout="
                                                    r"'image-folder': digits come with scikit-learn and "
                                                    r"read no folder \(leave data\.layout unset"):
        train.resolve_config(args)
    with pytest.raises(runconfig.ConfigError, match=r"^d\.toml: data\.layout='tiny-imagenet': digits"):
        runconfig.from_dict({"data": {"dataset": "digits", "layout": "tiny-imagenet"}}, "d.toml")
    assert runconfig.from_dict({"data": {"dataset": "digits", "layout": "auto"}}).data.layout == "auto"
    assert runconfig.from_dict({"data": {"dataset": "image-folder", "layout": "image-folder"}}).data.layout \
        == "image-folder"


def test_config_with_resume_is_refused_not_ignored(tmp_path, capsys):
    """--resume RUN uses RUN/config.json; a --config beside it was silently ignored (a digits run
    resumed 'with' configs/recipe.toml went on as the digits run). Now it is an error naming
    both, and the same command without it goes on."""
    import train
    from vit import runconfig

    (tmp_path / "config.json").write_text(runconfig.dumps(runconfig.from_dict({"data": {"dataset": "digits"}})))
    recipe = str(runconfig.CONFIG_DIR / "recipe.toml")
    with pytest.raises(SystemExit) as exit_:
        train.resolve_config(train.parse_args(["--resume", str(tmp_path), "--config", recipe]))
    assert exit_.value.code == 2
    assert f"--config {recipe}: --resume {tmp_path} continues that run with its own config" in capsys.readouterr().err
    assert train.resolve_config(train.parse_args(["--resume", str(tmp_path)])).data.dataset == "digits"


def test_a_tiny_imagenet_config_given_an_image_folder_records_image_folder(tmp_path):
    """The default config and the presets say data.dataset = "tiny-imagenet"; given --data-dir of
    an image folder, the run records "image-folder" (its name and error hints follow it), as
    --dataset image-folder would. A dataset named by a flag, Tiny ImageNet's own folder and a
    folder that is not there keep the config's."""
    import train
    from vit import runconfig
    from vit.data.fake import write_fake_image_folder, write_fake_tiny_imagenet

    folder = write_fake_image_folder(tmp_path / "pets", train_per_class=1, val_per_class=1)
    tiny = write_fake_tiny_imagenet(tmp_path / "tiny")

    def dataset(*flags):
        return train.resolve_config(train.parse_args([str(f) for f in flags])).data.dataset
    assert dataset("--data-dir", folder) == "image-folder"
    assert dataset("--config", runconfig.CONFIG_DIR / "vit-s16.toml", "--data-dir", folder) == "image-folder"
    assert dataset("--data-dir", folder, "--dataset", "tiny-imagenet") == "tiny-imagenet"
    assert dataset("--data-dir", folder, "--set", "data.dataset=tiny-imagenet") == "tiny-imagenet"
    assert dataset("--data-dir", tiny) == "tiny-imagenet"
    assert dataset("--data-dir", tmp_path / "nowhere") == "tiny-imagenet"


def test_model_fields_the_data_sets_get_a_note_when_given(capsys):
    """model.image_size, channels and num_classes follow the data (vit.training.fit_model_to_data):
    given on the command line they are not what the run gets, and a note says so; from a config
    file they pass without one."""
    import train

    train.resolve_config(train.parse_args(["--dataset", "digits", "--set", "model.num_classes=7",
                                           "--set", "model.channels=3", "--set", "model.layers=1"]))
    assert ("note: --set model.channels=3, --set model.num_classes=7: the model takes its image "
            "size, channels and classes from the data") in capsys.readouterr().err
    from vit import runconfig

    config = runconfig.CONFIG_DIR / "tiny-imagenet.toml"  # it sets model.image_size and num_classes
    train.resolve_config(train.parse_args(["--config", str(config), "--set", "model.layers=1"]))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("key, value", [("warmup_epochs", "inf"), ("warmup_epochs", "nan"),
                                        ("lr", "nan"), ("weight_decay", "nan"),
                                        ("checkpoint_minutes", "nan"), ("min_lr", "-inf")])
def test_non_finite_numbers_are_refused_naming_the_key(key, value):
    """TOML reads nan and inf as floats: they were taken (a NaN loss later, a traceback for
    warmup_epochs = inf, checkpoints never due for checkpoint_minutes = nan)."""
    import train
    from vit.runconfig import ConfigError

    with pytest.raises(ConfigError, match=f"--set train.{key}={value}: train.{key} must be a finite "
                                          f"number, got {float(value)!r}$"):
        train.resolve_config(train.parse_args(["--set", f"train.{key}={value}"]))


def test_min_lr_above_lr_is_refused():
    from vit import runconfig

    with pytest.raises(runconfig.ConfigError, match="train.min_lr = 1.0 is above train.lr = 0.003"):
        runconfig.from_dict({"train": {"lr": 0.003, "min_lr": 1.0}})
    assert runconfig.from_dict({"train": {"lr": 0.003, "min_lr": 0.003}}).train.hparams.min_lr == 0.003


def test_a_warmup_longer_than_the_run_gets_a_note(capsys):
    """--set train.warmup_epochs=100 --epochs 2 never left warmup (14% top-1), in silence."""
    import train

    train.resolve_config(train.parse_args(["--dataset", "digits", "--epochs", "2", "--lr", "1e-3",
                                           "--set", "train.warmup_epochs=5"]))
    assert "train.py: note: train.warmup_epochs = 5 is above train.epochs = 2: the learning rate " \
           "rises all run long and peaks at 0.0004, not train.lr = 0.001" in capsys.readouterr().err
    train.resolve_config(train.parse_args(["--dataset", "digits", "--epochs", "2"]))  # warmup 2
    assert "warmup" not in capsys.readouterr().err
    # stochastic depth rises from 0 at the first block: one block drops nothing (runs bit-equal)
    for layers, said in ((1, True), (2, False)):
        train.resolve_config(train.parse_args(["--dataset", "digits", "--set", "model.drop_path=0.5",
                                               "--set", f"model.layers={layers}"]))
        assert ("note: model.drop_path = 0.5 drops nothing in a model of one block"
                in capsys.readouterr().err) == said
    # --set model.drop_path=0 asks for no stochastic depth: nothing to note
    train.resolve_config(train.parse_args(["--dataset", "digits", "--set", "model.drop_path=0",
                                           "--set", "model.layers=1"]))
    assert "drop_path" not in capsys.readouterr().err


def test_a_dataset_kind_without_a_loader_is_an_error_not_digits(monkeypatch):
    """load_dataset ended in an unconditional digits branch: a new kind added to the lists but
    not given its branch trained a 10-class model on digits without a word."""
    import vit.data
    from vit.data import DatasetError, load_dataset

    monkeypatch.setattr(vit.data, "DATASETS", (*vit.data.DATASETS, "stripes"))
    with pytest.raises(DatasetError, match="dataset 'stripes' has no loader in vit.data.load_dataset"):
        load_dataset("stripes", None, "train")
