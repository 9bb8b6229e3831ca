"""LlamaConfig: the architecture hyper-parameters, and presets for the real model sizes.

The config is frozen and hashable (it is a static argument of jitted functions), holds
dtypes as strings (so it serialises to JSON next to every checkpoint) and checks itself
on construction so a bad value fails here, not deep inside XLA.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp

from jalign.models.lora import LoraConfig

ROPE_TYPES = ("default", "linear", "llama3")
ATTENTION_IMPLS = ("xla", "cudnn", "splash", "blockwise", "auto")  # jalign.models.attention.IMPLS
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (HF ``rope_parameters`` minus ``rope_theta``).

    ``linear`` divides every frequency by ``factor``. ``llama3`` (Llama 3.1+) divides
    only the low frequencies (wavelength above ``original_max_position_embeddings /
    low_freq_factor``), keeps the high ones and interpolates smoothly in between.
    """

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ("linear", "llama3"):
            raise ValueError(f"unsupported rope_type {self.rope_type!r}; supported: {ROPE_TYPES}")
        if self.factor <= 0:
            raise ValueError(f"rope factor must be positive, got {self.factor}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError("llama3 rope scaling needs high_freq_factor > low_freq_factor, got "
                             f"{self.high_freq_factor} <= {self.low_freq_factor}")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None  # None: hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q, k, v and o (some Llama derivatives)
    mlp_bias: bool = False
    qkv_bias: bool = False        # biases on q, k and v only (Qwen2)
    qk_norm: bool = False         # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    sliding_window: int | None = None  # a key more than this many tokens back is not seen (Mistral)
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str = "auto"  # splash on TPU, cudnn on GPU, blockwise on CPU
    # Adapters on a frozen (optionally quantised) base; None: a plain model. Set by the
    # run from its LoraConfig, never read from Hugging Face.
    lora: LoraConfig | None = None
    # The model family (jalign.models.families): which Hugging Face architecture this
    # decoder is read from and written as; its options above say what differs.
    family: str = "llama"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"LlamaConfig: num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"LlamaConfig: hidden_size={self.hidden_size} is not divisible by "
                             f"num_heads={self.num_heads}; set head_dim explicitly")
        if self.resolved_head_dim % 2:
            raise ValueError(f"LlamaConfig: head_dim={self.resolved_head_dim} must be even for RoPE")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"LlamaConfig.{name}={getattr(self, name)!r}; one of {DTYPES}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"LlamaConfig.sliding_window must be >= 1 or None, got "
                             f"{self.sliding_window}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"LlamaConfig.remat_policy={self.remat_policy!r}; one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"LlamaConfig.attention_impl={self.attention_impl!r}; one of {ATTENTION_IMPLS}")
        if isinstance(self.eos_token_id, list):  # keep the dataclass hashable
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if isinstance(self.lora, dict):
            object.__setattr__(self, "lora", LoraConfig(**self.lora))
        if self.lora is not None and not self.lora.enabled and self.lora.quantize is None:
            object.__setattr__(self, "lora", None)  # rank 0 on a plain base: no adapters

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        d, f, l = self.hidden_size, self.intermediate_size, self.num_layers
        h, nq, nkv = self.resolved_head_dim, self.num_heads, self.num_kv_heads
        attn = d * h * (nq + 2 * nkv) + nq * h * d
        if self.attention_bias:
            attn += h * (nq + 2 * nkv) + d
        elif self.qkv_bias:
            attn += h * (nq + 2 * nkv)
        if self.qk_norm:
            attn += 2 * h
        mlp = 3 * d * f + (2 * f + d if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + l * per_layer + d + head

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["lora"] = None if self.lora is None else self.lora.to_dict()
        if out["lora"] is None:  # checkpoints written before adapters existed lack the key
            del out["lora"]
        if isinstance(out["eos_token_id"], tuple):
            out["eos_token_id"] = list(out["eos_token_id"])
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"LlamaConfig: unknown fields {unknown}")
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        if d.get("lora") is not None:
            d["lora"] = LoraConfig(**d["lora"])
        return cls(**d)


_LLAMA3_SCALING = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
_LLAMA3_2_SCALING = RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
_LLAMA2 = dict(vocab_size=32000, rope_theta=10000.0, rms_norm_eps=1e-5,
               max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
_LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
               max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001)
_LLAMA3_1 = dict(_LLAMA3, rope_scaling=_LLAMA3_SCALING, max_position_embeddings=131072,
                 eos_token_id=(128001, 128008, 128009))

_QWEN = dict(rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768,
             bos_token_id=151643, eos_token_id=151645)
_MISTRAL = dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                num_kv_heads=8, rms_norm_eps=1e-5, max_position_embeddings=32768,
                bos_token_id=1, eos_token_id=2, family="mistral")

PRESETS: dict[str, LlamaConfig] = {
    "llama2_7b": LlamaConfig(**_LLAMA2, hidden_size=4096, intermediate_size=11008,
                             num_layers=32, num_heads=32, num_kv_heads=32),
    "llama2_13b": LlamaConfig(**_LLAMA2, hidden_size=5120, intermediate_size=13824,
                              num_layers=40, num_heads=40, num_kv_heads=40),
    "llama2_70b": LlamaConfig(**_LLAMA2, hidden_size=8192, intermediate_size=28672,
                              num_layers=80, num_heads=64, num_kv_heads=8),
    "llama3_8b": LlamaConfig(**_LLAMA3, hidden_size=4096, intermediate_size=14336,
                             num_layers=32, num_heads=32, num_kv_heads=8),
    "llama3_70b": LlamaConfig(**_LLAMA3, hidden_size=8192, intermediate_size=28672,
                              num_layers=80, num_heads=64, num_kv_heads=8),
    "llama3_1_8b": LlamaConfig(**_LLAMA3_1, hidden_size=4096, intermediate_size=14336,
                               num_layers=32, num_heads=32, num_kv_heads=8),
    "llama3_1_70b": LlamaConfig(**_LLAMA3_1, hidden_size=8192, intermediate_size=28672,
                                num_layers=80, num_heads=64, num_kv_heads=8),
    "llama3_1_405b": LlamaConfig(**_LLAMA3_1, hidden_size=16384, intermediate_size=53248,
                                 num_layers=126, num_heads=128, num_kv_heads=8),
    "llama3_2_1b": LlamaConfig(**dict(_LLAMA3_1, rope_scaling=_LLAMA3_2_SCALING),
                               hidden_size=2048, intermediate_size=8192, num_layers=16,
                               num_heads=32, num_kv_heads=8, head_dim=64,
                               tie_word_embeddings=True),
    "llama3_2_3b": LlamaConfig(**dict(_LLAMA3_1, rope_scaling=_LLAMA3_2_SCALING),
                               hidden_size=3072, intermediate_size=8192, num_layers=28,
                               num_heads=24, num_kv_heads=8, head_dim=128,
                               tie_word_embeddings=True),
    # SmolLM2 (a Llama): 135M, tied, chatml's ids.
    "smollm2_135m": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                                rope_theta=100000.0, max_position_embeddings=8192,
                                tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                                pad_token_id=2),
    # Qwen2.5: q/k/v biases, rope theta 1e6 (Instruct's end-of-turn id as EOS).
    "qwen2_5_0_5b": LlamaConfig(**_QWEN, vocab_size=151936, hidden_size=896,
                                intermediate_size=4864, num_layers=24, num_heads=14,
                                num_kv_heads=2, tie_word_embeddings=True,
                                family="qwen2", qkv_bias=True),
    "qwen2_5_7b": LlamaConfig(**_QWEN, vocab_size=152064, hidden_size=3584,
                              intermediate_size=18944, num_layers=28, num_heads=28,
                              num_kv_heads=4, family="qwen2", qkv_bias=True),
    # Qwen3 (dense): q/k norms, head_dim 128.
    "qwen3_0_6b": LlamaConfig(**dict(_QWEN, max_position_embeddings=40960), vocab_size=151936,
                              hidden_size=1024, intermediate_size=3072, num_layers=28,
                              num_heads=16, num_kv_heads=8, head_dim=128,
                              tie_word_embeddings=True, family="qwen3", qk_norm=True),
    "qwen3_8b": LlamaConfig(**dict(_QWEN, max_position_embeddings=40960), vocab_size=151936,
                            hidden_size=4096, intermediate_size=12288, num_layers=36,
                            num_heads=32, num_kv_heads=8, head_dim=128, family="qwen3",
                            qk_norm=True),
    # Mistral 7B v0.1 (a 4096-token sliding window) and v0.3 (none; 32768 tokens).
    "mistral_7b": LlamaConfig(**_MISTRAL, vocab_size=32000, rope_theta=10000.0,
                              sliding_window=4096),
    "mistral_7b_v0_3": LlamaConfig(**_MISTRAL, vocab_size=32768, rope_theta=1000000.0),
    # Tiny sizes for tests and the bundled demo (vocab matches the committed tokenizer
    # once it exists; tests override it freely).
    "tiny": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=2, max_position_embeddings=256,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "small": LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=704,
                         num_layers=4, num_heads=8, num_kv_heads=4,
                         max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0),
}


def preset(name: str, **overrides: Any) -> LlamaConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
