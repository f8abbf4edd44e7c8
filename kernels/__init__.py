"""Fused Triton kernels for vitfuse: attention and residual-add LayerNorm, forward and backward.

``fused_ops(launcher=COMPILED, dot_precision="ieee", attention_kernel="auto")`` returns a
``vit.ops.Ops``: the drop-in replacement for ``vit.ops.REFERENCE`` (same four functions, same
signatures, same results).

launcher: ``COMPILED`` compiles the kernels through jax-triton, which needs JAX's GPU backend (a
clear error elsewhere); ``INTERPRETED`` runs the same kernels through Triton's interpreter on the
CPU (slow: tests, checks). Both are ``kernels.launch.Launcher`` values. dot_precision: tl.dot input
precision for float32 operands, "ieee" (exact) or "tf32"/"tf32x3" (GPU). attention_kernel: "auto"
lets kernels/dispatch.py pick the attention kernel and its blocks per shape; "one-tile" or
"key-blocked" forces one (checks, benchmarks).

Files: launch.py (the two launchers), interpreter.py (Triton's interpreter, which ``INTERPRETED``
launches through), layernorm.py, attention.py (the one-tile attention), flash_attention.py (the
key-blocked attention), dispatch.py (which attention runs), each kernel file naming the reference
functions it must equal as ``REFERENCE``; compile_check.py and lowering_check.py (``python -m
kernels.compile_check`` / ``kernels.lowering_check``). The checks that compare the kernels with the
reference live outside the product, in oracle/.

To change a kernel (its body, its launch geometry or blocks, or a variant beside it):
  - the kernel: layernorm.py (``_ln_*``; ``geometry``, from the launcher's tile_elements, tile_rows
    and reduce_programs in launch.py); attention.py (``geometry``; ``compiled_fits`` and
    MAX_KV_TILE_BYTES for what a GPU runs at all); flash_attention.py (``_DEFAULT_BLOCKS``); which
    attention kernel runs: dispatch.py's rule, after attention_table.json's rows, which win on
    their GPU. A new kernel: its launch named ``vitfuse_*`` (lowering_check checks the name),
    its function in bench/profile_step.py's OUR_KERNELS, cases in compile_check and lowering_check.
  - the numbers, on the CPU: tests/test_kernels_layernorm.py, _attention.py, _flash.py, _ops.py,
    tests/test_fused_model.py, then ``python -m oracle.kernel_gradcheck`` (one kernel: ``--shapes
    ln:130x256:r`` or ``--kernel key-blocked``). The interpreter ignores num_warps and
    num_stages, and the LayerNorm runs INTERPRETED's tiles (64 rows, <= 8 backward programs),
    not a GPU's: only tests/test_kernels_layernorm.py's test_compiled_tiling_in_the_interpreter
    runs COMPILED's.
  - the tests that pin geometry: tests/test_launchers.py (the LayerNorm's rule, shape by shape),
    tests/test_kernels_flash.py (_DEFAULT_BLOCKS), tests/test_kernels_spills.py (tf32x3 blocks),
    bench/test_tune_layernorm.py and bench/test_tune_attention.py (each tune's plan); none pins
    attention.geometry's values.
  - the compiler: ``python -m kernels.compile_check --only ln`` (or attn, flash): exit 0 even
    when a kernel spills (read its spills column and last line); ``python -m pytest
    tests/test_lowering.py`` (jax-triton's lowering, PTX instruction counts).
  - the tunes: ``python -m bench.tune_layernorm --interpret --shape quick``, ``python -m
    bench.tune_attention --interpret --shape 1x17x2x16`` (check every variant; in the interpreter
    the "planned" LayerNorm row is INTERPRETED's geometry); their GRIDS should hold the new choice.
    Timed only on a GPU (``bash bench/gpu.sh env tune-ln tune``; tune's winners come back in
    $OUT for attention_table.json, whose rows, timed on the old kernels, go stale with them).
  - the bench: ``python -m pytest bench/test_bench_layernorm.py bench/test_bench_attention.py``
    (checks only on the CPU). On a GPU start a fresh results file: ``--bench-continue`` keeps an
    earlier file's rows, timed on the old kernels (each row's ``code`` names the code it timed,
    and the add+LN row's note its geometry, but the rows are kept all the same).
  - what goes stale: README.md, "Fused kernels" (tiles, spills, registers) and "Speed on an H200"
    (its verdicts' tiles and programs), the compile_check row of "Two commands" (kernel count,
    spills); the comments that carry compile figures (``_DEFAULT_BLOCKS``, attention.geometry);
    bench/results/compile-check-*.md are dated records: add a new one rather than edit them.
"""

from __future__ import annotations

from kernels import attention, dispatch, layernorm
from kernels.launch import COMPILED, INTERPRETED, Launcher, check_dot_precision, check_launcher
from vit.ops import Ops

__all__ = ["COMPILED", "INTERPRETED", "Launcher", "fused_ops"]


def fused_ops(launcher: Launcher = COMPILED, dot_precision: str = "ieee",
              attention_kernel: str = "auto") -> Ops:
    """The fused ops, bound to one launcher (COMPILED or INTERPRETED), one dot precision and one
    attention kernel choice."""
    check_launcher(launcher, "fused_ops: launcher").check_available()
    dot_precision = check_dot_precision(dot_precision)
    kernel = dispatch.check_kernel(attention_kernel)
    launch = {"launcher": launcher}

    def attention_forward(qkv, heads, keep_scale=None):
        return dispatch.attention_forward(qkv, heads, keep_scale, dot_precision=dot_precision,
                                          kernel=kernel, **launch)

    def attention_backward(cache, do):
        return dispatch.attention_backward(cache, do, dot_precision=dot_precision, kernel=kernel,
                                           **launch)

    def add_layernorm_forward(params, x, r, eps):
        return layernorm.add_layernorm_forward(params, x, r, eps, **launch)

    def add_layernorm_backward(params, cache, dy):
        return layernorm.add_layernorm_backward(params, cache, dy, **launch)

    def check_model(model):
        try:
            if model.head_dim not in attention.HEAD_DIMS:  # in the model's words, not the kernel's
                raise ValueError(f"head dim model.d_model / model.heads = {model.head_dim}; the "
                                 f"kernels take {', '.join(map(str, attention.HEAD_DIMS))}")
            attention.check_shape(1, model.seq_len, model.heads, model.head_dim)
            if model.d_model > layernorm.MAX_WIDTH:
                raise ValueError(f"add_layernorm: width {model.d_model} exceeds the one-tile limit "
                                 f"{layernorm.MAX_WIDTH}")
        except ValueError as err:
            d, dims = model.d_model, attention.HEAD_DIMS
            fits = [h for h in range(1, d + 1) if d % h == 0 and d // h in dims]
            helps = fits and d <= layernorm.MAX_WIDTH  # no head count fixes the width
            hint = f"; model.heads = {' or '.join(map(str, fits))} would fit" if helps else ""
            if not fits and d <= layernorm.MAX_WIDTH:  # no head count: only another width helps
                widths = [w for w in (d // 16 * 16, -(-d // 16) * 16) if w >= 16]
                hint = (f"; no model.heads does for model.d_model {d}: a multiple of 16 "
                        f"({' or '.join(map(str, widths))}) would take some")
            raise ValueError(f"the fused kernels cannot run this model (model.d_model "
                             f"{model.d_model}, model.heads {model.heads}): {err}{hint}") from None

    # Triton's interpreter runs tl.dot as a float32 matmul whatever its input_precision
    exact = "; the interpreter computes dots exactly" if dot_precision != "ieee" and not launcher.on_gpu else ""
    return Ops(
        name="fused",
        attention_forward=attention_forward,
        attention_backward=attention_backward,
        add_layernorm_forward=add_layernorm_forward,
        add_layernorm_backward=add_layernorm_backward,
        description=f"fused Triton kernels ({launcher.name}, dot precision {dot_precision}, "
                    f"attention {kernel}{exact})",
        partitionable=False,
        check_model=check_model,
    )
