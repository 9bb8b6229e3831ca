"""Training checkpoints restore exactly onto a different mesh, and export to HF."""

import jax
import numpy as np
import pytest

from jalign import sources
from jalign.checkpoint import CheckpointError, TrainCheckpointer, resolve_run_dir
from jalign.losses.sft import sft_loss
from jalign.models.config import preset
from jalign.sharding import MeshConfig, make_mesh
from jalign.train.optimizer import OptimizerConfig
from jalign.train.recipe import custom
from jalign.train.roles import RunModels, role_record
from jalign.train.state_init import abstract_train_state, build_optimizer, fresh_state
from jalign.train.step import make_train_step

CONFIG = preset("tiny", num_kv_heads=4)
MODELS = RunModels.single(CONFIG)
ROLES = {"policy": role_record(MODELS.role("policy"), "random", 5, True)}


def _state(mesh):
    """A state two optimizer steps in: every Adam moment is non-zero and differs from every
    other, so a leaf restored into the wrong place cannot go unnoticed."""
    tx, lr = build_optimizer(OptimizerConfig(), MODELS, 10)
    abstract, shardings = abstract_train_state(MODELS, tx, mesh, sources.DEFAULT_RULES)
    initial = sources.InitialModels(MODELS, ROLES, gin_config=CONFIG, overrides={}, mesh=mesh)
    state = fresh_state(MODELS, initial, tx, 0, shardings)
    step = make_train_step(custom(sft_loss).loss_fn, tx, MODELS, mesh=mesh,
                           state_sharding=shardings, global_batch=8, schedule=lr)
    rng = np.random.default_rng(0)
    for _ in range(2):
        ids = rng.integers(3, CONFIG.vocab_size, (8, 16)).astype(np.int32)
        state, _ = step(state, {"input_ids": ids, "loss_mask": np.ones_like(ids)})
    return state, abstract


def test_restore_onto_another_mesh(tmp_path):
    mesh_a = make_mesh(MeshConfig(1, 8, 1))
    state, _ = _state(mesh_a)
    ckpt = TrainCheckpointer(tmp_path / "run", keep=2)
    ckpt.save(state, data_state={"version": 1, "batches": 0, "grain": {}}, model_config=CONFIG,
              operative="TrainConfig.steps = 10", roles=ROLES)
    ckpt.close()

    mesh_b = make_mesh(MeshConfig(2, 1, 4))
    tx, _ = build_optimizer(OptimizerConfig(), MODELS, 10)
    abstract_b, _ = abstract_train_state(MODELS, tx, mesh_b, sources.DEFAULT_RULES)
    restored, data_state, metadata = TrainCheckpointer(
        tmp_path / "run", keep=2).restore(abstract_b)
    assert data_state["version"] == 1 and metadata["step"] == 2 and metadata["config_hash"]
    wq = restored.params["policy"]["layers"]["wq"]
    assert wq.sharding.mesh.devices.shape == (2, 1, 4) and wq.sharding.spec[2] == "tensor"
    mu = restored.opt_state[1][0].mu["policy"]["layers"]["wq"]  # chain(clip, adamw=...)
    assert mu.sharding.spec == wq.sharding.spec
    # What this test exists to catch: moments restored into another parameter's slot. Two
    # same-shaped moments swapped are told apart (with zero moments they would not be).
    mu_saved = state.opt_state[1][0].mu["policy"]["layers"]
    assert mu_saved["wq"].shape == mu_saved["wk"].shape
    assert not np.array_equal(np.asarray(mu_saved["wq"]), np.asarray(mu_saved["wk"]))
    saved_leaves = jax.tree.leaves(jax.device_get(state))
    opt_leaves = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.opt_state))
                  if np.asarray(x).ndim > 0]
    assert all(np.abs(x).max() > 0 for x in opt_leaves)  # the moments carry information
    # exact by construction: restore returns the saved bytes, onto another mesh
    for a, b in zip(saved_leaves, jax.tree.leaves(jax.device_get(restored))):
        np.testing.assert_array_equal(a, b)
    # The model part of a training checkpoint loads on its own (for export).
    config, model = sources.load_checkpoint(tmp_path / "run")
    assert config == CONFIG
    np.testing.assert_array_equal(np.asarray(model.layers.wq[...]), np.asarray(jax.device_get(wq)))


@pytest.mark.parametrize("name", ["../x", "/abs", "a/../../b", "", ".hidden", "a b", "a//b"])
def test_run_names_cannot_escape(tmp_path, name):
    with pytest.raises(CheckpointError, match="invalid run name|escapes"):
        resolve_run_dir(tmp_path, name)


def test_good_run_names(tmp_path):
    assert resolve_run_dir(tmp_path, "sweep/lr_1e-3.seed0") == (tmp_path / "sweep" / "lr_1e-3.seed0").resolve()


def test_an_undecodable_item_is_named(tmp_path):
    """Bytes that no longer decode (a truncated array file) are reported as damage of the
    item that holds them, not of the step in general."""
    from jalign.checkpoint import CorruptCheckpoint
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    state, abstract = _state(mesh)
    ckpt = TrainCheckpointer(tmp_path / "run", keep=2)
    ckpt.save(state, data_state={"version": 1, "batches": 0, "grain": {}}, model_config=CONFIG,
              operative="", roles=ROLES)
    ckpt.close()
    files = [p for p in (tmp_path / "run" / "checkpoints" / "2" / "train_state").rglob("*")
             if p.is_file() and p.parent.name == "d"]
    for f in files:  # every data file cut in half: nothing of the item decodes
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CorruptCheckpoint) as e:
        TrainCheckpointer(tmp_path / "run", keep=2).restore(abstract)
    assert "['train_state']" in str(e.value) and "'params'" not in str(e.value)
