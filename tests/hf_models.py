"""Tiny Hugging Face checkpoints of every family (Llama, Qwen2, Qwen3, Mistral) for tests,
built locally with transformers + torch.

Weights are re-drawn at unit scale (matrices ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norm
weights ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2)): HF's default std of 0.02 leaves attention
almost uniform, which would hide RoPE and masking bugs.
"""

from __future__ import annotations

import logging

import numpy as np

try:
    import torch
    import transformers
except ImportError as e:  # fail loudly: these tests must not silently pass without torch
    raise ImportError("the HF parity tests need torch and transformers: "
                      "pip install -e '.[test]'") from e

# README's product requirement for the HF parity tests: max |dlogit| between jalign and
# transformers <= 1e-4 (import, and exported reward models read back by transformers), and
# <= 1e-5 between a transformers model and its jalign export reloaded (the same weights bit
# for bit, so the same torch program). 1e-4 is tighter than the worst-case float32 bound of
# the tiny models' forwards (1e-3 to 2e-2, see tests.numerics.llama_logits_bound): it holds
# by how rounding errors actually add up (measured <= 1.3e-5, a margin of 8x or more),
# not by construction, so the tests assert that bound first (a failure there is a bug),
# then the requirement. (Exported reward-model scores were held to 1e-5 once: measured
# 2.9e-6 on an AVX-512 machine, a margin too thin for another CPU.)
IMPORT_MAX_DLOGIT = 1e-4
EXPORT_MAX_DLOGIT = 1e-5

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}

# name -> transformers config kwargs (the family's config class: FAMILY, default Llama)
CONFIGS = {
    # Llama 2 style: multi-head attention, untied head, default rope.
    "llama2": dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                   rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                   tie_word_embeddings=False),
    # Llama 3.1 style: GQA 4:1, llama3 rope scaling; tests run sequences longer than
    # original_max_position_embeddings (32). head_dim 16 puts frequencies in all three
    # llama3 bands (kept, interpolated, divided).
    "llama3_1": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                     max_position_embeddings=256, rms_norm_eps=1e-5, rope_parameters=LLAMA3_ROPE,
                     tie_word_embeddings=False),
    # Llama 3.2 style: tied embeddings, GQA 2:1, explicit head_dim != hidden/heads.
    "llama3_2": dict(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                     max_position_embeddings=256, rms_norm_eps=1e-5,
                     rope_parameters=dict(LLAMA3_ROPE, factor=32.0), tie_word_embeddings=True),
    # Biases on attention and MLP (some Llama derivatives), linear rope scaling.
    "biased": dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                   attention_bias=True, mlp_bias=True,
                   rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    # Qwen2.5 style: q/k/v biases, large rope theta, GQA 3:1, tied embeddings.
    "qwen2": dict(vocab_size=112, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                  tie_word_embeddings=True),
    # Qwen3 style: per-head q/k RMSNorm, explicit head_dim != hidden/heads, untied.
    "qwen3": dict(vocab_size=112, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=256, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                  tie_word_embeddings=False),
    # Mistral style: a sliding window (8) shorter than the tests' sequences, GQA 2:1.
    "mistral": dict(vocab_size=112, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    rms_norm_eps=1e-5, sliding_window=8,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                    tie_word_embeddings=False),
}
# name -> (transformers config class, causal LM class, classifier class) when not Llama
FAMILY = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
          "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "Qwen3ForSequenceClassification"),
          "mistral": ("MistralConfig", "MistralForCausalLM", "MistralForSequenceClassification")}
LLAMA = ("LlamaConfig", "LlamaForCausalLM", "LlamaForSequenceClassification")


def hf_classes(name: str):
    """(config class, causal LM class, sequence classifier class) of a CONFIGS entry."""
    return tuple(getattr(transformers, c) for c in FAMILY.get(name, LLAMA))


def make_hf_model(name: str, seed: int = 0, **overrides):
    kwargs = dict(CONFIGS[name], **overrides)
    config_cls, lm_cls, _ = hf_classes(name)
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = lm_cls(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif pname.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in pname:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
    return model


def save_hf_model(name: str, path, seed: int = 0, dtype=None, tokenizer: bool = False,
                  **overrides):
    """Save a CONFIGS model; with ``tokenizer`` the bundled tokenizer's files go with it
    (as a real checkpoint's do: a run from it then uses them as the model's own)."""
    model = make_hf_model(name, seed, **overrides)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path)
    if tokenizer:
        save_bundled_tokenizer(path)
    return model


def save_bundled_tokenizer(path) -> None:
    from jalign.data.tokenize import load_tokenizer
    load_tokenizer("bundled").save_pretrained(str(path))


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.array(ids))).logits.float().numpy()


class WarningCapture(logging.Handler):
    """Collects WARNING+ log records (e.g. transformers' missing/unexpected-key warnings)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)
