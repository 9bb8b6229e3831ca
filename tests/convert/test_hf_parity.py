"""Logit parity with transformers' causal LMs of every family (Llama, Qwen2, Qwen3,
Mistral), on import and after export."""

import logging

import numpy as np
import pytest
import torch
import transformers

from jalign.convert.hf import load_hf, save_hf
from jalign.models.build import forward
from tests.hf_models import (EXPORT_MAX_DLOGIT, IMPORT_MAX_DLOGIT, WarningCapture, hf_classes,
                             hf_logits, save_hf_model)
from tests.numerics import assert_f32_close, f32_tolerance, llama_logits_bound


# (config name, sequence length). llama3_1 runs 80 tokens: longer than its
# original_max_position_embeddings (32), where llama3 scaling matters.
CASES = [("llama2", 40), ("llama3_1", 80), ("llama3_2", 64), ("biased", 30), ("qwen2", 40),
         ("qwen3", 40), ("mistral", 40)]  # mistral: 40 tokens through a window of 8


def _ids(vocab, length, batch=2, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


@pytest.mark.parametrize("name,length", CASES)
def test_import_and_export_match_transformers(tmp_path, name, length):
    hf_model = save_hf_model(name, tmp_path / "hf")
    ids = _ids(hf_model.config.vocab_size, length)
    ref = hf_logits(hf_model, ids)

    config, model = load_hf(tmp_path / "hf")
    out = np.asarray(forward(model, ids))
    assert out.shape == ref.shape
    # jalign and torch, two float32 programs for one forward: the logits chain's bound.
    assert_f32_close(out, ref, **llama_logits_bound(model, length), err_msg=name)
    assert np.abs(out - ref).max() <= IMPORT_MAX_DLOGIT, \
        f"{name}: import max |dlogit| {np.abs(out - ref).max()}"

    save_hf(config, model, tmp_path / "export", max_shard_bytes=30_000)  # several shards
    assert (tmp_path / "export" / "model.safetensors.index.json").exists()
    assert (tmp_path / "export" / "generation_config.json").exists()
    capture = WarningCapture()
    tf_logger = logging.getLogger("transformers")
    tf_logger.addHandler(capture)
    try:
        reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "export", output_loading_info=True)
    finally:
        tf_logger.removeHandler(capture)
    assert type(reloaded) is hf_classes(name)[1]
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"] and not info["error_msgs"], info
    assert not capture.records, [r.getMessage() for r in capture.records]
    # exact by construction: import and export only transpose and reshape, so the reloaded
    # model holds the original's float32 tensors bit for bit
    original, again = hf_model.state_dict(), reloaded.state_dict()
    assert original.keys() == again.keys()
    for key in original:
        assert torch.equal(original[key], again[key]), key
    # Hence the same torch program on the same weights: identical in practice (torch's
    # kernels do not promise it; the worst case would be the import bound above).
    reloaded_logits = hf_logits(reloaded.eval(), ids)
    assert np.abs(reloaded_logits - ref).max() <= EXPORT_MAX_DLOGIT


def test_parity_check_is_sensitive_to_rope_and_attention(tmp_path):
    """The weights make attention position-dependent: a rope or mask bug would show."""
    hf_model = save_hf_model("llama3_1", tmp_path / "hf")
    ids = _ids(hf_model.config.vocab_size, 80)
    ref = hf_logits(hf_model, ids)
    _, model = load_hf(tmp_path / "hf")
    # The logits chain's float32 bound; positions up to 87 also round their RoPE angles
    # (relative error u in an angle of up to 87 radians), counted as 87 terms.
    bound = llama_logits_bound(model, 87)
    bound["terms"] = max(bound["terms"], 87)
    tol = f32_tolerance(**bound)
    _, unscaled = load_hf(tmp_path / "hf", rope_scaling=None)
    assert np.abs(np.asarray(forward(unscaled, ids)) - ref).max() > 2 * tol
    # RoPE is relative: a uniform shift must change nothing (up to the rounding of other
    # angles: an invariance, not the import requirement), stretched distances must.
    shifted = np.broadcast_to(np.arange(80, dtype=np.int32) + 7, ids.shape)
    assert_f32_close(forward(model, ids, shifted), ref, **bound)
    stretched = np.broadcast_to(np.arange(80, dtype=np.int32) * 2, ids.shape)
    assert np.abs(np.asarray(forward(model, ids, stretched)) - ref).max() > 2 * tol


def test_bfloat16_checkpoint_keeps_its_dtype(tmp_path):
    save_hf_model("llama3_2", tmp_path / "hf", dtype=torch.bfloat16)
    config, model = load_hf(tmp_path / "hf")
    assert config.param_dtype == "bfloat16"
    assert str(model.embed[...].dtype) == "bfloat16"
    config32, model32 = load_hf(tmp_path / "hf", dtype="float32")
    assert config32.param_dtype == "float32"
    ids = _ids(128, 24)
    # Reload in float32 (casting the bf16 module would also round its rope buffer).
    hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    ref = hf_logits(hf_model.eval(), ids)
    out = np.asarray(forward(model32, ids))
    assert_f32_close(out, ref, **llama_logits_bound(model32, 24))  # as on import, above
    assert np.abs(out - ref).max() <= IMPORT_MAX_DLOGIT


def test_import_onto_a_mesh_shards_as_it_reads(tmp_path):
    from jalign.sharding import MeshConfig, logical_to_spec, make_mesh

    hf_model = save_hf_model("llama3_1", tmp_path / "hf")
    ids = _ids(hf_model.config.vocab_size, 40, batch=4)
    ref = hf_logits(hf_model, ids)
    mesh = make_mesh(MeshConfig(2, 2, 2))
    _, model = load_hf(tmp_path / "hf", mesh=mesh)
    w_up = model.layers.w_up[...]
    assert w_up.sharding.spec == logical_to_spec(("layers", "embed", "mlp"), w_up.shape, mesh)
    assert w_up.sharding.spec[1:] == ("fsdp", "tensor")
    # Each device holds a quarter of the weight, not a full copy.
    assert w_up.addressable_shards[0].data.size == w_up.size // 4
    out = np.asarray(forward(model, ids, mesh=mesh))
    assert_f32_close(out, ref, **llama_logits_bound(model, 40))  # as on import, above
    assert np.abs(out - ref).max() <= IMPORT_MAX_DLOGIT
