"""Proof of every hand-written gradient, in float64:  python -m oracle.gradcheck

For each layer type and for the whole model (both norm layouts, a small config) the hand-written
backward is compared with
  * central finite differences: a 4-point stencil (f(-2h) - 8 f(-h) + 8 f(h) - f(2h)) / 12h along
    unit directions u of every input and parameter tensor (the gradient's own direction, then
    the gradient plus random unit vectors), against <grad, u>;
  * JAX autodiff (oracle.autodiff_vjp, outside the product) on the whole gradient tensor.
The scalar differentiated is f = sum(y * w) with a fixed random w, so the backward is fed dy = w.
One row per layer and tensor; exits 1 if any row is above tolerance.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from cmdline import positive_int
from oracle import autodiff_vjp
from oracle.gradient_cases import Case, all_cases, keys, normal

FD_TOL = 1e-8          # relative error against finite differences (the bound)
AUTODIFF_TOL = 1e-10   # relative error against autodiff (both are exact up to rounding)


# ----------------------------------------------------------------------------------------------
# checking


@dataclass
class Row:
    case: str
    tensor: str
    shape: tuple
    fd_rel_err: float
    autodiff_rel_err: float

    @property
    def ok(self) -> bool:
        return self.fd_rel_err <= FD_TOL and self.autodiff_rel_err <= AUTODIFF_TOL


def _path_name(path):
    return "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def check_case(case: Case, seed=0, directions=3, h=1e-4) -> list[Row]:
    """Compare the hand-written gradient of every input tensor with FD and autodiff.

    The directions and the moved inputs are numpy arrays: as JAX ops, every new array shape cost
    XLA a compilation, which was most of this check's time. (Jitting the forward and backward
    would save more on the layer cases and lose more on the model cases, whose op-by-op
    compilations are shared by all their blocks.)"""

    if directions < 1:  # none would compare nothing with finite differences, and pass
        raise ValueError(f"directions must be 1 or more, got {directions}")
    inputs = case.inputs
    y, cache = case.forward(inputs)
    y_leaves, y_tree = jax.tree_util.tree_flatten(y)
    w_out = jax.tree_util.tree_unflatten(
        y_tree, [normal(k, leaf.shape) for leaf, k in zip(y_leaves, keys(seed + 99, len(y_leaves)))])
    grads = case.backward(inputs, cache, w_out)
    oracle = autodiff_vjp(lambda i: case.forward(i)[0], inputs, w_out)

    @jax.jit
    def objective(i):
        # sum((y(i) - y(inputs)) * w): subtracting y first keeps the sum small, so less of the
        # finite difference is lost to rounding; the constant offset does not change the slope.
        out = case.forward(i)[0]
        return sum(jnp.sum((a - a0) * b) for a, a0, b in zip(
            jax.tree_util.tree_leaves(out), y_leaves, jax.tree_util.tree_leaves(w_out)))

    flat_in, in_tree = jax.tree_util.tree_flatten_with_path(inputs)
    flat_g = jax.tree_util.tree_leaves(grads)
    flat_ad = jax.tree_util.tree_leaves(oracle)
    if not (len(flat_in) == len(flat_g) == len(flat_ad)):
        raise AssertionError(f"{case.name}: backward returned {len(flat_g)} gradients for "
                             f"{len(flat_in)} inputs")
    leaves = [np.asarray(a) for _, a in flat_in]
    rows = []
    for idx, ((path, leaf), g, ad) in enumerate(zip(flat_in, flat_g, flat_ad)):
        if g.shape != leaf.shape:
            raise AssertionError(f"{case.name}: gradient of {_path_name(path)} has shape "
                                 f"{g.shape}, input has {leaf.shape}")
        g, ad = np.asarray(g, np.float64), np.asarray(ad, np.float64)
        if not np.any(ad):
            # A gradient that is exactly zero (say, drop-path removed the branch for every
            # example) proves nothing and finite differences only see rounding noise there.
            raise AssertionError(f"{case.name}: the gradient of {_path_name(path)} is identically "
                                 "zero for these inputs; pick inputs that exercise it")
        ad_err = float(np.linalg.norm((g - ad).ravel()) /
                       max(float(np.linalg.norm(ad.ravel())), 1e-300))
        fd_err = 0.0
        # Directions: the gradient itself, then the gradient plus a random unit vector. Both keep
        # <grad, u> well away from 0 (a purely random u can be nearly orthogonal to the gradient,
        # and a relative error of a near-zero slope measures only rounding), while the random
        # part still tests every component the gradient might have wrong.
        g_unit = g / np.linalg.norm(g.ravel())
        for n, kd in enumerate(keys(seed * 1000 + idx, directions)):
            u = g_unit
            if n:
                r = np.asarray(normal(kd, leaf.shape), np.float64)
                u = u + r / np.linalg.norm(r.ravel())
            u = u / np.linalg.norm(u.ravel())

            def at(t, u=u, idx=idx):
                moved = list(leaves)
                moved[idx] = leaves[idx] + t * u
                return float(objective(jax.tree_util.tree_unflatten(in_tree, moved)))
            fd = (at(-2 * h) - 8 * at(-h) + 8 * at(h) - at(2 * h)) / (12 * h)
            an = float(np.vdot(g.ravel(), u.ravel()))
            fd_err = max(fd_err, abs(fd - an) / max(abs(fd), abs(an), 1e-300))
        rows.append(Row(case.name, _path_name(path), tuple(leaf.shape), fd_err, ad_err))
    return rows


def header(layer_width: int) -> str:
    return (f"{'layer':<{layer_width}} {'tensor':<26} {'shape':<14} {'vs finite diff':>14} "
            f"{'vs autodiff':>12}  ok")


def format_row(r: Row, layer_width: int) -> str:
    return (f"{r.case:<{layer_width}} {r.tensor:<26} {str(r.shape).replace(' ', ''):<14} "
            f"{r.fd_rel_err:>14.2e} {r.autodiff_rel_err:>12.2e}  {'ok' if r.ok else 'FAIL'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m oracle.gradcheck",
        description="Check every hand-written gradient in float64 against central finite "
                    f"differences (relative error <= {FD_TOL:g}) and JAX autodiff "
                    f"(<= {AUTODIFF_TOL:g}). Exits 1 if any row fails.")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--directions", type=positive_int, default=3,
                        help="directions per tensor for the finite differences: the gradient's "
                             "own, then the gradient plus a random one (default: %(default)s)")
    parser.add_argument("--only", default=None,
                        help="check only cases whose name contains this text (e.g. 'block')")
    args = parser.parse_args(argv)
    with jax.enable_x64(True):
        return _run(parser, args)


def _run(parser, args) -> int:
    cases = all_cases(args.seed)
    if args.only:
        cases = [c for c in cases if args.only.lower() in c.name.lower()]
        if not cases:
            parser.error(f"--only {args.only!r} matches no case")
    width = max(len(c.name) for c in cases)  # the layer column, known before any row is checked
    top = header(width)
    print(f"{top}\n{'-' * len(top)}", flush=True)
    rows = []
    for case in cases:  # each case's rows as soon as it is checked (the whole run takes ~40 s)
        case_rows = check_case(case, args.seed, args.directions)
        print("\n".join(format_row(r, width) for r in case_rows), flush=True)
        rows += case_rows
    bad = [r for r in rows if not r.ok]
    worst_fd = max(r.fd_rel_err for r in rows)
    worst_ad = max(r.autodiff_rel_err for r in rows)
    print(f"\n{len(rows)} tensor{'s' * (len(rows) != 1)} in {len(cases)} case{'s' * (len(cases) != 1)}; "
          "worst relative error: "
          f"{worst_fd:.2e} vs finite differences (tolerance {FD_TOL:g}), "
          f"{worst_ad:.2e} vs autodiff (tolerance {AUTODIFF_TOL:g})")
    if bad:
        print(f"FAILED: {len(bad)} tensor(s) above tolerance", file=sys.stderr)
        return 1
    print("all gradients agree")
    return 0


if __name__ == "__main__":
    from vit.signals import exit_code_of_a_check

    sys.exit(exit_code_of_a_check(main, "python -m oracle.gradcheck"))
