"""Subprocess entry points of tests/test_parallel.py: the pytest process already has JAX with one
CPU device, so every multi-device or multi-process run happens here, in a fresh interpreter with
XLA_FLAGS=--xla_force_host_platform_device_count=N set by the test. Results go to npz/json files
under --out; the test compares them. No assertions here except on the setup itself. Each step
prints a line: the test waits for a worker as long as it makes progress (tests/watch.py).

    python tests/parallel_scripts/worker.py equivalence --out DIR          # 4 devices
    python tests/parallel_scripts/worker.py ops --out DIR                  # 4 devices
    python tests/parallel_scripts/worker.py multiprocess --out DIR \\
        --coordinator 127.0.0.1:PORT --num-processes 2 --process-id I      # 2 devices each
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import common


def _messages(cases):
    """{name: the ValueError message of calling fn, or None if it did not raise}."""
    out = {}
    for name, fn in cases.items():
        try:
            fn()
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    return out


def _run_steps(step, params, opt, steps, *, checkpoint=None):
    import jax  # noqa: PLC0415

    from vit import checkpoint as ckpt  # noqa: PLC0415
    from vit import parallel  # noqa: PLC0415

    metrics = []
    for s in range(steps):
        images, labels = common.batch(s)
        params, opt, m = step(params, opt, images, labels, common.step_key(s))
        metrics.append({k: float(v) for k, v in m.items()})
        print(f"step {s + 1} of {steps} done", flush=True)
        if checkpoint is not None and s + 1 == common.CKPT_STEP:
            host = parallel.gather_to_host({"params": params, "opt": opt})
            ckpt.save(checkpoint, host, {"step": s + 1})
    jax.block_until_ready(params)
    return params, opt, metrics


def equivalence(out: Path):
    """The data-parallel step on 4 devices (GSPMD, reference ops) for STEPS steps with a
    checkpoint after CKPT_STEP; the eval step; the compiled collectives; error messages."""
    import jax  # noqa: PLC0415

    from vit import parallel  # noqa: PLC0415
    from vit.ops import REFERENCE  # noqa: PLC0415

    mesh = parallel.make_mesh()
    cfg, hp = common.config(), common.hparams()
    report = {"devices": mesh.size, "seconds": {},
              "threefry_partitionable": bool(jax.config.jax_threefry_partitionable)}
    t0 = time.time()
    step = parallel.make_parallel_train_step(cfg, hp, mesh, mean=common.MEAN, std=common.STD)
    params, opt = common.init_state()
    params, opt, metrics = _run_steps(step, params, opt, common.STEPS,
                                      checkpoint=out / "ckpt_4dev.npz")
    evaluate = parallel.make_parallel_eval_step(cfg, mesh, mean=common.MEAN, std=common.STD)
    ev = parallel.gather_to_host(evaluate(params, *common.eval_batch()))
    host = parallel.gather_to_host({"params": params, "opt": opt})
    common.save_npz(out / "gspmd.npz", **common.flat(host, "state"),
                    **{f"eval/{k}": v for k, v in ev.items()})
    for s in range(2):  # (common.augmented's cutmix/mixup choice differs between the two keys)
        common.save_npz(out / f"augment{s}.npz", **common.augmented(
            *parallel.shard_batch(mesh, *common.batch(s)), common.step_key(s)))
    report["gspmd"] = metrics
    report["seconds"]["gspmd"] = time.time() - t0
    report["param_sharding"] = str(jax.tree_util.tree_leaves(params)[0].sharding)

    # Gradient accumulation: ACCUM_STEPS micro-batches spread over the 4 devices.
    t0 = time.time()
    accum_step = parallel.make_parallel_train_step(cfg, common.hparams(common.ACCUM_STEPS), mesh,
                                                   mean=common.MEAN, std=common.STD)
    accum_params, accum_opt, report["gspmd_accum"] = _run_steps(
        accum_step, *common.init_state(), common.SHARDED_STEPS)
    common.save_npz(out / "gspmd_accum.npz", **common.flat(
        parallel.gather_to_host({"params": accum_params, "opt": accum_opt}), "state"))
    report["seconds"]["gspmd_accum"] = time.time() - t0
    report["logits_sharding"] = str(evaluate(params, *common.eval_batch())["logits"].sharding)

    # The gradient all-reduce is in the compiled step (the SPMD partitioner put it there).
    params, opt = parallel.replicate(common.init_state(), mesh)
    images, labels = parallel.shard_batch(mesh, *common.batch(0))
    hlo = step.jitted.lower(params, opt, images, labels, common.step_key(0)).compile().as_text()
    report["hlo_all_reduce"] = hlo.count("all-reduce(")
    report["hlo_all_gather"] = hlo.count("all-gather(")

    # Errors: a global batch of 6 does not split over 4 devices.
    images6, labels6 = common.batch(0, size=6)
    report["errors"] = _messages({
        "step": lambda: step(params, opt, images6, labels6, common.step_key(0)),
        "eval": lambda: evaluate(params, images6, labels6, np.ones(6, bool)),
        "shard_batch": lambda: parallel.shard_batch(mesh, images6, labels6),
        "process_batch_slice": lambda: parallel.process_batch_slice(6, mesh),
        "sharded_op": lambda: parallel.sharded_ops(REFERENCE, mesh)
        .attention_forward(np.zeros((6, 5, 96), np.float32), 2),
        "make_mesh": lambda: parallel.make_mesh(5),
    })
    report["mesh_2"] = [d.id for d in parallel.make_mesh(2).devices.tolist()]
    (out / "equivalence.json").write_text(json.dumps(report, indent=1))


def _op_inputs(b=8, l=5, d=32, heads=2, seed=0):
    # L = 5: not a power of two (masked tiles); Dh = 16: the smallest head dim the kernel takes
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    keep = (rng.random((b, heads, l, l)) < 0.8).astype(np.float32) / 0.8
    return {
        "qkv": f(b, l, 3 * d), "do": f(b, l, d), "keep": keep,
        "ln": {"gamma": 1.0 + 0.1 * f(d), "beta": 0.1 * f(d)},
        "x3": f(b, l, d), "r3": f(b, l, d), "dy3": f(b, l, d),
        "x2": f(b, d), "dy2": f(b, d),
    }


def _run_ops(ops, inputs, mesh, heads=2, eps=1e-5):
    """Every op forward and backward, jitted, inputs sharded along the batch: {name: numpy}."""
    import jax  # noqa: PLC0415
    from jax.sharding import NamedSharding  # noqa: PLC0415
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    batch, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    x = {k: jax.device_put(v, repl if k == "ln" else batch) for k, v in inputs.items()}

    @jax.jit
    def run(x):
        out = {}
        for tag, keep in (("nokeep", None), ("keep", x["keep"])):
            o, cache = ops.attention_forward(x["qkv"], heads, keep)
            out[f"attn_{tag}/o"] = o
            out[f"attn_{tag}/dqkv"] = ops.attention_backward(cache, x["do"])
        for tag, xx, r, dy in (("3d_r", x["x3"], x["r3"], x["dy3"]), ("3d", x["x3"], None, x["dy3"]),
                               ("2d", x["x2"], None, x["dy2"])):
            y, cache = ops.add_layernorm_forward(x["ln"], xx, r, eps)
            ds, g = ops.add_layernorm_backward(x["ln"], cache, dy)
            out.update({f"ln_{tag}/y": y, f"ln_{tag}/ds": ds, f"ln_{tag}/dgamma": g["gamma"],
                        f"ln_{tag}/dbeta": g["beta"]})
        return out

    return {k: np.asarray(v) for k, v in run(x).items()}


def _spy(ops, seen):
    """ops that note the leading-axis size each function is traced with."""
    def wrap(name, fn, arg):
        def f(*args):
            seen.setdefault(name, []).append(int(args[arg].shape[0]))
            return fn(*args)
        return f
    return ops._replace(
        name="spy",
        attention_forward=wrap("attention_forward", ops.attention_forward, 0),
        attention_backward=wrap("attention_backward", ops.attention_backward, 1),
        add_layernorm_forward=wrap("add_layernorm_forward", ops.add_layernorm_forward, 1),
        add_layernorm_backward=wrap("add_layernorm_backward", ops.add_layernorm_backward, 2))


def ops(out: Path, fused: bool):
    """sharded_ops(ops, mesh) against the unwrapped ops, op by op, on 4 devices."""
    from vit import parallel  # noqa: PLC0415
    from vit.ops import REFERENCE  # noqa: PLC0415

    mesh = parallel.make_mesh()
    inputs = _op_inputs()
    report = {"devices": mesh.size}
    results = {"reference/plain": _run_ops(REFERENCE, inputs, mesh),
               "reference/sharded": _run_ops(parallel.sharded_ops(REFERENCE, mesh), inputs, mesh)}
    seen_plain, seen_sharded = {}, {}
    _run_ops(_spy(REFERENCE, seen_plain), inputs, mesh)
    _run_ops(parallel.sharded_ops(_spy(REFERENCE, seen_sharded), mesh), inputs, mesh)
    report["rows_seen"] = {"plain": seen_plain, "sharded": seen_sharded}
    if fused:
        from kernels import INTERPRETED, fused_ops  # noqa: PLC0415

        t0 = time.time()
        kernels = fused_ops(launcher=INTERPRETED)
        results["fused/plain"] = _run_ops(kernels, inputs, mesh)
        results["fused/sharded"] = _run_ops(parallel.sharded_ops(kernels, mesh), inputs, mesh)
        report["fused_seconds"] = time.time() - t0
    # The whole data-parallel step with the ops under shard_map (the kernels when triton is
    # there, else the reference ops wrapped all the same).
    t0 = time.time()
    step = parallel.make_parallel_train_step(common.config(), common.hparams(), mesh,
                                             ops=kernels if fused else REFERENCE, shard_ops=True,
                                             mean=common.MEAN, std=common.STD)
    params, opt, metrics = _run_steps(step, *common.init_state(), common.SHARDED_STEPS)
    host = parallel.gather_to_host({"params": params, "opt": opt})
    common.save_npz(out / "sharded_step.npz", **common.flat(host, "state"))
    report["sharded_step"] = metrics
    report["sharded_step_ops"] = step.ops.name
    report["sharded_step_seconds"] = time.time() - t0
    # The same with gradient accumulation: the shard_map-ed ops inside the micro-batch scan.
    t0 = time.time()
    step = parallel.make_parallel_train_step(common.config(), common.hparams(common.ACCUM_STEPS),
                                             mesh, ops=kernels if fused else REFERENCE,
                                             shard_ops=True, mean=common.MEAN, std=common.STD)
    params, opt, report["sharded_step_accum"] = _run_steps(step, *common.init_state(),
                                                           common.SHARDED_STEPS)
    common.save_npz(out / "sharded_step_accum.npz", **common.flat(
        parallel.gather_to_host({"params": params, "opt": opt}), "state"))
    report["sharded_step_accum_seconds"] = time.time() - t0
    common.save_npz(out / "ops.npz", **{f"{k}/{name}": v for k, vals in results.items()
                                       for name, v in vals.items()})
    (out / "ops.json").write_text(json.dumps(report, indent=1))


def multiprocess(out: Path, coordinator: str, num_processes: int, process_id: int):
    """One of the processes of a multi-process run: each feeds its own rows of every global
    batch; process 0 writes the checkpoint."""
    from vit import parallel  # noqa: PLC0415

    parallel.init_distributed(coordinator, num_processes, process_id)  # before any JAX call

    import jax  # noqa: PLC0415

    from vit import checkpoint as ckpt  # noqa: PLC0415

    mesh = parallel.make_mesh()
    rows = parallel.process_batch_slice(common.GLOBAL_BATCH, mesh)
    if rows != parallel.process_batch_slice(common.GLOBAL_BATCH):  # the mesh-free default
        raise SystemExit(f"process_batch_slice: {rows} from the mesh, "
                         f"{parallel.process_batch_slice(common.GLOBAL_BATCH)} without")
    cfg, hp = common.config(), common.hparams()
    step = parallel.make_parallel_train_step(cfg, hp, mesh, mean=common.MEAN, std=common.STD)
    params, opt = parallel.replicate(common.init_state(), mesh)
    metrics = []
    for s in range(common.MP_STEPS):
        images, labels = common.batch(s)                  # the same global order everywhere...
        images, labels = parallel.shard_batch(mesh, images[rows], labels[rows])  # ...own rows
        params, opt, m = step(params, opt, images, labels, common.step_key(s))
        metrics.append({k: float(v) for k, v in m.items()})
        print(f"process {process_id}: step {s + 1} of {common.MP_STEPS} done", flush=True)
    evaluate = parallel.make_parallel_eval_step(cfg, mesh, mean=common.MEAN, std=common.STD)
    # eval rows as device arrays, the way vit.data.loader.Batcher yields them
    images_e, labels_e, valid_e = (jax.device_put(a) for a in common.eval_batch())
    ev = evaluate(params, *parallel.shard_batch(mesh, images_e[rows], labels_e[rows], valid_e[rows]))
    host = parallel.gather_to_host({"params": params, "opt": opt})
    gathered_images = parallel.gather_to_host(images)     # sharded over processes: all-gathered
    if parallel.is_main_process():
        ckpt.save(out / "ckpt_mp.npz", host, {"step": common.MP_STEPS})
    common.save_npz(out / f"mp_{process_id}.npz", **common.flat(host, "state"),
                    **{f"eval/{k}": v for k, v in parallel.gather_to_host(ev).items()},
                    last_images=gathered_images)
    report = {"process_index": jax.process_index(), "process_count": jax.process_count(),
              "devices": mesh.size, "local_devices": jax.local_device_count(),
              "rows": [rows.start, rows.stop], "main": parallel.is_main_process(),
              "metrics": metrics, "images_fully_addressable": bool(images.is_fully_addressable)}
    (out / f"mp_{process_id}.json").write_text(json.dumps(report, indent=1))
    jax.distributed.shutdown()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("equivalence", "ops", "multiprocess"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fused", action="store_true", help="ops: also the interpreted kernels")
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.mode == "equivalence":
        # the step is compiled again for its HLO text: let that be a hit of a persistent cache
        import jax  # noqa: PLC0415

        jax.config.update("jax_compilation_cache_dir", str(args.out / "xla_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        equivalence(args.out)
    elif args.mode == "ops":
        ops(args.out, args.fused)
    else:
        multiprocess(args.out, args.coordinator, args.num_processes, args.process_id)
    print(f"worker {args.mode}: done", flush=True)


if __name__ == "__main__":
    sys.exit(main())
