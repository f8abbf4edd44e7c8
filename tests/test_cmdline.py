"""The command-line layer shared by train.py and evaluate.py (cmdline.py): the op-set flags
become an Ops, the multi-process flags (or their JAX_* variables) the three settings of
vit.parallel.init_distributed, and every bad value is an error naming the flag. Also: the usage
line of each `python -m` check and bench command, and of the bench's pytest options."""

import argparse
from pathlib import Path

import jax
import pytest

import cmdline
from vit import parallel
from vit.ops import REFERENCE, Ops

DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
NO_COORDINATOR = "no --coordinator (or JAX_COORDINATOR_ADDRESS), --process-id (or JAX_PROCESS_ID)"
COORDINATOR = "10.0.0.1:1234"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_env(monkeypatch):
    for name in DISTRIBUTED_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("kwargs, env, message", [
    (dict(num_processes=2), {}, NO_COORDINATOR),
    (dict(coordinator=COORDINATOR, process_id=1), {}, "no --num-processes (or JAX_NUM_PROCESSES)"),
    ({}, {"JAX_COORDINATOR_ADDRESS": COORDINATOR},
     f"got --coordinator {COORDINATOR} but no --num-processes"),
    (dict(process_id=0), {"JAX_NUM_PROCESSES": "4"},
     "got --num-processes 4, --process-id 0 but no --coordinator"),
    (dict(coordinator=COORDINATOR, num_processes=2, process_id=2), {}, "--process-id must be in 0..1"),
    (dict(coordinator="10.0.0.1", num_processes=2, process_id=0), {}, "--coordinator must be host:port"),
    (dict(num_processes=0), {}, "--num-processes must be a positive integer"),
    ({}, {"JAX_PROCESS_ID": "one"}, "--process-id: environment variable JAX_PROCESS_ID='one'"),
    ({}, {"JAX_NUM_PROCESSES": "two"}, "--num-processes: environment variable JAX_NUM_PROCESSES='two'"),
    (dict(num_processes=1, process_id=1), {}, "--process-id 1 given for a single-process run"),
])
def test_distributed_errors_name_the_flags(clean_env, kwargs, env, message):
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(cmdline.UsageError) as e:
        cmdline.distributed_settings(**kwargs)
    assert message in str(e.value)
    assert not jax.distributed.is_initialized()


@pytest.mark.parametrize("kwargs", [{}, dict(num_processes=1), dict(num_processes=1, process_id=0,
                                                                    coordinator="127.0.0.1:1")])
def test_single_process_needs_no_start(clean_env, kwargs):
    assert cmdline.distributed_settings(**kwargs) is None
    flags = {"coordinator": None, "num_processes": None, "process_id": None, **kwargs}
    cmdline.start_processes(argparse.Namespace(**flags))
    assert not jax.distributed.is_initialized()
    assert parallel.is_main_process()


def test_ctrl_c_ends_the_wait_for_the_other_processes(clean_env, monkeypatch, capsys):
    """JAX waits for every process in C++, where no Python handler runs (a Ctrl-C did nothing
    for as long as 5 minutes): during the wait SIGINT has the system's default, which ends the
    process; the handler before it is back afterwards."""
    import signal

    during = []
    monkeypatch.setattr(parallel, "init_distributed",
                        lambda *settings: during.append(signal.getsignal(signal.SIGINT)))
    before = signal.getsignal(signal.SIGINT)
    cmdline.start_processes(argparse.Namespace(coordinator=COORDINATOR, num_processes=2,
                                               process_id=1))
    assert during == [signal.SIG_DFL] and signal.getsignal(signal.SIGINT) is before
    assert "Ctrl-C stops the wait" in capsys.readouterr().err


def test_distributed_settings_from_the_environment(clean_env):
    clean_env.setenv("JAX_COORDINATOR_ADDRESS", COORDINATOR)
    clean_env.setenv("JAX_NUM_PROCESSES", "3")
    assert cmdline.distributed_settings(process_id=2) == (COORDINATOR, 3, 2)


@pytest.mark.parametrize("blank", ["", "  "])
def test_a_blank_environment_variable_counts_as_unset(clean_env, blank):
    clean_env.setenv("JAX_NUM_PROCESSES", blank)
    clean_env.setenv("JAX_PROCESS_ID", blank)
    assert cmdline.distributed_settings() is None
    clean_env.setenv("JAX_COORDINATOR_ADDRESS", COORDINATOR)
    clean_env.setenv("JAX_NUM_PROCESSES", "2")
    assert cmdline.distributed_settings(process_id=1) == (COORDINATOR, 2, 1)


def test_an_ipv6_coordinator_is_host_and_port(clean_env):
    """[::1]:1234: the port is what follows the last colon."""
    assert cmdline.distributed_settings("[::1]:1234", 2, 1) == ("[::1]:1234", 2, 1)
    with pytest.raises(cmdline.UsageError, match="--coordinator must be host:port"):
        cmdline.distributed_settings("[::1]", 2, 1)


@pytest.mark.parametrize("args, message", [
    (dict(coordinator="10.0.0.1", num_processes=2, process_id=0), "coordinator must be host:port"),
    (dict(coordinator=COORDINATOR, num_processes=2, process_id=2), "process_id must be in 0..1"),
    (dict(coordinator=COORDINATOR, num_processes=0, process_id=0), "num_processes must be a positive"),
    (dict(coordinator="10.0.0.1:", num_processes=2, process_id=1), "coordinator must be host:port"),
    (dict(coordinator="10.0.0.1:port", num_processes=2, process_id=1), "coordinator must be host:port"),
])
def test_init_distributed_checks_its_own_arguments(args, message, monkeypatch):
    """The library's own checks, in the library's own words (no flag names)."""
    def joined(**kwargs):  # a check that let a bad value through would get here, not hang connecting
        raise AssertionError(f"jax.distributed.initialize reached with {kwargs}")
    monkeypatch.setattr(jax.distributed, "initialize", joined)
    with pytest.raises(ValueError, match=message):
        parallel.init_distributed(**args)
    assert not jax.distributed.is_initialized()


def _ops_args(*argv):
    parser = argparse.ArgumentParser()
    cmdline.add_ops_flags(parser)
    return parser.parse_args(list(argv))


def test_build_ops():
    assert cmdline.build_ops(_ops_args()) is REFERENCE
    fused = cmdline.build_ops(_ops_args("--fused", "--interpret", "--dot-precision", "tf32"))
    assert isinstance(fused, Ops) and fused.name == "fused" and "tf32" in fused.description
    split = cmdline.build_ops(_ops_args("--fused", "--interpret", "--dot-precision", "tf32x3"))
    assert "dot precision tf32x3" in split.description
    # Triton's interpreter takes tl.dot's input_precision and computes in float32 anyway
    assert split.description.endswith("; the interpreter computes dots exactly)")
    plain = cmdline.build_ops(_ops_args("--fused", "--interpret"))  # ieee unless asked
    assert "dot precision ieee" in plain.description and "tf32" not in plain.description
    assert "exactly" not in plain.description
    for argv, message in ((["--interpret"], "--interpret only makes sense with --fused"),
                          (["--dot-precision", "tf32"], "--dot-precision only makes sense")):
        with pytest.raises(cmdline.UsageError, match=message):
            cmdline.build_ops(_ops_args(*argv))


def test_dot_precision_choices_are_the_kernels():
    """cmdline spells the kernels' dot precisions out (--help imports no jax): the same ones."""
    from kernels.launch import DOT_PRECISIONS  # noqa: PLC0415

    assert cmdline.DOT_PRECISIONS == DOT_PRECISIONS


def test_build_ops_without_gpu_names_the_flag(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    with pytest.raises(cmdline.UsageError, match="--fused needs a GPU.*Add --interpret"):
        cmdline.build_ops(_ops_args("--fused"))


def test_build_ops_on_a_gpu_without_jax_triton_says_what_to_install(monkeypatch):
    """Compiled kernels launch through jax-triton: without it, a message at start naming the
    extra to install, not an ImportError from inside the first step."""
    import sys  # noqa: PLC0415

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setitem(sys.modules, "jax_triton", None)  # import jax_triton raises ImportError
    with pytest.raises(cmdline.UsageError, match=r"jax-triton.*pip install -e '\.\[gpu\]'"):
        cmdline.build_ops(_ops_args("--fused"))
    assert cmdline.build_ops(_ops_args("--fused", "--interpret")).name == "fused"


def test_fused_with_a_head_dim_the_kernels_do_not_take_is_refused_before_any_work(tmp_path, capsys):
    """Dh = 48 / 2 = 24: a ValueError traceback from inside the first jitted step (exit code 1),
    in train.py and evaluate.py alike; now a usage error naming the keys, and the heads that fit,
    before the data loads."""
    import evaluate  # noqa: PLC0415
    import train  # noqa: PLC0415
    from kernels import INTERPRETED, fused_ops  # noqa: PLC0415
    from vit import ViTConfig  # noqa: PLC0415

    fused = fused_ops(INTERPRETED)
    fused.check_model(ViTConfig())  # Dh = 32
    REFERENCE.check_model(ViTConfig(d_model=48, heads=2))
    with pytest.raises(ValueError, match=r"model.d_model 48, model.heads 2\): head dim model.d_model / "
                                         r"model.heads = 24; the kernels take 16, 32, 64, 128; "
                                         r"model.heads = 3 would fit"):
        fused.check_model(ViTConfig(d_model=48, heads=2))
    small = ["--dataset", "digits", "--epochs", "1", "--set", "model.layers=1", "--set", "model.d_model=48",
             "--set", "model.mlp_dim=32", "--no-progress"]
    run = tmp_path / "run"
    assert train.main([*small, "--set", "model.heads=2", "--out", str(run)]) == 0  # the reference runs it
    capsys.readouterr()
    for main, args in ((train.main, [*small, "--set", "model.heads=2", "--out", str(tmp_path / "x")]),
                       (evaluate.main, [str(run)])):
        with pytest.raises(SystemExit) as e:
            main([*args, "--fused", "--interpret"])
        out, err = capsys.readouterr()
        assert e.value.code == 2 and "--fused: the fused kernels cannot run this model" in err, err
        assert "Traceback" not in err and "data:" not in out, out


@pytest.mark.parametrize("flag_type, text, said", [
    ("retries", "-1", "must be 0 or more, got -1"), ("retries", "x", "must be an integer, got 'x'"),
    ("positive", "0", "must be a positive integer, got 0"),
    ("positive", "1.5", "must be a positive integer, got '1.5'")])
def test_integer_flag_types_name_the_flag_and_the_bound(flag_type, text, said, capsys):
    """The two integer flag types, python -m vit.data's at_least (--retries is at_least(0)) and
    cmdline.positive_int (train.py, evaluate.py, the check commands): argparse's error names the
    flag and the bound."""
    from vit.data.__main__ import at_least  # noqa: PLC0415

    parse, lowest = {"retries": (at_least(0), 0), "positive": (cmdline.positive_int, 1)}[flag_type]
    parser = argparse.ArgumentParser(prog="prog")
    parser.add_argument("--n", type=parse)
    assert parser.parse_args(["--n", str(lowest)]).n == lowest
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--n", text])
    assert e.value.code == 2 and f"prog: error: argument --n: {said}" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["oracle.kernel_gradcheck", "kernels.compile_check", "kernels.lowering_check",
                                    "bench.profile_step", "bench.tune_attention"])
def test_a_command_run_with_python_m_says_so_in_its_usage(module, capsys):
    """argparse names a `python -m` module by its file ('usage: kernel_gradcheck.py'), which is
    no command a user can type; its usage and errors name the command instead."""
    import importlib

    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(["--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m {module} ")


def test_the_bench_options_show_what_they_take():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pytest", "bench/", "--help"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert "--bench-results=DIR" in out and "--bench-seed=SEED" in out and "VITFUSE_" not in out


def test_a_dot_precision_with_bf16_compute_gets_a_note(monkeypatch, capsys, tmp_path):
    """The kernels' dot precision sets their float32 dots; a bf16 run has none."""
    import train
    from vit import training

    def stop(*args, **kwargs):
        raise training.RunError("stopped here by the test")
    monkeypatch.setattr(training, "start_run", stop)
    with pytest.raises(SystemExit):
        train.main(["--dataset", "digits", "--fused", "--interpret", "--dot-precision", "tf32",
                    "--compute-dtype", "bf16", "--out", str(tmp_path / "run")])
    assert "train.py: note: --dot-precision tf32 sets the kernels' float32 dots; with " \
           "train.compute_dtype = bf16 it changes nothing" in capsys.readouterr().err
    from vit import parallel  # the run's notes come from process 0 only

    monkeypatch.setattr(parallel, "is_main_process", lambda: False)
    with pytest.raises(SystemExit):
        train.main(["--dataset", "digits", "--fused", "--interpret", "--dot-precision", "tf32",
                    "--compute-dtype", "bf16", "--out", str(tmp_path / "run")])
    assert "changes nothing" not in capsys.readouterr().err


def test_kernel_gradcheck_refuses_a_width_no_kernel_takes_and_fails_when_it_checked_nothing(capsys):
    """ln:3x70000 was a ValueError traceback from inside the run (the cases after it never ran);
    a run whose every case was skipped said "all tensors within tolerance" and exited 0."""
    from oracle import kernel_gradcheck

    with pytest.raises(SystemExit) as e:
        kernel_gradcheck.main(["--interpret", "--shapes", "ln:3x70000:r"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "width 70000 exceeds the add+LN kernel's one-tile limit 16384" in err, err
    assert kernel_gradcheck.main(["--interpret", "--kernel", "one-tile", "--shapes", "attn:1x1100x1x16"]) == 1
    out = capsys.readouterr().out
    assert "nothing checked: every case was skipped" in out and "within tolerance" not in out, out


def test_fused_check_model_names_every_head_count_that_fits_and_the_layernorm_width_limit():
    """The hint lists each model.heads whose head dim the kernels take (16, 32, 64 and 128); a
    width past the add+LayerNorm kernel's one tile is refused too, before any step runs."""
    from kernels import INTERPRETED, fused_ops, layernorm  # noqa: PLC0415
    from vit import ViTConfig  # noqa: PLC0415

    fused = fused_ops(INTERPRETED)
    with pytest.raises(ValueError, match=r"model.d_model 256, model.heads 1\): .*; model.heads = 2 or 4 or 8 "
                                         r"or 16 would fit$"):
        fused.check_model(ViTConfig(d_model=256, heads=1, mlp_dim=64))
    wide = 2 * layernorm.MAX_WIDTH
    with pytest.raises(ValueError, match=f"add_layernorm: width {wide} exceeds the one-tile limit "
                                         f"{layernorm.MAX_WIDTH}$"):  # no head count to offer
        fused.check_model(ViTConfig(d_model=wide, heads=wide // 64, mlp_dim=64))


def test_kernel_gradcheck_takes_the_add_layernorm_width_up_to_its_one_tile_limit_exactly():
    """The refusal sits at layernorm.MAX_WIDTH: that width is a case, one more is not."""
    from kernels import layernorm  # noqa: PLC0415
    from oracle import kernel_gradcheck  # noqa: PLC0415

    assert kernel_gradcheck.parse_shape(f"ln:3x{layernorm.MAX_WIDTH}")[1] == (3, layernorm.MAX_WIDTH)
    with pytest.raises(ValueError, match=f"width {layernorm.MAX_WIDTH + 1} exceeds the add\\+LN kernel's "
                                         f"one-tile limit {layernorm.MAX_WIDTH}"):
        kernel_gradcheck.parse_shape(f"ln:3x{layernorm.MAX_WIDTH + 1}")
    # a head dim the kernels do not take, in the words of the shape typed (not 3D / (3 * heads))
    with pytest.raises(ValueError, match=r"bad shape 'attn:2x17x2x15': head dim Dh = 15; the kernels "
                                         r"take Dh = 16, 32, 64, 128$"):
        kernel_gradcheck.parse_shape("attn:2x17x2x15")


def test_ctrl_c_in_a_check_command_is_one_line_and_exit_130(tmp_path):
    """python -m oracle.gradcheck (kernel_gradcheck and compile_check take the same path) got a
    Ctrl-C as a traceback of some 60 lines from inside whatever layer it was checking; train.py
    and the data commands say one line. A real SIGINT once the first tensor is checked."""
    import os
    import sys

    from watch import Watched, interrupt_when

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    proc = Watched([sys.executable, "-m", "oracle.gradcheck"], log=tmp_path / "log", env=env, cwd=ROOT)
    text = interrupt_when(proc, " ok")  # once the first tensor is checked
    assert proc.returncode == 130 and "Traceback" not in text, proc.tail()
    assert "python -m oracle.gradcheck: interrupted; it writes nothing: run it again to check" in text
    from vit.signals import exit_code_of_a_check

    assert exit_code_of_a_check(lambda: 0, "p") == 0


def test_a_check_commands_interruption_goes_to_stderr(capsys):
    """The one line of a Ctrl-C is a message, on stderr: stdout (the table of results, often
    piped to a file) is left as it was."""
    from vit.signals import exit_code_of_a_check

    def interrupted():
        raise KeyboardInterrupt
    assert exit_code_of_a_check(interrupted, "python -m oracle.gradcheck") == 130
    out, err = capsys.readouterr()
    assert out == "" and "python -m oracle.gradcheck: interrupted; it writes nothing" in err, (out, err)


@pytest.mark.parametrize("given, said", [("0", "'0' is not a compute capability the kernels are for"),
                                         ("-1", "'-1' is not a compute"), ("sm_70", "'sm_70' is not")])
def test_compile_check_takes_a_compute_capability_it_knows(given, said, capsys):
    """--arch 0 ended in an LLVM error (exit 134), -1 in every kernel failing; sm_90 was refused."""
    from kernels import compile_check

    assert compile_check.compute_capability("sm_90") == compile_check.compute_capability("90") == 90
    with pytest.raises(SystemExit) as e:
        compile_check.main(["--arch", given])
    assert e.value.code == 2 and said in capsys.readouterr().err


def test_a_refused_flag_prints_no_note_before_its_error(capsys):
    """A note on the config (here warmup past the run's end) read as if the run would go ahead,
    printed just before the error that refuses it; --devices 0 is refused as its flag's value."""
    import train

    for bad, said in ((["--interpret"], "train.py: error: --interpret only makes sense with --fused"),
                      (["--devices", "0"], "argument --devices: must be a positive integer")):
        with pytest.raises(SystemExit) as e:
            train.main(["--dataset", "digits", "--epochs", "2", "--set", "train.warmup_epochs=5", *bad])
        err = capsys.readouterr().err
        assert e.value.code == 2 and said in err and "note:" not in err, err


def test_fused_check_model_offers_no_head_count_for_a_width_past_the_layernorm_tile():
    """The 'model.heads = ... would fit' hint is for a head dim at fault alone: with a width past
    add+LayerNorm's one tile as well, no head count makes the model fit."""
    from kernels import INTERPRETED, fused_ops, layernorm  # noqa: PLC0415
    from vit import ViTConfig  # noqa: PLC0415

    wide = 2 * layernorm.MAX_WIDTH  # heads 1: a head dim of 2 * MAX_WIDTH, refused for that first
    with pytest.raises(ValueError, match="the fused kernels cannot run this model") as e:
        fused_ops(INTERPRETED).check_model(ViTConfig(d_model=wide, heads=1, mlp_dim=64))
    assert "would fit" not in str(e.value), e.value


@pytest.mark.parametrize("command", [["oracle.kernel_gradcheck", "--interpret"],
                                     ["kernels.compile_check", "--arch", "80"]])
def test_ctrl_c_in_the_other_check_commands_is_one_line_and_exit_130(command, tmp_path):
    """kernel_gradcheck and compile_check take exit_code_of_a_check's path as oracle.gradcheck
    does: a Ctrl-C once the first case is done is one line and exit code 130, no traceback."""
    import os
    import sys

    from watch import Watched, interrupt_when

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    proc = Watched([sys.executable, "-m", *command], log=tmp_path / "log", env=env, cwd=ROOT)
    text = interrupt_when(proc, " ok")
    assert proc.returncode == 130 and "Traceback" not in text, proc.tail()
    assert f"python -m {command[0]}: interrupted; it writes nothing: run it again to check" in text


@pytest.mark.parametrize("d_model, heads, widths", [(40, 2, "32 or 48"), (8, 1, "16"), (30, 3, "16 or 32")])
def test_fused_check_model_offers_widths_where_no_head_count_fits(d_model, heads, widths):
    """A width with no head count giving Dh 16..128 (40 = 2 x 20 = 5 x 8 ...) was refused with no
    way out named, where the README promises the model.heads that fit: it now names widths."""
    from kernels import INTERPRETED, fused_ops  # noqa: PLC0415
    from vit import ViTConfig  # noqa: PLC0415

    with pytest.raises(ValueError) as e:
        fused_ops(INTERPRETED).check_model(ViTConfig(d_model=d_model, heads=heads, mlp_dim=64))
    assert str(e.value).endswith(f"; no model.heads does for model.d_model {d_model}: a multiple "
                                 f"of 16 ({widths}) would take some"), e.value
