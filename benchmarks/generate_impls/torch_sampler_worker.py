"""Worker: transformers' ``LlamaForCausalLM.generate`` (KV cache on, under
``torch.inference_mode()``, ``--threads`` intra-op threads) on the driver's exported
weights. EOS disabled (``min_new_tokens`` = ``max_new_tokens``, no eos id), sampled =
``do_sample`` at temperature 1 with top-k 0 and top-p 1. Protocol and arguments:
sampler_protocol.py."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sampler_protocol import sampler_args, serve_sampler  # noqa: E402


def main():
    args = sampler_args()
    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    hf = transformers.LlamaForCausalLM.from_pretrained(args.hf_dir,
                                                       torch_dtype=torch.float32).eval()
    ids = np.load(args.prompts)
    t_ids = torch.from_numpy(ids.astype(np.int64))
    t_mask = torch.from_numpy((ids != args.pad).astype(np.int64))
    width = ids.shape[1]

    def call(seed: int):
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = hf.generate(input_ids=t_ids, attention_mask=t_mask, max_new_tokens=args.new,
                              min_new_tokens=args.new, do_sample=args.mode == "sampled",
                              top_k=0, temperature=1.0, top_p=1.0, use_cache=True,
                              pad_token_id=args.pad, eos_token_id=None)
        return out[:, width:].numpy()

    info = dict(versions=dict(torch=torch.__version__, transformers=transformers.__version__),
                threads=args.threads)
    serve_sampler(call, info, args.warmup)


if __name__ == "__main__":
    main()
