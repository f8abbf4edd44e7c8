"""The benchmark's results: speedups and % of peak per row, the verdict on every target, and the
files bench/results/<device>-<date>.json (rows a plot can read) and .md (the tables, the method
and the formulas), merged across runs with --bench-merge (an earlier run of the same day) and
--bench-continue (an earlier run of the same device, any day, whose measured rows are not run
again).
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.device import peak_for
from bench.harness import EPOCH_IMAGES, BenchSession, shape_label
from oracle.compare import TOLERANCE
from vit.data.cache import write_text_atomic

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def finalize(rows: list[dict], peaks: dict | None) -> list[dict]:
    """Speedups (reference median / row median within group, shape and dtype) and % of peak.
    The reference of a dtype is the row named "reference", or "reference-<dtype>" (the train
    step's bf16 rows: reference-bf16 is the hand-written step in bf16)."""
    ref = {(r["group"], r["shape"], r["dtype"]): r["median_ms"] for r in rows
           if r["contender"] in ("reference", f"reference-{r['dtype']}") and r["median_ms"]}
    for r in rows:
        base = ref.get((r["group"], r["shape"], r["dtype"]))
        if r["median_ms"] and base:
            r["speedup_vs_reference"] = base / r["median_ms"]
        if r["median_ms"] and peaks:
            r["frac_of_peak"] = peak_for(r, peaks)
    return rows


def _timed(rows, group, shape, contender, dtype):
    for r in rows:
        if (r["group"], r["shape"], r["contender"], r["dtype"]) == (group, shape, contender, dtype):
            return r
    return None


@dataclass(frozen=True)
class Target:
    """Row a (contender, dtype) must be `need` x as fast as row b: ratio = b / a >= need (strict:
    > need), both rows of `group` at the shape `shape` names in the `kind` table."""
    name: str
    group: str
    kind: str
    a: tuple[str, str]
    b: tuple[str, str]
    need: float
    strict: bool = False
    shape: str = "product"
    # at L=65: met outright when the dispatcher's own choice (the fused row's note) is one-tile
    met_if_dispatcher_is_one_tile: bool = False

    def rows(self) -> tuple[tuple[str, str, str, str], ...]:
        """The keys (_row_key: group, shape label, contender, dtype) of the two rows the verdict
        needs, a's then b's."""
        shape = shape_label(self.kind, self.shape)
        return tuple((self.group, shape, *key) for key in (self.a, self.b))


def _key_blocked_targets(shape: str, size: str) -> list[Target]:
    """Issue 15's targets for the key-blocked kernel at one standard ViT shape (L=197, Dh=64)."""
    return [Target(f"key-blocked attention fwd+bwd within 1.25x of cuDNN at L=197 Dh=64, {size} (bf16)",
                   "attention fwd+bwd", "attention", ("fused-key-blocked", "bf16"), ("dpa-cudnn", "bf16"),
                   1 / 1.25, shape=shape),
            Target(f"key-blocked attention fwd+bwd >= 2x faster than reference at L=197 Dh=64, {size} (bf16)",
                   "attention fwd+bwd", "attention", ("fused-key-blocked", "bf16"), ("reference", "bf16"),
                   2.0, shape=shape)]


def _dispatcher_target(dtype: str) -> Target:
    """At L=65 the dispatcher's choice must be no slower than the one-tile kernel."""
    return Target(f"at L=65 the dispatcher's choice no slower than the one-tile kernel, fwd+bwd ({dtype})",
                  "attention fwd+bwd", "attention", ("fused", dtype), ("fused-one-tile", dtype), 1.0,
                  met_if_dispatcher_is_one_tile=True)


TARGETS = [
    Target("fused attention fwd+bwd >= 2x faster than reference (fp32)",
           "attention fwd+bwd", "attention", ("fused", "fp32"), ("reference", "fp32"), 2.0),
    Target("fused attention fwd+bwd no slower than dot_product_attention(cudnn) (bf16)",
           "attention fwd+bwd", "attention", ("fused", "bf16"), ("dpa-cudnn", "bf16"), 1.0),
    Target("fused add+LN fwd+bwd >= 1.5x faster than reference (fp32)",
           "add+layernorm fwd+bwd", "layernorm", ("fused", "fp32"), ("reference", "fp32"), 1.5),
    Target("fused add+LN fwd+bwd faster than autodiff (fp32)",
           "add+layernorm fwd+bwd", "layernorm", ("fused", "fp32"), ("autodiff", "fp32"), 1.0, strict=True),
    Target("train step --fused faster than the reference step (fp32)",
           "train step", "step", ("fused", "fp32"), ("reference", "fp32"), 1.0, strict=True),
    Target("train step --fused faster than the autodiff step (fp32)",
           "train step", "step", ("fused", "fp32"), ("autodiff", "fp32"), 1.0, strict=True),
    # the key-blocked kernel at the standard ViT shapes, the dispatcher at L=65
    *_key_blocked_targets("vit-s", "ViT-S/16"),
    *_key_blocked_targets("vit-b", "ViT-B/16"),
    _dispatcher_target("fp32"),
    _dispatcher_target("bf16"),
]


def target_rows() -> set[tuple[str, str, str, str]]:
    """The keys (_row_key) of every row a target's verdict needs: the bench runs these first, so
    a run cut short still judges as many targets as it can."""
    return {row for target in TARGETS for row in target.rows()}


def evaluate_targets(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for the targets (they are GPU targets), at the product shape
    unless a target names another."""
    return [_verdict(target, rows) for target in TARGETS]


def _target_pair(t: Target, rows: list[dict]) -> tuple[dict | None, dict | None]:
    """The rows of t's contenders a and b at its shape (None where a row is missing)."""
    key_a, key_b = t.rows()
    return _timed(rows, *key_a), _timed(rows, *key_b)


def _verdict(t: Target, rows: list[dict]) -> tuple[str, str, str]:
    a, b = _target_pair(t, rows)
    if t.met_if_dispatcher_is_one_tile and a and "fwd one-tile" in a["note"] and "bwd one-tile" in a["note"]:
        return t.name, "-", "met: the dispatcher runs the one-tile kernel itself here (the fused row's note)"
    for r, (name, dtype) in ((a, t.a), (b, t.b)):
        if r is None:
            return t.name, "-", f"not evaluated: no {name} ({dtype}) row in this run"
        if not r["median_ms"]:
            why = r.get("why") or r["note"]
            return t.name, "-", f"not evaluated: {name} ({dtype}) {r['status']}: {why}"
    ratio = b["median_ms"] / a["median_ms"]
    measured = f"{t.a[0]} {a['median_ms']:.3f} ms vs {t.b[0]} {b['median_ms']:.3f} ms = {ratio:.2f}x"
    met = ratio > t.need if t.strict else ratio >= t.need
    verdict = "met" if met else f"missed by {t.need / ratio:.2f}x: {ratio:.2f}x where {t.need:g}x is needed"
    return t.name, measured, verdict


def target_evidence(rows: list[dict]) -> list[str]:
    """Per target (TARGETS' order), what its two rows say about why, where both were timed: each
    row's kernel count, XLA's bytes and % of this device's measured peak. That is the reason a
    verdict can give without a profile ("-" where a row is missing or untimed). Our kernels are
    custom calls, which XLA counts as 0 bytes: a fused row's bytes are those of the XLA ops
    around them, given only where there are any (the train step)."""
    out = []
    for t in TARGETS:
        pair = _target_pair(t, rows)
        out.append("; ".join(map(_row_evidence, pair)) if all(r and r["median_ms"] for r in pair) else "-")
    return out


def _row_evidence(r: dict) -> str:
    parts = []
    if r.get("kernels") is not None:
        parts.append(f"{r['kernels']} kernels")
    mb = r.get("hlo_mbytes")
    if mb is not None and not r["contender"].startswith("fused"):
        parts.append(f"{mb:.1f} MB by XLA")
    elif mb is not None and mb >= 1:
        parts.append(f"{mb:.1f} MB by XLA around our kernels")
    if r.get("frac_of_peak") is not None:
        parts.append(f"{100 * r['frac_of_peak']:.1f}% of peak")
    return f"{r['contender']}: {', '.join(parts) or 'no counts'}"


# the order of the groups' tables (bench/plot.py has its own copy for its panels)
GROUP_ORDER = ["device peak", "attention fwd", "attention fwd+bwd", "add+layernorm fwd",
               "add+layernorm fwd+bwd", "train step"]


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown_tables(rows: list[dict]) -> str:
    """One table per group (GROUP_ORDER), its rows in the order of `rows`: the order they were
    recorded in (the target rows first, under --benchmark), not sorted."""
    lines = []
    groups = sorted({r["group"] for r in rows}, key=lambda g: GROUP_ORDER.index(g) if g in GROUP_ORDER else 99)
    for g in groups:
        lines += [f"### {g}", ""]
        if g == "device peak":
            lines += ["| measurement | value | note |", "| --- | --- | --- |"]
            for r in (r for r in rows if r["group"] == g):
                value = f"{r['tflop_s']:.3f} TFLOP/s" if r["tflop_s"] is not None else f"{r['gb_s']:.1f} GB/s"
                lines.append(f"| {r['contender']} | {value} | {r['note']} |")
            lines.append("")
            continue
        step = g == "train step"
        metric = "images/s | epoch (100k img)" if step else ("TFLOP/s" if g.startswith("attention") else "GB/s")
        lines += [f"| shape | contender | dtype | median ms | p20-p80 ms | speedup vs ref | {metric} | % of peak "
                  "| kernels | XLA MB | note |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: |" + (" ---: |" if step else "")
                  + " ---: | ---: | ---: | --- |"]
        for r in (r for r in rows if r["group"] == g):
            if r["median_ms"] is None:
                t = f"{r['status']}" if r["status"] else "-"
                lines.append(f"| {r['shape']} | {r['contender']} | {r['dtype']} | {t} | - | - | -"
                             + (" | -" if step else "") + f" | - | - | - | {r['note']} |")
                continue
            spread = f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}"
            speed = _fmt(r["speedup_vs_reference"], ".2f") + ("x" if r["speedup_vs_reference"] else "")
            if step:
                m = f"{r['images_s']:.1f} | {r['epoch_s'] / 60:.1f} min"
            elif g.startswith("attention"):
                m = _fmt(r["tflop_s"], ".3f")
            else:
                m = _fmt(r["gb_s"], ".1f")
            frac = "-" if r["frac_of_peak"] is None else f"{100 * r['frac_of_peak']:.1f}%"
            kernels = _fmt(r.get("kernels"), "d")
            mbytes = _fmt(r.get("hlo_mbytes"), ".1f")
            lines.append(f"| {r['shape']} | {r['contender']} | {r['dtype']} | {r['median_ms']:.3f} | {spread} | "
                         f"{speed} | {m} | {frac} | {kernels} | {mbytes} | {r['note']} |")
        lines.append("")
    return "\n".join(lines)


def markdown(rows: list[dict], meta: dict) -> str:
    info = meta["info"]
    out = [f"# vitfuse benchmarks: {info['device']}, {meta['date']}", "",
           f"`python -m pytest bench/ --benchmark` at {meta['started']}; python {info['python']}, "
           f"jax {info['jax']} (jaxlib {info['jaxlib']}), triton {info['triton']}, "
           f"jax-triton {info['jax_triton']}; input seed {meta['seed']}; code {info.get('code', 'not recorded')} "
           "(`python -m bench.device` prints a checkout's).", ""]
    if meta.get("partial"):
        out += [f"**{meta['partial']}**", ""]
    if meta.get("machine_note"):
        out += [f"**{meta['machine_note']}**", ""]
    out += ["## Targets (GPU; product shape unless named)", "",
            "Rows say: each row's kernels, XLA's bytes and % of the measured peak (report.target_evidence).", "",
            "| target | measured | verdict | rows say |", "| --- | --- | --- | --- |"]
    evidence = meta.get("target_evidence") or ["-"] * len(meta["targets"])
    out += [f"| {t} | {m} | {v} | {e} |" for (t, m, v), e in zip(meta["targets"], evidence)]
    out += ["", "## Results", "", markdown_tables(rows), "## Method", ""]
    out += [f"- {line}" for line in meta["method"]]
    out += ["", "Formulas:", ""] + [f"- {k}: {v}" for k, v in FORMULAS.items()] + [""]
    return "\n".join(out)


METHOD = [
    "Validate first, then time: each contender's outputs and gradients are compared with the reference "
    "(vit.layers, float32) on the same fresh random inputs (rel = max|diff| / max|ref| per tensor; "
    f"tolerances (oracle/compare.py): fp32 {TOLERANCE['float32 long sums']:g} (fused-tf32x3 too: 3xTF32 "
    f"claims float32 accuracy), tf32 {TOLERANCE['tf32']:g} (fused-tf32), bf16 "
    f"{TOLERANCE['bfloat16 long sums']:g} against the fp32 reference on "
    f"the same bf16 inputs, train step {TOLERANCE['train step']:g} on the loss and every gradient, "
    f"{TOLERANCE['bf16 train step']:g} for a bf16 step against the fp32 one); "
    "a contender that fails gets no timing.",
    "Each contender is jit-compiled ahead of time (float32 rows under "
    "jax.default_matmul_precision('highest'), matching the kernels' ieee dots). Attention and "
    "add+LN: the timed executable applies the op to k fresh random input sets in sequence (k up to "
    "16, up to 128 MiB of inputs, so no call runs from a warm cache; an optimization barrier between "
    "applications keeps XLA from fusing or reordering them; one dispatch per k ops), and is checked "
    "again on the first set; per-op time = call time / k. A sample is n back-to-back calls (async "
    "dispatch) and one jax.block_until_ready on all results, divided by n (n calibrated to ~20 ms "
    "per sample on a GPU, ~200 ms on a CPU), after one warm-up call; median and 20th/80th "
    "percentiles over the samples (at least 15 samples on a GPU, 5 on a CPU, 3 for calls over ~7 s).",
    "Contenders: fused = our Triton kernels (kernels.fused_ops; fused-tf32 = the same with tf32 dots, "
    "fused-tf32x3 = with 3xTF32 dots, each float32 operand split into two tf32 parts and each dot done "
    "in three tensor-core passes; both labelled); reference = the hand-written jnp ops of vit.layers "
    "under XLA; autodiff = jax.vjp of the reference forward (oracle.autodiff_vjp; the step: "
    "oracle.autodiff_grad_fn); dpa-xla / dpa-cudnn = jax.nn.dot_product_attention(implementation='xla' "
    "/ 'cudnn') on (B, L, H, Dh) q, k, v: the split of the packed (B, L, 3D) qkv and the merge of the "
    "output are part of its timed call, and its backward is jax.vjp (one jax.vjp gives the output and "
    "the gradients). cuDNN runs bf16/fp16 only, so it is compared in bf16; its fwd+bwd rows pad an odd "
    "L to L+1 and pass query_seq_lengths and key_value_seq_lengths = L, which mask the padded key, and "
    "slice the output back to L (pad and slice timed), because jax's cuDNN training path refuses odd "
    "sequence lengths.",
    "fwd rows return the output only (as in evaluation; what a kernel writes for the backward, such as "
    "the LSE or LN's mean/rstd, is still paid); fwd+bwd rows return the output and every input "
    "gradient. The train step group times vit.make_train_step (one jit: uint8 images normalised on "
    "the device, forward, backward, AdamW; donated buffers), params and optimizer state carried from "
    "call to call.",
    "speedup vs ref = reference median / row median, within the same group, shape and dtype (the "
    "train step's bf16 rows: against reference-bf16, the hand-written step in bf16).",
    "kernels = device operations one call of the contender's own executable (one op, not the chained "
    "timed one) runs, counted in XLA's optimized HLO: each fusion, library or Triton custom call and "
    "copy counts 1. XLA MB = XLA's cost analysis of that executable, 'bytes accessed', in MB; our "
    "Triton kernels are custom calls, which XLA counts as 0 bytes, so for fused rows it covers only "
    "the XLA ops around them. Together they say how many passes over memory an op makes.",
]


def _row_key(r: dict) -> tuple:
    return (r["group"], r["shape"], r["contender"], r["dtype"])


def merge_rows(rows: list[dict], earlier: list[dict]) -> list[dict]:
    """This run's rows, plus the earlier run's rows for cases this run did not produce (in the
    earlier run's order, ahead of this run's), so one file can be filled by several runs."""
    mine = {_row_key(r) for r in rows}
    return [r for r in earlier if _row_key(r) not in mine] + rows


def measured_keys(rows: list[dict]) -> set[tuple]:
    """The keys (_row_key) of the rows that hold a timing. A row "not run" (a contender
    unavailable, such as cuDNN refusing a shape), "check FAILED" or "checked, not timed" is not
    measured: --bench-continue runs it again."""
    return {_row_key(r) for r in rows if r["status"] == "timed" and r["median_ms"] is not None}


def read_results(path: Path) -> dict:
    """An earlier results file, as write_results writes it, checked to hold what merging and
    continuing read (the device, the runs, each row's key, status and timing); ValueError saying
    what is wrong otherwise."""
    if not path.is_file():
        raise ValueError("no such file" if not path.exists() else "not a file")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not a results .json: cannot read it as JSON ({e})") from None
    try:
        data["meta"]["info"]["device"], data["meta"]["started"]
        for r in data["rows"]:
            _row_key(r), r["status"], r["median_ms"]
    except (KeyError, TypeError) as e:
        what = f"no {e.args[0]!r} field" if isinstance(e, KeyError) else "its meta or rows are of another form"
        raise ValueError(f"not a results .json as bench/report.py writes it ({what})") from None
    return data


def continued_results(path: Path, info: dict) -> dict:
    """The results file --bench-continue names (read_results), checked to be of this run's
    device (info: harness.BenchSession.info): a row measured on another device is no row of
    this one. ValueError saying what is wrong otherwise."""
    data = read_results(path)
    theirs, mine = data["meta"]["info"]["device"], info["device"]
    if theirs != mine:
        raise ValueError(f"its rows were measured on {theirs!r}, this run is on {mine!r}: continue "
                         "only a results file of the same device")
    return data


def results_paths(session: BenchSession, out_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """The session's results files: out_dir/<device>-<date>.json and .md (the day it started)."""
    stem = f"{session.info['device_slug']}-{session.started[:10]}"
    return out_dir / f"{stem}.json", out_dir / f"{stem}.md"


def merged_results(session: BenchSession, out_dir: Path = RESULTS_DIR) -> dict:
    """--bench-merge: the results file of this device and day as it was before this run's first
    write replaces it (read_results; {} when there is none), read once and kept in
    session.earlier. ValueError saying what is wrong with the file."""
    if session.earlier is None:
        json_path, _ = results_paths(session, out_dir)
        session.earlier = read_results(json_path) if json_path.exists() else {}
    return session.earlier


def _runs(results: dict) -> list[str]:
    """The starts of the runs a results file holds rows of (one before --bench-merge existed)."""
    return results["meta"].get("runs", [results["meta"]["started"]])


def write_results(session: BenchSession, out_dir: Path = RESULTS_DIR, *,
                  finished: bool = True) -> tuple[Path, Path, str]:
    """Write bench/results/<device>-<date>.json and .md from the session's rows so far. The bench
    calls it after every test that added rows (finished=False: the files say the run had not
    ended, so a run cut short by a timeout or a crash leaves every row it measured), and once at
    the end."""
    date = session.started[:10]
    info = session.info
    json_path, md_path = results_paths(session, out_dir)
    if session.merge:  # before this run's first write replaces it
        merged_results(session, out_dir)
    # the earlier files this one keeps the rows of, oldest first: --bench-continue's, then
    # --bench-merge's of the same day (which may already hold the first's rows: a run split in
    # two halves, each continuing the same file); a later file's row wins, this run's over all
    rows, runs, peaks = [], [], None
    for earlier in (session.continued, session.earlier if session.merge else None):
        if earlier:
            rows = merge_rows(earlier["rows"], rows)
            runs += [run for run in _runs(earlier) if run not in runs]
            peaks = earlier["meta"].get("peaks") or peaks
    rows = merge_rows(session.rows, rows)
    runs += [session.started]
    peaks = session.peaks or peaks
    rows = finalize(rows, peaks)
    machine_note = ""
    if info["backend"] == "cpu":
        machine_note = (f"Timings taken on a shared {os.cpu_count()}-core CPU machine where other "
                        "processes may have been running: indicative only. On the CPU the fused "
                        "kernels run in Triton's interpreter: checked, not timed.")
    if len(runs) > 1:
        flags = [flag for flag, on in (("--bench-continue", session.continued), ("--bench-merge", session.merge))
                 if on]
        machine_note += (" " if machine_note else "") + (
            f"Rows merged from {len(runs)} runs ({', '.join(flags)}), started {', '.join(runs)}; each "
            "row's own timestamp is in the JSON.")
    versions = Counter(r.get("code") or "not recorded" for r in rows)
    if len(versions) > 1:
        machine_note += (" " if machine_note else "") + (
            f"Rows timed on {len(versions)} versions of the code: "
            + ", ".join(f"{v} ({n} rows)" for v, n in versions.most_common()) + "; each row's in the JSON.")
    partial = None
    if not finished:
        last = session.rows[-1] if session.rows else {}
        partial = (f"Partial results: written after this run's row {len(session.rows)} "
                   f"({last.get('group')}, {last.get('shape')}, {last.get('contender')}, "
                   f"{last.get('dtype')}) while the run went on; if this note is still here, "
                   "the run never finished (timeout, crash or interrupt), and rows past that "
                   "one are missing.")
    meta = {"date": date, "started": session.started, "runs": runs, "seed": session.seed, "info": info,
            "finished": finished, "partial": partial,
            "peaks": peaks, "machine_note": machine_note, "targets": evaluate_targets(rows),
            "target_evidence": target_evidence(rows),
            "method": METHOD, "formulas": FORMULAS,
            "command": "python -m pytest bench/ --benchmark", "argv": sys.argv}
    out_dir.mkdir(parents=True, exist_ok=True)
    # whole or not at all: a run killed mid-write leaves the previous version
    write_text_atomic(json_path, json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    write_text_atomic(md_path, markdown(rows, meta))
    session.rows_written = len(session.rows)
    summary = "\n".join(["targets (GPU; product shape unless named):"]
                        + [f"  {t}: {v}" + (f" [{m}]" if m != "-" else "") for t, m, v in meta["targets"]]
                        + ["", markdown_tables(rows)])
    return json_path, md_path, summary




FORMULAS = {
    "attention TFLOP/s": "fwd = 4*B*H*L^2*Dh FLOP (QK^T and PV); fwd+bwd = 3.5 x fwd (backward = 2.5 x "
                         "fwd with the QK^T recompute); the same count for every contender",
    "add+layernorm GB/s": "fwd = 3*M*D*s + 2*D*4 + 2*M*4 bytes (read x, r, gamma, beta; write y, mean, "
                          "rstd); bwd = 4*M*D*s + 3*D*4 + 2*M*4 (read dy, x, r, gamma, mean, rstd; write ds, "
                          "dgamma, dbeta); M = B*L rows, s = activation bytes; the same count for every "
                          "contender",
    "train step": f"images/s = B / median; epoch = {EPOCH_IMAGES:,} images / (images/s)",
    "% of peak": "against this session's measured peak: a large matmul's TFLOP/s at the row's "
                 "precision, or a large elementwise copy's GB/s (read + write)",
}
