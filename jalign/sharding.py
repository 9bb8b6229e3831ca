"""Device mesh, the logical-axis rules table, and helpers that apply it.

Model code names array dimensions logically (``vocab``, ``embed``, ``q_heads`` ...).
One rules table maps each logical name to zero or more mesh axes (``data``, ``fsdp``,
``tensor``). Changing parallelism means changing the mesh shape or the table, never the
model.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. Parameters shard their large dims over fsdp (gathered per
# layer in the forward) and their head/mlp/vocab dims over tensor. Activations shard
# the batch over data+fsdp and the head/mlp/vocab dims over tensor.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("lora_rank", None),     # adapters: the rank dim is small, replicated
    ("quant_blocks", None),  # a quantised base's scales: one per block of inputs
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape. A size of -1 takes all devices left over (at most one axis).

    ``num_devices``: the device count a hardware config is written for (None: any); a run
    on another count is refused at start, naming it. ``dcn_data`` / ``dcn_fsdp``: how many
    granules (TPU slices, or GPU hosts) the data / fsdp axis spans over the slow
    data-centre network; the rest of each axis stays inside a granule (ICI / NVLink), and
    the tensor axis always does. With both 1 the devices are laid out by ``jax.make_mesh``.
    ``topology``: the TPU slice the file is written for (``v5e:4x4``; ``jalign.chips``),
    which ``jalign plan --compile`` compiles for without the hardware (multi-slice: one
    such slice per ``dcn_data x dcn_fsdp``).
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    num_devices: int | None = None
    dcn_data: int = 1
    dcn_fsdp: int = 1
    topology: str | None = None

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        self.check_topology()
        if self.num_devices is not None and num_devices != self.num_devices:
            raise ValueError(f"MeshConfig.num_devices={self.num_devices}: this hardware config "
                             f"is for {self.num_devices} devices, but {num_devices} are "
                             "available (pick the configs/hw file for this machine)")
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ValueError(f"MeshConfig: at most one axis may be -1, got {self}")
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"MeshConfig: axis sizes must be positive or -1, got {self}")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(
                    f"MeshConfig {self}: {num_devices} devices are not divisible by {known}")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"MeshConfig {self}: data*fsdp*tensor = {math.prod(sizes)} but "
                f"{num_devices} devices are available")
        for axis, size, dcn in (("data", sizes[0], self.dcn_data),
                                ("fsdp", sizes[1], self.dcn_fsdp)):
            if dcn < 1 or size % dcn:
                raise ValueError(f"MeshConfig.dcn_{axis}={dcn} must be positive and divide "
                                 f"MeshConfig.{axis} (= {size} here)")
        return tuple(sizes)  # type: ignore[return-value]

    def check_topology(self) -> None:
        """ValueError naming ``MeshConfig.topology`` when it is not a known slice or its
        chips (times the slices) are not ``num_devices``."""
        if self.topology is None:
            return
        from jalign.chips import chip_count
        try:
            chips = chip_count(self.topology, self.slices)
        except ValueError as e:
            raise ValueError(f"MeshConfig.topology: {e}") from None
        if self.num_devices is not None and chips != self.num_devices:
            raise ValueError(f"MeshConfig.topology={self.topology!r} has {chips} chips"
                             + (f" in {self.slices} slices" if self.slices > 1 else "")
                             + f", but MeshConfig.num_devices={self.num_devices}")

    def dcn_shape(self) -> tuple[int, int, int]:
        return (self.dcn_data, self.dcn_fsdp, 1)

    @property
    def slices(self) -> int:
        return self.dcn_data * self.dcn_fsdp


def abstract_mesh(config: MeshConfig, num_devices: int) -> jax.sharding.AbstractMesh:
    """The mesh ``config`` builds on ``num_devices`` devices, without any devices: for
    checking a hardware config (and planning its memory) away from the hardware."""
    return jax.sharding.AbstractMesh(config.shape(num_devices), MESH_AXES,
                                     axis_types=(AxisType.Auto,) * 3)


def make_mesh(config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with all three axes (size 1 where unused), Auto axis types.

    Auto (not Explicit) axes: Explicit ones break shard_map on unsharded inputs and the
    embedding gather, and we place every constraint ourselves through the rules table.
    """
    config = config or MeshConfig()
    devices = list(devices) if devices is not None else jax.devices()
    shape = config.shape(len(devices))
    axis_types = (AxisType.Auto,) * 3
    if config.dcn_shape() != (1, 1, 1):
        from jax.experimental import mesh_utils
        dcn = config.dcn_shape()
        ici = tuple(s // d for s, d in zip(shape, dcn))
        # TPU slices are granules by slice_index; GPU hosts by process.
        arranged = mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices, process_is_granule=devices[0].platform != "tpu")
        return Mesh(arranged, MESH_AXES, axis_types=axis_types)
    # The interconnect-aware layout a slice's devices get (ring/torus order on TPU), also
    # for devices other than this host's own (a deviceless topology's, a subset).
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)


def global_rows(sharding, local) -> jax.Array:
    """The global array whose rows are every process's ``local`` rows (each process gives
    as many). The global shape is stated, so a mesh whose batch blocks do not match the
    processes fails here instead of building a smaller, wrong batch."""
    local = np.asarray(local)
    shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
    return jax.make_array_from_process_local_data(sharding, local, shape)


def _lookup(rules: Rules, name: str | None) -> tuple[str, ...]:
    if name is None:
        return ()
    for key, axes in rules:
        if key == name:
            if axes is None:
                return ()
            return (axes,) if isinstance(axes, str) else tuple(axes)
    raise KeyError(f"logical axis {name!r} has no entry in the sharding rules table")


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for an array whose dims carry these logical names.

    With ``shape`` and ``mesh`` given, mesh axes that do not divide a dimension are
    dropped (from the right) so that e.g. 2 KV heads on a 4-way tensor axis are
    replicated instead of failing; a mesh axis is never used twice in one spec.
    """
    used: set[str] = set()
    out = []
    for i, name in enumerate(logical):
        axes = [a for a in _lookup(rules, name) if a not in used]
        if shape is not None and mesh is not None:
            while axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
                axes.pop()
            axes = [a for a in axes if mesh.shape[a] > 1] or axes[:0]
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*out)


def named_sharding(mesh: Mesh, logical: Sequence[str | None], shape: Sequence[int],
                   rules: Rules = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical, shape, mesh, rules))


# The mesh and rules that activation constraints use. Set by `use_mesh`; model code
# calls `constrain` and stays unaware of the parallelism.
_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "jalign_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[Mesh]:
    token = _ACTIVE.set((mesh, tuple(rules)))
    try:
        yield mesh
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> tuple[Mesh, Rules] | None:
    return _ACTIVE.get()


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Constrain an activation to the sharding its logical names map to (no-op without a mesh)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    if len(logical) != x.ndim:
        raise ValueError(f"constrain: {x.ndim}-d array given {len(logical)} logical names {logical}")
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, logical, x.shape, rules))


# Parameters already reported as (partly) replicated because a dim did not divide.
_REPORTED: set = set()


def _report_replicated(where: str, names, shape, mesh: Mesh, rules: Rules) -> None:
    """Say once per parameter and mesh which of its mesh axes were dropped (a dim they do
    not divide, e.g. 2 KV heads on a 4-way tensor axis): it stays correct, but replicated."""
    dropped = []
    for name, size in zip(names, shape):
        kept = logical_to_spec((name,), (size,), mesh, rules)[0]
        kept = () if kept is None else (kept,) if isinstance(kept, str) else tuple(kept)
        wanted = [a for a in _lookup(rules, name) if mesh.shape[a] > 1]
        lost = [a for a in wanted if a not in kept]
        if lost:
            dropped.append(f"{name}={size} over {'x'.join(f'{a}={mesh.shape[a]}' for a in lost)}")
    key = (where, tuple(shape), tuple(mesh.shape.items()))
    if dropped and key not in _REPORTED and jax.process_index() == 0:
        _REPORTED.add(key)
        import sys
        print(f"jalign: note: parameter {where} is replicated along what does not divide "
              f"({', '.join(dropped)})", file=sys.stderr, flush=True)


def param_shardings(abstract_state, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """NamedShardings for an nnx State of abstract or concrete Variables.

    Every parameter must carry ``logical_axes`` metadata; one that does not is an error
    naming it, so that nothing silently ends up replicated. A dim that a mesh axis does
    not divide is replicated along that axis, and said once.
    """
    from flax import nnx

    def one(path, var):
        where = "/".join(str(getattr(k, "key", k)) for k in path)
        names = var.get_metadata().get("logical_axes")
        if names is None:
            raise ValueError(f"parameter {where} has no logical_axes")
        if len(names) != len(var.shape):
            raise ValueError(f"parameter {where}: logical_axes {names} do not match shape {var.shape}")
        _report_replicated(where, names, var.shape, mesh, rules)
        return var.replace(named_sharding(mesh, names, var.shape, rules))

    return jax.tree_util.tree_map_with_path(
        one, abstract_state, is_leaf=lambda v: isinstance(v, nnx.Variable))
