"""Data parallelism (vit/parallel.py): the step on 4 devices, on 2 processes and resumed on 1
device equals the single-device step on the same global batches.

This pytest process has JAX with one CPU device, so the multi-device runs are subprocesses
(tests/parallel_scripts/worker.py) with XLA_FLAGS=--xla_force_host_platform_device_count=N that
write their results to files; the single-device reference runs here.

One exception to "equal": the K columns of the QKV bias, whose exact gradient is zero and whose
float32 noise AdamW turns into updates of about lr (tests/key_bias.py). Those D columns are
compared against that bound (and their gradient checked to be noise); every other number to 1e-5
relative (5e-5 for the fused kernels with accumulation: RTOL_FUSED_ACCUM says why).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import socket
import sys
import time

import jax
import numpy as np
import pytest

from vit import checkpoint, parallel
from vit.step import make_eval_step, make_train_step
from key_bias import adamw_noise_bound, qkv_bias_columns
from watch import Watched, run_watched, wait_for

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "parallel_scripts"
WORKER = SCRIPTS / "worker.py"

_spec = importlib.util.spec_from_file_location("parallel_common", SCRIPTS / "common.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

RTOL = 1e-5  # relative to the largest magnitude of each tensor
# The fused kernels with gradient accumulation against the reference ops: in the second step's
# AdamW moments of blocks/1/attn/out/b one element's two gradients nearly cancel (m = 2.9e-6
# against sqrt(v) = 1.1e-5), so the kernels' float32 summation order shows in its update at
# ~1e-5 of the tensor's largest value (8.9e-6 on one device, 1.4e-5 on four; 4e-6 elsewhere).
RTOL_FUSED_ACCUM = 5e-5
DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                   "JAX_LOCAL_DEVICE_IDS")


# ----------------------------------------------------------------------------------------------
# helpers


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_worker(mode: str, out: pathlib.Path, devices: int, *extra: str) -> None:
    """The worker in a subprocess, waited for as long as it makes progress (tests/watch.py)."""
    cmd = [sys.executable, str(WORKER), mode, "--out", str(out), *extra]
    done = run_watched(cmd, log=out / f"{mode}.log", env=_env(devices), cwd=ROOT)
    if done.returncode != 0:
        pytest.fail(f"{mode} worker failed\n{done.tail()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_state(path) -> dict:
    with np.load(path) as data:
        return {k: data[k] for k in data.files if k.startswith("state/")}


def assert_states_close(got: dict, want: dict, lr_sum: float, what: str, rtol: float = RTOL):
    """Every tensor of {"state/params/...", "state/opt/..."} to rtol of its largest magnitude; the
    key-bias columns of the params to the AdamW noise bound (see the module docstring)."""
    assert sorted(got) == sorted(want), what
    worst = 0.0
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape and g.dtype == w.dtype, (what, name, g.shape, w.shape)
        split = (qkv_bias_columns(name, common.config().d_model)
                 if name.startswith("state/params/") else None)
        if split is not None:
            tight, k_cols = split
            k_diff = float(np.max(np.abs(g[k_cols] - w[k_cols])))
            assert k_diff <= adamw_noise_bound(lr_sum), (what, name, "key bias", k_diff, lr_sum)
            g, w = g[tight], w[tight]
        scale = float(np.max(np.abs(w)))
        diff = float(np.max(np.abs(g.astype(np.float64) - w)))
        assert diff <= rtol * scale + 1e-30, (what, name, diff, scale)
        worst = max(worst, diff / scale if scale else 0.0)
    return worst


def assert_metrics_close(got: list, want: list, what: str):
    assert len(got) == len(want), what
    for s, (g, w) in enumerate(zip(got, want)):
        for k in ("loss", "grad_norm", "lr"):
            assert g[k] == pytest.approx(w[k], rel=RTOL), (what, s, k, g[k], w[k])
        assert g["accuracy"] == w["accuracy"], (what, s)


def assert_eval_close(got: dict, want: dict, what: str):
    for k in ("loss_sum", "top1", "top5", "count"):
        assert float(got[f"eval/{k}"]) == pytest.approx(float(want[k]), rel=RTOL, abs=1e-6), (what, k)
    logits = want["logits"]
    diff = np.max(np.abs(got["eval/logits"] - logits))
    assert diff <= RTOL * np.max(np.abs(logits)), (what, diff)


def lr_sum(metrics, steps) -> float:
    return float(sum(m["lr"] for m in metrics[:steps]))


# ----------------------------------------------------------------------------------------------
# the single-device reference, in this process


@pytest.fixture(scope="module")
def reference():
    """make_train_step (one device) on the global batches: metrics, the state after every step,
    and make_eval_step on the params after MP_STEPS and after STEPS."""
    cfg, hp = common.config(), common.hparams()
    step = make_train_step(cfg, hp, mean=common.MEAN, std=common.STD, donate=False)
    evaluate = make_eval_step(cfg, mean=common.MEAN, std=common.STD)
    params, opt = common.init_state()
    metrics, states, evals = [], {}, {}
    for s in range(common.STEPS):
        params, opt, m = step(params, opt, *common.batch(s), common.step_key(s))
        metrics.append({k: float(v) for k, v in m.items()})
        states[s + 1] = common.flat({"params": params, "opt": opt}, "state")
        if s + 1 in (common.MP_STEPS, common.STEPS):
            evals[s + 1] = jax.tree_util.tree_map(np.asarray, evaluate(params, *common.eval_batch()))
    # the same with gradient accumulation (ACCUM_STEPS micro-batches) for SHARDED_STEPS steps
    accum_step = make_train_step(cfg, common.hparams(common.ACCUM_STEPS), mean=common.MEAN,
                                 std=common.STD, donate=False)
    params, opt = common.init_state()
    accum_metrics = []
    for s in range(common.SHARDED_STEPS):
        params, opt, m = accum_step(params, opt, *common.batch(s), common.step_key(s))
        accum_metrics.append({k: float(v) for k, v in m.items()})
    accum_state = common.flat({"params": params, "opt": opt}, "state")
    return {"metrics": metrics, "states": states, "evals": evals, "step": step,
            "accum_metrics": accum_metrics, "accum_state": accum_state}


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    out = tmp_path_factory.mktemp("equivalence")
    t0 = time.time()
    run_worker("equivalence", out, 4)
    report = json.loads((out / "equivalence.json").read_text())
    report["wall_s"] = time.time() - t0
    return out, report


@pytest.fixture(scope="module")
def ops_run(tmp_path_factory):
    fused = importlib.util.find_spec("triton") is not None
    out = tmp_path_factory.mktemp("ops")
    run_worker("ops", out, 4, *(["--fused"] if fused else []))
    with np.load(out / "ops.npz") as data:
        arrays = {k: data[k] for k in data.files}
    return out, json.loads((out / "ops.json").read_text()), arrays, fused


# ----------------------------------------------------------------------------------------------
# 1. four devices = one device


def test_four_device_step_equals_one_device_step(reference, four_devices):
    """STEPS steps with dropout (every kind), crop, flip, mixup, smoothing, clipping, warmup: the
    metrics of every step, the params and AdamW moments after the last, and the eval step; and
    the augmentation with erasing and cutmix too (common.augmented) of a sharded batch."""
    out, report = four_devices
    assert report["devices"] == 4 and report["threefry_partitionable"]
    assert_metrics_close(report["gspmd"], reference["metrics"], "4 devices")
    got = load_state(out / "gspmd.npz")
    worst = assert_states_close(got, reference["states"][common.STEPS],
                                lr_sum(reference["metrics"], common.STEPS), "4 devices")
    print(f"4 devices vs 1: worst relative difference {worst:.1e} after {common.STEPS} steps")
    with np.load(out / "gspmd.npz") as data:
        assert_eval_close({k: data[k] for k in data.files if k.startswith("eval/")},
                          reference["evals"][common.STEPS], "4 devices")
    for s in range(2):  # the same draws whatever the sharding; float rounding may move a pixel
        with np.load(out / f"augment{s}.npz") as data:  # by 1e-7, or one level at RandAugment's floor
            want = common.augmented(*common.batch(s), common.step_key(s))
            np.testing.assert_allclose(data["targets"], want["targets"], rtol=0, atol=1e-6)
            diff = np.abs(data["x"] - want["x"])
            assert (diff > 1e-6).mean() < 1e-3 and diff.max() <= 1.01 / (255 * min(common.STD))
    assert report["param_sharding"].endswith("spec=P(), memory_kind=device)")
    assert report["logits_sharding"].endswith("spec=P(), memory_kind=device)")


def test_four_device_accumulated_step_equals_one_device_accumulated_step(reference, four_devices):
    """Gradient accumulation (2 micro-batches, each spread over the 4 devices) with dropout,
    crop, flip, mixup: the same metrics and state as one device taking the same micro-batches."""
    out, report = four_devices
    assert_metrics_close(report["gspmd_accum"], reference["accum_metrics"], "4 devices, accum")
    assert_states_close(load_state(out / "gspmd_accum.npz"), reference["accum_state"],
                        lr_sum(reference["accum_metrics"], common.SHARDED_STEPS), "4 devices, accum")


def test_key_bias_gradient_is_noise(reference):
    """The one exception of the comparisons: the K columns of the QKV bias get no gradient."""
    state = reference["states"][common.STEPS]
    for name, m in state.items():
        if name.startswith("state/opt/m/") and name.endswith("attn/qkv/b"):
            tight, k_cols = qkv_bias_columns(name, common.config().d_model)
            assert np.max(np.abs(m[k_cols])) < 1e-6 * np.max(np.abs(m[tight])), name


def test_gradient_all_reduce_is_inside_the_compiled_step(four_devices):
    _, report = four_devices
    assert report["hlo_all_reduce"] >= 1, report


# ----------------------------------------------------------------------------------------------
# 2. sharded_ops


def test_sharded_reference_ops_equal_plain_ops(ops_run):
    """Forward outputs and backward results (dqkv, ds, dgamma, dbeta) of every op, with and
    without dropout scale / residual, 3-D and 2-D LayerNorm inputs; each device sees its rows."""
    _, report, arrays, _ = ops_run
    names = sorted(k.split("/", 2)[2] for k in arrays if k.startswith("reference/plain/"))
    assert len(names) == 16, names
    for name in names:
        want, got = arrays[f"reference/plain/{name}"], arrays[f"reference/sharded/{name}"]
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.max(np.abs(want)), err_msg=name)
    # GSPMD traces the plain ops at the global batch (8 rows); shard_map at one device's 2 rows
    for fn, rows in report["rows_seen"]["plain"].items():
        assert set(rows) == {8}, (fn, rows)
    for fn, rows in report["rows_seen"]["sharded"].items():
        assert set(rows) == {2}, (fn, rows)
    assert len(report["rows_seen"]["sharded"]) == 4


def test_sharded_fused_kernels_equal_plain_kernels(ops_run):
    """The interpreted Triton kernels under shard_map equal themselves unsharded and the
    reference ops, op by op."""
    _, _, arrays, fused = ops_run
    if not fused:
        pytest.skip("triton is not installed: the fused kernels cannot run (pip install -e '.[test]')")
    names = sorted(k.split("/", 2)[2] for k in arrays if k.startswith("reference/plain/"))
    for name in names:
        ref = arrays[f"reference/plain/{name}"]
        scale = np.max(np.abs(ref))
        for kind in ("fused/plain", "fused/sharded"):
            np.testing.assert_allclose(arrays[f"{kind}/{name}"], ref, rtol=0, atol=1e-5 * scale,
                                       err_msg=f"{kind} {name}")
        np.testing.assert_allclose(arrays[f"fused/sharded/{name}"], arrays[f"fused/plain/{name}"],
                                   rtol=0, atol=1e-5 * scale, err_msg=name)


def test_step_with_sharded_ops_equals_one_device_step(ops_run, reference):
    """The whole 4-device step with the ops under shard_map (the interpreted fused kernels when
    triton is installed, else the reference ops) equals the 1-device reference step."""
    out, report, _, fused = ops_run
    want = "fused/shard_map[data=4]" if fused else "reference/shard_map[data=4]"
    assert report["sharded_step_ops"] == want
    steps = common.SHARDED_STEPS
    assert_metrics_close(report["sharded_step"], reference["metrics"][:steps], want)
    worst = assert_states_close(load_state(out / "sharded_step.npz"), reference["states"][steps],
                                lr_sum(reference["metrics"], steps), want)
    print(f"{want} 4-device step vs reference 1-device step: worst relative difference {worst:.1e}")
    # gradient accumulation: the shard_map-ed ops inside the scan over micro-batches
    assert_metrics_close(report["sharded_step_accum"], reference["accum_metrics"], want + ", accum")
    assert_states_close(load_state(out / "sharded_step_accum.npz"), reference["accum_state"],
                        lr_sum(reference["accum_metrics"], steps), want + ", accum",
                        rtol=RTOL_FUSED_ACCUM if fused else RTOL)


# ----------------------------------------------------------------------------------------------
# 3. resume a 4-device checkpoint on 1 device


def test_resume_four_device_checkpoint_on_one_device(reference, four_devices):
    """The checkpoint the 4-device run wrote after CKPT_STEP steps holds the 1-device state; one
    device continues from it exactly as the 4-device run did."""
    out, report = four_devices
    trees, meta = checkpoint.load(out / "ckpt_4dev.npz")
    assert meta == {"step": common.CKPT_STEP}
    k = common.CKPT_STEP
    assert_states_close(common.flat(trees, "state"), reference["states"][k],
                        lr_sum(reference["metrics"], k), "checkpoint")

    # continue on this process's one device with the reference's jitted single-device step,
    # from the numpy arrays of the checkpoint
    params, opt, metrics = trees["params"], trees["opt"], []
    for s in range(k, common.STEPS):
        params, opt, m = reference["step"](params, opt, *common.batch(s), common.step_key(s))
        metrics.append({key: float(v) for key, v in m.items()})
    assert_metrics_close(metrics, report["gspmd"][k:], "resumed vs 4 devices")
    resumed = common.flat({"params": params, "opt": opt}, "state")
    assert_states_close(resumed, load_state(out / "gspmd.npz"),
                        lr_sum(reference["metrics"][k:], common.STEPS - k), "resumed vs 4 devices")


def test_train_py_two_processes_equal_one_process_on_four_devices(tmp_path):
    """python train.py itself, 2 processes x 2 devices (each Batcher gathering only its rows of
    every global batch) against 1 process x 4 devices: the same metrics, epoch by epoch."""
    common_args = [sys.executable, "train.py", "--dataset", "digits", "--config", "configs/digits.toml",
                   "--epochs", "2", "--no-progress"]
    single = run_watched([*common_args, "--devices", "4", "--out", tmp_path / "one"],
                         log=tmp_path / "one.log", env=_env(4), cwd=ROOT)
    assert single.returncode == 0, single.tail()
    port = free_port()
    procs = [Watched([*common_args, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                      "--process-id", pid, "--out", tmp_path / "two"],
                     log=tmp_path / f"two-{pid}.log", env=_env(2), cwd=ROOT) for pid in range(2)]
    try:
        wait_for(procs)
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(p.tail() for p in procs)
    # each says what it waits for before JAX's silent wait for the other process
    assert all(f"process {pid} of 2: waiting for all 2 processes to join at 127.0.0.1:{port}"
               in p.text() for pid, p in enumerate(procs))

    def metrics(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    one, two = metrics("one"), metrics("two")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert a["val_images"] == b["val_images"] == 360
        for key in ("train_loss", "val_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
        for key in ("train_accuracy", "val_top1", "val_top5"):
            assert abs(b[key] - a[key]) <= 1 / 360, key  # at most one image flips on a near-tie


# ----------------------------------------------------------------------------------------------
# 4. two processes on loopback


def test_two_processes_equal_one_process(reference, tmp_path):
    """Two processes x 2 CPU devices (jax.distributed, gloo collectives), each feeding its half
    of every global batch, then eval, gather_to_host and a checkpoint from process 0."""
    port = free_port()
    procs = [Watched([sys.executable, WORKER, "multiprocess", "--out", tmp_path,
                      "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", pid],
                     log=tmp_path / f"proc{pid}.log", env=_env(2), cwd=ROOT) for pid in range(2)]
    try:  # as long as either process makes progress (a hang in a collective fails, load does not)
        wait_for(procs)
    finally:
        for p in procs:
            p.kill()
    if any(p.returncode != 0 for p in procs):
        pytest.fail("failed\n" + "\n".join(p.tail() for p in procs))

    want_state = reference["states"][common.MP_STEPS]
    total_lr = lr_sum(reference["metrics"], common.MP_STEPS)
    half = common.GLOBAL_BATCH // 2
    for pid in range(2):
        report = json.loads((tmp_path / f"mp_{pid}.json").read_text())
        assert (report["process_index"], report["process_count"]) == (pid, 2)
        assert (report["devices"], report["local_devices"]) == (4, 2)
        assert report["rows"] == [pid * half, (pid + 1) * half]
        assert report["main"] == (pid == 0)
        assert not report["images_fully_addressable"]  # the batch really spans both processes
        assert_metrics_close(report["metrics"], reference["metrics"][:common.MP_STEPS], f"process {pid}")
        with np.load(tmp_path / f"mp_{pid}.npz") as data:
            got = {k: data[k] for k in data.files}
        assert_states_close({k: v for k, v in got.items() if k.startswith("state/")}, want_state,
                            total_lr, f"process {pid}")
        assert_eval_close(got, reference["evals"][common.MP_STEPS], f"process {pid} eval")
        np.testing.assert_array_equal(got["last_images"], common.batch(common.MP_STEPS - 1)[0])
    trees, meta = checkpoint.load(tmp_path / "ckpt_mp.npz")
    assert meta == {"step": common.MP_STEPS}
    assert_states_close(common.flat(trees, "state"), want_state, total_lr, "process 0 checkpoint")


# ----------------------------------------------------------------------------------------------
# 5. errors and single-process behaviour


def test_batch_not_divisible_by_devices(four_devices):
    _, report = four_devices
    errors = report["errors"]
    for where in ("step", "eval", "shard_batch", "process_batch_slice"):
        assert errors[where] is not None, where
        assert "global batch size 6 is not divisible by the 4 devices" in errors[where], errors[where]
    assert "leading (batch) axis 6 is not divisible by the 4 devices" in errors["sharded_op"]
    assert "the device count must be an integer in 1..4" in errors["make_mesh"]
    assert report["mesh_2"] == [0, 1]


def test_single_process_helpers():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.size == jax.device_count() == 1
    assert parallel.process_batch_slice(8, mesh) == slice(0, 8)
    assert parallel.process_batch_slice(7) == slice(0, 7)  # one process: all rows
    images, labels = parallel.shard_batch(mesh, *common.batch(0))
    assert images.shape == (8, 16, 16, 3) and labels.shape == (8,)
    key = parallel.replicate(jax.random.key(3), mesh)  # typed keys too
    host = parallel.gather_to_host({"key": key, "x": images})
    np.testing.assert_array_equal(host["x"], common.batch(0)[0])
    np.testing.assert_array_equal(host["key"], jax.random.key_data(jax.random.key(3)))
    with pytest.raises(ValueError, match="the device count must be an integer in 1..1"):
        parallel.make_mesh(2)
    with pytest.raises(ValueError, match="same number of rows"):
        parallel.shard_batch(mesh, images, labels[:4])


def test_make_mesh_takes_as_many_devices_from_every_process(monkeypatch):
    """Two processes, one with 3 devices and one with 1 (faked): a mesh takes the same number of
    devices from each, the first ones of each in process order, or says why it cannot."""
    from types import SimpleNamespace

    devices = [SimpleNamespace(process_index=p, id=i) for p, i in ((1, 3), (0, 2), (0, 1), (0, 0))]
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "devices", lambda: devices)
    monkeypatch.setattr(parallel, "Mesh", lambda array, axes: ([(d.process_index, d.id) for d in array],
                                                               axes))
    assert parallel.make_mesh(2) == ([(0, 0), (1, 3)], ("data",))
    with pytest.raises(ValueError, match="3 devices are not a multiple of the 2 processes"):
        parallel.make_mesh(3)
    with pytest.raises(ValueError, match=r"4 devices need 2 devices on each of 2 processes; process\(es\) \{1: 1\}"):
        parallel.make_mesh(4)


def test_ops_xla_cannot_partition_run_under_shard_map_by_default():
    """The parallel steps wrap an op set in shard_map unless XLA can partition it: the fused
    kernels (custom calls) get one launch per device on its own rows, where unwrapped they would
    run on the gathered global batch (the same numbers, N times the work); the reference ops are
    left to GSPMD. shard_ops overrides the default either way."""
    from kernels import INTERPRETED, fused_ops
    from vit.ops import REFERENCE

    mesh, config, hp = parallel.make_mesh(1), common.config(), common.hparams()
    fused = fused_ops(launcher=INTERPRETED)
    makers = {"train": lambda **kw: parallel.make_parallel_train_step(config, hp, mesh, **kw),
              "eval": lambda **kw: parallel.make_parallel_eval_step(config, mesh, **kw)}
    for what, make in makers.items():
        assert make().ops is REFERENCE, what
        assert make(ops=fused).ops.name == "fused/shard_map[data=1]", what
        assert make(ops=fused, shard_ops=False).ops is fused, what
        assert make(shard_ops=True).ops.name == "reference/shard_map[data=1]", what
