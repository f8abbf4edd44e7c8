"""Compile every kernel for NVIDIA GPUs on a machine without one: ``python -m kernels.compile_check``.

The interpreter runs a kernel's Python body with numpy and accepts code the real compiler rejects
(type mismatches in tl.dot, bad block shapes, ...), and it says nothing about resources. This runs
the real Triton compiler (frontend, TritonGPU passes, LLVM, ptxas, all bundled in the triton wheel)
for sm_80 and sm_90 on exactly the launches the fused ops make (recorded through
``kernels.launch.record_launches`` under ``jax.eval_shape``, so the constexprs are the launcher's
own), and checks each kernel's shared memory against the device limit. It also reads each
cubin's resource usage with the cuobjdump bundled in the triton wheel: registers per thread and
stack bytes per thread (a kernel at the 255-register cap with a stack is spilling registers to
local memory, which costs memory traffic on every step of its loop); a spilling kernel is shown
as "spills" but not counted as a failure (it is slow, not wrong).

    python -m kernels.compile_check                 # product shapes + the awkward ones, sm_80/sm_90
    python -m kernels.compile_check --arch 90 --quick
    python -m kernels.compile_check --only flash    # cases whose label contains "flash"

Cases: "attn" the one-tile attention (kernels/attention.py) at the shapes it serves; "flash" the
key-blocked attention (kernels/flash_attention.py) at the standard ViT shapes (L = 65, 197,
577, 4096 and 8192; Dh 32, 64, 128) and small awkward ones, with the blocks the dispatcher gives
it when no tuned table row applies; "ln" the residual + LayerNorm kernels at the product's and
the standard ViT sizes' widths.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from kernels import attention, dispatch, layernorm
from kernels.launch import COMPILED, record_launches

# bytes of shared memory one block may use (opt-in maximum), per compute capability
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
_TRITON_TYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _attention_launches(b, l, heads, dh, dtype, keep, dot_precision, kernel="one-tile"):
    """The launches of fused_ops(attention_kernel=kernel): forward, then backward."""
    d = heads * dh
    qkv = jax.ShapeDtypeStruct((b, l, 3 * d), dtype)
    ks = jax.ShapeDtypeStruct((b, heads, l, l), dtype) if keep else None

    def run(qkv, ks):
        o, cache = dispatch.attention_forward(qkv, heads, ks, launcher=COMPILED,
                                              dot_precision=dot_precision, kernel=kernel)
        return dispatch.attention_backward(cache, o, launcher=COMPILED, dot_precision=dot_precision,
                                           kernel=kernel)

    with record_launches() as specs:
        jax.eval_shape(run, qkv, ks)
    return specs


def _layernorm_launches(m, n, dtype, residual):
    x = jax.ShapeDtypeStruct((m, n), dtype)
    params = {"gamma": jax.ShapeDtypeStruct((n,), jnp.float32), "beta": jax.ShapeDtypeStruct((n,), jnp.float32)}

    def run(params, x, r):
        y, cache = layernorm.add_layernorm_forward(params, x, r, 1e-6, launcher=COMPILED)
        return layernorm.add_layernorm_backward(params, cache, y, launcher=COMPILED)

    with record_launches() as specs:
        jax.eval_shape(run, params, x, x if residual else None)
    return specs


def cases(quick: bool):
    """(label, specs) for every configuration to compile."""
    # the product shape, small ones, and the largest tiles attention.compiled_fits admits
    # (the dispatcher's rule sends it only L <= 128 with Dh <= 32; the others show why)
    att = [(64, 65, 8, 32), (2, 17, 2, 16), (2, 1, 4, 128), (2, 64, 2, 64), (2, 32, 2, 128),
           (2, 197, 2, 32), (2, 100, 2, 64), (2, 33, 2, 128), (2, 197, 2, 64), (2, 100, 2, 128)]
    # key-blocked: the product shape, ViT-S/B at 224 px (L=197) and 384 px (L=577), long
    # sequences at Dh 64 and 128, and small awkward ones
    flash = [(64, 65, 8, 32), (2, 197, 6, 64), (2, 577, 6, 64), (2, 4096, 4, 64), (2, 4096, 4, 128),
             (1, 8192, 2, 64), (2, 17, 2, 16), (2, 1, 4, 128)]
    # add+LN: the product shape, the standard sizes' widths at 224 px (ViT-Ti 192, S 384, B 768,
    # L 1024; 197 tokens) and small awkward ones
    lns = [(64 * 65, 256), (2 * 197, 192), (2 * 197, 384), (2 * 197, 768), (2 * 197, 1024),
           (100, 1000), (7, 64)]
    dtypes = [jnp.float32, jnp.bfloat16]
    if quick:
        att, flash, lns = att[:1], flash[:2], lns[:1]
    for b, l, h, dh in flash:
        for dtype, dot_precision in ((jnp.float32, "ieee"), (jnp.float32, "tf32"), (jnp.float32, "tf32x3"),
                                     (jnp.bfloat16, "ieee")):
            for keep in (False, True):
                name = dispatch.dtype_key(dtype, dot_precision)
                label = f"flash B={b} L={l} H={h} Dh={dh} {name}{' keep' if keep else ''}"
                yield label, _attention_launches(b, l, h, dh, dtype, keep, dot_precision, "key-blocked")
    for b, l, h, dh in att:
        for dtype in dtypes:
            for dot_precision in ("ieee", "tf32", "tf32x3") if dtype == jnp.float32 else ("ieee",):
                if not attention.compiled_fits(l, dh, dtype, dot_precision):
                    continue
                for keep in (False, True):
                    name = jnp.dtype(dtype).name + (f"/{dot_precision}" if dtype == jnp.float32 else "")
                    label = f"attn B={b} L={l} H={h} Dh={dh} {name}{' keep' if keep else ''}"
                    yield label, _attention_launches(b, l, h, dh, dtype, keep, dot_precision)
    for m, n in lns:
        for dtype in dtypes:
            for residual in (False, True):
                label = f"ln M={m} N={n} {jnp.dtype(dtype).name}{' +r' if residual else ''}"
                yield label, _layernorm_launches(m, n, dtype, residual)


def _signature(spec):
    """Triton signature for ASTSource: pointers for inputs then outputs, then the constexprs."""
    kernel = spec.kernel
    pointers = list(spec.inputs) + list(spec.outputs)
    names = [n for n in kernel.arg_names if n not in spec.constexprs]
    if len(names) != len(pointers):
        raise ValueError(f"{spec.name}: {len(pointers)} arrays for pointer params {names}")
    sig = {n: "*" + _TRITON_TYPE[jnp.dtype(p.dtype).name] for n, p in zip(names, pointers)}
    sig.update({n: "constexpr" for n in spec.constexprs})
    return {n: sig[n] for n in kernel.arg_names}


def compile_spec(spec, arch: int):
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    # every pointer 16-byte aligned, as jax-triton 0.3.1 specializes them (XLA's buffers are), so
    # that loads and stores vectorize here as they do in the kernels a GPU runs
    pointers = len(spec.inputs) + len(spec.outputs)
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(pointers)}
    src = ASTSource(spec.kernel, _signature(spec), dict(spec.constexprs), attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={
        "num_warps": spec.num_warps,
        "num_stages": spec.num_stages,
        "enable_fp_fusion": True,  # jax-triton 0.3.1's default
    })


def _cuobjdump() -> str | None:
    import triton  # noqa: PLC0415
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


def resource_usage(compiled) -> dict | None:
    """{"regs", "stack"} per thread of a compiled kernel's cubin, or None without cuobjdump."""
    tool = _cuobjdump()
    if tool is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True,
                             check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return {"regs": int(match.group(1)), "stack": int(match.group(2))} if match else None


def _tile(spec) -> str:
    """Rows x columns of the kernel's tiles: BLOCK_M x BLOCK_N (key-blocked), BLOCK_M x BLOCK_L
    (one-tile: the padded sequence), or rows x width (LayerNorm, the delta kernel)."""
    c = spec.constexprs
    rows = c.get("BLOCK_M")
    cols = c.get("BLOCK_N", c.get("BLOCK_L", c.get("DH")))
    return f"{rows}x{cols}" if rows and cols else "-"


ARCHS = (80, 86, 87, 89, 90, 100, 120)  # compute capabilities from Ampere on (sm_80)


def compute_capability(text: str) -> int:
    """--arch's type: 90 or sm_90, one of ARCHS (0 crashed inside Triton's compiler, -1 failed
    every kernel, sm_90 was refused)."""
    value = text.removeprefix("sm_")
    if not value.isdigit() or int(value) not in ARCHS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a compute capability the kernels are "
                                         f"for: give one of {', '.join(map(str, ARCHS))}")
    return int(value)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels.compile_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=compute_capability, nargs="+", default=[80, 90],
                    help=f"compute capabilities, of {', '.join(map(str, ARCHS))} (sm_90 or 90)")
    ap.add_argument("--quick", action="store_true", help="the first case of each kind only: the product shapes "
                    "(and, for the key-blocked kernel, ViT-S/16's L = 197)")
    ap.add_argument("--only", default=None, metavar="TEXT", help="only cases whose label contains TEXT")
    args = ap.parse_args(argv)
    selected = [(label, specs) for label, specs in cases(args.quick)
                if not args.only or args.only in label]
    if not selected:  # compiling nothing proves nothing: not "all kernels compile"
        ap.error(f"--only {args.only!r} matches no case")
    import triton  # noqa: PLC0415

    print(f"triton {triton.__version__}, jax {jax.__version__}; compiling for "
          f"{', '.join(f'sm_{a}' for a in args.arch)}")
    print(f"{'case':<48} {'kernel':<24} {'tile':>8} {'arch':>4} {'warps':>5} {'smem B':>8} {'regs':>4} "
          f"{'stack':>5} {'sec':>5}  ok")
    failures = spilling = 0
    seen = set()
    for label, specs in selected:
        for spec in specs:
            for arch in args.arch:
                key = (spec.name, tuple(sorted((k, str(v)) for k, v in spec.constexprs.items())),
                       tuple(str(a.dtype) for a in spec.inputs), arch)
                if key in seen:
                    continue
                seen.add(key)
                t0 = time.perf_counter()
                usage = None
                try:
                    compiled = compile_spec(spec, arch)
                    shared = compiled.metadata.shared
                    limit = SHARED_LIMIT.get(arch, 101376)
                    ok = shared <= limit
                    note = "" if ok else f"  shared memory over the sm_{arch} limit {limit}"
                    usage = resource_usage(compiled)
                except Exception as e:  # report every failing configuration, then exit non-zero
                    shared, ok, note = -1, False, f"  {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                failures += not ok
                spills = bool(usage and usage["stack"] > 0)
                spilling += spills
                regs, stack = (usage["regs"], usage["stack"]) if usage else ("?", "?")
                dt = time.perf_counter() - t0
                print(f"{label:<48} {spec.name:<24} {_tile(spec):>8} {arch:>4} {spec.num_warps:>5} {shared:>8} {regs:>4} "
                      f"{stack:>5} {dt:>5.1f}  {'ok' if ok else 'FAIL'}{' spills' if spills else ''}{note}")
    print("all kernels compile" if not failures else f"{failures} compile failure(s)")
    if _cuobjdump() is None:
        print("registers and stack not read: no cuobjdump in the triton wheel or on PATH")
    else:
        print(f"{spilling} kernel(s) spill registers (stack > 0)" if spilling else "no kernel spills registers")
    return 1 if failures else 0


if __name__ == "__main__":
    from vit.signals import exit_code_of_a_check

    sys.exit(exit_code_of_a_check(main, "python -m kernels.compile_check"))
