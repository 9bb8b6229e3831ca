"""jalign (Orbax) model checkpoints restore exactly, onto any mesh."""

import jax
import numpy as np
from flax import nnx

from jalign import checkpoint
from jalign.sources import load_checkpoint
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
    config_b, restored = load_checkpoint(tmp_path / "ck", mesh=mesh_b)
    assert config_b == config
    wq = restored.layers.wq[...]
    assert wq.sharding.mesh.devices.shape == (2, 1, 4)
    assert wq.sharding.spec[2] == "tensor"
    # exact by construction: restore returns the saved bytes, on any mesh
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(restored))):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    _, single = load_checkpoint(tmp_path / "ck")
    assert np.array_equal(np.asarray(single.embed[...]), np.asarray(model.embed[...]))


def test_uncommitted_step_is_ignored(tmp_path):
    config = preset("tiny")
    checkpoint.save_model(tmp_path / "ck", config, create_model(config), step=3)
    # What an interrupted Orbax save leaves behind.
    (tmp_path / "ck" / "5.orbax-checkpoint-tmp-123").mkdir()
    assert checkpoint.latest_step(tmp_path / "ck") == 3


def test_a_bf16_checkpoint_loads_as_float32_and_verifies(tmp_path):
    """Checksums describe the stored bytes: a dtype change on load is applied after they are
    verified (a bf16 checkpoint may start a float32 run)."""
    import jax.numpy as jnp
    from jalign.checkpoint import save_model
    from jalign.sources import load_checkpoint as load_model
    from jalign.models.build import create_model
    from jalign.models.config import preset

    config = preset("tiny", param_dtype="bfloat16", dtype="bfloat16")
    model = create_model(config, seed=0)
    save_model(tmp_path / "bf16", config, model)
    loaded_config, loaded = load_model(tmp_path / "bf16", param_dtype="float32", dtype="float32")
    assert loaded_config.param_dtype == "float32"
    wq = np.asarray(loaded.layers.wq[...])
    assert wq.dtype == np.float32
    # exact by construction: bf16 -> float32 is exact
    np.testing.assert_array_equal(wq, np.asarray(model.layers.wq[...].astype(jnp.float32)))
