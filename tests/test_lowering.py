"""The fused kernels and the whole fused train step lower for an NVIDIA GPU through the real
jax-triton 0.3.1, on this machine without one (``python -m kernels.lowering_check``).

Each kernel configuration and three small train steps are lowered to StableHLO for "cuda" with the
compute capability faked to 90, plainly, and inside ``poisoned_outputs()`` once per kernel and
dtype with every optional input (``lowering_check.cases()`` says which); every case must hold one
``triton_kernel_call`` per launch that ``record_launches`` saw, named as kernels/launch.py names it,
with PTX for sm_90a, and without poisoning that PTX must be what kernels.compile_check compiles for
the launch, byte for byte but the source paths. A kernel that stops lowering (a Triton compile
error, a calling convention jax-triton no longer accepts, a launch dropped or duplicated) fails its
case, and so does a compile_check that no longer compiles what jax-triton does (its registers and
spills would then not be the GPU's).

The check needs jax-triton, absl-py and the jax CUDA plugin, which live in their own folder
(``.lowering-site/``, or ``VITFUSE_LOWERING_SITE``), never in the test environment's
site-packages, so it runs in a subprocess with that folder on PYTHONPATH. When they are missing
the first test installs them there (``python -m kernels.lowering_check --install``: about 8 MB
from PyPI, 21 MB on disk); if that install fails (no network), these tests fail under CI and are
skipped elsewhere, saying how to install.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from kernels import lowering_check

ROOT = pathlib.Path(__file__).resolve().parents[1]
SITE = pathlib.Path(os.environ.get("VITFUSE_LOWERING_SITE", ROOT / lowering_check.DEFAULT_SITE))
ARCH = 90
HANG_GUARD_S = 3600  # not a speed limit: the whole check takes well under a minute on 2 cores

CASES = [(label, poisoned) for label, _, poisoned_too in lowering_check.cases()
         for poisoned in ((False, True) if poisoned_too else (False,))]


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def _tail(text: str, n: int = 6000) -> str:
    return text if len(text) <= n else "..." + text[-n:]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Run the check once for the whole module; its --json report, by (label, poisoned)."""
    out = tmp_path_factory.mktemp("lowering") / "report.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    path = [str(SITE)] if SITE.is_dir() else []
    env["PYTHONPATH"] = os.pathsep.join(path + [str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "kernels.lowering_check", "--arch", str(ARCH), "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    if done.returncode == 2:  # jax-triton, absl-py or the CUDA plugin is missing: install, once
        install = subprocess.run([sys.executable, "-m", "kernels.lowering_check", "--install", str(SITE)],
                                 cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
        if install.returncode == 0:
            env["PYTHONPATH"] = os.pathsep.join([str(SITE), env["PYTHONPATH"]])
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=HANG_GUARD_S)
    if done.returncode == 2:
        message = f"{done.stderr.strip()}\n(tests/test_lowering.py looked in {SITE})"
        if _in_ci():
            pytest.fail(f"{message}\nCI must run this check; installing them (python -m "
                        f"kernels.lowering_check --install {SITE}) gave rc {install.returncode}:\n"
                        + _tail(install.stdout + install.stderr, 3000))
        pytest.skip(message)
    if not out.exists():
        pytest.fail(f"lowering check crashed (rc {done.returncode}):\n{_tail(done.stdout)}\n{_tail(done.stderr)}")
    data = json.loads(out.read_text())
    data["log"] = done.stdout
    data["by_case"] = {(r["case"], r["poisoned"]): r for r in data["results"]}
    return data


@pytest.mark.parametrize("label,poisoned", CASES,
                         ids=[f"{label}{' poisoned' if p else ''}" for label, p in CASES])
def test_lowers_one_call_per_launch(report, label, poisoned):
    result = report["by_case"].get((label, poisoned))
    assert result is not None, f"the check did not run this case\n{report['log']}"
    assert not result["problems"], "\n".join(result["problems"])
    assert result["launches"] > 0 and len(result["calls"]) == result["launches"]
    for call in result["calls"]:
        assert call["name"].startswith("vitfuse_"), call["name"]
        assert call["ptx_target"] == f"sm_{ARCH}a" and call["compute_capability"] == ARCH
    # plain launches: kernels.compile_check made the same PTX as jax-triton, launch by launch
    # (lowering_check.compile_check_disagrees; a difference is one of the problems above)
    assert result["ptx_compared"] == (0 if poisoned else result["launches"])


def test_every_kernel_and_both_launch_paths_are_covered(report):
    """All eight launch names (both attention kernels, add+LN) appear, plainly and poisoned, in
    kernel cases and in train steps; each kernel is lowered poisoned in float32 and bfloat16."""
    names = {"vitfuse_attn_fwd", "vitfuse_attn_bwd", "vitfuse_flash_fwd", "vitfuse_flash_bwd_delta",
             "vitfuse_flash_bwd", "vitfuse_ln_fwd", "vitfuse_ln_bwd", "vitfuse_ln_bwd_reduce"}
    for poisoned in (False, True):
        rs = [r for r in report["results"] if r["poisoned"] == poisoned]
        assert {c["name"] for r in rs if not r["case"].startswith("train") for c in r["calls"]} == names
        assert {c["name"] for r in rs if r["case"].startswith("train") for c in r["calls"]} == names
    poisoned = {r["case"] for r in report["results"] if r["poisoned"]}
    for kernel in ("attn B=", "attn key-blocked ", "ln M="):
        for dtype in ("float32", "bfloat16"):
            assert any(case.startswith(kernel) and dtype in case for case in poisoned), (kernel, dtype)
    assert report["jax_triton"] == "0.3.1"


def test_float32_dots_run_as_their_dot_precision_says(report):
    """The PTX of the product-shape one-tile kernels, by dot precision (same geometry for all
    three): ieee dots use no tensor core; tf32 dots do, with no rounding to tf32 of their own
    (the tensor core reads the top 19 bits of each float32); tf32x3 rounds each operand's high
    part to tf32 (cvt.rna.tf32.f32) and takes exactly three times tf32's tensor-core
    instructions in every kernel: each dot done as hi*hi + hi*lo + lo*hi (3xTF32)."""
    def ptx_counts(precision):
        result = report["by_case"][(f"attn B=64 L=65 H=8 Dh=32 float32/{precision}", False)]
        return {c["name"]: (c["tf32_tensor_core_ops"], c["tf32_roundings"]) for c in result["calls"]}

    ieee, tf32, tf32x3 = (ptx_counts(p) for p in ("ieee", "tf32", "tf32x3"))
    assert set(ieee) == set(tf32) == set(tf32x3) == {"vitfuse_attn_fwd", "vitfuse_attn_bwd"}
    for name in tf32:
        assert ieee[name] == (0, 0), (name, ieee[name])
        assert tf32[name][0] > 0 and tf32[name][1] == 0, (name, tf32[name])
        assert tf32x3[name][0] == 3 * tf32[name][0] and tf32x3[name][1] > 0, (name, tf32x3[name], tf32[name])


# ----------------------------------------------------------------------------------------------
# the comparison itself can fail (these need neither jax-triton nor a CUDA plugin)


def _call(name="vitfuse_ln_fwd", **changes):
    call = {"name": name, "kernel": "_ln_fwd", "grid": [4, 1, 1], "num_warps": 4, "params": 5,
            "operands": 2, "results": 3, "aliases": 0}
    return {**call, **changes}


def _lowered(call, target="sm_90a", cc=90):
    return {**call, "ptx_target": target, "compute_capability": cc, "ptx_bytes": 1}


def test_compare_accepts_exactly_the_launches():
    expected = [_call(), _call("vitfuse_ln_bwd", kernel="_ln_bwd")]
    assert lowering_check.compare(expected, [_lowered(c) for c in reversed(expected)], 90) == []


@pytest.mark.parametrize("calls,needle", [
    ([_lowered(_call())], "1 triton_kernel_call(s) in the module for 2 launch(es)"),
    ([_lowered(_call())] * 3, "unexpected call"),
    ([_lowered(_call()), _lowered(_call(params=4))], "no call for launch"),
    ([_lowered(_call()), _lowered(_call(), target="sm_90")], "PTX .target sm_90,"),
    ([_lowered(_call()), _lowered(_call(), cc=80)], "compute capability 80 (want sm_90a, 90)"),
], ids=["dropped", "duplicated", "other-signature", "wrong-arch", "wrong-capability"])
def test_compare_reports(calls, needle):
    problems = lowering_check.compare([_call(), _call()], calls, 90)
    assert any(needle in p for p in problems), problems


def test_a_case_that_raises_is_a_failed_case():
    def make():
        raise RuntimeError("triton.compiler.errors.CompilationError: boom")
    result = lowering_check.check_case("broken", make, 90, poisoned=False)
    assert result["problems"] == ["RuntimeError: triton.compiler.errors.CompilationError: boom"]


def test_proto_fields_reads_nested_messages():
    """TritonAnyKernelCall{kernel_call{kernel{kernel_name, num_warps}, grid_0}, name} by hand."""
    def field(number, payload):  # length-delimited (wire type 2); payloads < 128 bytes here
        return bytes([number << 3 | 2, len(payload)]) + payload
    kernel = field(1, b"_attn_fwd") + bytes([2 << 3, 4]) + field(4, b".version 8.4\n.target sm_90a\n")
    call = field(1, kernel) + bytes([2 << 3, 0x80, 0x01])  # grid_0 = 128 (a two-byte varint)
    import zlib
    decoded = lowering_check.decode_backend_config(zlib.compress(field(1, call) + field(4, b"vitfuse_attn_fwd")))
    assert decoded["name"] == "vitfuse_attn_fwd" and decoded["kernel"] == "_attn_fwd"
    assert decoded["grid"] == [128, 0, 0] and decoded["num_warps"] == 4
    assert decoded["ptx_target"] == "sm_90a"


def test_ptx_counts_tf32_tensor_core_ops_and_roundings():
    """The two PTX counts test_float32_dots_run_as_their_dot_precision_says reads: tensor-core
    ops on tf32 operands as mma.sync or as wgmma (triton 3.9's one-tile backward for sm_90a has
    both), and cvt.rna.tf32.f32; not bf16 tensor-core ops, other conversions or comments."""
    def field(number, payload):  # length-delimited, the length as a varint (the PTX is > 127 bytes)
        n, size = len(payload), b""
        while True:
            size += bytes([(n & 0x7F) | (0x80 if n >> 7 else 0)])
            n >>= 7
            if not n:
                return bytes([number << 3 | 2]) + size + payload
    ptx = "\n".join([
        ".version 8.4", ".target sm_90a",
        "\tmma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%f1, %f2, %f3, %f4}, {%r1, %r2, %r3, %r4}, "
        "{%r5, %r6}, {%f1, %f2, %f3, %f4};",
        "  wgmma.mma_async.sync.aligned.m64n32k8.f32.tf32.tf32 {%f5, %f6}, %rd1, %rd2, p, 1, 1, 0, 0;",
        "\twgmma.mma_async.sync.aligned.m64n32k8.f32.tf32.tf32 {%f5, %f6}, %rd1, %rd2, p, 1, 1, 0, 0;",
        "\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1, %f2, %f3, %f4}, {%r1, %r2}, {%r3}, {%f1};",
        "\twgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%f5, %f6}, %rd1, %rd2, p, 1, 1, 0, 0;",
        "\tcvt.rna.tf32.f32 %r7, %f6;", "\tcvt.rna.tf32.f32 %r8, %f7;", "\tcvt.rn.bf16.f32 %rs1, %f7;",
        "\tsub.f32 %f8, %f6, %f9;", "\t// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 (a comment)"])
    call = field(1, field(1, b"_attn_bwd") + field(4, ptx.encode()))
    import zlib
    decoded = lowering_check.decode_backend_config(zlib.compress(field(1, call) + field(4, b"vitfuse_attn_bwd")))
    assert (decoded["tf32_tensor_core_ops"], decoded["tf32_roundings"]) == (3, 2), decoded
    assert decoded["ptx_target"] == "sm_90a"


def test_proto_fields_reads_fixed_width_fields():
    """fixed64 (wire type 1) is 8 bytes, fixed32 (wire type 5) 4; the fields after them still parse."""
    import struct
    buf = (bytes([1 << 3 | 1]) + struct.pack("<d", 2.5) + bytes([2 << 3 | 5]) + struct.pack("<f", 1.5)
           + bytes([3 << 3 | 0, 0xAC, 0x02]))  # field 3 = 300, a two-byte varint
    fields = lowering_check.proto_fields(buf)
    assert fields == {1: [struct.pack("<d", 2.5)], 2: [struct.pack("<f", 1.5)], 3: [300]}
    with pytest.raises(ValueError, match="unsupported wire type 3"):
        lowering_check.proto_fields(bytes([4 << 3 | 3]))
