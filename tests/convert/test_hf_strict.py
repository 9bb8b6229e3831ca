"""Strict import: every malformed checkpoint is refused with an error naming the problem."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jalign.convert.hf import load_hf
from jalign.convert.safetensors_io import ConversionError
from tests.hf_models import save_hf_model


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    save_hf_model("llama2", path)
    return path


def _copy(good_dir: Path, tmp_path: Path, edit_tensors=None, edit_config=None) -> Path:
    out = tmp_path / "ckpt"
    out.mkdir(parents=True)
    tensors = load_file(str(good_dir / "model.safetensors"))
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((good_dir / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_good_checkpoint_loads(good_dir):
    config, _ = load_hf(good_dir)
    assert config.num_layers == 2


def test_missing_tensor_is_named(good_dir, tmp_path):
    path = _copy(good_dir, tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ConversionError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_hf(path)


def test_unexpected_tensor_is_named(good_dir, tmp_path):
    def add(t):
        t["model.layers.0.self_attn.extra_proj.weight"] = np.zeros((4, 4), np.float32)
    with pytest.raises(ConversionError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.extra_proj\.weight'"):
        load_hf(_copy(good_dir, tmp_path, add))


def test_layer_beyond_config_is_unexpected(good_dir, tmp_path):
    def add(t):
        t["model.layers.2.input_layernorm.weight"] = np.ones((64,), np.float32)
    with pytest.raises(ConversionError, match=r"unexpected tensor 'model\.layers\.2\.input_layernorm\.weight'"):
        load_hf(_copy(good_dir, tmp_path, add))


def test_misshaped_tensor_is_named(good_dir, tmp_path):
    def reshape(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((32, 64), np.float32)
    with pytest.raises(ConversionError, match=r"misshaped tensor 'model\.layers\.0\.self_attn\.k_proj\.weight': "
                                              r"shape \[32, 64\], expected \[64, 64\]"):
        load_hf(_copy(good_dir, tmp_path, reshape))


def test_unsupported_rope_type_is_named(good_dir, tmp_path):
    def yarn(c):
        c["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    with pytest.raises(ConversionError, match="unsupported rope type 'yarn'"):
        load_hf(_copy(good_dir, tmp_path, edit_config=yarn))


def test_old_style_rope_keys_are_read(good_dir, tmp_path):
    def old(c):
        c.pop("rope_parameters")
        c["rope_theta"] = 5000.0
        c["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
    with pytest.raises(ConversionError, match="unsupported rope type 'dynamic'"):
        load_hf(_copy(good_dir, tmp_path, edit_config=old))

    def old_linear(c):
        c.pop("rope_parameters")
        c["rope_theta"] = 5000.0
        c["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    config, _ = load_hf(_copy(good_dir, tmp_path / "b", edit_config=old_linear))
    assert config.rope_theta == 5000.0 and config.rope_scaling.factor == 2.0


def test_unsupported_architecture_is_named(good_dir, tmp_path):
    def gemma(c):  # (mistral was the example here until it became a family)
        c["model_type"] = "gemma2"
        c["architectures"] = ["Gemma2ForCausalLM"]
    with pytest.raises(ConversionError, match="model_type='gemma2'"):
        load_hf(_copy(good_dir, tmp_path, edit_config=gemma))

    def mixed(c):  # a llama config naming another family's class
        c["architectures"] = ["Qwen2ForCausalLM"]
    with pytest.raises(ConversionError, match="Qwen2ForCausalLM"):
        load_hf(_copy(good_dir, tmp_path / "mixed", edit_config=mixed))


class _Canary:
    """Unpickling this touches a file: proof that nothing was unpickled if it is absent."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).touch, ())


def test_pickle_only_directory_is_refused_unread(good_dir, tmp_path):
    path = tmp_path / "pickled"
    path.mkdir()
    (path / "config.json").write_text((good_dir / "config.json").read_text())
    marker = tmp_path / "UNPICKLED"
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(_Canary(str(marker))))
    with pytest.raises(ConversionError, match=r"pytorch_model\.bin.*never unpickles"):
        load_hf(path)
    assert not marker.exists()


def test_duplicated_tensor_across_shards_is_named(good_dir, tmp_path):
    path = tmp_path / "dup"
    path.mkdir()
    tensors = load_file(str(good_dir / "model.safetensors"))
    names = sorted(tensors)
    dup = "model.norm.weight"
    first = {k: tensors[k] for k in names[: len(names) // 2]} | {dup: tensors[dup]}
    second = {k: tensors[k] for k in names[len(names) // 2:]}
    assert dup in second
    save_file(first, str(path / "model-00001-of-00002.safetensors"))
    save_file(second, str(path / "model-00002-of-00002.safetensors"))
    (path / "config.json").write_text((good_dir / "config.json").read_text())
    with pytest.raises(ConversionError, match=r"duplicated tensor 'model\.norm\.weight'"):
        load_hf(path)


def test_index_naming_absent_shard_is_refused(good_dir, tmp_path):
    path = _copy(good_dir, tmp_path)
    weight_map = {k: "model.safetensors" for k in load_file(str(path / "model.safetensors"))}
    weight_map["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ConversionError, match="model-00002-of-00002.safetensors"):
        load_hf(path)


def test_all_problems_reported_together(good_dir, tmp_path):
    def edit(t):
        t.pop("model.norm.weight")
        t["lm_head.weight"] = np.zeros((3, 64), np.float32)
    with pytest.raises(ConversionError) as info:
        load_hf(_copy(good_dir, tmp_path, edit))
    assert "missing tensor 'model.norm.weight'" in str(info.value)
    assert "misshaped tensor 'lm_head.weight'" in str(info.value)
