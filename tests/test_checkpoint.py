"""jalign (Orbax) model checkpoints restore exactly, onto any mesh."""

import jax
import numpy as np
from flax import nnx

from jalign import checkpoint
from jalign.models.build import create_model
from jalign.models.config import preset
from jalign.sharding import MeshConfig, make_mesh


def test_save_restore_onto_a_different_mesh(tmp_path):
    config = preset("tiny", num_kv_heads=4)
    mesh_a = make_mesh(MeshConfig(1, 8, 1))
    model = create_model(config, seed=1, mesh=mesh_a)
    checkpoint.save_model(tmp_path / "ck", config, model, step=7)
    assert checkpoint.latest_step(tmp_path / "ck") == 7
    mesh_b = make_mesh(MeshConfig(2, 1, 4))
    config_b, restored = checkpoint.load_model(tmp_path / "ck", mesh=mesh_b)
    assert config_b == config
    wq = restored.layers.wq[...]
    assert wq.sharding.mesh.devices.shape == (2, 1, 4)
    assert wq.sharding.spec[2] == "tensor"
    # exact by construction: restore returns the saved bytes, on any mesh
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(restored))):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    _, single = checkpoint.load_model(tmp_path / "ck")
    assert np.array_equal(np.asarray(single.embed[...]), np.asarray(model.embed[...]))


def test_uncommitted_step_is_ignored(tmp_path):
    config = preset("tiny")
    checkpoint.save_model(tmp_path / "ck", config, create_model(config), step=3)
    # What an interrupted Orbax save leaves behind.
    (tmp_path / "ck" / "5.orbax-checkpoint-tmp-123").mkdir()
    assert checkpoint.latest_step(tmp_path / "ck") == 3
