"""Shared by the kernel tests: the interpreted fused ops, and the assertion on gradcheck rows."""

import pytest

from kernels import fused_ops


@pytest.fixture(scope="module")
def ops():
    """The fused ops through Triton's interpreter (the same kernel source a GPU compiles)."""
    return fused_ops(interpret=True)


def assert_all_close(rows, tol):
    """rows from kernels.gradcheck.compare: no non-finite value, relative error within tol."""
    for name, shape, max_abs, rel, nonfinite, _ in rows:
        assert nonfinite == 0, f"{name}{shape}: {nonfinite} non-finite values (unwritten or overflow)"
        assert rel <= tol, f"{name}{shape}: rel error {rel:.2e} (max abs {max_abs:.2e}) > {tol:g}"
