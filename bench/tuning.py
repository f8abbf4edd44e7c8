"""What the tunes (bench/tune_attention.py, bench/tune_layernorm.py) share: each variant's sm_90
registers and its speed against the plan, their Markdown file, rewritten as they go, and their
verdict."""

from __future__ import annotations

from pathlib import Path

from kernels.launch import record_launches
from vit.data.cache import write_text_atomic


def sm90_regs_stack(trace, pick) -> str:
    """'regs/stack' per thread of one launch compiled for sm_90 (kernels.compile_check; no GPU
    needed): trace() traces the variant, pick(specs) chooses its launch among those recorded. A
    variant that does not trace or compile is reported ('no: <exception type>'), not fatal."""
    from kernels import compile_check  # noqa: PLC0415

    try:
        with record_launches() as specs:
            trace()
        usage = compile_check.resource_usage(compile_check.compile_spec(pick(specs), 90))
        return f"{usage['regs']}/{usage['stack']}" if usage else "?"
    except Exception as e:  # noqa: BLE001
        return f"no: {type(e).__name__}"


def mark_speed_vs_plan(rows: list[dict]) -> None:
    """rows: one direction's variants. Each timed row gets vs_plan, the plan's median over its own
    (2.00x: twice as fast as the plan); none where the plan was not timed."""
    plan = next((r for r in rows if r["planned"] and "median_ms" in r), None)
    for r in rows:
        if plan and "median_ms" in r:
            r["vs_plan"] = plan["median_ms"] / r["median_ms"]


def write_tables_so_far(path: Path, title: str, tables: list[str], total: int) -> None:
    """A tune's Markdown tables under `title`, rewritten whole (atomically) after each of its
    `total` shape/dtype pairs: a run cut short keeps what it timed, and while fewer than `total`
    tables are in, a line at the top says the run never finished."""
    partial = (f"**Partial: {len(tables)} of {total} shape/dtype pairs so far; if this line is "
               "still here, the run never finished.**\n\n") if len(tables) < total else ""
    write_text_atomic(Path(path), f"# {title}\n\n{partial}" + "\n".join(tables))


def tune_failures(rows: list[dict]) -> tuple[int, int]:
    """(variants with wrong numbers, plans that failed to run) among a tune's rows. A variant that
    does not compile is a finding, not a failure; the plan (the product's own launch) failing to
    run is one: it leaves nothing to compare with (on a GPU without jax-triton, say)."""
    wrong = sum(r.get("error", "").startswith("wrong") for r in rows)
    broken = sum(r["planned"] and "error" in r and not r["error"].startswith("wrong") for r in rows)
    return wrong, broken


def tune_exit_status(wrong: int, plans_broken: int) -> int:
    """Say what failed; 1 if anything did, else 0."""
    if wrong:
        print(f"{wrong} variant(s) gave wrong results")
    if plans_broken:
        print(f"{plans_broken} plan(s) failed to run")
    return 1 if wrong or plans_broken else 0
