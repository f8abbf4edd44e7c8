"""Data parallelism over many devices and hosts: the existing step, jitted once with shardings.

    mesh            a 1-D jax.sharding.Mesh over every device, axis "data" (N devices, P processes)
    params, opt     replicated on every device                           NamedSharding(mesh, P())
    images, labels  the global batch (B, ...) split along B, B/N rows per device   P("data")
    metrics         replicated scalars

GSPMD: `jax.jit(train_step_fn(...), in_shardings=..., out_shardings=...)` partitions the one
step over the mesh. Every weight gradient of the hand-written backward contracts over the batch
axis (dW = x^T dy, db = sum dy, dgamma = sum dy * s_hat, ...), which is sharded, so XLA computes
per-device partial sums and inserts the all-reduce itself, inside the compiled step; the AdamW
update then runs replicated. The loss is the mean over the *global* batch, so the result is the
single-device step on the same global batch, up to the order of float summation.

Random numbers: with `jax_threefry_partitionable` (on by default since jax 0.5) a random array of
the global shape has the same bits however it is sharded, and each device generates only its
rows. Dropout masks, crop offsets, flips and the mixup partner permutation are therefore those of
the single-device step: the result does not depend on the device count.

Fused kernels: the Triton kernels are custom calls (jax_triton.triton_call on a GPU, a
pure_callback under the interpreter) that the SPMD partitioner cannot split; under a sharded jit
they would run replicated on the gathered global batch. `sharded_ops` wraps each of the four ops
in `jax.shard_map` over the batch axis, so every device runs the kernel on its own rows. Every
array of the kernels' caches has the batch (or batch-major flattened rows, B*L) as its leading
axis, so the forward's per-device cache block is exactly what that device's backward gets back.
The only cross-device term is LayerNorm's dgamma/dbeta, a per-shard partial sum: psum over "data".

Many hosts: every process runs this same program (SPMD, "multi-controller"). Call
`init_distributed` first, before any other JAX call; every process reads the same seeded global
order and keeps rows `process_batch_slice(B)` of each global batch (`Batcher(..., rows=...)`
gathers only those); `shard_batch` assembles the global array from those per-process rows. On the CPU the cross-process collectives are gloo
(`jax_cpu_collectives_implementation`, jax's default); on GPUs, NCCL.

    init_distributed(coordinator, num_processes, process_id)   # cmdline.start_processes(args)
    mesh = make_mesh(num_devices)
    step = make_parallel_train_step(config, hp, mesh, ops=ops, mean=mean, std=std)
    params, opt = replicate((params, opt), mesh)
    batcher = Batcher(images, labels, B, seed=seed, rows=process_batch_slice(B, mesh))
    for x, y in batcher.epoch(epoch):                     # this process's rows of each global batch
        x, y = shard_batch(mesh, x, y)
        params, opt, metrics = step(params, opt, x, y, key)
    if is_main_process():  # replicated params: this process's own copy, no collective
        checkpoint.save(path, gather_to_host({"params": params, "opt": opt}), meta)
"""

from __future__ import annotations

import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vit.config import TrainHParams, ViTConfig
from vit.ops import REFERENCE, Ops
from vit.step import eval_step_fn, train_step_fn

DATA = "data"  # the mesh axis the batch is split along

# ----------------------------------------------------------------------------------------------
# processes


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def init_distributed(coordinator: str, num_processes: int, process_id: int) -> None:
    """Join a multi-process run as process `process_id` of `num_processes` (jax.distributed),
    coordinated by process 0 at `coordinator` ("host:port"). Call it before any other JAX call
    in the process. The command line's flags and environment variables that stand for these
    three are resolved (and checked, with messages naming them) in cmdline.py."""
    if not (_is_int(num_processes) and num_processes >= 1):
        raise ValueError(f"num_processes must be a positive integer, got {num_processes!r}")
    if not (_is_int(process_id) and 0 <= process_id < num_processes):
        raise ValueError(f"process_id must be in 0..{num_processes - 1} for {num_processes} "
                         f"processes, got {process_id!r}")
    host, _, port = str(coordinator).rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator must be host:port (process 0's address and a free port), "
                         f"got {coordinator!r}")
    if jax.config.jax_cpu_collectives_implementation is None:  # CPU processes: gloo over TCP
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if jax.distributed.is_initialized():
        if (jax.process_count(), jax.process_index()) != (num_processes, process_id):
            raise RuntimeError(
                f"jax.distributed is already initialized as process {jax.process_index()} of "
                f"{jax.process_count()}, not {process_id} of {num_processes}")
        return
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=int(num_processes),
                               process_id=int(process_id))


def is_main_process() -> bool:
    """Process 0: the one that logs and writes checkpoints."""
    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """Whether `flag` holds on any process: with several, a collective that every process must
    enter at the same point of the run (it all-gathers one int from each)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())


# ----------------------------------------------------------------------------------------------
# mesh and placement


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh, axis "data", over num_devices devices (default: every device of every process).

    Devices are ordered by (process, id), so each process owns one contiguous block of the batch
    axis (process_batch_slice). With several processes, num_devices must be a multiple of the
    process count and each process contributes its first num_devices / P local devices."""
    procs = jax.process_count()
    by_process: dict[int, list] = {}
    for d in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
        by_process.setdefault(d.process_index, []).append(d)
    total = sum(len(v) for v in by_process.values())
    if num_devices is None:
        num_devices = total
    if not (_is_int(num_devices) and 1 <= num_devices <= total):
        raise ValueError(f"the device count must be an integer in 1..{total} (the devices of "
                         f"{procs} process(es)), got {num_devices!r}")
    if num_devices % procs:
        raise ValueError(f"{num_devices} devices are not a multiple of the {procs} processes: "
                         f"each process must contribute the same number of devices")
    per_process = num_devices // procs
    short = {p: len(v) for p, v in by_process.items() if len(v) < per_process}
    if short:
        raise ValueError(f"{num_devices} devices need {per_process} devices on each of "
                         f"{procs} processes; process(es) {short} have fewer")
    devices = [d for p in sorted(by_process) for d in by_process[p][:per_process]]
    return Mesh(np.array(devices), (DATA,))


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA))


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _has_sharding(x, sharding: NamedSharding) -> bool:
    """Already placed as `sharding` on its mesh (committed: an uncommitted single-device array
    is "equivalent" to a 1-device mesh but traces as a different type, so it is moved too)."""
    if not isinstance(x, jax.Array) or not x.committed:
        return False
    if x.sharding == sharding:  # fast path: the step's own outputs
        return True
    return (isinstance(x.sharding, NamedSharding) and x.sharding.mesh == sharding.mesh
            and x.sharding.is_equivalent_to(sharding, x.ndim))


def _replicate_leaf(x, sharding):
    if _has_sharding(x, sharding):
        return x
    if _is_key(x):  # typed PRNG keys: move the key data, keep the implementation
        data = _replicate_leaf(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    # Several processes: every process holds the same value and fills its own devices with it.
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree, mesh: Mesh):
    """A pytree of host (numpy) or device arrays, replicated on every device of the mesh.

    With several processes each process must pass the same values (e.g. params initialised from
    the same seed, or the same checkpoint)."""
    sharding = _replicated(mesh)
    return jax.tree_util.tree_map(lambda x: _replicate_leaf(x, sharding), tree)


def check_batch(global_batch_size: int, mesh: Mesh) -> None:
    """The global batch must split evenly over the devices."""
    n = mesh.size
    if global_batch_size % n:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the {n} devices of the "
            f"mesh; use a batch size that is a multiple of {n} (or fewer devices)")


def process_batch_slice(global_batch_size: int, mesh: Mesh | None = None) -> slice:
    """Rows of each global batch that this process feeds (its devices' shards); every process
    reads the same seeded global order and keeps only these rows. One process: every row.

    Without a mesh: process p of P gets block p of P equal blocks, which is what every mesh of
    make_mesh gives (each process contributes the same number of devices, in process order).
    With a mesh: read off the mesh's sharding (and the batch checked against its devices)."""
    procs, pid = jax.process_count(), jax.process_index()
    if mesh is None:
        if global_batch_size % procs:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                             f"{procs} processes")
        local = global_batch_size // procs
        return slice(pid * local, (pid + 1) * local)
    check_batch(global_batch_size, mesh)
    index_map = _batch_sharded(mesh).addressable_devices_indices_map((global_batch_size,))
    rows = sorted({(s[0].start or 0, s[0].stop if s[0].stop is not None else global_batch_size)
                   for s in index_map.values()})
    for (_, stop), (start, _) in zip(rows, rows[1:]):
        if stop != start:  # not a mesh from make_mesh
            raise ValueError(f"this process's devices hold non-contiguous rows {rows} of the "
                             f"batch; build the mesh with make_mesh")
    return slice(rows[0][0], rows[-1][1])


def shard_batch(mesh: Mesh, images, labels, *more):
    """This process's rows of the global batch (numpy or jax arrays, leading axis = rows) ->
    global arrays sharded along "data"; global batch = local rows * process count. Any further
    per-example arrays (an eval validity mask) are sharded the same way and returned after."""
    arrays = (images, labels, *more)
    local = int(np.shape(images)[0])
    for a in arrays[1:]:
        if int(np.shape(a)[0]) != local:
            raise ValueError(f"shard_batch: every array needs the same number of rows, got "
                             f"{[tuple(np.shape(a)) for a in arrays]}")
    check_batch(local * jax.process_count(), mesh)
    sharding = _batch_sharded(mesh)
    if jax.process_count() == 1:
        return tuple(jax.device_put(a, sharding) for a in arrays)
    return tuple(jax.make_array_from_process_local_data(sharding, a) for a in arrays)


def _global_batch(mesh: Mesh, arrays):
    """The step's batch arguments as global arrays sharded along "data"."""
    sharding = _batch_sharded(mesh)
    out = []
    for a in arrays:
        check_batch(int(np.shape(a)[0]), mesh)
        if _has_sharding(a, sharding):
            out.append(a)
        elif jax.process_count() == 1:
            out.append(jax.device_put(a, sharding))
        else:
            raise ValueError("in a multi-process run the step takes global batches: build them "
                             "with shard_batch(mesh, images[rows], labels[rows]), "
                             "rows = process_batch_slice(global_batch_size, mesh)")
    return out


def _as_replicated(mesh: Mesh, tree):
    sharding = _replicated(mesh)
    leaves = jax.tree_util.tree_leaves(tree)
    if all(_has_sharding(x, sharding) for x in leaves):
        return tree  # the usual case after the first step
    return replicate(tree, mesh)


def gather_to_host(tree):
    """Numpy copies of a pytree of (possibly global) arrays, e.g. for vit.checkpoint.save.

    Replicated arrays (params, optimizer state) come from this process's own copy, with no
    communication, so process 0 may call it alone for them. Arrays sharded over several
    processes (a global batch, eval logits if they were sharded) are all-gathered: a collective
    that every process must enter, or it hangs."""
    def to_host(x):
        if _is_key(x):
            x = jax.random.key_data(x)
        if not isinstance(x, jax.Array):
            return np.asarray(x)
        if x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils  # noqa: PLC0415

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.tree_util.tree_map(to_host, tree)


# ----------------------------------------------------------------------------------------------
# the four fused ops, one kernel launch per device on its own rows


def sharded_ops(ops: Ops, mesh: Mesh) -> Ops:
    """`ops` (vit.ops: the fused kernels, or the reference) with each function wrapped in
    jax.shard_map over the leading batch axis of every array: each device runs the op on its
    B/N rows. LayerNorm's dgamma/dbeta are psum'd over "data" (replicated out)."""
    batch, repl = P(DATA), P()

    def smap(f, in_specs, out_specs):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)

    def check(name, x):
        if x.shape[0] % mesh.size:
            raise ValueError(f"sharded {name}: leading (batch) axis {x.shape[0]} is not divisible "
                             f"by the {mesh.size} devices of the mesh")

    def attention_forward(qkv, heads, keep_scale=None):
        check("attention_forward", qkv)
        local = lambda qkv, keep: ops.attention_forward(qkv, heads, keep)  # noqa: E731
        return smap(local, (batch, batch), batch)(qkv, keep_scale)

    def attention_backward(cache, do):
        check("attention_backward", do)
        return smap(ops.attention_backward, (batch, batch), batch)(cache, do)

    def add_layernorm_forward(params, x, r, eps):
        check("add_layernorm_forward", x)
        local = lambda params, x, r: ops.add_layernorm_forward(params, x, r, eps)  # noqa: E731
        return smap(local, (repl, batch, batch), batch)(params, x, r)

    def add_layernorm_backward(params, cache, dy):
        check("add_layernorm_backward", dy)

        def local(params, cache, dy):
            ds, grads = ops.add_layernorm_backward(params, cache, dy)
            return ds, jax.lax.psum(grads, DATA)  # per-shard partial sums -> the global sums
        return smap(local, (repl, batch, batch), (batch, repl))(params, cache, dy)

    return Ops(
        name=f"{ops.name}/shard_map[{DATA}={mesh.size}]",
        attention_forward=attention_forward,
        attention_backward=attention_backward,
        add_layernorm_forward=add_layernorm_forward,
        add_layernorm_backward=add_layernorm_backward,
        description=f"{ops.description or ops.name}, one launch per device under shard_map over "
                    f"{mesh.size} devices",
        partitionable=True,
    )


def _mesh_ops(mesh: Mesh, ops: Ops, shard_ops: bool | None) -> Ops:
    if shard_ops is None:
        shard_ops = not ops.partitionable
    return sharded_ops(ops, mesh) if shard_ops else ops


def _check_rng():
    if not jax.config.jax_threefry_partitionable:
        warnings.warn("jax_threefry_partitionable is off: random masks of the global batch are "
                      "generated whole on every device (same values, more work); turn it on",
                      stacklevel=3)


# ----------------------------------------------------------------------------------------------
# steps


def make_parallel_train_step(config: ViTConfig, hp: TrainHParams, mesh: Mesh, *,
                             ops: Ops = REFERENCE, mean=None, std=None,
                             compute_dtype: str = "fp32", grad_fn: Callable | None = None,
                             donate=True, shard_ops: bool | None = None):
    """The data-parallel step, called like vit.step.make_train_step's result:

        step(params, opt_state, images (B, H, W, C), labels (B,), key) -> (params, opt_state, metrics)

    B is the global batch. One process: plain or single-device arrays are moved onto the mesh
    (the batch split, the rest replicated). Several processes: pass shard_batch's global arrays
    and replicate()d state. shard_ops (default: not ops.partitionable) wraps the ops in
    shard_map; the reference ops need no wrapping (GSPMD partitions them), the option is there
    to test it."""
    _check_rng()
    ops = _mesh_ops(mesh, ops, shard_ops)
    step = train_step_fn(config, hp, ops=ops, mean=mean, std=std, grad_fn=grad_fn,
                         compute_dtype=compute_dtype)
    repl, data = _replicated(mesh), _batch_sharded(mesh)
    jitted = jax.jit(step, in_shardings=(repl, repl, data, data, repl),
                     out_shardings=(repl, repl, repl), donate_argnums=(0, 1) if donate else ())

    def parallel_step(params, opt_state, images, labels, key):
        images, labels = _global_batch(mesh, (images, labels))
        params, opt_state = _as_replicated(mesh, (params, opt_state))
        key = _replicate_leaf(key, repl)
        return jitted(params, opt_state, images, labels, key)

    parallel_step.jitted = jitted  # .lower(...) for inspecting the compiled collectives
    parallel_step.mesh = mesh
    parallel_step.ops = ops
    return parallel_step


def make_parallel_eval_step(config: ViTConfig, mesh: Mesh, *, ops: Ops = REFERENCE, mean=None,
                            std=None, compute_dtype: str = "fp32",
                            shard_ops: bool | None = None):
    """step(params, images, labels, valid) -> {"loss_sum", "top1", "top5", "count", "logits"},
    like vit.step.make_eval_step's result, for the global batch: the sums are over every valid
    row of every device; the logits (B, K) come back replicated (small), so every process can
    read them."""
    ops = _mesh_ops(mesh, ops, shard_ops)
    step = eval_step_fn(config, ops=ops, mean=mean, std=std, compute_dtype=compute_dtype)
    repl, data = _replicated(mesh), _batch_sharded(mesh)
    jitted = jax.jit(step, in_shardings=(repl, data, data, data), out_shardings=repl)

    def parallel_eval_step(params, images, labels, valid):
        images, labels, valid = _global_batch(mesh, (images, labels, valid))
        return jitted(_as_replicated(mesh, params), images, labels, valid)

    parallel_eval_step.jitted = jitted
    parallel_eval_step.mesh = mesh
    parallel_eval_step.ops = ops
    return parallel_eval_step
