"""bench/matmul_floor.py: the FLOPs it divides its time by are those of the matmuls its step runs,
and it times --repeats calls after the compiling one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import matmul_floor


def _matmul_flops(jaxpr) -> int:
    """2 * (output elements) * (contracted length) over every dot_general, nested jaxprs included."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contracted, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * \
                int(np.prod([lhs[d] for d in contracted]))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                if hasattr(sub, "eqns"):
                    total += _matmul_flops(sub)
    return total


def test_flops_are_the_steps_matmuls():
    m = matmul_floor
    for b in (1, 3):
        args = (jnp.zeros((b, m.L, m.D)), jnp.zeros((b, m.L, m.F)),
                {"qkv": jnp.zeros((m.D, 3 * m.D)), "out": jnp.zeros((m.D, m.D)),
                 "fc1": jnp.zeros((m.D, m.F)), "fc2": jnp.zeros((m.F, m.D))},
                jnp.zeros((b, m.H, m.L, m.Dh)), jnp.zeros((b, m.H, m.L, m.L)))
        assert m.flops(b) == _matmul_flops(jax.make_jaxpr(m.step)(*args).jaxpr), b


def test_command_times_the_repeats_it_is_given(monkeypatch, capsys):
    calls, jit = [], jax.jit

    def counting_jit(f):
        compiled = jit(f)
        return lambda *a: calls.append(1) or compiled(*a)
    monkeypatch.setattr(matmul_floor.jax, "jit", counting_jit)
    matmul_floor.main(["--batch", "1", "--repeats", "3"])
    assert len(calls) == 1 + 3  # the compiling call, then the timed ones
    out = capsys.readouterr().out
    assert f"for {matmul_floor.flops(1) / 1e9:.0f} GFLOP" in out, out


def test_counts_below_one_are_refused_naming_the_flag(capsys):
    for flag in ("--batch", "--repeats"):
        with pytest.raises(SystemExit) as exit_:
            matmul_floor.main([flag, "0"])
        assert exit_.value.code == 2
        assert f"argument {flag}: must be a positive integer, got 0" in capsys.readouterr().err
