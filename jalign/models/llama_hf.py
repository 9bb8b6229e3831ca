"""The decoder's parameters under their Hugging Face names: the tensor map of the Llama,
Qwen2, Qwen3 and Mistral families (``jalign.models.families``), which name their tensors
alike (Qwen2's q/k/v biases and Qwen3's q/k norms where the config has them).

Each ``TensorMap`` pairs one jalign parameter path with the HF tensor(s) it comes from and
the reshapes between the two layouts (transformers' weights are [out, in]; jalign's are
[in, *out dims], stacked over layers). ``jalign.convert.hf`` reads and writes checkpoints
through this table and checks a file's names and shapes against it before reading.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from jalign.models.config import LlamaConfig
from jalign.models.llama import layer_shapes


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


def tensor_maps(config: LlamaConfig, prefix: str = "model.", *,
                lm_head: bool = True) -> list[TensorMap]:
    """All ``Llama`` parameters in Hugging Face file order (without the untied output
    projection when ``lm_head`` is false)."""
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
    if config.attention_bias or config.qkv_bias:
        per_layer += [vec("bq", "self_attn.q_proj.bias", nq * h),
                      vec("bk", "self_attn.k_proj.bias", nkv * h),
                      vec("bv", "self_attn.v_proj.bias", nkv * h)]
    if config.attention_bias:
        per_layer.append(vec("bo", "self_attn.o_proj.bias", d))
    if config.qk_norm:
        per_layer += [vec("q_norm", "self_attn.q_norm.weight", h),
                      vec("k_norm", "self_attn.k_norm.weight", h)]
    if config.mlp_bias:
        per_layer += [vec("b_gate", "mlp.gate_proj.bias", f), vec("b_up", "mlp.up_proj.bias", f),
                      vec("b_down", "mlp.down_proj.bias", d)]
    maps += per_layer
    maps.append(TensorMap(("final_norm",), prefix + "norm.weight", (d,), _identity, _identity))
    if lm_head and not config.tie_word_embeddings:
        maps.append(TensorMap(("lm_head",), "lm_head.weight", (config.vocab_size, d),
                              lambda w: w.T, lambda w: w.T))
    return maps
