"""Every hardware config parses with an experiment, builds its mesh for the device count
it states (abstractly: no hardware), refuses another count, and shards Llama 3.1 8B and
70B with every parameter dim divided by its mesh axes, or reported where one is not."""

from pathlib import Path

import jax
import pytest
from flax import nnx

from jalign import config as jconfig
from jalign import memory_plan, sharding
from jalign.models.build import abstract_model
from jalign.sharding import MeshConfig, abstract_mesh

ROOT = Path(__file__).resolve().parents[1]
HW_FILES = sorted((ROOT / "configs" / "hw").glob("*.gin"))
EXPERIMENT = "configs/demo/sft_add.gin"  # includes cpu.gin: the hw file must override it


def _ids(path):
    return path.stem


def _parse(path) -> tuple[MeshConfig, object]:
    jconfig.parse([EXPERIMENT, path])
    return jconfig.build("MeshConfig"), jconfig.model_config()


def test_hw_configs_exist():
    assert HW_FILES, "no configs/hw/*.gin files"
    assert {"cpu", "gpu_8", "tpu_v5e_16"} <= {p.stem for p in HW_FILES}


@pytest.mark.parametrize("path", HW_FILES, ids=_ids)
def test_parses_with_an_experiment_and_builds_its_mesh(path):
    mesh_config, _ = _parse(path)
    assert jconfig.build("DataConfig").batch_size == 16, "a hw config must not set the batch"
    if mesh_config.num_devices is None:  # cpu.gin: any device count
        assert path.stem == "cpu", f"{path.name} must state MeshConfig.num_devices"
        for n in (1, 2, 8):
            assert abstract_mesh(mesh_config, n).size == n
        return
    n = mesh_config.num_devices
    mesh = abstract_mesh(mesh_config, n)
    assert mesh.axis_names == sharding.MESH_AXES and mesh.size == n
    memory_plan.chip(path.stem)  # the planner knows its chip (benchmarks/memory_plan.py)


@pytest.mark.parametrize("path", [p for p in HW_FILES if p.stem != "cpu"], ids=_ids)
def test_a_wrong_device_count_is_refused_naming_it(path):
    mesh_config, _ = _parse(path)
    n = mesh_config.num_devices
    for wrong in (n // 2 or 2, n * 2):
        with pytest.raises(ValueError, match=f"num_devices={n}.*{wrong} are available"):
            abstract_mesh(mesh_config, wrong)


def _dropped(state, mesh) -> dict[str, list[str]]:
    """path -> the logical dims whose mesh axes do not divide them (so are replicated)."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        names = var.get_metadata()["logical_axes"]
        lost = []
        for name, size in zip(names, var.shape):
            wanted = [a for a in sharding._lookup(sharding.DEFAULT_RULES, name)
                      if mesh.shape[a] > 1]
            kept = sharding.logical_to_spec((name,), (size,), mesh)[0]
            kept = () if kept is None else (kept,) if isinstance(kept, str) else kept
            lost += [f"{name}={size}/{a}" for a in wanted if a not in kept]
        if lost:
            out["/".join(map(str, path))] = lost
    return out


@pytest.mark.parametrize("model", sorted(memory_plan.MODELS))
@pytest.mark.parametrize("path", HW_FILES, ids=_ids)
def test_llama_8b_and_70b_shard_on_the_mesh(path, model, monkeypatch, capfd):
    mesh_config, hw = _parse(path)
    mesh = abstract_mesh(mesh_config, mesh_config.num_devices or 8)
    config = memory_plan.with_execution(memory_plan.MODELS[model], hw)
    monkeypatch.setattr(sharding, "_REPORTED", set())  # notes are said once per process
    _, state = abstract_model(config, mesh)  # shardings from the rules; shard shapes below
    notes = capfd.readouterr().err
    dropped = _dropped(state, mesh)
    for where, lost in dropped.items():  # what does not divide is said, by name
        assert f"parameter {where} is replicated" in notes, (where, lost, notes)
    if not dropped:
        assert "is replicated" not in notes, notes
    # Only the 8 KV heads may fail to divide (on a tensor axis above 8); every other dim
    # of both models divides on every shipped mesh.
    assert all(d.startswith("kv_heads=") for lost in dropped.values() for d in lost), dropped
    for leaf in jax.tree.leaves(state):
        leaf.sharding.shard_shape(leaf.shape)  # raises if a kept axis did not divide
