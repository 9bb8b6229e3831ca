"""What ``jalign plan`` prints: per chip memory (planned and compiled) against HBM, the
verdict and the knobs that would make a refused step fit, collectives and the roofline."""

from __future__ import annotations

from jalign.chips import GiB
from jalign.memory_plan import resolve_attention
from jalign.plan import Planned, Program, peak_bytes, roofline


def gib(n: float) -> str:
    """GiB with two decimals; below a tenth of one, MiB or KiB (a tiny model's plan)."""
    for unit, size in (("GiB", GiB), ("MiB", 2 ** 20), ("KiB", 1024)):
        if abs(n) >= size / 10 or n == 0:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def describe(p: Planned) -> list[str]:
    exp, config = p.exp, p.models.configs[p.models.primary]
    mesh = " x ".join(f"{k} {v}" for k, v in p.mesh.shape.items())
    tc = exp.configs.train
    chip = p.target.chip
    where = p.target.name + (f" ({p.target.count} chips of {chip.name}, {gib(chip.hbm_bytes)} "
                             "HBM each)" if chip else "")
    lines = [f"jalign plan: {exp.recipe.name} of a {config.num_params() / 1e9:.2f}B-parameter "
             f"{type(config).__name__.removesuffix('Config')} on {where}; mesh {mesh}",
             f"train step: {p.rows} rows x {p.length} tokens (TrainConfig.accum_steps="
             f"{tc.accum_steps}), remat {config.remat_policy!r}, attention "
             f"{config.attention_impl!r}, {config.dtype} compute on {config.param_dtype} params"]
    a = p.arithmetic
    if a is None:
        lines.append("arithmetic plan: not modelled for LoRA (jalign.memory_plan plans full "
                     "fine-tuning); use --compile")
        return lines
    lines.append(f"arithmetic plan per chip: state {gib(a.state)} + temporaries "
                 f"{gib(a.temporaries)} = {gib(a.total)} (jalign.memory_plan; the frozen "
                 "models a recipe holds are not in it)")
    return lines


def hbm_of(p: Planned) -> int | None:
    return p.target.chip.hbm_bytes if p.target.chip else None


def verdict(p: Planned, program: Program, name: str = "train step"
            ) -> tuple[bool | None, list[str]]:
    """(fits, lines) of the compiled ``name``: True/False against the chip's HBM, None when
    no HBM is known."""
    hbm = hbm_of(p)
    if program.refused:
        over = (f" by {gib(program.over_bytes)}" if program.over_bytes is not None else "")
        lines = [f"compiled {name}: does not fit{over} — the compiler refused it: "
                 f"{program.refused[:240]}"]
        return False, lines + knobs(p, program.over_bytes, name)
    m = program.memory
    peak = peak_bytes(m)
    line = (f"compiled {name} ({program.compile_seconds:.0f} s) per chip: arguments "
            f"{gib(m['argument_size_in_bytes'])}, outputs {gib(m['output_size_in_bytes'])} "
            f"(aliased {gib(m['alias_size_in_bytes'])}), temporaries "
            f"{gib(m['temp_size_in_bytes'])}; peak {gib(peak)}")
    if hbm is None:
        return None, [line]
    fits = peak <= hbm
    line += (f" of {gib(hbm)}: " + (f"fits ({gib(hbm - peak)} free)" if fits
                                    else f"does not fit by {gib(peak - hbm)}"))
    return fits, [line] + ([] if fits else knobs(p, peak - hbm, name))


def knobs(p: Planned, over: int | None, name: str = "train step") -> list[str]:
    """Settings that bring program ``name`` under HBM: the recipe's own, then for the
    train step those estimated from the arithmetic plan (what scales with the micro-batch:
    activations, recomputation, logits)."""
    config = p.models.configs[p.models.primary]
    tc = p.exp.configs.train
    a = p.arithmetic
    out = list(p.exp.recipe.memory_knobs(name))
    if name != "train step":
        return ["  to fit, try: " + "; ".join(out + ["more chips on MeshConfig.fsdp"])]
    if resolve_attention(config, p.target.platform) == "xla":
        out.append(f"{type(config).__name__}.attention_impl='auto' (a fused kernel: no "
                   "[heads, seq, seq] scores)")
    if config.remat_policy != "full":
        out.append(f"{type(config).__name__}.remat_policy='full' (keeps no activations "
                   "but each layer's input)")
    rows_per_shard = p.rows // tc.accum_steps // max(1, p.mesh.shape["data"] * p.mesh.shape["fsdp"])
    scaling = 0 if a is None else a.activations + a.recompute + a.logits
    if over is not None and scaling > over and rows_per_shard > 1:
        need = scaling / (scaling - over)  # micro-batches that shrink what scales enough
        k = next((k for k in range(2, rows_per_shard + 1)
                  if rows_per_shard % k == 0 and k >= need), None)
        if k is not None:
            out.append(f"TrainConfig.accum_steps={tc.accum_steps * k} (the same global batch in "
                       f"micro-batches of {p.rows // tc.accum_steps // k} rows; estimated)")
    out.append("more chips on MeshConfig.fsdp (the state per chip shrinks with them)"
               + (", or LoraConfig (no optimizer state for the frozen weights)"
                  if config.lora is None else ""))
    return ["  to fit, try: " + "; ".join(out)]


def collective_lines(program: Program) -> list[str]:
    per = program.unit if program.units == 1 else f"{program.units} {program.unit}s"
    if not program.collectives:
        return [f"  collectives per {per}: none"]
    parts = [f"{k} {v['count']} x, {gib(v['bytes'])}" for k, v in
             sorted(program.collectives.items())]
    return [f"  collectives per {per} and chip (loop trips counted): " + "; ".join(parts)]


def roofline_lines(p: Planned, program: Program) -> list[str]:
    chip = p.target.chip
    if chip is None or program.memory is None:
        return []
    r = roofline(program, chip)
    ici = (f", ICI >= {r['ici_s'] * 1e3:.2f} ms" if chip.ici_bandwidth else
           ", ICI not bounded (no bandwidth stated)")
    unit = program.unit
    return [f"  roofline per chip and {unit} ({chip.name}: {chip.peak_flops / 1e12:.0f} "
            f"TFLOP/s bf16, {chip.hbm_bandwidth / 1e9:.0f} GB/s HBM"
            + (f", {chip.ici_bandwidth / 1e9:.0f} GB/s ICI" if chip.ici_bandwidth else "")
            + f"; {chip.source}): {program.flops / 1e12:.3g} TFLOP analytic -> compute >= "
            f"{r['compute_s'] * 1e3:.2f} ms, HBM >= {r['hbm_s'] * 1e3:.2f} ms{ici}; {unit} >= "
            f"{r['step_s'] * 1e3:.2f} ms ({r['limit']}-bound), MFU <= {100 * r['mfu']:.0f}%"
            + (f" (the compiler's cost analysis says {program.compiler_flops / 1e12:.3g} "
               "TFLOP: it counts each loop body once)" if program.compiler_flops else "")]


def report(p: Planned, programs: dict | None) -> tuple[bool | None, list[str]]:
    """(fits, lines): ``programs`` {name: Program} compiled (``plan.compile_all``), or None
    for the arithmetic plan alone. Fits when every program fits."""
    lines = describe(p)
    if programs is None:
        hbm = hbm_of(p)
        if hbm is None or p.arithmetic is None:
            return None, lines
        fits = p.arithmetic.total <= hbm
        return fits, lines + [f"arithmetic verdict: {'fits' if fits else 'does not fit'} "
                              f"{gib(hbm)} (compile with --compile for the compiler's own "
                              "numbers)"]
    verdicts = []
    for name, program in programs.items():
        fits, more = verdict(p, program, name)
        verdicts.append(fits)
        lines += more
        if program.memory is not None:
            lines += collective_lines(program) + roofline_lines(p, program)
    if False in verdicts:
        return False, lines
    return (None if None in verdicts else True), lines
