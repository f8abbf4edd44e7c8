"""Every hand-written backward against float64 central finite differences and JAX autodiff.

The cases are the ones `python -m oracle.gradcheck` prints; here they also run at awkward shapes:
batch 1, sequence lengths that are not powers of two (5, 17), head counts 1, 3, 4 and 6.

Most of this file's time is XLA compiling the cases' ops one by one, once per shape; so the
shapes are shared where nothing is lost: the block and model cases run at the layers' default
batch of 2 (the gradcheck command's is 3), and everything at batch 1 uses the small model's
L = 5, D = 12, MLP 20 (the layer cases with a single head, the model with 3, 1 and 6 heads)."""

import re
from pathlib import Path

import jax
import pytest

from oracle import gradcheck, gradient_cases as cases



@pytest.fixture(autouse=True)
def float64():
    """float64 inside these tests only (a global switch would leak into other test files)."""
    with jax.enable_x64(True):
        yield

LAYER_SHAPES = [  # (batch, length, d_model, heads, ffn hidden)
    dict(batch=2, length=5, d=12, heads=3, hidden=20),    # the gradcheck default
    dict(batch=1, length=5, d=12, heads=1, hidden=20),    # batch 1, a single head
    dict(batch=3, length=17, d=16, heads=4, hidden=24),   # L = 17: one past a power of two
]


def _ids(cases):
    return [c.name for c in cases]


def _assert_rows(rows):
    assert rows, "no tensor was checked"
    for r in rows:
        assert r.fd_rel_err <= gradcheck.FD_TOL, f"{r.case} {r.tensor}: FD rel err {r.fd_rel_err:.2e}"
        assert r.autodiff_rel_err <= gradcheck.AUTODIFF_TOL, (
            f"{r.case} {r.tensor}: autodiff rel err {r.autodiff_rel_err:.2e}")


@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=lambda s: "B{batch}-L{length}-D{d}-H{heads}".format(**s))
def test_every_layer(shape):
    for case in cases.layer_cases(seed=1, **shape):
        _assert_rows(gradcheck.check_case(case, seed=1, directions=2))


with jax.enable_x64(True):  # the cases' arrays are built at collection, in float64
    BLOCK_CASES = cases.block_cases(seed=2, batch=2)
    MODEL_CASES = cases.model_cases(seed=3, batch=2) + cases.model_cases(seed=4, batch=1)

@pytest.mark.parametrize("case", BLOCK_CASES, ids=_ids(BLOCK_CASES))
def test_blocks_stack_and_head(case):
    _assert_rows(gradcheck.check_case(case, seed=2, directions=2))


@pytest.mark.parametrize("case", MODEL_CASES, ids=[f"{c.name}-B{c.inputs['images'].shape[0]}"
                                                   for c in MODEL_CASES])
def test_whole_model(case):
    _assert_rows(gradcheck.check_case(case, seed=3, directions=2))


def test_whole_model_other_head_counts():
    for heads in (1, 6):
        cfg = cases.small_config("post", heads=heads)
        case = cases.Case(f"model H={heads}", *_model_case_parts(cfg))
        _assert_rows(gradcheck.check_case(case, seed=5, directions=1))


def _model_case_parts(cfg):
    import jax.numpy as jnp

    from vit import model
    params = cases.perturbed_params(cfg, 5)
    images = jax.random.normal(jax.random.PRNGKey(0), (1, cfg.image_size, cfg.image_size,
                                                       cfg.channels), jnp.float64)
    fwd = lambda i: model.model_forward(i["params"], i["images"], cfg)  # noqa: E731

    def bwd(i, c, dy):
        g, dimg = model.model_backward(i["params"], c, dy, cfg, need_dimages=True)
        return {"params": g, "images": dimg}
    return {"params": params, "images": images}, fwd, bwd


@pytest.fixture(scope="module")
def dense_case():
    """The dense layer's case (float64), built once for the tests of the checker itself."""
    with jax.enable_x64(True):
        case = cases.layer_cases(seed=0)[0]
    assert case.name == "dense"
    return case


def test_check_catches_a_wrong_gradient(dense_case):
    """The checker itself must fail on a wrong backward (here: dx of dense off by a factor)."""
    case = dense_case
    wrong = cases.Case("dense (broken)", case.inputs, case.forward,
                           lambda i, c, dy: {**case.backward(i, c, dy),
                                             "x": 1.001 * case.backward(i, c, dy)["x"]})
    rows = {r.tensor: r for r in gradcheck.check_case(wrong)}
    assert not rows["x"].ok and rows["w"].ok
    # both columns see it: each is a check of its own (the autodiff one measured against the
    # oracle's gradient, not the hand-written one again)
    assert rows["x"].fd_rel_err > gradcheck.FD_TOL and rows["x"].autodiff_rel_err > gradcheck.AUTODIFF_TOL


def test_check_refuses_a_gradient_of_another_shape(dense_case):
    """A gradient with the input's size but not its shape (here db as (1, F)) would broadcast
    against autodiff's and pass: it is an error naming the tensor."""
    case = dense_case
    wrong = cases.Case("dense (db 2-D)", case.inputs, case.forward,
                       lambda i, c, dy: {**case.backward(i, c, dy), "b": case.backward(i, c, dy)["b"][None]})
    with pytest.raises(AssertionError, match=r"gradient of b has shape \(1, 20\), input has \(20,\)"):
        gradcheck.check_case(wrong)


def test_normal_draws_follow_the_key_and_the_scale():
    """The cases' inputs: the same key draws the same values, another key others (a generator
    seeded regardless of the key would make q, k and v of a case equal), scaled, float64."""
    k1, k2 = cases.keys(0, 2)
    a = cases.normal(k1, (4, 5))
    assert a.dtype == jax.numpy.float64 and a.shape == (4, 5)
    assert (cases.normal(k1, (4, 5)) == a).all() and not (cases.normal(k2, (4, 5)) == a).any()
    assert jax.numpy.allclose(cases.normal(k1, (4, 5), 0.1), 0.1 * a, rtol=1e-15, atol=0)


def test_gradcheck_command_exits_one_when_a_gradient_is_wrong(monkeypatch, capsys):
    def broken_cases(seed):  # y = a * b, whose gradient for b is off by 0.1% (for a right)
        a, b = cases.normal(jax.random.PRNGKey(1), (3,)), cases.normal(jax.random.PRNGKey(2), (3,))
        return [cases.Case("product (broken)", {"a": a, "b": b}, lambda i: (i["a"] * i["b"], None),
                           lambda i, c, dy: {"a": dy * i["b"], "b": 1.001 * dy * i["a"]})]
    monkeypatch.setattr(gradcheck, "all_cases", broken_cases)
    assert gradcheck.main(["--directions", "1"]) == 1
    out, err = capsys.readouterr()
    assert "FAIL" in out and "FAILED: 1 tensor(s) above tolerance" in err


def test_a_row_is_ok_only_within_both_tolerances():
    ok = dict(case="c", tensor="t", shape=(2,), fd_rel_err=gradcheck.FD_TOL, autodiff_rel_err=gradcheck.AUTODIFF_TOL)
    assert gradcheck.Row(**ok).ok
    assert not gradcheck.Row(**{**ok, "fd_rel_err": 2 * gradcheck.FD_TOL}).ok
    assert not gradcheck.Row(**{**ok, "autodiff_rel_err": 2 * gradcheck.AUTODIFF_TOL}).ok


@pytest.mark.parametrize("count", ["0", "-2"])
def test_gradcheck_needs_a_direction_to_compare(dense_case, capsys, count):
    """--directions 0 compared nothing with finite differences and said "all gradients agree"."""
    with pytest.raises(SystemExit) as e:
        gradcheck.main(["--directions", count])
    assert e.value.code == 2 and "argument --directions: must be a positive integer" in capsys.readouterr().err
    with pytest.raises(ValueError, match="directions must be 1 or more"):
        gradcheck.check_case(dense_case, directions=int(count))


def test_gradcheck_command_exits_zero(capsys):
    assert gradcheck.main(["--only", "cross-entropy", "--directions", "1"]) == 0
    out = capsys.readouterr().out
    assert "vs finite diff" in out and "all gradients agree" in out


def test_gradcheck_command_prints_each_case_as_it_is_checked(dense_case, monkeypatch, capsys):
    """Rows come out case by case, not all at the end: here a later case breaks, and the rows of
    the one before it have been printed already."""
    def stop(i):
        raise RuntimeError("the second case")
    good = dense_case
    monkeypatch.setattr(gradcheck, "all_cases", lambda seed: [good, cases.Case("broken", good.inputs, stop, None)])
    with pytest.raises(RuntimeError, match="the second case"):
        gradcheck.main(["--directions", "1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("dense ")]
    assert sorted(r[1] for r in rows) == ["b", "w", "x"] and all(r[-1] == "ok" for r in rows)


def test_gradcheck_columns_line_up_with_a_long_case_name(dense_case, monkeypatch, capsys):
    """The layer column is as wide as the longest case name (the whole model's block cases run
    past 52 characters), so every row's tensor column starts under the header's."""
    long = cases.Case("a case name longer than the old fifty-two character column", dense_case.inputs,
                      dense_case.forward, dense_case.backward)
    monkeypatch.setattr(gradcheck, "all_cases", lambda seed: [dense_case, long])
    assert gradcheck.main(["--directions", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    column = lines[0].index("tensor")
    assert lines[1] == "-" * len(lines[0])  # the rule under the header spans it
    rows = [line for line in lines[2:] if line.endswith(" ok")]
    assert len(rows) == 6 and all(row[column - 1] == " " and row[column] != " " for row in rows)


def test_the_readme_quotes_the_gradchecks_own_counts():
    """The README's `python -m oracle.gradcheck` excerpt ends with 'N tensors in M cases': the
    cases and input tensors all_cases() has now (and the timing table's 'the float64 proof: N
    tensors' the same N), so a case added is a README to rerun; a failure says which lines."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    quoted = {tuple(map(int, m)) for m in re.findall(r"(\d+) tensors in (\d+) cases", readme)}
    with jax.enable_x64(True):
        all_cases = cases.all_cases(0)
    tensors = sum(len(jax.tree_util.tree_leaves(c.inputs)) for c in all_cases)
    now = f"{tensors} tensors in {len(all_cases)} cases"
    assert quoted == {(tensors, len(all_cases))}, (
        f"README.md quotes {sorted(quoted)} as (tensors, cases); all_cases() has {now} now. "
        f"Rerun `python -m oracle.gradcheck` and paste its '{now}; worst relative error: ...' "
        f"line (the one before 'all gradients agree') over the old one at the end of the excerpt "
        f"in README.md's section 'The proof: `python -m oracle.gradcheck`'")
    assert re.findall(r"the float64 proof: (\d+) tensors", readme) == [str(tensors)], (
        f"README.md's timing table in section 'Two commands' (the `python -m oracle.gradcheck` "
        f"row) should say 'the float64 proof: {tensors} tensors'; rerun the gradcheck with `time` "
        f"and update that row's count (and its times, if they moved)")
