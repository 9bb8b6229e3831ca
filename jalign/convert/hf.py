"""Import Hugging Face Llama checkpoints into jalign and export them back.

Strict by construction: the checkpoint's names and shapes are checked against what the
config implies *before* any tensor is read, and every problem is reported by name. No
partial model is ever returned. Only safetensors are read: nothing is ever unpickled.

Loading streams: tensors are read one at a time and each device receives only its own
shard, so the host never holds the whole model. Export gathers one tensor at a time and
writes one safetensors shard at a time.

Two heads convert: a causal LM (``lm``: ``Llama`` <-> ``LlamaForCausalLM``) and a scalar
head (``scalar``: ``ScalarHeadModel``, reward/value models <->
``LlamaForSequenceClassification`` with one label). The tensor names come from the
model family's tensor map (``jalign.models.families``). A causal-LM checkpoint can also start a scalar head: its backbone is read, its
LM head is not, and the score is freshly initialised.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from jalign.convert.hf_config import (checkpoint_head, config_from_hf, config_to_hf,
                                      generation_config_to_hf)
from jalign.convert.safetensors_io import (ConversionError, SafetensorsCheckpoint,
                                          atomic_directory, write_sharded)
from jalign.errors import first_line
from jalign.models.build import abstract_model
from jalign.models.config import LlamaConfig
from jalign.models.families import family_of
from jalign.models.heads import BACKBONE, HEADS, LM, SCALAR, fresh_score, head_of
from jalign.models.llama_hf import TensorMap
from jalign.sharding import DEFAULT_RULES, Rules

# Buffers some older checkpoints saved; they are recomputed from the config, not weights.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
# pad_token_id written for a scalar head whose config has none: jalign's data pipeline pads
# with the tokenizer's pad id, or 0 when it has none (ChatTokenizer.pad_id).
DEFAULT_CLASSIFIER_PAD_ID = 0


def _under(maps: list[TensorMap], *path: str) -> list[TensorMap]:
    return [dataclasses.replace(m, jalign_path=(*path, *m.jalign_path)) for m in maps]


def tensor_maps(config, prefix: str = "model.", *, lm_head: bool = True) -> list[TensorMap]:
    """The causal LM's tensors in HF file order (the config's family's tensor map)."""
    return family_of(config).tensor_maps(config, prefix, lm_head=lm_head)


def backbone_maps(config: LlamaConfig) -> list[TensorMap]:
    """A ScalarHeadModel's backbone: HF ``model.*`` -> jalign ``backbone.*``."""
    return _under(tensor_maps(config, lm_head=False), BACKBONE)


def score_map(config: LlamaConfig) -> TensorMap:
    d = config.hidden_size
    return TensorMap(("score",), "score.weight", (1, d),
                     lambda w: w.reshape(d), lambda w: w.reshape(1, d))


def file_maps(config: LlamaConfig, head: str) -> list[TensorMap]:
    """Every tensor a HF checkpoint of a model with ``head`` holds, in file order, with
    jalign paths into the jalign model with that head."""
    if head == LM:
        return tensor_maps(config)
    if head == SCALAR:
        return backbone_maps(config) + [score_map(config)]
    raise ValueError(f"unknown head {head!r}")


def _expected_names(maps: list[TensorMap], num_layers: int) -> dict[str, tuple[int, ...]]:
    out = {}
    for m in maps:
        names = [m.hf_name.format(i=i) for i in range(num_layers)] if m.stacked else [m.hf_name]
        out.update({n: m.hf_shape for n in names})
    return out


def validate(ckpt: SafetensorsCheckpoint, config: LlamaConfig, head: str = LM, *,
             uses_lm_head: bool = True) -> None:
    """Raise one ConversionError listing every missing, unexpected and misshaped tensor.

    ``head`` is the checkpoint's own head: the whole file is checked, including tensors the
    caller will not read (a causal LM's head when importing it as a scalar head, where
    ``uses_lm_head`` is false).
    """
    expected = _expected_names(file_maps(config, head), config.num_layers)
    present = {k for k in ckpt.tensors if not k.endswith(IGNORED_SUFFIXES)}
    problems = []
    if head == LM and config.tie_word_embeddings and "lm_head.weight" in present:
        # Some tied checkpoints store the head anyway; accept it only if it is the embedding
        # (compared only when the head will be used: a dropped head is never read).
        expected["lm_head.weight"] = (config.vocab_size, config.hidden_size)
        if uses_lm_head and not np.array_equal(ckpt.read("lm_head.weight"),
                                               ckpt.read("model.embed_tokens.weight")):
            problems.append("tensor 'lm_head.weight' differs from 'model.embed_tokens.weight' "
                            "but config.json says tie_word_embeddings=true")
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    for name in missing:
        problems.append(f"missing tensor {name!r} (expected shape {list(expected[name])})")
    for name in unexpected:
        problems.append(f"unexpected tensor {name!r} (shape {list(ckpt.tensors[name].shape)}) "
                        "that this config has no place for")
    for name in sorted(present & set(expected)):
        if ckpt.tensors[name].shape != expected[name]:
            problems.append(f"misshaped tensor {name!r}: shape {list(ckpt.tensors[name].shape)}, "
                            f"expected {list(expected[name])}")
        if ckpt.tensors[name].dtype not in _SAFETENSORS_FLOATS:
            problems.append(f"tensor {name!r} has non-float dtype {ckpt.tensors[name].dtype}")
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ConversionError(f"{ckpt.directory}: checkpoint does not match config.json:\n  "
                              + "\n  ".join(shown))


_SAFETENSORS_FLOATS = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def _stored_dtype(ckpt: SafetensorsCheckpoint) -> str:
    kinds = {_SAFETENSORS_FLOATS.get(t.dtype) for t in ckpt.tensors.values()}
    kinds.discard(None)
    return kinds.pop() if len(kinds) == 1 and "float64" not in kinds else "float32"


def _assemble(shape, dtype, sharding, read_layer, num_layers: int | None) -> jax.Array:
    """Build a global array shard by shard from per-layer (or whole) host tensors.

    Each distinct device shard gets its own host buffer, filled layer by layer, so host
    memory holds this process's shards of one parameter plus one layer of it.
    """
    index_map = sharding.addressable_devices_indices_map(shape)
    buffers: dict[tuple, np.ndarray] = {}
    devices_of: dict[tuple, list] = {}
    for device, index in index_map.items():
        key = tuple((s.start or 0, shape[k] if s.stop is None else s.stop)
                    for k, s in enumerate(index))
        if key not in buffers:
            buffers[key] = np.empty([b - a for a, b in key], dtype)
            devices_of[key] = []
        devices_of[key].append(device)
    if num_layers is None:
        whole = read_layer(None)
        for key, buf in buffers.items():
            buf[...] = whole[tuple(slice(a, b) for a, b in key)]
    else:
        for i in range(num_layers):
            layer = None
            for key, buf in buffers.items():
                (l0, l1), rest = key[0], key[1:]
                if l0 <= i < l1:
                    layer = read_layer(i) if layer is None else layer
                    buf[i - l0] = layer[tuple(slice(a, b) for a, b in rest)]
    arrays = [jax.device_put(buf, d) for key, buf in buffers.items() for d in devices_of[key]]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def resolve_directory(path: str | os.PathLike, *, config_only: bool = False) -> Path:
    """A local checkpoint directory, or a hub repo id downloaded into the HF cache
    (``config_only``: just its JSON files, for checks before the weights are needed)."""
    p = Path(path)
    if p.is_dir():
        return p
    if p.exists():
        raise ConversionError(f"{p} is a file; pass the checkpoint directory")
    text = str(path)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        # A hub repo id: fetch only configs and safetensors (never pickle files).
        from huggingface_hub import snapshot_download
        try:
            patterns = ["*.json"] + ([] if config_only else ["*.safetensors"])
            return Path(snapshot_download(text, allow_patterns=patterns))
        except Exception as e:  # offline, unknown or gated repo: hub-specific error classes
            first = first_line(e, 200)
            raise ConversionError(f"{text}: not a local directory, and downloading it from the "
                                  f"Hugging Face hub failed ({type(e).__name__}: {first})") from None
    raise ConversionError(f"{p}: no such checkpoint directory")


def _read_config_json(directory: Path) -> dict:
    config_path = directory / "config.json"
    if not config_path.exists():
        raise ConversionError(f"{directory}: no config.json")
    return json.loads(config_path.read_text())


def read_hf_config(directory: Path, **overrides) -> LlamaConfig:
    return config_from_hf(_read_config_json(directory), **overrides)


def _check_head(head: str, file_head: str, directory: Path) -> str:
    """``head`` when a model with it can be built from a checkpoint with ``file_head``."""
    if file_head == SCALAR and head == LM:
        raise ConversionError(
            f"{directory}: a LlamaForSequenceClassification (reward/value model) checkpoint "
            "has no LM head ('lm_head.weight'), so it cannot load as a causal LM; "
            "load it with head='scalar' (CLI: --head scalar)")
    return head


def load_hf(path, *, head: str = "lm", seed: int = 0, mesh: Mesh | None = None, dtype=None,
            compute_dtype=None, rules: Rules = DEFAULT_RULES, allow_nonfinite: bool = False,
            quantize: tuple[str, int] | None = None, **config_overrides):
    """Load a Hugging Face Llama checkpoint (directory or hub id) as a jalign model.

    Returns ``(config, model)``. ``head="lm"`` builds a ``Llama`` from a
    ``LlamaForCausalLM`` checkpoint. ``head="scalar"`` builds a ``ScalarHeadModel``: from a
    ``LlamaForSequenceClassification`` checkpoint (one label) its ``score.weight`` is read;
    from a causal LM the LM head is dropped unread and the score is
    ``fresh_score(config, seed)`` (a reward model started from a policy).

    ``dtype`` is the parameter dtype; by default the dtype the checkpoint stores (so a
    round trip is exact). ``compute_dtype`` defaults to the parameter dtype. Other
    LlamaConfig execution fields (scan_layers, remat_policy, attention_impl) may be
    overridden by keyword. With ``mesh``, parameters are sharded per ``rules`` as read.
    A truncated file or a tensor holding NaN/Inf is a ConversionError naming the file and
    the tensor (``allow_nonfinite=True`` imports non-finite values anyway).

    ``quantize=(kind, block_size)`` (``'int8'``/``'nf4'``) stores every layer projection as
    codes as soon as it is read (a QLoRA base: the model never exists in its parameter
    dtype as a whole); the config then carries ``LoraConfig(rank=0, quantize=kind)``.
    """
    if head not in HEADS:
        raise ValueError(f"load_hf: head={head!r}; one of {sorted(HEADS)}")
    directory = resolve_directory(path)
    ckpt = SafetensorsCheckpoint(directory, allow_nonfinite=allow_nonfinite)
    file_head = checkpoint_head(_read_config_json(directory))
    head = _check_head(head, file_head, directory)
    param_dtype = str(jnp.dtype(dtype).name) if dtype is not None else _stored_dtype(ckpt)
    config_overrides["dtype"] = str(jnp.dtype(compute_dtype).name) if compute_dtype else param_dtype
    config = read_hf_config(directory, param_dtype=param_dtype, **config_overrides)
    validate(ckpt, config, file_head, uses_lm_head=head == LM)
    return build_model(ckpt, config, file_head, head, seed=seed, mesh=mesh, rules=rules,
                       quantize=quantize)


def build_model(reader, config, file_head: str, head: str, *, seed: int = 0, mesh=None,
                rules: Rules = DEFAULT_RULES, quantize: tuple[str, int] | None = None):
    """``(config, model)`` from ``reader.read(hf_name) -> numpy`` (a checkpoint's tensors
    under their Hugging Face names and layout, already validated against ``config``),
    placed shard by shard; ``reader`` is closed at the end. A scalar head from a causal-LM
    file (``file_head`` lm) reads the backbone and starts a fresh score (``seed``)."""
    directory = reader.directory
    graphdef, abstract = abstract_model(config, mesh, rules, head=head)
    flat = dict(nnx.to_flat_state(abstract))
    default_sharding = SingleDeviceSharding(jax.devices()[0])
    quantized = None
    if quantize is not None:
        from jalign.models.lora import LoraConfig
        quantized = config.replace(lora=LoraConfig(rank=0, quantize=quantize[0],
                                                   block_size=quantize[1]))
        graphdef, q_abstract = abstract_model(quantized, mesh, rules, head=head)
        q_flat = dict(nnx.to_flat_state(q_abstract))

    def place(jalign_path, read, stacked):
        target = flat[jalign_path]
        np_dtype = np.dtype(target.dtype)
        sharding = target.get_value().sharding if mesh is not None else default_sharding
        return _assemble(target.shape, np_dtype, sharding, lambda i: read(i).astype(np_dtype),
                         config.num_layers if stacked else None)

    # A scalar head from a causal LM reads only the backbone; everything else maps 1:1.
    maps = backbone_maps(config) if head != file_head else file_maps(config, head)
    values = {}
    try:
        for m in maps:
            def read(i, m=m):
                return m.to_jalign(reader.read(m.hf_name.format(i=i) if i is not None else m.hf_name))

            values[m.jalign_path] = place(m.jalign_path, read, m.stacked)
            path = m.jalign_path
            if quantized is not None and path[:-1] + (path[-1] + "_scale",) in q_flat:
                values.update(_quantize_placed(m.jalign_path, values.pop(m.jalign_path),
                                               q_flat, quantize, mesh is not None))
    finally:
        reader.close()
    if head != file_head:
        print(f"{directory} is a causal LM; its LM head is dropped and the score "
              f"head is freshly initialised (seed={seed})", flush=True)
        score = np.asarray(fresh_score(config, seed))
        values[("score",)] = place(("score",), lambda _: score, False)
    if quantized is not None:
        config, flat = quantized, q_flat
    missing = set(flat) - set(values)
    if missing:  # a model parameter no HF tensor fills: a bug in tensor_maps, never silent
        raise ConversionError(f"internal: no HF source for {sorted(missing)}")
    state = nnx.from_flat_state([(k, flat[k].replace(values[k])) for k in flat])
    return config, nnx.merge(graphdef, state)


def _quantize_placed(path: tuple, weight: jax.Array, q_flat: dict, quantize: tuple[str, int],
                     sharded: bool) -> dict:
    """{path: codes, path_scale: scale} of a placed stacked projection weight (which is
    then dropped), laid out as the quantised model's parameters."""
    from jalign.models.lora import SCALE_SUFFIX, quantize_weight
    scale_path = path[:-1] + (path[-1] + SCALE_SUFFIX,)
    out_sh = None
    if sharded:
        out_sh = (q_flat[path].get_value().sharding, q_flat[scale_path].get_value().sharding)
    fn = jax.jit(quantize_weight, static_argnums=(1, 2, 3), out_shardings=out_sh)
    codes, scale = fn(weight, path[-1], quantize[0], quantize[1])
    del weight
    return {path: codes, scale_path: scale}


def _to_host(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _export_config(config: LlamaConfig, head: str, pad_token_id: int | None) -> LlamaConfig:
    """The config to describe in config.json: ``pad_token_id`` overrides the model's; a
    scalar head always gets one, because transformers reads a sequence's score at the
    rightmost token that is not ``pad_token_id`` and refuses batches > 1 without one."""
    if pad_token_id is not None:
        return config.replace(pad_token_id=pad_token_id)
    if head == SCALAR and config.pad_token_id is None:
        print(f"save_hf: the config has no pad_token_id; writing pad_token_id="
              f"{DEFAULT_CLASSIFIER_PAD_ID} (jalign's padding default). transformers scores "
              "each row at its rightmost non-pad token: pass pad_token_id= to match your "
              "tokenizer", flush=True)
        return config.replace(pad_token_id=DEFAULT_CLASSIFIER_PAD_ID)
    return config


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_hf(config: LlamaConfig, model, path, *, dtype=None,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
            pad_token_id: int | None = None, tokenizer=None,
            chat_template: str | None = None) -> Path:
    """Export as a transformers checkpoint directory (sharded safetensors, config.json and,
    with ``tokenizer``, its files and ``chat_template``: a self-contained directory
    ``AutoTokenizer``/``AutoModelForCausalLM`` load).

    A ``Llama`` becomes a ``LlamaForCausalLM`` (plus generation_config.json); a
    ``ScalarHeadModel`` becomes a ``LlamaForSequenceClassification`` with one label
    (``model.*`` + ``score.weight`` [1, hidden], no LM head). ``dtype`` defaults to the
    parameter dtype. ``pad_token_id`` overrides the config's in config.json (see
    ``_export_config`` for why a scalar head always needs one).

    Files are written into a temporary sibling directory and moved into place at the end,
    so an interrupted export never leaves a half-written checkpoint at ``path``.
    """
    out = Path(path)
    if out.exists() and any(out.iterdir()) and not overwrite:  # before any work is done
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    head = head_of(model)
    np_dtype = np.dtype(jnp.dtype(dtype) if dtype is not None else config.weight_dtype)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    maps = file_maps(config, head)
    described = _export_config(config, head, pad_token_id)
    # HF file order: embeddings, then layer by layer, then final norm and head (or score).
    whole = [m for m in maps if not m.stacked]
    layer_maps = [m for m in maps if m.stacked]
    first, last = whole[:1], whole[1:]

    def produce(m, i):
        arr = flat[m.jalign_path].get_value()
        arr = arr[i] if i is not None else arr
        return m.to_hf(_to_host(arr)).astype(np_dtype)

    plan = [(m.hf_name, m.hf_shape, np_dtype, lambda m=m: produce(m, None)) for m in first]
    for i in range(config.num_layers):
        plan += [(m.hf_name.format(i=i), m.hf_shape, np_dtype, lambda m=m, i=i: produce(m, i))
                 for m in layer_maps]
    plan += [(m.hf_name, m.hf_shape, np_dtype, lambda m=m: produce(m, None)) for m in last]

    if jax.process_index() != 0:  # every process joins the gathers; process 0 writes
        for *_, fn in plan:
            fn()
        return out
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_sharded(plan, tmp, max_shard_bytes)
        _write_json(tmp / "config.json", config_to_hf(described, np_dtype.name, head))
        if head == LM:  # a classifier does not generate
            _write_json(tmp / "generation_config.json",
                        generation_config_to_hf(described, tokenizer))
        if tokenizer is not None:
            from jalign.data.tokenizer_files import write_tokenizer
            write_tokenizer(tokenizer, tmp, chat_template)
    return out
