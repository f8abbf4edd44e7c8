"""What a user copies from the README works as written: a renamed function, keyword or flag
would leave it broken while every other test passes.

- The Public API block runs, on small made-up batches: every name, argument and
  comment-promised behaviour it shows exists. On the CPU, `fused_ops()` (compiled, for a GPU) is
  given Triton's interpreter, as the block's own comment says to do. The block's last loss and
  grads are the fused ops' (float32): within 1e-4 of the reference's (oracle.compare's "train
  step" row; observed 2e-6). About 12 s on the CPU.
- Every `python ...` command of the README's bash blocks is taken by its parser (argparse),
  and a new train.py run's flags and --set keys by train.resolve_config, without running it (the
  run an `--init-from` names, an earlier command's output, stood in by one of the default model).
"""

import argparse
import functools
import importlib
import re
import shlex
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
import vit
from vit import finetune
from kernel_checks import INTERPRET

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def public_api_block() -> str:
    text = README.read_text()
    section = text[text.index("\n## Public API\n"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md's section 'Public API' has no ```python block"
    return match.group(1)


def test_the_public_api_block_runs_and_its_fused_grads_match_the_reference(monkeypatch):
    if INTERPRET:  # fused_ops() is the compiled launcher, which needs a GPU
        monkeypatch.setattr(kernels, "fused_ops", functools.partial(kernels.fused_ops, kernels.INTERPRETED))
    rng = np.random.default_rng(0)
    uint8_images = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    names = {"images": jnp.asarray(uint8_images, jnp.float32) / 255.0, "uint8_images": uint8_images,
             "labels": jnp.asarray([3, 199]), "key": jax.random.PRNGKey(1)}
    exec(compile(public_api_block(), "README.md: Public API", "exec"), names)  # noqa: S102

    config, params = names["config"], names["params"]
    assert names["logits"].shape == (2, config.num_classes)
    assert np.isfinite(float(names["metrics"]["loss"]))
    with pytest.raises(ValueError):  # the block's comment: params for another config are refused
        vit.forward(params, names["images"], vit.ViTConfig(layers=config.layers + 1))
    # the block's last loss and grads are the fused ops' (at the params after one step)
    loss, grads = vit.loss_and_grads(params, names["images"], names["labels"], config)
    assert abs(float(names["loss"]) - float(loss)) <= 1e-5 * abs(float(loss))
    errors = jax.tree_util.tree_map(lambda got, want: float(jnp.max(jnp.abs(got - want))
                                                            / max(float(jnp.max(jnp.abs(want))), 1e-30)), names["grads"], grads)
    worst = max(jax.tree_util.tree_leaves_with_path(errors), key=lambda leaf: leaf[1])
    assert worst[1] <= 1e-4, f"fused grads{jax.tree_util.keystr(worst[0])}: rel error {worst[1]:.2e}"


def readme_commands() -> list[str]:
    """The `python` commands of the README's bash blocks (continued lines joined, comments cut,
    each side of a `&&` or `|`; after any VAR=value, and a venv's bin/python or python3.12 too):
    train.py, evaluate.py and this repository's `python -m` modules (not `python -c`, not
    `python -m pytest`)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|\|", line.split(" #")[0]):
                words = shlex.split(part)
                while words and re.fullmatch(r"[A-Za-z_]\w*=\S*", words[0]):  # VAR=value python ...
                    words = words[1:]
                if words and re.fullmatch(r"python(3(\.\d+)?)?", Path(words[0]).name):  # a venv's too
                    words[0] = "python"
                if words[:1] == ["python"] and words[1:2] not in (["-c"], ["-m"]) or \
                        words[1:2] == ["-m"] and words[2].split(".")[0] in ("vit", "oracle", "kernels", "bench"):
                    commands.append(shlex.join(words))
    return commands


class Parsed(BaseException):  # not an Exception: no `except Exception` in a main() takes it
    pass


def parse_only(monkeypatch):
    """From here on argparse stops every main() right after its command line is parsed."""
    parse_args = argparse.ArgumentParser.parse_args

    def parsed(self, args=None, namespace=None):
        raise Parsed(parse_args(self, args, namespace))
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parsed)


def take(command: str, monkeypatch) -> None:
    """Parse one README command as its program would (module docstring); raise if it is refused."""
    import train  # noqa: PLC0415

    words = shlex.split(command)[1:]
    if words[0] == "train.py" and "--help" not in words and "--resume" not in words:
        with monkeypatch.context() as m:  # --init-from RUN: an earlier command's run, not here
            m.setattr(finetune, "read_source", lambda path, where: (Path(path) / "best.npz", {
                "config": {"model": vit.ViTConfig().to_dict()}, "mean": [0.5] * 3, "std": [0.25] * 3}))
            train.resolve_config(train.parse_args(words[1:]))  # flags, --set keys, config files
        return
    module = {"train.py": "train", "evaluate.py": "evaluate"}.get(words[0])
    if module is None:  # -m MODULE
        module, words = words[1], words[1:]
        if hasattr(importlib.import_module(module), "__path__"):  # a package: its __main__
            module += ".__main__"
    with monkeypatch.context() as m:
        parse_only(m)
        try:
            importlib.import_module(module).main(words[1:])
        except Parsed:
            return
        except SystemExit as leave:  # only --help may leave, and with 0
            if leave.code == 0 and "--help" in words:
                return
            raise
    raise AssertionError("its main() returned without parsing a command line")


def test_every_readme_command_is_taken_by_its_parser(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the README's paths (configs/...) are the repository's
    commands = readme_commands()
    assert len(commands) >= 20 and "python train.py --dataset digits" in commands, commands
    refused = []
    for command in commands:
        try:
            take(command, monkeypatch)
        except (Exception, SystemExit) as e:  # noqa: BLE001  (each refusal is reported below)
            refused.append(f"{command}\n    {type(e).__name__}: {e} {capsys.readouterr().err.strip()[-300:]}")
    capsys.readouterr()
    assert not refused, "README.md commands refused:\n" + "\n".join(refused)
