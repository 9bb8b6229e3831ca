"""Import Hugging Face Llama checkpoints into jalign and export them back.

Strict by construction: the checkpoint's names and shapes are checked against what the
config implies *before* any tensor is read, and every problem is reported by name. No
partial model is ever returned. Only safetensors are read: nothing is ever unpickled.

Loading streams: tensors are read one at a time and each device receives only its own
shard, so the host never holds the whole model. Export gathers one tensor at a time and
writes one safetensors shard at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from jalign.convert.hf_config import config_from_hf, config_to_hf, generation_config_to_hf
from jalign.convert.safetensors_io import ConversionError, SafetensorsCheckpoint, write_sharded
from jalign.models.build import abstract_model
from jalign.models.config import LlamaConfig
from jalign.models.llama import Llama, layer_shapes
from jalign.sharding import DEFAULT_RULES, Rules

# Buffers some older checkpoints saved; they are recomputed from the config, not weights.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class TensorMap:
    """One jalign parameter and the HF tensor(s) it comes from.

    ``hf_name`` contains ``{i}`` for per-layer tensors (stacked into one jalign array).
    ``to_jalign`` maps one HF tensor to the jalign layout (one layer's slice);
    ``to_hf`` is its inverse.
    """

    jalign_path: tuple[str, ...]
    hf_name: str
    hf_shape: tuple[int, ...]
    to_jalign: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_name


def _identity(x):
    return x


def tensor_maps(config: LlamaConfig, prefix: str = "model.") -> list[TensorMap]:
    """All parameters in Hugging Face file order."""
    d, f = config.hidden_size, config.intermediate_size
    h, nq, nkv = config.resolved_head_dim, config.num_heads, config.num_kv_heads
    shapes = layer_shapes(config)
    layer = prefix + "layers.{i}."

    def linear_in(name, hf, out_features):  # HF [out, in] -> jalign [in, *out_dims]
        tail = shapes[name][1:]
        return TensorMap(("layers", name), layer + hf, (out_features, d),
                         lambda w, tail=tail: w.T.reshape(d, *tail),
                         lambda w: w.reshape(d, -1).T)

    def vec(name, hf, n):
        shape = shapes[name]
        return TensorMap(("layers", name), layer + hf, (n,),
                         lambda w, shape=shape: w.reshape(shape), lambda w: w.reshape(-1))

    maps = [TensorMap(("embed",), prefix + "embed_tokens.weight", (config.vocab_size, d),
                      _identity, _identity)]
    per_layer = [
        vec("attn_norm", "input_layernorm.weight", d),
        linear_in("wq", "self_attn.q_proj.weight", nq * h),
        linear_in("wk", "self_attn.k_proj.weight", nkv * h),
        linear_in("wv", "self_attn.v_proj.weight", nkv * h),
        TensorMap(("layers", "wo"), layer + "self_attn.o_proj.weight", (d, nq * h),
                  lambda w: w.T.reshape(nq, h, d), lambda w: w.reshape(nq * h, d).T),
        vec("mlp_norm", "post_attention_layernorm.weight", d),
        linear_in("w_gate", "mlp.gate_proj.weight", f),
        linear_in("w_up", "mlp.up_proj.weight", f),
        TensorMap(("layers", "w_down"), layer + "mlp.down_proj.weight", (d, f),
                  lambda w: w.T, lambda w: w.T),
    ]
    if config.attention_bias:
        per_layer += [vec("bq", "self_attn.q_proj.bias", nq * h),
                      vec("bk", "self_attn.k_proj.bias", nkv * h),
                      vec("bv", "self_attn.v_proj.bias", nkv * h),
                      vec("bo", "self_attn.o_proj.bias", d)]
    if config.mlp_bias:
        per_layer += [vec("b_gate", "mlp.gate_proj.bias", f), vec("b_up", "mlp.up_proj.bias", f),
                      vec("b_down", "mlp.down_proj.bias", d)]
    maps += per_layer
    maps.append(TensorMap(("final_norm",), prefix + "norm.weight", (d,), _identity, _identity))
    if not config.tie_word_embeddings:
        maps.append(TensorMap(("lm_head",), "lm_head.weight", (config.vocab_size, d),
                              lambda w: w.T, lambda w: w.T))
    return maps


def _expected_names(maps: list[TensorMap], num_layers: int) -> dict[str, tuple[int, ...]]:
    out = {}
    for m in maps:
        names = [m.hf_name.format(i=i) for i in range(num_layers)] if m.stacked else [m.hf_name]
        out.update({n: m.hf_shape for n in names})
    return out


def validate(ckpt: SafetensorsCheckpoint, config: LlamaConfig) -> None:
    """Raise one ConversionError listing every missing, unexpected and misshaped tensor."""
    expected = _expected_names(tensor_maps(config), config.num_layers)
    present = {k for k in ckpt.tensors if not k.endswith(IGNORED_SUFFIXES)}
    problems = []
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    if config.tie_word_embeddings and "lm_head.weight" in unexpected:
        # Some tied checkpoints store the head anyway; accept it only if it is the embedding.
        unexpected.remove("lm_head.weight")
        if not np.array_equal(ckpt.read("lm_head.weight"), ckpt.read("model.embed_tokens.weight")):
            problems.append("tensor 'lm_head.weight' differs from 'model.embed_tokens.weight' "
                            "but config.json says tie_word_embeddings=true")
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


def _resolve_directory(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        return p
    if p.exists():
        raise ConversionError(f"{p} is a file; pass the checkpoint directory")
    text = str(path)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        # A hub repo id: fetch only configs and safetensors (never pickle files).
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors"]))
    raise ConversionError(f"{p}: no such checkpoint directory")


def read_hf_config(directory: Path, **overrides) -> LlamaConfig:
    config_path = directory / "config.json"
    if not config_path.exists():
        raise ConversionError(f"{directory}: no config.json")
    return config_from_hf(json.loads(config_path.read_text()), **overrides)


def load_hf(path, *, mesh: Mesh | None = None, dtype=None, compute_dtype=None,
            rules: Rules = DEFAULT_RULES, **config_overrides) -> tuple[LlamaConfig, Llama]:
    """Load a Hugging Face Llama checkpoint (directory or hub id) as a jalign model.

    ``dtype`` is the parameter dtype; by default the dtype the checkpoint stores (so a
    round trip is exact). ``compute_dtype`` defaults to the parameter dtype. Other
    LlamaConfig execution fields (scan_layers, remat_policy, attention_impl) may be
    overridden by keyword. With ``mesh``, parameters are sharded per ``rules`` as read.
    """
    directory = _resolve_directory(path)
    ckpt = SafetensorsCheckpoint(directory)
    param_dtype = str(jnp.dtype(dtype).name) if dtype is not None else _stored_dtype(ckpt)
    config_overrides["dtype"] = str(jnp.dtype(compute_dtype).name) if compute_dtype else param_dtype
    config = read_hf_config(directory, param_dtype=param_dtype, **config_overrides)
    validate(ckpt, config)

    graphdef, abstract = abstract_model(config, mesh, rules)
    flat = dict(nnx.to_flat_state(abstract))
    default_sharding = SingleDeviceSharding(jax.devices()[0])
    values = {}
    for m in tensor_maps(config):
        target = flat[m.jalign_path]
        shape, np_dtype = target.shape, np.dtype(target.dtype)
        sharding = target.get_value().sharding if mesh is not None else default_sharding

        def read(i, m=m):
            name = m.hf_name.format(i=i) if i is not None else m.hf_name
            return m.to_jalign(ckpt.read(name)).astype(np_dtype)

        values[m.jalign_path] = _assemble(shape, np_dtype, sharding, read,
                                          config.num_layers if m.stacked else None)
    ckpt.close()
    missing = set(flat) - set(values)
    if missing:  # a model parameter no HF tensor fills: a bug in tensor_maps, never silent
        raise ConversionError(f"internal: no HF source for {sorted(missing)}")
    state = nnx.from_flat_state([(k, flat[k].replace(values[k])) for k in flat])
    return config, nnx.merge(graphdef, state)


def _to_host(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def save_hf(config: LlamaConfig, model: Llama, path, *, dtype=None,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False) -> Path:
    """Export as a transformers ``LlamaForCausalLM`` directory (sharded safetensors,
    config.json, generation_config.json). ``dtype`` defaults to the parameter dtype.

    Files are written into a temporary sibling directory and moved into place at the end,
    so an interrupted export never leaves a half-written checkpoint at ``path``.
    """
    out = Path(path)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    np_dtype = np.dtype(jnp.dtype(dtype) if dtype is not None else config.weight_dtype)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    maps = tensor_maps(config)
    # HF file order: embeddings, then layer by layer, then final norm and head.
    whole = [m for m in maps if not m.stacked]
    layer_maps = [m for m in maps if m.stacked]
    head, tail = whole[:1], whole[1:]

    def produce(m, i):
        arr = flat[m.jalign_path].get_value()
        arr = arr[i] if i is not None else arr
        return m.to_hf(_to_host(arr)).astype(np_dtype)

    plan = [(m.hf_name, m.hf_shape, np_dtype, lambda m=m: produce(m, None)) for m in head]
    for i in range(config.num_layers):
        plan += [(m.hf_name.format(i=i), m.hf_shape, np_dtype, lambda m=m, i=i: produce(m, i))
                 for m in layer_maps]
    plan += [(m.hf_name, m.hf_shape, np_dtype, lambda m=m: produce(m, None)) for m in tail]

    if jax.process_index() != 0:  # every process joins the gathers; process 0 writes
        for *_, fn in plan:
            fn()
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_sharded(plan, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(
            json.dumps(config_to_hf(config, np_dtype.name), indent=2, sort_keys=True) + "\n")
        (tmp / "generation_config.json").write_text(
            json.dumps(generation_config_to_hf(config), indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
