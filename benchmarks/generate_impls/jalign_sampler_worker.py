"""Worker: jalign's KV-cache sampler (``jalign.rl.generate.generate``: the prefill, then one
cached decode step per token inside one jitted ``lax.while_loop``) on the driver's exported
weights, loaded with ``jalign.convert.hf.load_hf``. EOS disabled (an id no token takes).
Protocol and arguments: sampler_protocol.py."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sampler_protocol import NO_EOS, sampler_args, serve_sampler  # noqa: E402


def main():
    args = sampler_args()
    import jax
    import numpy as np

    import flax
    from jalign.convert.hf import load_hf
    from jalign.rl.generate import generate

    _, model = load_hf(args.hf_dir)
    ids = np.load(args.prompts)
    mask = (ids != args.pad).astype(np.int32)
    greedy = args.mode == "greedy"

    def call(seed: int):
        out = generate(model, ids, mask, max_new_tokens=args.new, rng=jax.random.key(seed),
                       greedy=greedy, eos_id=NO_EOS, pad_id=args.pad)
        return np.asarray(jax.block_until_ready(out["tokens"]))

    info = dict(versions=dict(jax=jax.__version__, flax=flax.__version__),
                glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""))
    serve_sampler(call, info, args.warmup)


if __name__ == "__main__":
    main()
