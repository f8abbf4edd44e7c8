"""The key-blocked kernel's default blocks for tf32x3 dots (flash_attention._DEFAULT_BLOCKS,
dot kind "tf32x3") through the real Triton compiler and ptxas for sm_80 and sm_90, on this
machine without a GPU (kernels.compile_check's way): at ViT-S/B's L=197, with dropout, the
forward and the backward spill no register to the stack. Blocks compute the same numbers
whatever they are, so only the compiler shows a tile too large for 3xTF32, which needs more
registers than tf32 (tf32's 128x32 forward at Dh=64 spills with it).

Dh = 16, 32, 64 and 128. (Dh = 128 was left out while compile_check compiled without jax-triton's
16-byte pointer alignment: triton 3.9 then spilled 80-88 bytes in its forward on sm_90.)"""

import jax.numpy as jnp
import pytest

from kernels import compile_check, flash_attention


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dh", [16, 32, 64, 128])
def test_tf32x3_default_blocks_do_not_spill_at_l197(dh, arch, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compile here, not from a cache
    specs = compile_check._attention_launches(2, 197, 2, dh, jnp.float32, True, "tf32x3", "key-blocked")
    by_name = {spec.name: spec for spec in specs}
    for name, direction in (("vitfuse_flash_fwd", "fwd"), ("vitfuse_flash_bwd", "bwd")):
        blocks = flash_attention.default_blocks(197, dh, jnp.float32, "tf32x3", direction)
        spec = by_name[name]
        assert (spec.constexprs["BLOCK_M"], spec.constexprs["BLOCK_N"], spec.num_warps) == (
            blocks.block_m, blocks.block_n, blocks.num_warps), name
        usage = compile_check.resource_usage(compile_check.compile_spec(spec, arch))
        if usage is None:
            pytest.skip("no cuobjdump in the triton wheel to read the cubin's resource usage")
        assert usage["stack"] == 0, (name, blocks, f"sm_{arch}", usage)
