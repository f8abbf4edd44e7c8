"""``python -m oracle.kernel_gradcheck`` and oracle/compare.py's tolerance table, as the checks a
GPU run relies on: what the command runs (which kernels, which dtype, poisoned outputs, the
reference on the other side) and when it may exit 0. Each spies on ``gradcheck.check`` or the
run functions, so little runs in the interpreter (tests/test_kernels_ops.py runs the command end
to end)."""

import jax.numpy as jnp
import pytest

from kernels import launch as launch_module
from oracle import kernel_gradcheck as gradcheck
from oracle.compare import TOLERANCE, compare


def test_tolerances_are_the_documented_ones():
    """Every row of the table, pinned: a tolerance loosened by mistake (100x, say) lets every
    check held to it pass a wrong kernel (the bench's "long sums" rows, tf32, half precision,
    the train step), and no other test pins any row but float32's. Change a row here only with
    the reason beside it in oracle/compare.py."""
    assert TOLERANCE == {
        "float32": 1e-5, "float32 long sums": 3e-5, "tf32": 5e-3, "tf32x3": 1e-5,
        "bfloat16": 2e-2, "float16": 2e-2, "bfloat16 long sums": 3e-2,
        "train step": 1e-4, "bf16 train step": 6e-2,
    }


def spy_on_runs(monkeypatch):
    """Record, per run of either side, the op set's name, the kernel description, the poisoning
    in force and the inputs' dtype and residual."""
    seen = []
    for name in ("run_attention", "run_layernorm"):
        real = getattr(gradcheck, name)

        def spy(ops, inp, real=real, name=name):
            data = inp["qkv"] if name == "run_attention" else inp["x"]
            seen.append(dict(side=ops.name, description=ops.description, dtype=jnp.dtype(data.dtype).name,
                             poisoned=bool(launch_module._POISON_COMPILED), residual=inp.get("r") is not None))
            return real(ops, inp)
        monkeypatch.setattr(gradcheck, name, spy)
    return seen


def test_gradcheck_runs_both_kernels_poisoned_against_the_reference(monkeypatch):
    """By default (--kernel both) every attn case runs the one-tile and the key-blocked kernels,
    each against the reference, with outputs NaN-poisoned (on a GPU only poisoned_outputs()
    makes an unwritten element show; the interpreter always poisons, so only the context, not
    the numbers, can tell here); an ln :r case passes its residual."""
    seen = spy_on_runs(monkeypatch)
    assert gradcheck.main(["--interpret", "--seed", "0", "--shapes", "attn:1x5x1x16", "ln:3x10:r"]) == 0
    fused = [s for s in seen if s["side"] == "fused"]
    assert [s["side"] for s in seen] == ["fused", "reference"] * 3
    assert ["attention one-tile" in fused[0]["description"], "attention key-blocked" in fused[1]["description"]] \
        == [True, True]
    assert all(s["poisoned"] for s in fused)
    assert seen[-1]["residual"] and seen[-2]["residual"]


def test_gradcheck_dtype_reaches_the_kernels(monkeypatch):
    """--dtype bfloat16: the fused kernels get bf16 inputs, the reference their float32 upcast
    (a check that ran float32 kernels under a bf16 label would pass and prove nothing)."""
    seen = spy_on_runs(monkeypatch)
    assert gradcheck.main(["--interpret", "--seed", "0", "--dtype", "bfloat16", "--kernel", "key-blocked",
                           "--shapes", "attn:1x5x1x16", "ln:3x10"]) == 0
    assert [(s["side"], s["dtype"]) for s in seen] == [("fused", "bfloat16"), ("reference", "float32")] * 2


def test_gradcheck_that_checked_nothing_fails(capsys):
    """Every case skipped (the one-tile kernel cannot take L > 1024): not a pass, exit 1."""
    assert gradcheck.main(["--interpret", "--seed", "0", "--kernel", "one-tile",
                           "--shapes", "attn:1x1100x1x16"]) == 1
    assert "nothing checked" in capsys.readouterr().out


def test_compare_refuses_a_result_with_a_tensor_missing():
    """A contender that returns fewer tensors than the reference (a fwd+bwd row returning the
    forward only) is an error, not a check of the tensors both have."""
    want = {"o": jnp.ones(3), "dqkv": jnp.ones(9)}
    with pytest.raises(AssertionError, match="output structure differs"):
        compare({"o": jnp.ones(3)}, want, 1e-5)
