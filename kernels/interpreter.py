"""Triton's interpreter, which ``kernels.launch.INTERPRETED`` launches through: the same
``@triton.jit`` source the GPU compiles, run on the CPU with numpy behind ``jax.pure_callback``.

Triton's interpreter runs the Python body of the ``@triton.jit`` function (``kernel.fn``) with
numpy, reading and writing raw host memory through ``data_ptr()``. It was written for torch
tensors, so ``_HostTensor`` below is the small part of the torch tensor API it calls (see
``GridExecutor._init_args_hst`` / ``_restore_args_dev`` and ``mangle_type`` in
triton/runtime/interpreter.py and jit.py; the same in triton 3.6 and 3.9). Float outputs are
filled with NaN before the run ("poison"), so an element a kernel forgets to write shows up as NaN.

Two interpreter gaps are closed for the duration of a launch (``_interpreted_device_calls``):
calls to library ``@triton.jit`` functions (tl.sum, tl.max) and float32 -> bfloat16 rounding.

Known interpreter limitation (triton 3.6 and 3.9): it keeps bfloat16 data as raw uint16 words, so a
bf16 ``tl.dot`` or bf16 arithmetic gives garbage. The kernels therefore compute in float32 after
every load and take a ``DOT_F32`` constexpr that upcasts half-precision dot operands to float32 (set
where the launcher says ``half_dots_in_float32``: ``launch.INTERPRETED``); products of bf16 values
are exact in float32, so this equals a bf16 MMA with float32 accumulation up to summation order.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import types

import jax
import numpy as np

# The interpreter patches triton.language globally while it runs and keeps the grid position in
# a module-level builder, so two callbacks must never run at the same time.
_INTERPRETER_LOCK = threading.Lock()


def launch_interpreted(kernel, grid, inputs, outputs, constexprs):
    """The interpreted launch under jax: a pure_callback into run_interpreted (any jit, vmap)."""
    if not host_platform_present():
        raise RuntimeError(
            "Triton's interpreter (kernels.INTERPRETED, --interpret) runs the kernels on the host "
            "through jax.pure_callback, which needs JAX's cpu platform, and JAX_PLATFORMS="
            f"{os.environ.get('JAX_PLATFORMS')!r} leaves it out: list it too (e.g. "
            "JAX_PLATFORMS=cuda,cpu), or run the compiled kernels (kernels.COMPILED) on the GPU")
    host_fn = functools.partial(run_interpreted, kernel, grid, outputs, constexprs)
    result = jax.pure_callback(host_fn, list(outputs), *inputs, vmap_method="sequential")
    return tuple(result)


@functools.cache
def host_platform_present() -> bool:
    """Whether JAX has its cpu platform, where jax.pure_callback places a callback's inputs
    (JAX_PLATFORMS=cuda alone leaves it out: seen on an H200, a cryptic error at run time)."""
    try:
        return bool(jax.devices("cpu"))
    except RuntimeError:
        return False


def run_interpreted(kernel, grid, outputs, constexprs, *inputs, poison=True):
    """Host side: numpy in, numpy out. Outputs start as NaN when ``poison`` (always, via launch)."""
    host_inputs = [np.ascontiguousarray(np.asarray(a)) for a in inputs]
    host_outputs = [
        np.full(o.shape, np.nan, o.dtype)
        if poison and jax.numpy.issubdtype(o.dtype, jax.numpy.floating) else np.zeros(o.shape, o.dtype)
        for o in outputs
    ]
    run_on_host(kernel, grid, host_inputs + host_outputs, constexprs)
    return tuple(host_outputs)


def run_on_host(kernel, grid, arrays, constexprs):
    """kernel[grid](*arrays, **constexprs) in the interpreter, reading and writing the
    C-contiguous numpy ``arrays`` in place (one interpreted launch at a time)."""
    from triton.runtime.interpreter import InterpretedFunction  # noqa: PLC0415

    fn = InterpretedFunction(getattr(kernel, "fn", kernel))
    args = [_HostTensor(a) for a in arrays]
    with _INTERPRETER_LOCK, _interpreted_device_calls():
        fn[grid](*args, **constexprs)


@contextlib.contextmanager
def _interpreted_device_calls():
    """Two adjustments to Triton's interpreter for the duration of one interpreted launch.

    1. Let the kernel call other ``@triton.jit`` functions (tl.max, tl.sum, ... are such functions
       in triton.language.standard). With TRITON_INTERPRET=1 set before triton is imported,
       ``triton.jit`` makes every function an ``InterpretedFunction``; we decide per call instead,
       so those library functions stay ``JITFunction``s whose ``__call__`` refuses to run outside
       a compiled kernel. Here ``JITFunction.__call__`` runs the function's Python body, with
       ``triton.language`` patched for the interpreter: ``tl`` by the launch itself, ``tl.core``
       (what the library functions see) by us, once per launch and *before* the launch patches
       ``tl``, so that the two patches unwind in reverse order (they share ``tl.tensor``) and
       nothing leaks into later compiled launches. (Patching around each call instead cost a
       fifth of an interpreted attention launch.)
    2. Round float32 -> bfloat16 to nearest even, as the GPU does (``x.to(tl.bfloat16)`` defaults
       to RTNE); the interpreter (3.6 and 3.9) truncates toward zero there, a bias of up to one
       bf16 ulp that the reference (XLA, RTNE) does not have.
    """
    from triton.runtime import interpreter as interp  # noqa: PLC0415
    from triton.runtime.jit import JITFunction  # noqa: PLC0415
    import triton.language as tl  # noqa: PLC0415

    def device_call(jit_fn, *args, **kwargs):
        return interp.InterpretedFunction(jit_fn.fn).rewrite()(*args, **kwargs)

    builder_cls = interp.InterpreterBuilder
    original_trunc = builder_cls.create_fp_trunc

    def fp_trunc_rtne(builder, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = np.asarray(src.data, np.float32).astype(_BF16).view(np.uint16)
            return interp.TensorHandle(data, dst_type.scalar)
        return original_trunc(builder, src, dst_type)

    # tl.core patched once, before the launch patches tl (see 1. above); _patch_lang reads only
    # a function's __globals__, so a stand-in that sees tl.core alone will do.
    core_scope = interp._patch_lang(types.SimpleNamespace(__globals__={"core": tl.core}))
    original_call = JITFunction.__call__
    try:
        JITFunction.__call__ = device_call
        builder_cls.create_fp_trunc = fp_trunc_rtne
        yield
    finally:
        JITFunction.__call__ = original_call
        builder_cls.create_fp_trunc = original_trunc
        core_scope.restore()


_BF16 = np.dtype(jax.numpy.bfloat16)


class _HostTensor:
    """A numpy array dressed as the torch tensor Triton's interpreter expects.

    The interpreter copies each argument's storage "to the host" (``untyped_storage().cpu()``,
    ``new_empty().set_(...)``), runs, then copies back (``copy_``). Our memory already is host
    memory, so every one of those steps returns this same object and the kernel reads and writes
    the numpy buffer in place through ``data_ptr()``. ``dtype`` is a string such as "float32" or
    "bfloat16": Triton maps ``str(dtype).split('.')[-1]`` to its own type names.
    """

    def __init__(self, array: np.ndarray):
        if not array.flags.c_contiguous:
            raise ValueError("interpreter launcher: arrays must be C-contiguous")
        self.array = array
        self.dtype = str(array.dtype)
        self.device = "cpu"

    def data_ptr(self) -> int:
        return self.array.ctypes.data

    def untyped_storage(self):
        return self

    def cpu(self):
        return self

    def new_empty(self, *args, **kwargs):
        return self

    def set_(self, *args, **kwargs):
        return self

    def copy_(self, other):
        return self

    def storage_offset(self) -> int:
        return 0

    def size(self):
        return tuple(self.array.shape)

    def stride(self):
        return tuple(s // self.array.itemsize for s in self.array.strides)
