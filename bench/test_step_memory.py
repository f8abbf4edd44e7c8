"""bench/step_memory.py: XLA's memory accounting of the compiled step, and what gradient
accumulation does to it (the reason --accum-steps exists)."""

import pytest

import vit
from bench import step_memory


def test_accumulation_divides_the_steps_temporary_memory():
    """4 micro-batches hold about a quarter of the activations; the arguments (params, AdamW
    state, the batch) stay as they are."""
    cfg = vit.ViTConfig(image_size=16, patch_size=4, channels=3, d_model=32, heads=2, layers=2,
                        mlp_dim=64, num_classes=10)
    hp = vit.TrainHParams(crop_pad=2, flip=True, mixup_alpha=0.4)
    whole = step_memory.step_memory(cfg, hp, 128)
    accum = step_memory.step_memory(cfg, hp.replace(accum_steps=4), 128)
    assert accum["arguments"] == whole["arguments"] > 0
    assert 0 < accum["temporary"] < 0.4 * whole["temporary"], (accum, whole)


def test_command_prints_a_row_per_accumulation_and_skips_what_does_not_split(capsys):
    step_memory.main(["configs/digits.toml", "--batch", "12", "--accum", "1", "5", "3"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("configs/digits.toml: batch 12, fp32")
    rows = {line.split()[0]: line for line in out[2:]}
    assert sorted(rows) == ["1", "3", "5"]
    assert "does not split" in rows["5"]
    assert rows["3"].split()[1] == "4" and "MiB" in rows["3"]


def test_command_errors_name_the_file_or_flag(tmp_path, capsys):
    """A missing or broken config, or a batch or accumulation below 1: exit status 2 and one line
    naming what is wrong, no traceback."""
    bad, latin1 = tmp_path / "bad.toml", tmp_path / "latin1.toml"
    bad.write_text("[model]\nheads = 'many'\n")
    latin1.write_bytes(b"# caf\xe9\n")
    cases = [([str(tmp_path / "missing.toml")], f"error: {tmp_path / 'missing.toml'}: no such file"),
             ([str(bad)], f"error: {bad}: "),
             ([str(latin1)], f"error: {latin1}: cannot be read as UTF-8 text"),
             (["--accum", "0"], "--accum: must be a positive integer, got 0"),
             (["--batch", "-4"], "--batch: must be a positive integer, got -4")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_:
            step_memory.main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and "Traceback" not in err, (argv, err)
