"""``jalign plan``: what a run needs per chip, before anyone rents the chips.

From the same gin files and bindings as ``jalign train``, and through the same code that
opens a run (``check_start``, ``fresh_point``, ``resolve_models``, ``planned_state``) and
builds its step (``recipe_train_step`` with the recipe's ``batch_spec``), without weights
or data:

- the arithmetic plan (``jalign.memory_plan``) of the step's memory per device;
- with ``--compile``, the train step — and a rollout recipe's sampler and scoring pass,
  built by its rollout source as for a run (``Recipe.planned_programs``) — compiled ahead
  of time for the target: the TPU slice
  the hardware config names (``MeshConfig.topology``, compiled by libtpu with no TPU
  attached; the devices laid out as on the slice) or this host's devices. It reports each
  program's per-chip memory against the chip's HBM (or the compiler's refusal, and by how
  much), the collectives in the optimized HLO (counted per loop trip), and a roofline per
  unit of work (a step, a rollout, a decode step): analytic FLOPs (the compiler's cost
  analysis counts a loop body once) against the chip's peak, the bytes it reads against
  HBM bandwidth and its collective bytes against the interconnect (``jalign.chips``).
"""

from __future__ import annotations

import dataclasses
import re
import time

import jax

from jalign.chips import GiB, Chip, parse_topology
from jalign.errors import ConfigError
from jalign.program_spec import ProgramSpec

TPU_EXTRA = "pip install 'jalign[tpu]'  (jax[tpu]: libtpu, ~0.7 GB)"


@dataclasses.dataclass
class Target:
    """Where the plan compiles for: devices (real or a topology's), their chip, processes."""

    name: str
    devices: list | None          # None: known by count only (no libtpu to describe them)
    count: int
    processes: int
    chip: Chip | None
    platform: str = "tpu"


def tpu_topology(name: str, slices: int = 1):
    """libtpu's description of a TPU slice (no TPU needed). libtpu takes a lock file per
    machine unless told that several processes may load it: compiling holds no device, so
    a plan runs beside a training run (or another plan) on the same host."""
    import os
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    kwargs = {"num_slices": slices} if slices > 1 else {}
    chip, _ = parse_topology(name)
    if chip.chip_config:
        kwargs["chip_config_name"] = chip.chip_config
    return topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs)


def target_of(mesh_config, devices_needed: bool = True) -> Target:
    """The slice ``MeshConfig.topology`` names (libtpu compiles for it without a TPU), else
    this host's devices. Without libtpu a topology is a ConfigError naming the extra when
    ``devices_needed``, else a target known by its chip count only."""
    if mesh_config.topology is None:
        devices = jax.devices()
        return Target(f"this host ({len(devices)} {devices[0].platform} devices)", devices,
                      len(devices), jax.process_count(), None, devices[0].platform)
    try:
        mesh_config.check_topology()
        chip, _ = parse_topology(mesh_config.topology)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    name = f"TPU {mesh_config.topology}" + (f" x {mesh_config.slices} slices"
                                             if mesh_config.slices > 1 else "")
    try:
        topo = tpu_topology(mesh_config.topology, mesh_config.slices)
    except Exception as e:  # no libtpu: jax raises RuntimeError/ValueError by version
        if not devices_needed:
            from jalign.chips import chip_count
            return Target(name, None, chip_count(mesh_config.topology, mesh_config.slices),
                          1, chip)
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"MeshConfig.topology={mesh_config.topology!r}: compiling for a TPU "
                          f"needs libtpu, which is not usable here ({text}); install it with "
                          f"{TPU_EXTRA}") from None
    devices = list(topo.devices)
    return Target(name, devices, len(devices), len({d.process_index for d in devices}), chip)


@dataclasses.dataclass
class Program:
    """A compiled program's per-chip numbers."""

    compile_seconds: float
    memory: dict | None          # memory_analysis() fields, bytes per chip
    refused: str | None          # the compiler's out-of-memory message, when it refused
    over_bytes: int | None       # by how much it did not fit, when the message says
    collectives: dict            # over the whole program (every unit)
    flops: float                 # analytic, per chip and unit
    compiler_flops: float | None = None  # cost_analysis(): each loop body counted once
    unit: str = "step"
    units: int = 1
    read_bytes: float | None = None


@dataclasses.dataclass
class Planned:
    """A run as planned: its configs resolved for the target, the step's inputs abstract."""

    exp: object
    target: Target
    mesh: object
    models: object
    step: object
    state: object
    batch: dict
    rows: int
    length: int
    arithmetic: object           # memory_plan.Plan of the primary model (None with LoRA)
    programs: dict = dataclasses.field(default_factory=dict)  # the recipe's other programs


def open_plan(exp, target: Target | None = None) -> Planned:
    """Check the experiment's configs for ``target`` and build its train step, abstractly."""
    from jalign.data.formats import rows_per_example
    from jalign.memory_plan import plan as arithmetic_plan
    from jalign.sharding import DEFAULT_RULES
    from jalign.train.loop import recipe_train_step
    from jalign.train.resume import config_record
    from jalign.train.run import check_start, fresh_point, normalized, resolve_models
    from jalign.train.state_init import planned_state
    from jalign.train.step import batch_sharding

    rules = DEFAULT_RULES
    recipe, configs = exp.recipe, normalized(exp.configs)
    target = target or target_of(configs.mesh)
    mesh, _ = check_start(recipe, configs, rules, devices=target.devices,
                          processes=target.processes,
                          abstract=target.count if target.devices is None else None)
    point = fresh_point(configs, config_record(configs.by_binding(recipe)),
                        processes=target.processes)
    models = resolve_models(recipe, configs, point)
    tc = configs.train
    optimizer, schedule, state, shardings = planned_state(models, configs.optimizer, mesh,
                                                          rules, tc.steps)
    rows = recipe.step_rows(configs.data.batch_size)
    length = recipe.row_length(configs.data)
    step = batch = None
    programs = {}
    if target.devices is not None:
        step = recipe_train_step(recipe, optimizer, models, mesh, shardings, rows,
                                 tc.accum_steps, rules, schedule)
        sh = batch_sharding(mesh, rows, rules)
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh)
                 for k, v in recipe.batch_spec(models, rows, length).items()}
        programs = recipe.planned_programs(models, configs, mesh, rules, state)
    config = models.configs[models.primary]
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    per_shard = max(1, rows * rows_per_example(recipe.data_kind) // tc.accum_steps // shards)
    # The arithmetic models full fine-tuning of the primary model (no LoRA: None then).
    arithmetic = None if config.lora is not None else arithmetic_plan(
        config, configs.mesh, target.count, batch=per_shard, seq_len=length,
        platform=target.platform, optimizer=configs.optimizer,
        chunk_tokens=getattr(recipe.config, "chunk_tokens", 2048))
    return Planned(exp, target, mesh, models, step, state, batch, rows, length, arithmetic,
                   programs)


_OOM = re.compile(r"exceeds available HBM|RESOURCE_EXHAUSTED|Ran out of memory", re.I)
_SIZE = re.compile(r"([\d.]+)([KMGT])?(?:i?B)?\b")
_UNITS = {None: 1, "K": 1024, "M": 1024 ** 2, "G": GiB, "T": 1024 ** 4}


def _over_by(message: str) -> int | None:
    """Bytes by which a program exceeded HBM, from the compiler's message
    (``... (25.57G) exceeds available HBM (15.75G)``), when it says."""
    m = re.search(r"\(([\d.]+[KMGT]?)\)\s*exceeds available HBM\s*\(([\d.]+[KMGT]?)\)", message)
    if not m:
        return None
    need, have = (float(x[:-1]) * _UNITS[x[-1]] if x[-1] in "KMGT" else float(x)
                  for x in m.groups())
    return int(need - have)


def step_spec(planned: Planned) -> ProgramSpec:
    """The train step, with its analytic FLOPs per chip."""
    from jalign.data.formats import rows_per_example
    exp = planned.exp
    rows = planned.rows * rows_per_example(exp.recipe.data_kind)
    flops = exp.recipe.flops_per_step(planned.models, planned.length, rows)
    return ProgramSpec(planned.step, (planned.state, planned.batch),
                       flops / planned.target.count)


def compile_program(mesh, spec: ProgramSpec) -> Program:
    """``spec``'s program compiled for the mesh's devices: its memory, collectives and
    FLOPs per chip, or the compiler's refusal when it does not fit."""
    from jalign.hlo_collectives import collectives
    from jalign.sharding import use_mesh

    more = dict(unit=spec.unit, units=spec.units, read_bytes=spec.read_bytes)
    t0 = time.perf_counter()
    try:
        with use_mesh(mesh):
            compiled = spec.fn.lower(*spec.args).compile()
    except Exception as e:  # XlaRuntimeError / JaxRuntimeError by version
        if not _OOM.search(str(e)):
            raise
        message = " ".join(str(e).split())
        return Program(time.perf_counter() - t0, None, message[:400],
                       _over_by(message), {}, spec.flops, **more)
    seconds = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    memory = {k: int(getattr(ma, k)) for k in (
        "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
        "temp_size_in_bytes", "peak_memory_in_bytes") if hasattr(ma, k)}
    return Program(seconds, memory, None, None, collectives(compiled.as_text()),
                   spec.flops, _compiler_flops(compiled), **more)


def compile_step(planned: Planned) -> Program:
    """The train step compiled for the target."""
    return compile_program(planned.mesh, step_spec(planned))


def compile_all(planned: Planned, progress=None) -> dict:
    """{name: Program}: the train step, then the recipe's other programs (a rollout's
    sampler and scoring pass), each compiled for the target. ``progress(name)`` is called
    before each compile (they take minutes on a pod's topology)."""
    out = {}
    for name, spec in {"train step": step_spec(planned), **planned.programs}.items():
        if progress:
            progress(name)
        out[name] = compile_program(planned.mesh, spec)
    return out


def _compiler_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend reports one
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    return float(cost["flops"]) if isinstance(cost, dict) and "flops" in cost else None


def peak_bytes(memory: dict) -> int:
    """Bytes a program holds at once: its peak when the compiler states one, else
    arguments + outputs not aliased to them + temporaries."""
    if memory.get("peak_memory_in_bytes"):
        return memory["peak_memory_in_bytes"]
    return (memory["argument_size_in_bytes"] + memory["output_size_in_bytes"]
            - memory["alias_size_in_bytes"] + memory["temp_size_in_bytes"])


def roofline(program: Program, chip: Chip) -> dict:
    """Lower bounds on the time of one of the program's units (a step, a decode step)
    per chip (seconds) and the MFU they allow."""
    from jalign.hlo_collectives import ici_bytes
    m = program.memory
    compute = program.flops / chip.peak_flops
    read = program.read_bytes
    if read is None:
        read = (m["argument_size_in_bytes"] + m["output_size_in_bytes"]) / program.units
    hbm = read / chip.hbm_bandwidth
    ici = (ici_bytes(program.collectives) / program.units / chip.ici_bandwidth
           if chip.ici_bandwidth else 0.0)
    bound = max(compute, hbm, ici)
    return {"compute_s": compute, "hbm_s": hbm, "ici_s": ici, "step_s": bound,
            "mfu": compute / bound if bound else 0.0,
            "limit": max((("compute", compute), ("HBM", hbm), ("ICI", ici)),
                         key=lambda kv: kv[1])[0]}
