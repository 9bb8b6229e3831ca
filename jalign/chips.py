"""Accelerator chips by generation, and TPU topologies by name.

One table of per-chip numbers for the plan's roofline, each row with the page it comes from
(Google Cloud's TPU system-architecture pages; vendor numbers: peak dense bf16 FLOP/s, HBM
capacity and bandwidth, bidirectional inter-chip interconnect bandwidth per chip). A
topology name is ``generation:AxB[xC]`` as ``jax.experimental.topologies`` and Cloud TPU
name a slice's chip grid (``v5e:4x4`` = 16 chips); note that the names of Cloud TPU
*accelerator types* count TensorCores on v4 and v5p (``v5p-128`` = 64 chips, ``v5p:4x4x4``).
"""

from __future__ import annotations

import dataclasses
import math

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float         # dense bf16 FLOP/s per chip
    hbm_bytes: int            # HBM per chip
    hbm_bandwidth: float      # bytes/s per chip
    ici_bandwidth: float | None  # bidirectional inter-chip bytes/s per chip (None: not stated)
    source: str
    # libtpu's chip configuration as JAX uses the chip: v4's two TensorCores as one device
    # ("megacore"; a deviceless v4 topology otherwise lists one device per core).
    chip_config: str | None = None


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 275e12, 32 * GiB, 1200e9, None,
               "https://cloud.google.com/tpu/docs/v4", chip_config="megacore"),
    "v5e": Chip("v5e", 197e12, 16 * GiB, 819e9, 400e9,
                "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", 459e12, 95 * GiB, 2765e9, 1200e9,
                "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", 918e12, 32 * GiB, 1638e9, 800e9,
                "https://cloud.google.com/tpu/docs/v6e"),
}


def parse_topology(name: str) -> tuple[Chip, tuple[int, ...]]:
    """(chip, grid) of a topology name such as ``v5e:4x4`` or ``v5p:4x4x4``; ValueError
    naming the known generations otherwise."""
    generation, _, grid = name.partition(":")
    if generation not in CHIPS or not grid:
        raise ValueError(f"topology {name!r}: expected GENERATION:AxB[xC] with GENERATION one "
                         f"of {sorted(CHIPS)} (e.g. 'v5e:4x4')")
    try:
        dims = tuple(int(d) for d in grid.split("x"))
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise ValueError(f"topology {name!r}: the chip grid {grid!r} is not AxB[xC] of "
                         "positive integers")
    return CHIPS[generation], dims


def chip_count(name: str, slices: int = 1) -> int:
    return math.prod(parse_topology(name)[1]) * slices
