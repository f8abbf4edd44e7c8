"""Lower every fused kernel and the whole fused train step for an NVIDIA GPU, on a machine without
one, through the real jax-triton: ``python -m kernels.lowering_check``.

``kernels.compile_check`` runs Triton's compiler on the launches; this goes through jax-triton's
own lowering rule, so the calling convention of kernels/launch.py is checked against the real
library instead of our reading of it. Each case is jitted and lowered to StableHLO for the
platform "cuda" (``jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))``), plainly and
(once per kernel and dtype, see ``cases()``) inside ``kernels.launch.poisoned_outputs()``, and the
module must hold one ``triton_kernel_call``
custom call per launch that ``kernels.launch.record_launches`` records for the same function.
Each call's backend config (a zlib-compressed ``TritonAnyKernelCall`` protobuf, see
jaxlib/gpu/triton.proto) is decoded and must carry the launch's name (``vitfuse_attn_fwd``, ...),
its Triton function, grid, warps and pointer count, and PTX whose ``.target`` is ``sm_<arch>a``.
Without poisoning, each call's PTX must also be what ``kernels.compile_check`` compiles for the
launch, byte for byte but the source paths.

jax-triton asks the GPU for its compute capability (``jaxlib.gpu_triton.get_compute_capability``);
here there is none, so that function is replaced by one returning ``--arch``.

It needs three packages on ``sys.path`` that the product does not: jax-triton 0.3.1, absl-py
(which jax-triton imports) and the jax CUDA plugin of exactly the installed jaxlib's version, for
its ``_triton`` module (``jax-cuda13-plugin`` alone, without the ``jax-cuda13-pjrt`` wheel and the
CUDA libraries, gives jax no CUDA backend, and its ``_triton`` module loads without a driver).
They go into a folder of their own, never into site-packages:

    python -m kernels.lowering_check --install .lowering-site    # pip --no-deps --target
    PYTHONPATH=.lowering-site python -m kernels.lowering_check   # the check (JAX_PLATFORMS=cpu)

The folder must come first on PYTHONPATH (jax imports the plugin when jax itself is imported).
``tests/test_lowering.py`` runs this module in a subprocess and asserts on its ``--json`` report.
Exit status: 0 if every case lowers as expected, 1 if any does not, 2 if the packages are missing.

Long because: one check end to end (its packages, jax-triton's protobuf, the cases, the two
comparisons, the command), and no part of it serves anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
import time
import zlib
from collections import Counter

JAX_TRITON = "jax-triton==0.3.1"
PLUGIN = "jax-cuda13-plugin"
DEFAULT_SITE = ".lowering-site"


# ----------------------------------------------------------------------------------------------
# the packages


def install_command(target: str) -> list[str]:
    """pip command that puts jax-triton, absl-py and the CUDA plugin matching the installed
    jaxlib into ``target`` (no dependencies: jax, jaxlib and triton are already installed)."""
    jaxlib_version = importlib.metadata.version("jaxlib")
    return [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade",
            "--target", target, JAX_TRITON, "absl-py", f"{PLUGIN}=={jaxlib_version}"]


def missing_packages() -> list[str]:
    """What of jax-triton, absl-py and a CUDA plugin's ``_triton`` module this process lacks."""
    # found, not imported: importing jax_triton clears TRITON_CACHE_DIR (launch.import_jax_triton)
    missing = [f"{module} (no module named {module!r})" for module in ("absl", "jax_triton")
               if importlib.util.find_spec(module) is None]
    from jax._src.lib import gpu_triton  # noqa: PLC0415

    if not hasattr(gpu_triton, "get_compute_capability"):
        missing.append(f"the _triton module of {PLUGIN} (or jax-cuda12-plugin) matching jaxlib "
                       f"{importlib.metadata.version('jaxlib')}")
    return missing


# ----------------------------------------------------------------------------------------------
# the backend config: a zlib-compressed TritonAnyKernelCall (jaxlib/gpu/triton.proto)
#
#   TritonAnyKernelCall { TritonKernelCall kernel_call = 1; TritonAutotunedKernelCall
#                         autotuned_kernel_call = 2; bytes metadata = 3; string name = 4; }
#   TritonKernelCall    { TritonKernel kernel = 1; uint32 grid_0 = 2, grid_1 = 3, grid_2 = 4;
#                         repeated Parameter parameters = 5; }
#   TritonKernel        { string kernel_name = 1; uint32 num_warps = 2; uint32 shared_mem_bytes = 3;
#                         string ptx = 4; string ttir = 5; uint32 compute_capability = 6; }


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def proto_fields(buf: bytes) -> dict[int, list]:
    """Protobuf wire format -> {field number: [values]} (varints as ints, length-delimited as
    bytes; fixed32/64 as raw bytes). Enough for the messages above."""
    fields: dict[int, list] = {}
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"protobuf: unsupported wire type {wire} (field {number})")
        fields.setdefault(number, []).append(value)
    return fields


# PTX instructions that show how a kernel's float32 dots run: tensor-core instructions taking
# tf32 operands (mma.sync on sm_80 and up, wgmma on sm_90a), and the rounding of a float32 to tf32
# that Triton emits for tf32x3 only (each operand's high part; its low part is the float32 minus
# that), whose dots then take three tensor-core passes each (hi*hi, hi*lo, lo*hi)
TF32_TENSOR_CORE_OP = re.compile(r"^\s*(?:mma\.sync|wgmma\.mma_async)\S*\.tf32\b", re.MULTILINE)
TF32_ROUNDING = re.compile(r"^\s*cvt\.rna\.tf32\.f32\b", re.MULTILINE)


def decode_backend_config(backend_config: bytes) -> dict:
    """The fields of one ``triton_kernel_call``'s backend config that the check compares, and
    counts of the PTX instructions above (tf32_tensor_core_ops, tf32_roundings)."""
    call = proto_fields(zlib.decompress(backend_config))
    if 1 not in call:
        kinds = "an autotuned call" if 2 in call else f"fields {sorted(call)}"
        raise ValueError(f"TritonAnyKernelCall holds {kinds}, not one kernel call")
    kernel_call = proto_fields(call[1][0])
    kernel = proto_fields(kernel_call[1][0])
    ptx = kernel.get(4, [b""])[0].decode()
    target = re.search(r"^\s*\.target\s+(\S+)", ptx, re.MULTILINE)
    return {
        "name": call.get(4, [b""])[0].decode(),
        "kernel": kernel.get(1, [b""])[0].decode(),
        "grid": [kernel_call.get(n, [0])[0] for n in (2, 3, 4)],
        "num_warps": kernel.get(2, [0])[0],
        "params": len(kernel_call.get(5, [])),
        "compute_capability": kernel.get(6, [0])[0],
        "ptx_target": target.group(1) if target else None,
        "ptx_bytes": len(ptx),
        "tf32_tensor_core_ops": len(TF32_TENSOR_CORE_OP.findall(ptx)),
        "tf32_roundings": len(TF32_ROUNDING.findall(ptx)),
        "ptx_digest": ptx_digest(ptx),
    }


def ptx_digest(ptx: str) -> str:
    """sha256 of PTX without its debug information (.file lines and .debug_* sections), which
    holds source paths: Triton's cache, which compile_check reads, keys a kernel by its source
    text, so a checkout elsewhere gets the first checkout's PTX, paths and all."""
    code = re.sub(r"(?m)^\s*\.file\s.*\n", "", ptx)
    code = re.sub(r"(?ms)^\s*\.section\s+\.debug_\w+\s*\{.*?\}\s*$", "", code)
    return hashlib.sha256(code.encode()).hexdigest()


def triton_calls(module) -> list[dict]:
    """Every ``triton_kernel_call`` custom call in a StableHLO module (all functions), decoded,
    with its operand, result and alias counts."""
    from jax._src.lib.mlir import ir  # noqa: PLC0415

    calls = []

    def visit(operation):
        for region in operation.regions:
            for block in region.blocks:
                for op in block.operations:
                    op = op.operation
                    if op.name == "stablehlo.custom_call":
                        target = ir.StringAttr(op.attributes["call_target_name"]).value
                        if target == "triton_kernel_call":
                            config = ir.StringAttr(op.attributes["backend_config"]).value_bytes
                            aliases = (len(ir.ArrayAttr(op.attributes["output_operand_aliases"]))
                                       if "output_operand_aliases" in op.attributes else 0)
                            calls.append({**decode_backend_config(config),
                                          "operands": len(op.operands), "results": len(op.results),
                                          "aliases": aliases})
                    visit(op)

    visit(module.operation)
    return calls


# ----------------------------------------------------------------------------------------------
# the cases: (label, make) where make() returns a fresh (function, argument shapes); fresh, because
# jax.jit caches a trace per function and record_launches / poisoned_outputs act at trace time


def _attention_case(b, l, heads, dh, dtype, keep, dot_precision, kernel="one-tile"):
    import jax  # noqa: PLC0415
    from kernels import dispatch  # noqa: PLC0415
    from kernels.launch import COMPILED  # noqa: PLC0415

    def make():
        def run(qkv, ks):
            launch = dict(launcher=COMPILED, dot_precision=dot_precision, kernel=kernel)
            o, cache = dispatch.attention_forward(qkv, heads, ks, **launch)
            return dispatch.attention_backward(cache, o, **launch)

        d = heads * dh
        args = (jax.ShapeDtypeStruct((b, l, 3 * d), dtype),
                jax.ShapeDtypeStruct((b, heads, l, l), dtype) if keep else None)
        return run, args
    return make


def _layernorm_case(m, n, dtype, residual):
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from kernels import layernorm  # noqa: PLC0415
    from kernels.launch import COMPILED  # noqa: PLC0415

    def make():
        def run(params, x, r):
            y, cache = layernorm.add_layernorm_forward(params, x, r, 1e-5, launcher=COMPILED)
            return layernorm.add_layernorm_backward(params, cache, y, launcher=COMPILED)

        x = jax.ShapeDtypeStruct((m, n), dtype)
        params = {"gamma": jax.ShapeDtypeStruct((n,), jnp.float32),
                  "beta": jax.ShapeDtypeStruct((n,), jnp.float32)}
        return run, (params, x, x if residual else None)
    return make


def _compiled_ops():
    """kernels.fused_ops() as on a GPU: it checks JAX's backend, which here is the CPU we lower on."""
    import jax  # noqa: PLC0415
    from kernels import fused_ops  # noqa: PLC0415

    backend = jax.default_backend
    jax.default_backend = lambda: "gpu"
    try:
        return fused_ops()  # COMPILED
    finally:
        jax.default_backend = backend


def _train_step_case(config, hp, compute_dtype):
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import vit  # noqa: PLC0415
    from vit.step import make_train_step  # noqa: PLC0415

    def make():
        step = make_train_step(config, hp, ops=_compiled_ops(), compute_dtype=compute_dtype)
        params = jax.eval_shape(lambda k: vit.init_params(k, config), jax.random.PRNGKey(0))
        opt_state = jax.eval_shape(vit.adamw_init, params)
        batch = 8
        images = jax.ShapeDtypeStruct((batch, config.image_size, config.image_size, config.channels),
                                      jnp.uint8)
        labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
        key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
        return step, (params, opt_state, images, labels, key)
    return make


def cases():
    """(label, make, poisoned_too) for every kernel configuration and three small whole train
    steps. Each is lowered plainly; poisoned_too: also inside poisoned_outputs(), once per kernel
    and dtype, with every optional input (dropout's keep-scale, the residual), and the two train
    steps that between them launch all eight kernels. What poisoning changes in a lowering is the
    call's operands and aliases (n_in + n_out operands, n_out aliased), which follow from the
    launch's inputs and outputs, not from its dot precision."""
    import jax.numpy as jnp  # noqa: PLC0415
    import vit  # noqa: PLC0415

    b, l, h, dh = 64, 65, 8, 32  # the product's attention shape: the one-tile kernel
    for dtype, dot_precision in ((jnp.float32, "ieee"), (jnp.float32, "tf32"), (jnp.float32, "tf32x3"),
                                 (jnp.bfloat16, "ieee")):
        # tf32x3 once, without dropout: the same geometry as tf32's case, so tests/test_lowering.py
        # can compare their PTX dot by dot
        for keep in (False, True) if dot_precision != "tf32x3" else (False,):
            name = f"{jnp.dtype(dtype).name}/{dot_precision}"
            label = f"attn B={b} L={l} H={h} Dh={dh} {name}{' keep' if keep else ''}"
            yield label, _attention_case(b, l, h, dh, dtype, keep, dot_precision), keep and dot_precision == "ieee"
    b, l, h, dh = 8, 197, 12, 64  # ViT-B/16 at 224 px: the key-blocked kernel
    for dtype, dot_precision, keep in ((jnp.float32, "ieee", True), (jnp.float32, "tf32", False),
                                       (jnp.bfloat16, "ieee", True)):
        name = f"{jnp.dtype(dtype).name}/{dot_precision}"
        label = f"attn key-blocked B={b} L={l} H={h} Dh={dh} {name}{' keep' if keep else ''}"
        yield label, _attention_case(b, l, h, dh, dtype, keep, dot_precision, "key-blocked"), keep
    m, n = 64 * 65, 256  # the product's rows and width
    for dtype in (jnp.float32, jnp.bfloat16):
        for residual in (False, True):
            yield (f"ln M={m} N={n} {jnp.dtype(dtype).name}{' +r' if residual else ''}",
                   _layernorm_case(m, n, dtype, residual), residual)
    small = vit.ViTConfig(image_size=16, patch_size=4, d_model=64, heads=2, layers=2, mlp_dim=128,
                          num_classes=10)
    hp = vit.TrainHParams(crop_pad=2, flip=True, mixup_alpha=0.8, clip_norm=1.0)
    yield ("train step post-norm fp32 dropout",
           _train_step_case(small.replace(dropout=0.1, attn_dropout=0.1, drop_path=0.1), hp, "fp32"), True)
    yield "train step pre-norm bf16", _train_step_case(small.replace(norm="pre"), hp, "bf16"), False
    # Dh = 64: the dispatcher sends attention to the key-blocked kernel
    yield ("train step key-blocked attention (Dh=64) fp32 dropout",
           _train_step_case(small.replace(d_model=128, attn_dropout=0.1), hp, "fp32"), True)


# ----------------------------------------------------------------------------------------------
# the check


def expected_calls(specs, poisoned: bool) -> list[dict]:
    """What each recorded launch must lower to: kernels/launch.py's calling convention."""
    out = []
    for spec in specs:
        n_in, n_out = len(spec.inputs), len(spec.outputs)
        out.append({
            "name": spec.name,
            "kernel": spec.kernel.__name__ + ("_poisoned" if poisoned else ""),
            "grid": list(spec.grid) + [1] * (3 - len(spec.grid)),
            "num_warps": spec.num_warps,
            # the NaN buffers are extra inputs aliased to the outputs, and (jax-triton 0.3.x)
            # each aliased output still gets its own pointer parameter
            "params": n_in + 2 * n_out if poisoned else n_in + n_out,
            "operands": n_in + n_out if poisoned else n_in,
            "results": n_out,
            "aliases": n_out if poisoned else 0,
        })
    return out


def _key(call: dict) -> tuple:
    return tuple((k, json.dumps(call[k])) for k in sorted(call))


def compare(expected: list[dict], calls: list[dict], arch: int) -> list[str]:
    """Problems (empty when the lowered calls are exactly the expected ones, one per launch)."""
    problems = []
    if len(calls) != len(expected):
        problems.append(f"{len(calls)} triton_kernel_call(s) in the module for {len(expected)} launch(es)")
    fields = list(expected[0]) if expected else []
    got = Counter(_key({k: c[k] for k in fields}) for c in calls)
    want = Counter(_key(e) for e in expected)
    for key, n in (want - got).items():
        problems.append(f"no call for launch {dict((k, json.loads(v)) for k, v in key)} (x{n})")
    for key, n in (got - want).items():
        problems.append(f"unexpected call {dict((k, json.loads(v)) for k, v in key)} (x{n})")
    for c in calls:
        if c["ptx_target"] != f"sm_{arch}a" or c["compute_capability"] != arch:
            problems.append(f"{c['name']}: PTX .target {c['ptx_target']}, compute capability "
                            f"{c['compute_capability']} (want sm_{arch}a, {arch})")
    return problems


def compile_check_disagrees(specs, calls, arch: int) -> list[str]:
    """The PTX kernels.compile_check makes of each launch must be jax-triton's for one of the
    calls (ptx_digest; each call answers one launch, in any order): its registers and spills,
    which the tune and tests/test_kernels_spills.py read, are then those of the kernels a GPU runs."""
    from kernels import compile_check  # noqa: PLC0415

    lowered = Counter(call["ptx_digest"] for call in calls)
    problems = []
    for spec in specs:
        digest = ptx_digest(compile_check.compile_spec(spec, arch).asm["ptx"])
        if lowered[digest]:
            lowered[digest] -= 1
        else:
            problems.append(f"{spec.name}: kernels.compile_check's PTX for this launch is not the PTX "
                            "jax-triton compiled (compile_spec no longer compiles what a GPU runs)")
    return problems


def check_case(label: str, make, arch: int, poisoned: bool) -> dict:
    """Record a case's launches, lower it for cuda, compare. Any exception is a failed case."""
    import jax  # noqa: PLC0415
    from kernels.launch import poisoned_outputs, record_launches  # noqa: PLC0415

    t0 = time.perf_counter()
    result = {"case": label, "poisoned": poisoned, "launches": 0, "calls": [], "problems": [],
              "ptx_compared": 0}
    try:
        fn, args = make()
        with record_launches() as specs:
            jax.eval_shape(fn, *args)
        result["launches"] = len(specs)
        fn, args = make()
        with poisoned_outputs() if poisoned else contextlib.nullcontext():
            lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
        calls = triton_calls(lowered.compiler_ir("stablehlo"))
        result["calls"] = calls
        if not specs:
            result["problems"].append("no launch recorded: the case does not use the fused kernels")
        result["problems"] += compare(expected_calls(specs, poisoned), calls, arch)
        if not poisoned and len(calls) == len(specs):  # (the poisoned calls wrap the kernels)
            result["problems"] += compile_check_disagrees(specs, calls, arch)
            result["ptx_compared"] = len(specs)
    except Exception as e:  # a case that does not lower is reported, then the next one runs
        result["problems"].append(f"{type(e).__name__}: {str(e).strip()[:2000]}")
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def fake_compute_capability(arch: int):
    from jax._src.lib import gpu_triton  # noqa: PLC0415

    gpu_triton.get_compute_capability = lambda device=0: arch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels.lowering_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability to lower for (default 90)")
    ap.add_argument("--json", metavar="PATH", help="also write every case's result to PATH")
    ap.add_argument("--only", metavar="TEXT", help="only the cases whose label contains TEXT")
    ap.add_argument("--install", metavar="DIR",
                    help="install jax-triton 0.3.1, absl-py and the matching CUDA plugin into DIR, then exit")
    args = ap.parse_args(argv)

    if args.install:
        command = install_command(args.install)
        print("$", " ".join(command), flush=True)
        return subprocess.call(command)

    import jax  # noqa: PLC0415

    missing = missing_packages()
    if missing:
        print("kernels.lowering_check: missing " + "; ".join(missing) + ".\nInstall them with "
              f"`python -m kernels.lowering_check --install {DEFAULT_SITE}` and run with "
              f"PYTHONPATH={DEFAULT_SITE} first on the path.", file=sys.stderr)
        return 2
    import triton  # noqa: PLC0415
    from kernels.launch import import_jax_triton  # noqa: PLC0415

    jax_triton = import_jax_triton()  # as the launcher imports it (keeps TRITON_CACHE_DIR)
    fake_compute_capability(args.arch)
    from jax._src.lib import gpu_triton  # noqa: PLC0415

    plugin = getattr(getattr(gpu_triton, "_cuda_triton", None), "__name__", "?")
    print(f"jax {jax.__version__}, jaxlib {importlib.metadata.version('jaxlib')}, triton "
          f"{triton.__version__}, jax-triton {jax_triton.__version__} ({jax_triton.__file__}), "
          f"_triton from {plugin}; lowering for cuda sm_{args.arch}a on {jax.default_backend()}")
    print(f"{'case':<44} {'poisoned':>8} {'launches':>8} {'calls':>5} {'sec':>6}  ok")
    results = []
    for label, make, poisoned_too in cases():
        if args.only and args.only not in label:
            continue
        for poisoned in (False, True) if poisoned_too else (False,):
            r = check_case(label, make, args.arch, poisoned)
            results.append(r)
            ok = "ok" if not r["problems"] else "FAIL"
            print(f"{label:<44} {'yes' if poisoned else 'no':>8} {r['launches']:>8} {len(r['calls']):>5} "
                  f"{r['seconds']:>6.1f}  {ok}", flush=True)
            for problem in r["problems"]:
                print(f"    {problem}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "jax": jax.__version__, "triton": triton.__version__,
                       "jax_triton": jax_triton.__version__, "results": results}, f, indent=1)
    if not results:
        print(f"no case matches --only {args.only!r}")
        return 1
    failures = sum(bool(r["problems"]) for r in results)
    names = sorted({c["name"] for r in results for c in r["calls"]})
    print(f"{len(results)} lowerings, {sum(len(r['calls']) for r in results)} triton_kernel_calls "
          f"({', '.join(names)}); " + (f"{failures} FAILED" if failures else "all as launched"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
