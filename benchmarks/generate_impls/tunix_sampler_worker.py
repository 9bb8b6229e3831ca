"""Worker: Tunix's KV-cache sampler (``tunix.generate.sampler.Sampler``) on Tunix's NNX Llama3.

Runs in the Tunix virtual environment (see the top of benchmarks/train_step.py for the
exact commands that build it); started and driven by benchmarks/generate.py. Standard
library + what that venv has; nothing from jalign is imported.

Weights: the HF checkpoint that generate.py exported with ``jalign.convert.hf.save_hf``
(``--hf-dir``), loaded by Tunix's own loader
(``tunix.models.llama3.params.create_model_from_safe_tensors``), so Tunix samples from
the same weights as jalign and transformers. The shape comes from its config.json.

Prompts: ``--prompts`` is a .npy file of the driver's left-padded prompt ids
[batch, prompt] (pad = ``--pad``). Tunix's ``Sampler.__call__`` takes strings and
tokenizes them itself, so a small tokenizer object (``IdTokenizer``: the four methods
Tunix's ``TokenizerAdapter`` accepts) turns "17 403 9" into [17, 403, 9] and back; no
BOS is added (the driver's prompts have none). With ``max_prompt_length`` = the
driver's prompt width, Tunix left-pads each row back to exactly the driver's array.
EOS is disabled (``eos_tokens=[-1]``: no token takes that id), so every row generates
``--new`` tokens, as in the driver's other rows. Greedy: ``temperature=0`` with no
``top_p`` (Tunix's greedy mode); sampled: ``temperature=1, top_p=1.0, top_k=None``
(Tunix's top-p mode, which at top_p 1 and no top-k draws from the full softmax).
The KV cache holds ``prompt + new`` positions (Tunix requires at least that).

Protocol and common arguments: sampler_protocol.py (the benchmark harness's). A call is
``Sampler.__call__`` and its timed interval is everything Tunix's public call does
(tokenization, prefill, the jitted decode loop, device_get, detokenization). ``ready``
also says whether Tunix padded the prompts back to exactly the driver's array
(``same_prompts``; the driver refuses the row otherwise).

``--rope-theta-from-config`` is a correctness check only (not used for the benchmark
rows): Tunix 0.1.7's Llama3 attention calls ``apply_rope`` without the config's
``rope_theta``, so it rotates with apply_rope's default base 1e6 whatever the config
says; the flag makes apply_rope use the config's base instead, to show that with it the
loaded weights reproduce jalign's greedy tokens.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sampler_protocol import NO_EOS, sampler_args, serve_sampler  # noqa: E402


class IdTokenizer:
    """Token ids written as decimal text: what Tunix's sampler needs to take the driver's
    ids unchanged (encode/decode/bos_id/eos_id/pad_id)."""

    def __init__(self, pad: int):
        self._pad = pad

    def encode(self, text: str, **kwargs) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids, **kwargs) -> str:
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self):
        return None  # no BOS is prepended

    def eos_id(self) -> int:
        return -1

    def pad_id(self) -> int:
        return self._pad


def main():
    def extra(ap):
        ap.add_argument("--rope-theta-from-config", action="store_true",
                        help="correctness check: make Tunix's apply_rope use config.rope_theta")

    args = sampler_args(extra)
    t0 = time.perf_counter()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import flax
    import tunix
    from tunix.generate import sampler as sampler_lib
    from tunix.models.llama3 import model as llama3
    from tunix.models.llama3 import params as llama3_params

    with open(os.path.join(args.hf_dir, "config.json")) as f:
        hf = json.load(f)
    theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    cfg = llama3.ModelConfig(num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"],
                             embed_dim=hf["hidden_size"], hidden_dim=hf["intermediate_size"],
                             num_heads=hf["num_attention_heads"], head_dim=head_dim,
                             num_kv_heads=hf["num_key_value_heads"], rope_theta=theta,
                             norm_eps=hf["rms_norm_eps"],
                             weight_tying=bool(hf.get("tie_word_embeddings", False)))
    if args.rope_theta_from_config:
        original = llama3.apply_rope

        def apply_rope(inputs, positions, head_dim, rope_theta=theta):
            return original(inputs, positions, head_dim, rope_theta=theta)

        llama3.apply_rope = apply_rope
    model = llama3_params.create_model_from_safe_tensors(args.hf_dir, cfg, dtype=jnp.float32)
    load_s = time.perf_counter() - t0

    ids = np.load(args.prompts)
    batch, width = ids.shape
    prompts = [" ".join(str(int(t)) for t in row[row != args.pad]) for row in ids]
    cache = sampler_lib.CacheConfig(cache_size=width + args.new, num_layers=cfg.num_layers,
                                    num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)
    sampler = sampler_lib.Sampler(model, IdTokenizer(args.pad), cache)

    kw = (dict(temperature=0.0) if args.mode == "greedy"
          else dict(temperature=1.0, top_p=1.0, top_k=None))
    same = []

    def call(seed: int):
        out = sampler(prompts, max_generation_steps=args.new, max_prompt_length=width,
                      eos_tokens=[NO_EOS], seed=seed, **kw)
        if not same:  # did the sampler see the driver's exact left-padded prompt array?
            same.append(bool(np.array_equal(np.asarray(out.padded_prompt_tokens), ids)))
        return np.asarray([np.asarray(t) for t in out.tokens])

    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(flax.nnx.state(model))))
    info = dict(
        versions=dict(tunix=getattr(tunix, "__version__", "?"), jax=jax.__version__,
                      flax=flax.__version__),
        devices=str(jax.devices()), n_params=n_params, load_s=load_s,
        rope_theta_config=theta, rope_theta_from_config=args.rope_theta_from_config,
        tunix_file=os.path.dirname(tunix.__file__))
    serve_sampler(call, info, args.warmup, extra_info=lambda: dict(same_prompts=same[0]))


if __name__ == "__main__":
    main()
