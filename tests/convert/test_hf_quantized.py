"""A QLoRA base read from Hugging Face goes straight to codes, projection by projection
(the float model never exists whole): the same codes and scales as quantising the loaded
model, on one device and sharded."""

import jax
import numpy as np
import pytest

from jalign.convert.hf import load_hf
from jalign.models.lora import LoraConfig
from jalign.sharding import MeshConfig, make_mesh
from jalign.models.adapters import attach
from jalign.models.build import params_of
from jalign.train.roles import ADAPTERS, split
from tests.hf_models import save_hf_model


@pytest.mark.parametrize("kind, mesh_shape", [("nf4", None), ("int8", (1, 2, 4))])
def test_quantised_while_loading_equals_quantised_after(tmp_path, kind, mesh_shape):
    save_hf_model("llama3_1", tmp_path / "hf")
    mesh = make_mesh(MeshConfig(*mesh_shape)) if mesh_shape else None
    lora = LoraConfig(rank=2, quantize=kind, block_size=16)
    config, direct = load_hf(tmp_path / "hf", mesh=mesh, quantize=(kind, 16))
    assert direct.config.lora == LoraConfig(rank=0, quantize=kind, block_size=16)
    assert direct.layers.w_up[...].dtype == (np.int8 if kind == "int8" else np.uint8)
    _, plain = load_hf(tmp_path / "hf", mesh=mesh)
    after = attach(plain, lora, seed=0, mesh=mesh)
    from_direct = attach(direct, lora, seed=0, mesh=mesh)  # keeps the codes it was given
    want, got = split(params_of(after), ADAPTERS), split(params_of(from_direct), ADAPTERS)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):  # exact: same function
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if mesh is not None:
        assert from_direct.layers.w_up[...].sharding == after.layers.w_up[...].sharding
