"""The collectives of a compiled program, read from its optimized HLO text.

Each collective is counted as many times as it runs: an instruction inside a while loop's
body runs once per trip (the layer scan, the loss's chunk loop, XLA:TPU's windowed
matmuls), so counts and bytes are multiplied by each loop's trip count through every level
of calls: the count XLA states (``known_trip_count``, XLA:CPU/GPU), else the bound of the
loop condition's ``compare(i, constant(N)), direction=LT`` (XLA:TPU states none; its
loops count from 0 by 1). An async pair (``all-gather-start`` / ``-done``) counts once.
XLA:TPU also fuses a collective into a loop's compute (``async_collective_fusion``) to
overlap the two: such a collective (a whole weight's all-gather inside a windowed matmul's
loop) is taken to run once per entry into that loop, not once per trip (an inference
from its shape: a per-trip gather of the whole weight would be redundant); the counts are
estimates there.
Bytes are the larger of an instruction's operands and results (operand shapes looked up by
name where the text does not repeat them): what one device sends or receives through the
collective, within a factor (N - 1) / N of a ring's traffic.
"""

from __future__ import annotations

import collections
import re

import numpy as np

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s([\w\-]+)\((.*)$")
_SHAPE = re.compile(r"\b(pred|s4|u4|s8|u8|s16|u16|s32|u32|s64|u64|f8e\w+|bf16|f16|f32|f64|"
                    r"c64|c128)\[([\d,]*)\]")
_CALLS = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)="
                    r"%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIPS = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')
_BITS = {"pred": 8, "s4": 4, "u4": 4}


def _bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        bits = _BITS.get(dtype) or (8 if dtype.startswith("f8") else int(re.sub(r"\D", "", dtype)))
        n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        total += n * bits // 8
    return total


def _largest(text: str) -> int:
    """Bytes of the largest single array shape in ``text`` (a tuple's biggest element)."""
    return max((_bytes(f"{dtype}[{dims}]") for dtype, dims in _SHAPE.findall(text)), default=0)


def _computations(hlo: str) -> tuple[dict, str | None]:
    """({name: [instruction lines]}, the entry computation's name)."""
    comps, entry, current = {}, None, None
    for line in hlo.splitlines():
        if current is None:
            m = _COMPUTATION.match(line)
            if m and "=" not in line.split("{")[0].split("(")[0]:
                current = m.group(1)
                comps[current] = []
                if line.lstrip().startswith("ENTRY"):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
        else:
            comps[current].append(line)
    return comps, entry


_CONSTANT = re.compile(r"^\s*%?([\w.\-]+)\s*=\s*[su]\d+\[\]\S*\s+constant\((\d+)\)")
_COMPARE = re.compile(r"compare\(([^)]*)\),\s*direction=(LT|GT)")


def _condition_bound(lines: list) -> int | None:
    """N of a loop condition that compares its counter with a constant N: ``compare(i,
    N), direction=LT`` (or ``compare(N, i), direction=GT``). The counter may be offset
    (XLA rotates a loop into ``compare(add(i, 1), N)``) and the condition may also stop
    the loop early (a sampler's ``& ~all(done)``): N is then an upper bound on the trips.
    None when no such compare, or several, is found."""
    constants = dict(m.groups() for m in map(_CONSTANT.match, lines) if m)
    bounds = []
    for line in lines:
        for operands, direction in _COMPARE.findall(line):
            names = [n.lstrip("%") for n in re.findall(r"%?([\w.\-]+)(?:,|$)",
                                                        operands.replace(" ", ""))]
            if len(names) != 2:
                continue
            bound = names[1] if direction == "LT" else names[0]
            if bound in constants:
                bounds.append(int(constants[bound]))
    return bounds[0] if len(set(bounds)) == 1 else None


def _trips(line: str, comps: dict) -> int:
    stated = _TRIPS.search(line)
    if stated:
        return int(stated.group(1))
    cond = re.search(r"\bcondition=%?([\w.\-]+)", line)
    bound = _condition_bound(comps.get(cond.group(1), [])) if cond else None
    return bound if bound is not None else 1


def _multipliers(comps: dict, entry: str | None) -> dict:
    """{computation: how many times it runs per call of the entry}."""
    trips_of: dict[str, int] = {}  # each loop body's and condition's trip count
    for lines in comps.values():
        for line in lines:
            body = re.search(r"\sbody=%?([\w.\-]+)", line)
            if body and re.search(r"\swhile\(", line):
                trips_of[body.group(1)] = _trips(line, comps)
                cond = re.search(r"\bcondition=%?([\w.\-]+)", line)
                if cond:  # it runs once more than the body: close enough for a count
                    trips_of[cond.group(1)] = trips_of[body.group(1)]
    callers: dict[str, list] = collections.defaultdict(list)
    for name, lines in comps.items():
        for line in lines:
            is_while = re.search(r"\swhile\(", line) is not None
            for kind, callee in _CALLS.findall(line):
                n = trips_of.get(callee, 1) if is_while and kind in ("body", "condition") else 1
                # a collective fused into a loop body's compute: once per loop, not per trip
                if callee.startswith("async_collective_fusion") and trips_of.get(name, 1) > 1:
                    n = 1 / trips_of[name]
                callers[callee].append((name, n))
            for group in _BRANCHES.findall(line):
                for callee in re.findall(r"%?([\w.\-]+)", group):
                    callers[callee].append((name, 1))
    memo: dict[str, int] = {}

    def times(name: str, seen=()) -> int:
        if name == entry or name not in callers:
            return 1 if name == entry or entry is None else 0
        if name in memo:
            return memo[name]
        if name in seen:  # recursion does not occur in HLO; guard anyway
            return 0
        memo[name] = sum(times(c, seen + (name,)) * n for c, n in callers[name])
        return memo[name]

    return {name: times(name) for name in comps}


def collectives(hlo: str) -> dict:
    """{kind: {"count": runs per step, "bytes": bytes per step}} of every collective kind
    present in the optimized HLO text ``hlo``."""
    comps, entry = _computations(hlo)
    mult = _multipliers(comps, entry)
    out: dict[str, dict] = {}
    for name, lines in comps.items():
        shapes = {}  # instruction name -> its result shape text, for operands given by name
        for line in lines:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            results, op, operands = m.groups()
            shapes[line.split("=", 1)[0].strip().removeprefix("ROOT").strip().lstrip("%")] = results
            if op.endswith("-done"):
                continue
            kind = op[:-len("-start")] if op.endswith("-start") else op
            if kind not in KINDS:
                continue
            operands = operands.split("), ")[0]
            named = sum(_bytes(shapes.get(n, "")) for n in re.findall(r"%([\w.\-]+)", operands))
            given = max(_bytes(operands), named)
            if op.endswith("-start"):
                # An async start's result is a tuple of its operand (the local shard of an
                # all-gather), its destination (the gathered array) and small contexts.
                size = max(given, _largest(results))
            else:
                size = max(_bytes(results), given)
            row = out.setdefault(kind, {"count": 0, "bytes": 0})
            row["count"] += round(mult.get(name, 1))
            row["bytes"] += round(size * mult.get(name, 1))
    return out


def ici_bytes(found: dict) -> int:
    """Bytes each device moves over the interconnect for these collectives, roughly: an
    all-reduce moves its data twice (reduce-scatter, then all-gather), the others once."""
    return sum(v["bytes"] * (2 if k == "all-reduce" else 1) for k, v in found.items())
