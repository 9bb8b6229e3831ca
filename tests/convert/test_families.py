"""Every model family against transformers, beyond the import parity of test_hf_parity.py:
scanned and unrolled layers, one device and sharded, packed rows, greedy decoding with the
KV cache (Mistral's past its sliding window), and LoRA adapters through peft. Tiny configs
with unit-scale weights (tests/hf_models.py), so attention is far from uniform."""

import json

import jax
import numpy as np
import pytest
import torch

from jalign.convert.hf import load_hf, read_hf_config
from jalign.models.build import forward, params_of
from jalign.rl.generate import generate
from jalign.sharding import MeshConfig, make_mesh
from tests.hf_models import hf_logits, save_hf_model
from tests.numerics import assert_f32_close, f32_tolerance, llama_logits_bound

FAMILIES = ["qwen2", "qwen3", "mistral"]  # Llama: test_hf_parity.py, test_decode.py
LENGTH = 40  # Mistral's window is 8: most keys are out of reach


def _ids(vocab, length, batch=2, seed=0):
    return np.random.default_rng(seed).integers(3, vocab, (batch, length)).astype(np.int32)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "hf"
    hf_model = save_hf_model(request.param, path)
    return request.param, path, hf_model


def test_the_family_is_read_from_config_json(family):
    name, path, _ = family
    config = read_hf_config(path)
    assert config.family == name
    assert (config.qkv_bias, config.qk_norm, config.sliding_window) == {
        "qwen2": (True, False, None), "qwen3": (False, True, None),
        "mistral": (False, False, 8)}[name]


@pytest.mark.parametrize("scan, mesh_shape", [(True, None), (False, None), (True, (2, 2, 2)),
                                              (False, (1, 4, 2))])
def test_scanned_unrolled_and_sharded_equal_transformers(family, scan, mesh_shape):
    name, path, hf_model = family
    ids = _ids(hf_model.config.vocab_size, LENGTH, batch=4)
    ref = hf_logits(hf_model, ids)
    mesh = make_mesh(MeshConfig(*mesh_shape)) if mesh_shape else None
    _, model = load_hf(path, mesh=mesh, scan_layers=scan)
    out = np.asarray(forward(model, ids, mesh=mesh))
    assert_f32_close(out, ref, **llama_logits_bound(model, LENGTH), err_msg=name)


def test_packed_rows_equal_each_sequence_alone(family):
    """Two sequences in one row (segment ids, positions restarting): each one's logits are
    transformers' on it alone; the window counts back within its own sequence."""
    name, path, hf_model = family
    vocab = hf_model.config.vocab_size
    a, b = _ids(vocab, 23, batch=1, seed=1)[0], _ids(vocab, 17, batch=1, seed=2)[0]
    ids = np.concatenate([a, b])[None]
    seg = np.array([[1] * 23 + [2] * 17], np.int32)
    pos = np.array([list(range(23)) + list(range(17))], np.int32)
    _, model = load_hf(path)
    out = np.asarray(forward(model, ids, pos, seg))[0]
    bound = llama_logits_bound(model, 23)
    assert_f32_close(out[:23], hf_logits(hf_model, a[None])[0], **bound, err_msg=name)
    assert_f32_close(out[23:], hf_logits(hf_model, b[None])[0], **bound, err_msg=name)


def test_sliding_window_is_what_mistral_computes():
    """Without its window the model computes something else (beyond the float32 bound):
    the window test above is not passing by chance."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        hf_model = save_hf_model("mistral", d)
        ids = _ids(hf_model.config.vocab_size, LENGTH)
        ref = hf_logits(hf_model, ids)
        _, model = load_hf(d)
        _, unwindowed = load_hf(d, sliding_window=None)
    tol = f32_tolerance(**llama_logits_bound(model, LENGTH))
    assert np.abs(np.asarray(forward(unwindowed, ids)) - ref).max() > 2 * tol
    # The first window's tokens see the same keys either way.
    assert_f32_close(np.asarray(forward(unwindowed, ids))[:, :8], ref[:, :8],
                     **llama_logits_bound(model, 8))


def test_greedy_decoding_equals_transformers_generate(family):
    """The KV-cache sampler, left-padded prompts, 24 new tokens (Mistral: well past its
    window of 8): the same tokens as transformers' greedy generate, or, where they part,
    a true tie (the top two logits within the float32 bound)."""
    name, path, hf_model = family
    vocab = hf_model.config.vocab_size
    prompts = [_ids(vocab, 6, batch=1, seed=3)[0], _ids(vocab, 9, batch=1, seed=4)[0]]
    _, model = load_hf(path)
    width = max(len(p) for p in prompts)
    ids = np.zeros((2, width), np.int32)
    mask = np.zeros((2, width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    out = generate(model, ids, mask, max_new_tokens=24, rng=jax.random.key(0), greedy=True,
                   eos_id=-1, pad_id=0)
    tokens = np.asarray(out["tokens"])
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf_model.generate(torch.as_tensor(p[None]), max_new_tokens=24, do_sample=False,
                                    min_new_tokens=24)[0, len(p):].numpy()
        diff = np.flatnonzero(tokens[i] != ref)
        if diff.size:  # a tie: the two candidates' logits at the first difference
            k = int(diff[0])
            context = np.concatenate([p, ref[:k]])[None]
            logits = hf_logits(hf_model, context)[0, -1]
            bound = f32_tolerance(**llama_logits_bound(model, len(context[0])))
            assert abs(logits[ref[k]] - logits[tokens[i][k]]) <= 2 * bound, (name, i, k)


def test_a_lora_adapter_of_the_family_loads_in_peft(family, tmp_path):
    """Adapters on every projection (B made non-zero), exported as PEFT and loaded by peft
    onto the transformers model: the adapted logits agree."""
    import peft

    from jalign.convert.peft import save_peft
    from jalign.models.adapters import attach
    from jalign.models.lora import LoraConfig
    name, path, hf_model = family
    _, base = load_hf(path)
    adapted = attach(base, LoraConfig(rank=2, alpha=4.0), seed=1)
    rng = np.random.default_rng(5)
    for w in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
        param = getattr(adapted.layers, w + "_lora_b")
        param.set_value(jax.numpy.asarray(rng.normal(0, 0.3, param[...].shape), np.float32))
    save_peft(adapted, tmp_path / "adapter", base_name=str(path))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(path)
    fresh = save_hf_model(name, tmp_path / "base")  # the same weights (same seed)
    model = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    ids = _ids(hf_model.config.vocab_size, 24)
    with torch.no_grad():
        ref = model(input_ids=torch.as_tensor(ids)).logits.numpy()
    out = np.asarray(forward(adapted, ids))
    from jalign.models.adapters import merge
    assert_f32_close(out, ref, **llama_logits_bound(merge(adapted), 24), err_msg=name)
    assert set(params_of(adapted)["layers"]) > set(params_of(base)["layers"])


def test_a_reward_model_of_the_family_exports_as_its_classifier(family, tmp_path):
    """A scalar head on the family's backbone exports as ``<Family>ForSequenceClassification``
    (one label) and transformers scores each row as jalign does."""
    import transformers

    from jalign.convert.hf import save_hf
    from tests.hf_models import hf_classes
    name, path, hf_model = family
    config, scalar = load_hf(path, head="scalar", seed=3)
    save_hf(config, scalar, tmp_path / "rm", pad_token_id=0)
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "rm").eval()
    assert type(reloaded) is hf_classes(name)[2]
    ids = _ids(hf_model.config.vocab_size, 20)
    with torch.no_grad():
        ref = reloaded(input_ids=torch.as_tensor(ids)).logits.numpy()[:, 0]
    out = np.asarray(scalar.sequence_scores(ids, np.ones_like(ids)))
    assert_f32_close(out, ref, **llama_logits_bound(scalar, 20), err_msg=name)
