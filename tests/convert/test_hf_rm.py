"""Reward/value models (ScalarHeadModel) <-> transformers' LlamaForSequenceClassification."""

import functools
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from jalign.cli import main
from jalign.convert.hf import load_hf, save_hf
from jalign.convert.safetensors_io import ConversionError, SafetensorsCheckpoint
from jalign.models.heads import ScalarHeadModel, fresh_score
from tests.hf_models import (IMPORT_MAX_DLOGIT, WarningCapture,
                             make_hf_model, save_hf_model)
from tests.numerics import assert_f32_close, llama_hidden_bound, llama_logits_bound


PAD = 0  # jalign's default classifier pad id; real tokens below never use it
LENGTHS = (24, 9, 17)  # a right-padded batch of 3 rows of different lengths

# Scores against transformers: a classifier's logits, so README's |dlogit| requirements
# apply (tests.hf_models: <= 1e-4 on import, <= 1e-5 after export and reload), each after
# the float32 bound of the score chain (llama_logits_bound, the score row as head), which
# is the looser of the two for these shapes.


def _assert_scores_match(ours, ref, model, requirement):
    assert_f32_close(ours, ref, **llama_logits_bound(model, max(LENGTHS)))
    assert np.abs(ours - ref).max() <= requirement, (ours, ref)


# ------------------------------------------------------------------ helpers


@functools.lru_cache(maxsize=None)
def _hidden_fn(graphdef):
    return jax.jit(lambda state, ids: nnx.merge(graphdef, state).backbone.backbone(ids))


@functools.lru_cache(maxsize=None)
def _scores_fn(graphdef):
    return jax.jit(lambda state, ids, seg: nnx.merge(graphdef, state).sequence_scores(ids, seg))


def _hidden(model, ids):
    graphdef, state = nnx.split(model)
    return np.asarray(_hidden_fn(graphdef)(state, ids))


def _scores(model, ids, seg):
    graphdef, state = nnx.split(model)
    return np.asarray(_scores_fn(graphdef)(state, ids, seg))


def _batch(vocab, seed=0):
    """Right-padded ids and segment ids; real tokens are drawn from 1..vocab-1 (never PAD)."""
    t = max(LENGTHS)
    ids = np.random.default_rng(seed).integers(1, vocab, (len(LENGTHS), t)).astype(np.int32)
    seg = (np.arange(t)[None, :] < np.array(LENGTHS)[:, None]).astype(np.int32)
    return np.where(seg > 0, ids, PAD).astype(np.int32), seg


def _hf_scores(hf_model, ids, seg):
    with torch.no_grad():
        out = hf_model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                       attention_mask=torch.as_tensor(seg, dtype=torch.long))
    return out.logits.float().numpy()[:, 0]


def _params(model):
    return dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def _assert_bit_identical(a, b):
    """exact by construction: a format round trip stores and reads back the same bytes"""
    fa, fb = _params(a), _params(b)
    assert set(fa) == set(fb)
    for k in fa:
        x, y = np.asarray(fa[k].get_value()), np.asarray(fb[k].get_value())
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), k


def _tensors(path):
    ckpt = SafetensorsCheckpoint(path)
    return {k: ckpt.read(k) for k in ckpt.tensors}


def _from_pretrained_quietly(path):
    """Load with transformers; fail on any missing/unexpected key or logged warning."""
    capture = WarningCapture()
    tf_logger = logging.getLogger("transformers")
    tf_logger.addHandler(capture)
    try:
        model, info = transformers.LlamaForSequenceClassification.from_pretrained(
            path, output_loading_info=True)
    finally:
        tf_logger.removeHandler(capture)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"] and not info["error_msgs"], info
    assert not capture.records, [r.getMessage() for r in capture.records]
    return model.eval()


def _make_hf_classifier(name, seed=0, pad_token_id=PAD):
    """A transformers LlamaForSequenceClassification with unit-scale random weights: the
    backbone of tests.hf_models' causal LM plus a random score row."""
    lm = make_hf_model(name, seed)
    config = transformers.LlamaConfig(**dict(lm.config.to_dict(), num_labels=1,
                                             pad_token_id=pad_token_id))
    config.architectures = ["LlamaForSequenceClassification"]
    clf = transformers.LlamaForSequenceClassification(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        clf.model.load_state_dict(lm.model.state_dict())
        clf.score.weight.copy_(torch.randn(clf.score.weight.shape, generator=gen))
    return clf


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm")
    return path, save_hf_model("llama3_1", path)


@pytest.fixture(scope="module")
def exported(lm_dir, tmp_path_factory):
    """A ScalarHeadModel started from the causal LM, with a random non-trivial score,
    exported as a sequence classifier in several shards."""
    config, model = load_hf(lm_dir[0], head="scalar")
    score = np.random.default_rng(1).normal(size=config.hidden_size).astype(np.float32)
    model.score.set_value(jnp.asarray(score))
    out = tmp_path_factory.mktemp("rm") / "export"
    save_hf(config, model, out, max_shard_bytes=30_000)
    return config, model, out


@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clf")
    clf = _make_hf_classifier("llama2")
    clf.save_pretrained(path)
    return path, clf


# ------------------------------------------------------------------ import from a causal LM


def test_causal_lm_imports_as_scalar_head(lm_dir, capsys, monkeypatch):
    path, hf_model = lm_dir
    read = []
    original_read = SafetensorsCheckpoint.read
    monkeypatch.setattr(SafetensorsCheckpoint, "read",
                        lambda self, key: read.append(key) or original_read(self, key))
    config, model = load_hf(path, head="scalar", seed=3)
    assert type(model) is ScalarHeadModel
    assert "lm_head.weight" not in read and "model.norm.weight" in read
    assert not hasattr(model.backbone, "lm_head")
    assert "LM head is dropped" in capsys.readouterr().out

    # exact by construction: the same seed draws the same score (integer RNG bits, scaled)
    assert np.array_equal(np.asarray(model.score[...]), np.asarray(fresh_score(config, 3)))
    assert not np.array_equal(np.asarray(model.score[...]), np.asarray(fresh_score(config, 4)))

    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 40)).astype(np.int32)
    with torch.no_grad():
        ref = hf_model.model(torch.as_tensor(ids, dtype=torch.long)).last_hidden_state.numpy()
    # jalign and torch, two float32 programs for the final-norm hidden states (not logits:
    # no README figure), within the float32 bound of their chain over 40 tokens.
    assert_f32_close(_hidden(model, ids), ref, **llama_hidden_bound(model, 40))


def test_scalar_import_onto_a_mesh_shards_the_score(lm_dir):
    from jalign.sharding import MeshConfig, logical_to_spec, make_mesh

    mesh = make_mesh(MeshConfig(2, 2, 2))
    config, model = load_hf(lm_dir[0], head="scalar", mesh=mesh)
    score = model.score[...]
    assert score.sharding.spec == logical_to_spec(("embed",), score.shape, mesh)
    # exact by construction: the same seed's draw, placed on a mesh
    assert np.array_equal(np.asarray(score), np.asarray(fresh_score(config, 0)))


def test_causal_lm_is_still_checked_whole_when_its_head_is_dropped(lm_dir, tmp_path):
    tensors = load_file(str(lm_dir[0] / "model.safetensors"))
    tensors.pop("lm_head.weight")
    (tmp_path / "config.json").write_text((lm_dir[0] / "config.json").read_text())
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"missing tensor 'lm_head\.weight'"):
        load_hf(tmp_path, head="scalar")


# ------------------------------------------------------------------ export


def test_export_matches_transformers_sequence_classifier(exported):
    config, model, out = exported
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForSequenceClassification"]
    assert hf_config["id2label"] == {"0": "LABEL_0"} and hf_config["pad_token_id"] == PAD
    assert not (out / "generation_config.json").exists()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    tensors = _tensors(out)
    assert "lm_head.weight" not in tensors
    assert tensors["score.weight"].shape == (1, config.hidden_size)

    hf_model = _from_pretrained_quietly(out)
    assert hf_model.config.num_labels == 1
    ids, seg = _batch(config.vocab_size)
    ours, ref = _scores(model, ids, seg), _hf_scores(hf_model, ids, seg)
    assert np.ptp(ref) > 0.1  # a real score per row, not a constant
    _assert_scores_match(ours, ref, model, IMPORT_MAX_DLOGIT)  # jalign vs transformers


def test_tied_embeddings_scalar_head_exports_and_reloads(tmp_path):
    """Llama 3.2 style (tied): the classifier has no output projection to tie, but the flag
    is kept so the config round-trips; transformers loads it without complaint."""
    save_hf_model("llama3_2", tmp_path / "hf")
    config, model = load_hf(tmp_path / "hf", head="scalar")
    save_hf(config, model, tmp_path / "out")
    hf_model = _from_pretrained_quietly(tmp_path / "out")
    ids, seg = _batch(config.vocab_size)
    _assert_scores_match(_scores(model, ids, seg), _hf_scores(hf_model, ids, seg), model,
                         IMPORT_MAX_DLOGIT)  # jalign vs transformers
    config2, model2 = load_hf(tmp_path / "out", head="scalar")
    assert config2 == config.replace(pad_token_id=PAD)
    _assert_bit_identical(model, model2)


def test_export_writes_the_configs_pad_id_or_the_override(exported, tmp_path):
    config, model, _ = exported
    save_hf(config.replace(pad_token_id=7), model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "config.json").read_text())["pad_token_id"] == 7
    save_hf(config.replace(pad_token_id=7), model, tmp_path / "b", pad_token_id=5)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["pad_token_id"] == 5


def test_reimport_is_bit_identical_and_refuses_lm_head(exported):
    config, model, out = exported
    config2, model2 = load_hf(out, head="scalar")
    assert config2 == config.replace(pad_token_id=PAD)
    _assert_bit_identical(model, model2)
    with pytest.raises(ConversionError, match=r"LlamaForSequenceClassification.*head='scalar'"):
        load_hf(out)


# ------------------------------------------------------------------ transformers' own classifier


def test_transformers_classifier_imports_and_round_trips(clf_dir, tmp_path):
    path, clf = clf_dir
    config, model = load_hf(path, head="scalar")
    assert config.pad_token_id == PAD
    ids, seg = _batch(config.vocab_size, seed=1)
    _assert_scores_match(_scores(model, ids, seg), _hf_scores(clf, ids, seg), model,
                         IMPORT_MAX_DLOGIT)

    save_hf(config, model, tmp_path / "out")
    src, out = _tensors(path), _tensors(tmp_path / "out")
    assert set(src) == set(out)
    for k in src:  # exact by construction: a format round trip of the same bytes
        assert np.array_equal(src[k].view(np.uint8), out[k].view(np.uint8)), k


def _edited_copy(src, dst, edit_tensors=None, edit_config=None):
    dst.mkdir()
    tensors = load_file(str(src / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    save_file(tensors, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _two_labels(c):
    c["id2label"] = {"0": "LABEL_0", "1": "LABEL_1"}
    c["label2id"] = {"LABEL_0": 0, "LABEL_1": 1}


def _no_labels(c):  # transformers then defaults to num_labels=2
    c.pop("id2label", None)
    c.pop("label2id", None)
    c.pop("num_labels", None)


def _wide_score(t):
    t["score.weight"] = np.zeros((2, t["score.weight"].shape[1]), np.float32)


def _extra_lm_head(t):
    t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()


@pytest.mark.parametrize("edit_tensors,edit_config,message", [
    (lambda t: t.pop("score.weight"), None, r"missing tensor 'score\.weight' \(expected shape \[1, 64\]\)"),
    (_wide_score, _two_labels, r"num_labels=2 \(score\.weight \[2, hidden\]\)"),
    (None, _no_labels, r"num_labels=2"),
    (_wide_score, None, r"misshaped tensor 'score\.weight': shape \[2, 64\], expected \[1, 64\]"),
    (_extra_lm_head, None, r"unexpected tensor 'lm_head\.weight'"),
], ids=["missing-score", "two-labels", "default-labels", "misshaped-score", "stray-lm-head"])
def test_malformed_classifier_is_refused_by_name(clf_dir, tmp_path, edit_tensors, edit_config,
                                                 message):
    path = _edited_copy(clf_dir[0], tmp_path / "bad", edit_tensors, edit_config)
    with pytest.raises(ConversionError, match=message):
        load_hf(path, head="scalar")


# ------------------------------------------------------------------ command line


def test_cli_round_trip_of_a_scalar_head(clf_dir, tmp_path, capsys):
    from jalign import checkpoint

    path, _ = clf_dir
    assert main(["convert", "hf-to-jalign", str(path), str(tmp_path / "j"), "--head", "scalar"]) == 0
    assert [r.head for r in checkpoint.read_roles(tmp_path / "j").roles] == ["scalar"]
    assert main(["convert", "jalign-to-hf", str(tmp_path / "j"), str(tmp_path / "out")]) == 0
    src, out = _tensors(path), _tensors(tmp_path / "out")
    assert set(src) == set(out)
    for k in src:  # exact by construction: a format round trip of the same bytes
        assert np.array_equal(src[k].view(np.uint8), out[k].view(np.uint8)), k
    assert json.loads((tmp_path / "out" / "config.json").read_text())["pad_token_id"] == PAD
    capsys.readouterr()
    assert main(["convert", "hf-to-jalign", str(path), str(tmp_path / "k")]) == 2
    assert "head='scalar'" in capsys.readouterr().err
