#!/usr/bin/env bash
# The GPU checks and benchmarks of vitfuse, in one go, on a lent GPU machine.
#
#   bash bench/gpu.sh                  # the four main parts, in order: env tests gradcheck bench
#   bash bench/gpu.sh gradcheck bench  # only some parts (same order as given)
#   bash bench/gpu.sh env tune profile # two of the four extra parts (the why behind the bench's times)
#   bash bench/gpu.sh env memory       # what a step holds on this GPU, by accumulation steps
#
# A lent machine allows 10 minutes per command: set TOTAL_TIMEOUT below that, so that gpu.sh stops
# what would run past it and still copies to $OUT the rows the bench measured so far (its results
# files are rewritten after every row; logs go to $OUT as they come), and split the parts if they
# need more, e.g.
#   TOTAL_TIMEOUT=540 bash bench/gpu.sh env tests gradcheck bench
#   TOTAL_TIMEOUT=540 bash bench/gpu.sh env bench-step   # what the first call did not reach
#   TOTAL_TIMEOUT=540 bash bench/gpu.sh env tune-ln tune profile
# and, on a later day, the rows that a committed results file of the same GPU still lacks:
#   BENCH_CONTINUE=bench/results/nvidia-h200-2026-11-30.json TOTAL_TIMEOUT=540 bash bench/gpu.sh env bench
#
# Parts (each one's output is shown and tee'd to $OUT/<part>.log):
#   env        nvidia-smi, Python and package versions, jax devices (fails without a GPU backend)
#   tests      the kernel tests (both attention kernels and the dispatcher, LN, the launcher), the
#              fused whole model, bf16, the ViT presets' fused runs and the README's Public API
#              block: every test file that runs the kernels, compiled through jax-triton
#              (JAX_PLATFORMS=cuda,cpu; VITFUSE_REQUIRE_GPU=1 makes them fail rather than fall back to
#              Triton's interpreter), in TEST_WORKERS pytest-xdist processes where xdist is installed
#   gradcheck  python -m oracle.kernel_gradcheck (float32) and --dtype bfloat16, side by side
#   bench      python -m pytest bench/ --benchmark -q; this run's bench/results files and a
#              speedup plot copied to $OUT/
#   bench-ops, bench-step
#              the same in two halves (attention + add+LN; the train step), each with
#              --bench-merge so that together they fill one results file: for when the whole
#              bench does not fit one 10-minute command
#   tune       python -m bench.tune_attention: every variant of both attention kernels (one-tile
#              BLOCK_M x warps; key-blocked blocks, TUNE_GRID=quick|full) checked and timed at the
#              product shape and ViT-B/16's L=197; $OUT/tune-attention.md, and the winners in
#              $OUT/attention_table.json (copy it over kernels/attention_table.json)
#   tune-ln    python -m bench.tune_layernorm: launch geometries of the add+LN kernels (forward:
#              BLOCK_M x warps; backward: BLOCK_M x warps x programs x reduction columns, TUNE_GRID)
#              checked and timed as the bench times its add+LN rows, at the product shape in fp32
#              (the missed targets), beside today's plan; its tables end tune-ln.log (nothing in
#              the product changes)
#   profile    one reference and one fused train step under Nsight Compute (ncu), kernel by
#              kernel; $OUT/ncu-step-{reference,fused}.csv and their summaries in profile.log
#   memory     python -m bench.step_memory: XLA's memory accounting of the compiled train step on
#              this GPU, for the product ViT (batch 256, fp32; 1 2 4 8 accumulation steps) and
#              ViT-B/16 (batch 1024, bf16; 1 2 4 8 16), the README's table; compiles, runs
#              nothing (ViT-B/16 at 1 2 4 8: 46 s on a 2-core CPU); memory.log
# Before any part, the wheels carried in .whl/ (jax-triton 0.3.1 and absl-py, which it imports:
# `pip download --no-deps jax-triton==0.3.1 absl-py -d .whl`) are installed to /tmp/site and put
# first on PYTHONPATH (the GPU image has jax with CUDA, triton, pytest and pytest-benchmark, no
# jax-triton). --upgrade replaces what an earlier call left in /tmp/site on a warm machine (without
# it pip keeps the old copy and exits 0); the versions then found there are printed. Its
# output opens $OUT/env.log. A missing wheel or a failed install fails the run (the parts still run).
#
# Every part runs even when an earlier one failed; the exit status is 1 if any part (or the
# install) failed, 2 for a bad part name. $OUT/ gets one log per part, the results .json and .md,
# one .png, tune-attention.md, attention_table.json and two ncu CSVs, none in subfolders. (A lent
# machine returns at most 8 files from $OUT: `env tests gradcheck bench` leaves 7, `env tune
# profile` 7, `env tune-ln tune profile` and `env tune profile memory` 8; all eight parts in one
# call would leave 15.)
#
# Environment: OUT (default /tmp/vitfuse-gpu), PYTHON (default python3), PART_TIMEOUT (seconds per
# command, default 0 = none; a part past it fails with exit 124 and the next part runs),
# TOTAL_TIMEOUT (seconds for the whole script, default 0 = none: each command gets at most what is
# left of it less TOTAL_RESERVE, default 20 s kept for copying results and the plot; a part with
# no time left is not started and counts as failed; set it below a machine's limit per command,
# e.g. TOTAL_TIMEOUT=540 for 10 minutes, so the script, not the machine, ends the call),
# TEST_WORKERS (default 8: pytest-xdist processes of the tests part; 1 = one process), WHEELS
# (default .whl) and SITE (default /tmp/site): where the wheels are and where they go.
# BENCH_CONTINUE (default empty): a results .json of this GPU from an earlier call that was cut
# short, on any day, relative to the repository root or absolute (e.g.
# bench/results/nvidia-h200-2026-11-30.json); bench, bench-ops and bench-step then pass
# --bench-continue with it: the rows it measured are not run again, and this call's results file
# (of today's date) holds them beside the new ones.

set -u -o pipefail

if [ "${1-}" = "-h" ] || [ "${1-}" = "--help" ]; then  # the comment above, as the usage
  sed -n '2,/^set -u/{/^set -u/d;s/^# \{0,1\}//;p;}' "${BASH_SOURCE[0]}"
  exit 0
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT=${OUT:-/tmp/vitfuse-gpu}
PY=${PYTHON:-python3}
PART_TIMEOUT=${PART_TIMEOUT:-0}
TOTAL_TIMEOUT=${TOTAL_TIMEOUT:-0}
TOTAL_RESERVE=${TOTAL_RESERVE:-20}
STARTED=$(date +%s)
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
BENCH_CONTINUE=${BENCH_CONTINUE:-}
mkdir -p "$OUT" || exit 1

failed=()

# seconds_left: what is left of TOTAL_TIMEOUT less TOTAL_RESERVE (only when TOTAL_TIMEOUT is set)
seconds_left() {
  echo $((TOTAL_TIMEOUT - TOTAL_RESERVE - ($(date +%s) - STARTED)))
}

# with_timeout CMD...: run CMD for at most PART_TIMEOUT seconds and at most what is left of
# TOTAL_TIMEOUT (GNU timeout, whose signal reaches CMD's whole process group, and KILL 10 s
# after it; 0 = no limit); exit 124 without running CMD when no time is left
with_timeout() {
  local limit=$PART_TIMEOUT left
  if [ "$TOTAL_TIMEOUT" -gt 0 ]; then
    left=$(seconds_left)
    if [ "$left" -le 0 ]; then
      echo "gpu.sh: no time left of TOTAL_TIMEOUT=${TOTAL_TIMEOUT}s for: $*"
      return 124
    fi
    if [ "$limit" -eq 0 ] || [ "$left" -lt "$limit" ]; then
      limit=$left
    fi
  fi
  timeout -k 10 "$limit" "$@"
}

part_env() {
  local rc=0
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(hostname)  cpus: $(nproc)"
  echo "JAX_PLATFORMS=${JAX_PLATFORMS-<unset>}  PYTHONPATH=${PYTHONPATH-<unset>}"
  with_timeout "$PY" -m bench.device || rc=1  # the timed code's fingerprint, as every row records it
  nvidia-smi || { echo "nvidia-smi failed"; rc=1; }
  with_timeout "$PY" - <<'EOF' || rc=1
import importlib.metadata as md
import platform
import sys

def version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"

print("python", platform.python_version(), sys.executable)
for dist in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin",
             "triton", "jax-triton", "numpy", "pytest", "pytest-benchmark", "matplotlib"):
    print(f"  {dist:<20} {version(dist)}")
import jax
import jax_triton
print("jax_triton from", jax_triton.__file__)
print("jax backend:", jax.default_backend(), "devices:", jax.devices())
assert jax.default_backend() == "gpu", "no GPU backend: the fused kernels cannot be compiled here"
EOF
  return "$rc"
}

# On a GPU the tests and the gradchecks spend their time compiling kernels: jax-triton compiles
# each one (to PTX) in the process that lowers it and keeps no cache on disk; the tests part
# launches about 290 distinct kernels, each kernel_gradcheck 90. So these parts run several
# processes side by side on the machine's cores, each allocating GPU memory as it needs it
# (XLA_PYTHON_CLIENT_PREALLOCATE=false; JAX's default takes 75% of the GPU per process).

# test_workers: pytest-xdist's -n TEST_WORKERS (default 8) where it is installed, else nothing
test_workers() {
  local n=${TEST_WORKERS:-8}
  if [ "$n" -gt 1 ] && "$PY" -c "import xdist" 2>/dev/null; then
    echo "-n $n"
  fi
}

part_tests() {
  local workers
  workers=$(test_workers)
  echo "pytest workers: ${workers:-none (one process)}"
  # shellcheck disable=SC2086  # $workers is "" or "-n N"
  # cuda first (JAX's default backend: the kernels compile), cpu beside it: the tests that run
  # Triton's interpreter on purpose (kernels.INTERPRETED, gradcheck --interpret) go through
  # jax.pure_callback, which needs a CPU device (with cuda alone, 8 such tests failed on an H200)
  JAX_PLATFORMS=cuda,cpu VITFUSE_REQUIRE_GPU=1 XLA_PYTHON_CLIENT_PREALLOCATE=false \
    with_timeout "$PY" -m pytest -q -rs $workers \
    tests/test_kernels_attention.py tests/test_kernels_flash.py tests/test_kernels_flash_sums.py \
    tests/test_kernels_layernorm.py tests/test_kernels_ops.py tests/test_fused_model.py \
    tests/test_precision.py tests/test_presets.py tests/test_readme_examples.py
}

part_gradcheck() {
  # float32 and bf16 side by side: the bf16 run's output follows the float32 run's
  local rc=0 log16 pid16
  log16=$(mktemp)
  XLA_PYTHON_CLIENT_PREALLOCATE=false with_timeout "$PY" -m oracle.kernel_gradcheck --dtype bfloat16 \
    > "$log16" 2>&1 &
  pid16=$!
  XLA_PYTHON_CLIENT_PREALLOCATE=false with_timeout "$PY" -m oracle.kernel_gradcheck || rc=1
  wait "$pid16" || rc=1
  cat "$log16"
  rm -f "$log16"
  return "$rc"
}

# bench_files [PYTEST ARGS...]: the benchmark on the given files/flags (and --bench-continue
# "$BENCH_CONTINUE" when it is set); this run's results files and a speedup plot copied to $OUT/
bench_files() {
  local rc=0 marker json continued=()
  marker=$(mktemp)
  if [ -n "$BENCH_CONTINUE" ]; then
    continued=(--bench-continue "$BENCH_CONTINUE")
  fi
  with_timeout "$PY" -m pytest --benchmark -q "${continued[@]}" "$@" || rc=$?
  # only this run's files: bench/results/ also holds committed results of other devices (and the
  # file BENCH_CONTINUE names, which the bench reads, not writes, unless it is this day's file)
  while IFS= read -r -d '' file; do
    cp -v "$file" "$OUT/" || rc=1
  done < <(find bench/results -maxdepth 1 -type f -newer "$marker" \( -name '*.json' -o -name '*.md' \) -print0)
  json=$(find bench/results -maxdepth 1 -type f -newer "$marker" -name '*.json' | head -n 1)
  if [ -n "$json" ]; then  # the plot is a convenience: its failure doesn't fail the part
    "$PY" bench/plot.py "$json" -o "$OUT/$(basename "$json" .json)-speedup.png" \
      || echo "plot failed (not counted as a failure)"
  else
    echo "no results file was written"
    rc=1
  fi
  rm -f "$marker"
  return "$rc"
}

part_bench() {
  bench_files bench/
}

part_bench-ops() {
  bench_files --bench-merge bench/test_bench_attention.py bench/test_bench_layernorm.py
}

part_bench-step() {
  bench_files --bench-merge bench/test_bench_train_step.py
}

part_tune() {
  # the dispatcher's table comes back in $OUT: copy it over kernels/attention_table.json
  cp kernels/attention_table.json "$OUT/attention_table.json" || return 1
  with_timeout "$PY" -m bench.tune_attention --grid "${TUNE_GRID:-quick}" \
    --table "$OUT/attention_table.json" --out "$OUT/tune-attention.md"
}

part_tune-ln() {
  with_timeout "$PY" -m bench.tune_layernorm --grid "${TUNE_GRID:-quick}"
}

part_memory() {
  local rc=0
  with_timeout "$PY" -m bench.step_memory || rc=1
  with_timeout "$PY" -m bench.step_memory configs/vit-b16.toml --batch 1024 --accum 1 2 4 8 16 \
    --compute-dtype bf16 || rc=1
  return "$rc"
}

part_profile() {
  local rc=0 ncu contender csv
  ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
  if [ -z "$ncu" ]; then
    echo "no ncu on PATH or under /opt/nvidia/nsight-compute"
    return 1
  fi
  for contender in reference fused; do
    csv="$OUT/ncu-step-$contender.csv"
    # --clock-control none: leave the GPU's clocks as they are (the device README asks for it)
    with_timeout "$ncu" --profile-from-start off --clock-control none --print-units base --csv \
      --page raw --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,launch__registers_per_thread \
      --log-file "$csv" "$PY" -m bench.profile_step run "$contender" || rc=1
    "$PY" -m bench.profile_step summarize "$csv" || rc=1
  done
  return "$rc"
}

# run_part NAME: run part_NAME, tee its output to $OUT/NAME.log, note a failure, always go on
run_part() {
  local name=$1 start=$SECONDS rc
  echo "=== $name" | tee -a "$OUT/$name.log"
  if [ "$TOTAL_TIMEOUT" -gt 0 ] && [ "$(seconds_left)" -le 0 ]; then
    echo "=== $name: not started, no time left of TOTAL_TIMEOUT=${TOTAL_TIMEOUT}s" | tee -a "$OUT/$name.log"
    failed+=("$name (not started: no time left)")
    return
  fi
  "part_$name" 2>&1 | tee -a "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/$name.log"
  if [ "$rc" -ne 0 ]; then
    failed+=("$name (exit $rc)")
  fi
}

parts=("$@")
if [ "${#parts[@]}" -eq 0 ]; then
  parts=(env tests gradcheck bench)
fi
for name in "${parts[@]}"; do
  case $name in
    env | tests | gradcheck | bench | bench-ops | bench-step | tune | tune-ln | profile | memory) ;;
    *) echo "unknown part '$name': use env, tests, gradcheck, bench, bench-ops, bench-step, tune, tune-ln, profile, memory (bash bench/gpu.sh --help)" >&2
       exit 2 ;;
  esac
done

for name in env "${parts[@]}"; do  # fresh logs (env.log: the install's output, at least)
  : > "$OUT/$name.log"
done

# install jax-triton and absl-py here, in this shell, so that PYTHONPATH reaches every part; the
# install's output opens env.log
install_wheels() {
  local wheels dist missing=()
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  for dist in jax_triton absl_py; do
    local found=("$WHEELS/$dist"-*.whl)
    [ "${#found[@]}" -eq 0 ] && missing+=("$dist")
  done
  shopt -u nullglob
  echo "=== install into $SITE: ${wheels[*]:-no wheel in $WHEELS/}"
  if [ "${#missing[@]}" -ne 0 ]; then
    echo "no ${missing[*]} wheel in $WHEELS/: pip download --no-deps jax-triton==0.3.1 absl-py -d $WHEELS"
    return 1
  fi
  # --upgrade replaces the packages' folders but leaves an older version's .dist-info beside the
  # new one (then importlib.metadata may report either): remove those first
  rm -rf "$SITE"/jax_triton-*.dist-info "$SITE"/absl_py-*.dist-info
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "${wheels[@]}" \
    || return 1
  PYTHONPATH="$SITE" "$PY" -c '
import importlib.metadata as md
for dist in ("jax-triton", "absl-py"):
    print(f"installed: {dist} {md.version(dist)} from", md.distribution(dist).locate_file(""))'
}
install_wheels 2>&1 | tee -a "$OUT/env.log"
if [ "${PIPESTATUS[0]}" -ne 0 ]; then
  failed+=("install (see env.log)")
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# every line printed reaches its log at once: a command stopped by a timeout keeps its output
# (Python buffers a pipe's or a file's output in blocks, which a kill throws away)
export PYTHONUNBUFFERED=1

for name in "${parts[@]}"; do
  run_part "$name"
done

echo "=== logs and results in $OUT:"
ls -l "$OUT"
if [ "${#failed[@]}" -ne 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all parts passed: ${parts[*]}"
