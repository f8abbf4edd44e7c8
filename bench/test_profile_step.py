"""bench/profile_step.py: the summary of an ncu CSV (a made-up one in ncu's raw-page layout), and
`run` refusing to run without a GPU and building the compiled step on one; its counts, and
bench/step_time.py's, refusing anything below 1 before any work."""

import pytest

from bench import profile_step

NCU_LOG = '''==PROF== Connected to process 123 (/usr/bin/python3.12)
==PROF== Profiling "_attn_fwd": 0%....50%....100% - 1 pass
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","dram__bytes_read.sum","dram__bytes_write.sum","gpu__time_duration.sum","launch__registers_per_thread"
"","","","","","","","","","","","byte","byte","nsecond","register/thread"
"0","123","python3.12","localhost","_attn_fwd","1","7","(256, 1, 1)","(64, 8, 1)","0","9.0","1,000,000","500,000","10,000","80"
"1","123","python3.12","localhost","_attn_bwd_poisoned","1","7","(256, 1, 1)","(64, 8, 1)","0","9.0","2000000","1000000","30000","244"
"2","123","python3.12","localhost","nvjet_tst_128x64_64x6_1x1_v_bz_coopA_TNT","1","7","(384, 1, 1)","(33, 2, 1)","0","9.0","3000000","1000000","40000","168"
"3","123","python3.12","localhost","loop_add_fusion","1","7","(128, 1, 1)","(130, 1, 1)","0","9.0","4000000","4000000","20000","16"
"4","123","python3.12","localhost","loop_add_fusion","1","7","(128, 1, 1)","(130, 1, 1)","0","9.0","4000000","4000000","20000","16"
==PROF== Disconnected from process 123
'''


def test_summarize_totals_by_kind_and_kernel(tmp_path):
    path = tmp_path / "ncu.csv"
    path.write_text(NCU_LOG)
    rows = profile_step.read_ncu_csv(str(path))
    assert [r["name"] for r in rows][:2] == ["_attn_fwd", "_attn_bwd_poisoned"]
    assert rows[0]["ns"] == 10000 and rows[0]["bytes"] == 1.5e6 and rows[0]["regs"] == 80
    text = profile_step.summarize(str(path))
    assert "5 kernels, 120.0 us of kernel time" in text
    kinds = {line[:46].strip(): line for line in text.splitlines()[3:6]}
    assert kinds["vitfuse Triton kernels"].split()[3:5] == ["2", "40.0"]
    assert kinds["XLA fusions and copies"].split()[4:6] == ["2", "40.0"]
    assert "library GEMM" in text and "loop_add_fusion" in text


def test_summarize_rejects_a_csv_without_the_metrics(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text('"ID","Kernel Name"\n"0","k"\n')
    assert profile_step.main(["summarize", str(path)]) == 1
    assert "not an ncu raw CSV" in capsys.readouterr().err


def test_run_needs_a_gpu(capsys):
    assert profile_step.main(["run", "fused"]) == 2
    assert "needs a GPU" in capsys.readouterr().err


def test_every_kernel_of_ours_is_counted_as_ours():
    """Each kernel the ops launch (one-tile, key-blocked, LayerNorm; as kernels.compile_check
    records them), and its poisoned wrapper, falls in the "vitfuse Triton kernels" total,
    whichever attention kernel dispatch picks; an XLA fusion does not."""
    from kernels import compile_check  # noqa: PLC0415

    names = {spec.kernel.__name__ for _, specs in compile_check.cases(quick=True) for spec in specs}
    assert {"_attn_fwd", "_flash_bwd_delta", "_flash_bwd", "_ln_bwd_reduce"} <= names, names
    for name in sorted(names):
        for shown in (name, f"{name}_poisoned"):
            assert profile_step.kind_of(shown) == "vitfuse Triton kernels", shown
    assert profile_step.kind_of("loop_add_fusion") == "XLA fusions and copies"


def test_run_builds_the_compiled_step(monkeypatch):
    """On a GPU, `run fused` profiles the step built with kernels.COMPILED (bench/steps.make_step's
    launcher defaults to None, which fused_ops refuses: a GPU job's profile part would die there).
    The model, batch and step are stand-ins: only the arguments of make_step are checked."""
    import jax  # noqa: PLC0415

    import vit  # noqa: PLC0415
    from bench import steps  # noqa: PLC0415
    from kernels import COMPILED  # noqa: PLC0415

    built = []

    class Built(Exception):
        pass

    def make_step(contender, config, launcher=None):
        built.append((contender, launcher))
        raise Built  # stop before any step runs

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(vit, "init_params", lambda key, config: {})
    monkeypatch.setattr(vit, "adamw_init", lambda params: {})
    monkeypatch.setattr(steps, "make_batch", lambda config, batch, key: (None, None))
    monkeypatch.setattr(steps, "make_step", make_step)
    with pytest.raises(Built):
        profile_step.run("fused", 1)
    assert built == [("fused", COMPILED)]


def test_a_fused_contender_without_a_launcher_is_an_error_naming_it():
    """bench.steps.ops_for / make_step: the fused contenders need a launcher; forgetting it is a
    ValueError at build time on any machine, not a refusal inside fused_ops on the GPU only."""
    from bench import steps  # noqa: PLC0415
    from vit.ops import REFERENCE  # noqa: PLC0415

    assert steps.ops_for("reference") is REFERENCE
    for contender in ("fused", "fused-attn", "fused-ln", "fused-bf16"):
        with pytest.raises(ValueError, match=f"'{contender}' contender needs a launcher"):
            steps.ops_for(contender)


@pytest.mark.parametrize("argv", [["run", "fused", "--steps", "0"], ["summarize", "x.csv", "--top", "0"]])
def test_profile_step_counts_below_1_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        profile_step.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {argv[2]}: must be a positive integer, got 0" in err, err


@pytest.mark.parametrize("flag", ["--steps", "--batch"])
def test_step_time_counts_below_1_are_usage_errors(flag, monkeypatch, capsys):
    """--steps 0 was a traceback after compiling both steps (the median of no times); a model
    built here means the flag got through."""
    import runpy  # noqa: PLC0415
    import sys  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    import vit  # noqa: PLC0415

    def built(*args, **kwargs):
        raise AssertionError(f"{flag} 0 got past the flags")
    monkeypatch.setattr(vit, "ViTConfig", built)
    monkeypatch.setattr(sys, "argv", ["step_time.py", flag, "0"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(Path(__file__).with_name("step_time.py")), run_name="__main__")
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}: must be a positive integer, got 0" in err, err


def test_augment_time_times_every_stage(monkeypatch, capsys):
    """python bench/augment_time.py on a tiny batch: a line per stage, and its counts checked."""
    import runpy  # noqa: PLC0415
    import sys  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    script = str(Path(__file__).with_name("augment_time.py"))
    monkeypatch.setattr(sys, "argv", ["augment_time.py", "--size", "16", "--batch", "4", "--reps", "1"])
    runpy.run_path(script, run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "4 images of 16x16x3 on cpu:", lines
    assert [line.split(" median")[0].strip() for line in lines[1:]] == [
        "crop+flip+mix", "+ erasing", "+ erasing + RandAugment"], lines
    monkeypatch.setattr(sys, "argv", ["augment_time.py", "--reps", "0"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(script, run_name="__main__")
    assert e.value.code == 2 and "argument --reps: must be a positive integer, got 0" in capsys.readouterr().err
