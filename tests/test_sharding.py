import pytest
from jax.sharding import PartitionSpec as P

from jalign.sharding import MeshConfig, logical_to_spec, make_mesh


def test_mesh_config_fills_one_axis():
    assert MeshConfig(2, -1, 2).shape(8) == (2, 2, 2)
    assert MeshConfig().shape(8) == (1, 8, 1)
    with pytest.raises(ValueError, match="at most one"):
        MeshConfig(-1, -1, 1).shape(8)
    with pytest.raises(ValueError, match="8 devices"):
        MeshConfig(2, 2, 1).shape(8)
    mesh = make_mesh(MeshConfig(1, 4, 2))
    assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.devices.shape == (1, 4, 2)


def test_indivisible_dims_fall_back_to_fewer_axes():
    mesh = make_mesh(MeshConfig(2, 2, 2))
    # 2 kv heads on a 2-way tensor axis shard; 1 kv head cannot and is replicated.
    assert logical_to_spec(("embed", "kv_heads"), (64, 2), mesh) == P("fsdp", "tensor")
    assert logical_to_spec(("embed", "kv_heads"), (64, 1), mesh) == P("fsdp", None)
    # batch of 2 cannot use data*fsdp=4, keeps data only.
    assert logical_to_spec(("batch", "length"), (2, 8), mesh) == P("data", None)
    assert logical_to_spec(("batch", "length"), (8, 8), mesh) == P(("data", "fsdp"), None)
    with pytest.raises(KeyError, match="'nonsense'"):
        logical_to_spec(("nonsense",))
