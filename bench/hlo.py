"""What XLA compiled, counted: the device kernels one call of an executable runs and XLA's own
count of the bytes they touch. The "why" beside a benchmark's time: an op that runs in fewer
kernels makes fewer passes over memory.
"""

from __future__ import annotations

import re

_NOT_KERNELS = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "opt-barrier",
                "after-all", "partition-id", "replica-id", "add-dependency"}
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*)$")
_CALLS = re.compile(r"(?:to_apply|calls)=%?([\w.\-]+)")


def _opcode(rhs: str) -> str:
    """The opcode of an HLO instruction's right-hand side ('f32[2]{0} fusion(...)', or a tuple shape)."""
    if rhs.startswith("("):  # tuple-shaped result: skip the balanced parentheses
        depth = 0
        for i, ch in enumerate(rhs):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                rhs = rhs[i + 1:]
                break
    else:
        rhs = rhs.split(" ", 1)[1] if " " in rhs else ""
    return rhs.lstrip().split("(", 1)[0].strip()


def count_kernels(hlo_text: str) -> int:
    """Device operations one call of an optimized HLO module runs: each fusion, custom call
    (cuBLAS, cuDNN, a Triton kernel), copy or other non-trivial instruction of the entry
    computation counts 1; a `call` (e.g. a GPU command buffer) counts what it calls; async
    -done/-update halves are not counted again."""
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m and not line.startswith(" "):
            current = m.group(2)
            computations[current] = []
            entry = current if m.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None:
            inst = _INSTRUCTION.match(line)
            if inst:
                computations[current].append(inst.group(1))

    def count(name: str, depth: int = 0) -> int:
        total = 0
        for rhs in computations.get(name, []):
            op = _opcode(rhs)
            if op in _NOT_KERNELS or op.endswith("-done") or op.endswith("-update"):
                continue
            called = _CALLS.search(rhs)
            if op == "call" and called and depth < 8:
                total += count(called.group(1), depth + 1)
            else:
                total += 1
        return total

    return count(entry) if entry else 0


def executable_profile(compiled) -> dict:
    """{"kernels": device ops per call, "hlo_mbytes": XLA's cost analysis "bytes accessed" / 1e6
    (custom calls, such as our Triton kernels, count 0 there; None if XLA gives no figure)}."""
    kernels = count_kernels(compiled.as_text())
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        mbytes = float(cost["bytes accessed"]) / 1e6
    except Exception:  # noqa: BLE001  (a backend without cost analysis: no figure, not an error)
        mbytes = None
    return {"kernels": kernels, "hlo_mbytes": mbytes}
