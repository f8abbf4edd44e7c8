"""bench/tune_attention.py: its geometry override reaches the launches, and on the CPU it checks
every variant in Triton's interpreter (nothing timed) and exits 0."""

import jax
import jax.numpy as jnp

from bench import tune_attention
from kernels import attention
from kernels.launch import record_launches


def launched_geometry(direction):
    qkv = jax.ShapeDtypeStruct((2, 65, 3 * 64), jnp.float32)

    def run(qkv):
        o, cache = attention.attention_forward(qkv, 2, interpret=False)
        return attention.attention_backward(cache, o, interpret=False)

    with record_launches() as specs:
        jax.eval_shape(run, qkv)
    spec = specs[direction == "bwd"]
    return spec.constexprs["BLOCK_M"], spec.num_warps


def test_geometry_override_reaches_only_its_direction():
    default = {d: launched_geometry(d) for d in ("fwd", "bwd")}
    assert default["bwd"] == tune_attention.default_geometry(2, 65, 2, 32, jnp.float32, "ieee", "bwd")
    with tune_attention.geometry("bwd", 64, 4):
        assert launched_geometry("bwd") == (64, 4)
        assert launched_geometry("fwd") == default["fwd"]
    assert launched_geometry("bwd") == default["bwd"]  # restored


def test_interpreted_run_checks_every_variant(tmp_path, capsys):
    out = tmp_path / "tune.md"
    assert tune_attention.main(["--interpret", "--shape", "1x5x1x16", "--dtype", "float32/ieee",
                                "--out", str(out)]) == 0
    text = out.read_text()
    assert text.count("| float32/ieee |") == 4 and "default" in text  # BLOCK_M 16 x warps 4, 8
    assert "wrong" not in capsys.readouterr().out
