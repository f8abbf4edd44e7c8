"""What the tunes (bench/tune_attention.py, bench/tune_layernorm.py) share: their Markdown file,
rewritten as they go, and their verdict."""

from __future__ import annotations

from pathlib import Path

from vit.data.cache import write_text_atomic


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
