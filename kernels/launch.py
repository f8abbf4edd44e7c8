"""How a Triton kernel runs, as a value: ``COMPILED`` (through jax-triton, on a GPU) or
``INTERPRETED`` (Triton's interpreter on the CPU behind ``jax.pure_callback``,
kernels/interpreter.py), both ``Launcher``s. A kernel file takes the launcher, launches through
``launcher.launch(...)`` and asks it what it needs to know (does shared memory bound a tile? how
large should a program's tile be?); it never asks which launcher it has.

Calling convention shared by both launchers (and so by every kernel signature in kernels/):

    kernel(*input_pointers, *output_pointers, **constexprs)

Inputs are jax arrays (passed as pointers, contiguous, row-major), outputs are described by
``jax.ShapeDtypeStruct``s and come back as a tuple of arrays, and every scalar (sizes, strides,
eps, flags, tile sizes) is a ``tl.constexpr`` passed by keyword. jax-triton 0.3.1 lays a call out
exactly like that: positional arrays, then one pointer per ``out_shape``, then the keywords as
compile-time constants; the interpreter path below does the same.

Which jax-triton works, as far as lowering for cuda sm_90 on a CPU shows (``python -m
kernels.lowering_check``; on a GPU only 0.3.1 has run, on the lent H200 with jax 0.11.2):

- 0.3.1, the one pinned (the ``gpu`` extra): every launch, plain and inside ``poisoned_outputs()``,
  lowers to the legacy ``triton_kernel_call`` custom call, with jax 0.11.2 and 0.12.0.1 on triton
  3.6.0 and with jax 0.10.2 on triton 3.6.0 and 3.9.0.
- 0.4.1 (0.4.0 not checked): plain launches lower (to ``triton_kernel_call_ffi``) with jax 0.11.2 on
  triton 3.9.0, but no poisoned one does: 0.4.x gives an aliased output no pointer parameter of its
  own, so the wrapper kernel below has one parameter per output too many ("ValueError: out_type has
  0 unaliased outputs, but 3 kernel parameters are missing an argument" for _ln_fwd). On triton
  3.6 nothing lowers (it imports ``TMA_TF32`` from triton's NVIDIA driver, absent there, then
  treats the NVIDIA backend as missing: "TypeError: object.__new__() takes exactly one argument"),
  and on jax 0.12.0.1 its DCE rule fails ("_triton_kernel_call_dce_rule() takes 2 positional
  arguments but 3 were given").

Checks only (they cost time or skip the kernel):
- ``poisoned_outputs()``: compiled launches start their outputs as NaN, as the interpreter's
  always do, through a generated wrapper kernel and jax-triton's ``input_output_aliases``.
- ``record_launches()``: note each launch's kernel, grid and constexprs instead of running it
  (kernels/compile_check.py compiles exactly what the ops would launch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import linecache
import os
from collections.abc import Callable

import jax
import numpy as np

from kernels.interpreter import launch_interpreted

# dtypes the kernels accept for activations; statistics are always float32
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(jax.numpy.bfloat16), np.dtype(np.float16))
DOT_PRECISIONS = ("ieee", "tf32", "tf32x3")  # tl.dot input_precision for float32 operands
DIRECTIONS = ("fwd", "bwd")  # a kernel's direction, as the geometries and the tuned table name it

NO_GPU_MESSAGE = (
    "vitfuse fused kernels: no GPU backend (jax.default_backend() == {backend!r}), so the Triton "
    "kernels cannot be compiled. Pass kernels.INTERPRETED (fused_ops(INTERPRETED)) to run them "
    "through Triton's interpreter on the CPU (correct but slow: meant for tests and small checks)."
)


def check_gpu() -> None:
    """The compiled launcher needs JAX's GPU backend; a clear error elsewhere."""
    backend = jax.default_backend()
    if backend != "gpu":
        raise RuntimeError(NO_GPU_MESSAGE.format(backend=backend))


def check_dot_precision(dot_precision: str) -> str:
    if dot_precision not in DOT_PRECISIONS:
        raise ValueError(f"dot_precision must be one of {DOT_PRECISIONS}, got {dot_precision!r}")
    return dot_precision


def check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return direction


def check_dtype(name: str, dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise ValueError(f"{name}: dtype must be one of {names}, got {dtype}")
    return dtype


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


# ----------------------------------------------------------------------------------------------
# the launcher


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
    """Everything one launch needs, as recorded by ``record_launches`` (for compile checks)."""

    kernel: object
    grid: tuple
    inputs: tuple  # jax.ShapeDtypeStruct per input pointer
    outputs: tuple  # jax.ShapeDtypeStruct per output pointer
    num_warps: int
    num_stages: int
    name: str
    constexprs: dict


_RECORDING: list[list[LaunchSpec]] = []


@contextlib.contextmanager
def record_launches():
    """Within this context ``Launcher.launch`` records its arguments and returns zeros instead of
    running a kernel; use it under ``jax.eval_shape`` to learn which kernels a call would launch."""
    specs: list[LaunchSpec] = []
    _RECORDING.append(specs)
    try:
        yield specs
    finally:
        _RECORDING.remove(specs)


@dataclasses.dataclass(frozen=True)
class Launcher:
    """How kernels run, and the facts about that which their geometry depends on.

    name: for descriptions ("jax-triton", "Triton's interpreter").
    on_gpu: the kernels run on a GPU, so shared memory bounds what one tile may hold (the one-tile
        attention kernel, attention.compiled_fits) and the tuned attention table, measured on GPUs,
        applies (kernels/dispatch.py).
    half_dots_in_float32: upcast half-precision ``tl.dot`` operands to float32 (the ``DOT_F32``
        constexpr): Triton's interpreter keeps bfloat16 as raw words (kernels/interpreter.py).
    tile_elements, tile_rows: how large one program's tile should be, at most (layernorm.py): a
        compiled program keeps its tile in registers (near 4K elements, 16 rows); the interpreter
        pays per numpy call, not per element, so it takes tiles up to 64K elements and 64 rows.
    reduce_programs: how many programs a split reduction uses at most (the LayerNorm backward's
        partial dgamma/dbeta): enough to fill a GPU, few in the interpreter.
    """

    name: str
    on_gpu: bool
    half_dots_in_float32: bool
    tile_elements: int
    tile_rows: int
    reduce_programs: int
    run: Callable = dataclasses.field(repr=False)  # (kernel, grid, inputs, outputs, num_warps,
    #                                                 num_stages, name, constexprs) -> outputs

    def check_available(self) -> None:
        """A clear error now, rather than at the first launch, where this launcher cannot run."""
        if self.on_gpu:
            check_gpu()

    def launch(self, kernel, *, grid, inputs, outputs, name: str, num_warps: int = 4,
               num_stages: int = 1, **constexprs):
        """Run ``kernel[grid](*inputs, *outputs, **constexprs)`` and return the outputs as a tuple.

        kernel: a ``@triton.jit`` function; inputs: jax arrays; outputs: ``jax.ShapeDtypeStruct``s.
        Works under ``jax.jit`` either way.
        """
        grid = tuple(int(g) for g in grid)
        outputs = tuple(jax.ShapeDtypeStruct(tuple(o.shape), o.dtype) for o in outputs)
        if _RECORDING:  # kernels.compile_check: note the launch, run nothing
            _RECORDING[-1].append(
                LaunchSpec(kernel, grid, tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in inputs),
                           outputs, num_warps, num_stages, name, dict(constexprs))
            )
            return tuple(jax.numpy.zeros(o.shape, o.dtype) for o in outputs)
        with jax.named_scope(name):
            return self.run(kernel, grid, inputs, outputs, num_warps, num_stages, name, constexprs)


def _launch_compiled(kernel, grid, inputs, outputs, num_warps, num_stages, name, constexprs):
    jax_triton = import_jax_triton()
    extra = {}
    if _POISON_COMPILED:
        # jax-triton 0.3.x hands an aliased output its own pointer parameter as well, so the NaN
        # arrays are extra inputs of a wrapper kernel(*inputs, *nan_inputs, *outputs) whose
        # output pointers are the NaN buffers themselves (input_output_aliases). 0.4.x does not,
        # and rejects this call (see the module docstring)
        n_inputs = len(inputs)
        kernel = _poisoned_wrapper(kernel, n_inputs, len(outputs))
        inputs = list(inputs) + [_poison_fill(o) for o in outputs]
        extra["input_output_aliases"] = {n_inputs + j: j for j in range(len(outputs))}
    result = jax_triton.triton_call(
        *inputs,
        kernel=kernel,
        out_shape=list(outputs),
        grid=grid,
        num_warps=num_warps,
        num_stages=num_stages,
        name=name,
        **extra,
        **constexprs,
    )
    return tuple(result)


def _launch_interpreted(kernel, grid, inputs, outputs, num_warps, num_stages, name, constexprs):
    del num_warps, num_stages, name  # GPU settings; the interpreter runs one program at a time
    return launch_interpreted(kernel, grid, inputs, outputs, constexprs)


COMPILED = Launcher("jax-triton", on_gpu=True, half_dots_in_float32=False, tile_elements=4096,
                    tile_rows=16, reduce_programs=256, run=_launch_compiled)
INTERPRETED = Launcher("Triton's interpreter", on_gpu=False, half_dots_in_float32=True,
                       tile_elements=65536, tile_rows=64, reduce_programs=8, run=_launch_interpreted)


def check_launcher(launcher, what: str = "launcher") -> Launcher:
    if not isinstance(launcher, Launcher):
        raise TypeError(f"{what} must be kernels.COMPILED (jax-triton, GPU) or kernels.INTERPRETED "
                        f"(Triton's interpreter, CPU), got {launcher!r}")
    return launcher


def import_jax_triton():
    """``import jax_triton``, undoing its import-time ``os.environ["TRITON_CACHE_DIR"] = ""``
    (jax-triton 0.3.1; fixed upstream after it), which makes every later ``triton.compile`` in
    the process fail with "Could not create or locate cache dir" (kernels.compile_check does
    such compiles, on the GPU machine too)."""
    before = os.environ.get("TRITON_CACHE_DIR")
    import jax_triton  # noqa: PLC0415  (only importable with a CUDA jaxlib)

    if before is None:
        if os.environ.get("TRITON_CACHE_DIR") == "":
            del os.environ["TRITON_CACHE_DIR"]
    else:
        os.environ["TRITON_CACHE_DIR"] = before
    return jax_triton


# ----------------------------------------------------------------------------------------------
# NaN-poisoned outputs on the compiled path (the interpreter always poisons: kernels/interpreter.py)

_POISON_COMPILED: list[bool] = []


@contextlib.contextmanager
def poisoned_outputs():
    """Compiled launches traced inside this context start their outputs as NaN (ints as -1), as
    the interpreter's always do, so an element a kernel never writes shows up as non-finite.
    It costs one fill per output, so only checks use it (oracle.kernel_gradcheck, the kernel tests).
    Read at trace time: a jitted function traced outside the context stays unpoisoned."""
    _POISON_COMPILED.append(True)
    try:
        yield
    finally:
        _POISON_COMPILED.pop()


def _poison_fill(out):
    value = np.nan if jax.numpy.issubdtype(out.dtype, jax.numpy.floating) else -1
    return jax.numpy.full(out.shape, value, out.dtype)


@functools.cache
def _poisoned_wrapper(kernel, n_inputs: int, n_outputs: int):
    """``@triton.jit`` wrapper(*inputs, *poison, *outputs, *constexprs) that calls
    kernel(*inputs, *outputs, *constexprs); the poison pointers are never read. Triton needs a
    function's source, so the wrapper's is generated and registered with linecache."""
    import triton  # noqa: PLC0415
    import triton.language as tl  # noqa: PLC0415

    names = list(kernel.arg_names)
    pointers, trailing = names[: n_inputs + n_outputs], names[n_inputs + n_outputs:]
    if not all(p.is_constexpr for p in kernel.params[n_inputs + n_outputs:]):
        raise ValueError(f"{kernel.__name__}: parameters after the pointers must be tl.constexpr")
    inputs, outputs = pointers[:n_inputs], pointers[n_inputs:]
    poison = [f"poison_{o}" for o in outputs]
    fn_name = f"{kernel.__name__}_poisoned"
    params = ", ".join(inputs + poison + outputs + [f"{c}: tl.constexpr" for c in trailing])
    source = f"def {fn_name}({params}):\n    kernel({', '.join(pointers + trailing)})\n"
    filename = f"<kernels.launch: {kernel.__module__}.{kernel.__name__} with poisoned outputs>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"__name__": kernel.__module__, "tl": tl, "kernel": kernel}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102  (source generated above)
    return triton.jit(namespace[fn_name])
