"""Worker (b): plain transformers + PyTorch, a hand-written loop.

``LlamaForCausalLM`` (float32, transformers' default attention implementation, SDPA),
``torch.optim.AdamW`` with torch's defaults for the implementation choice, and per step:
forward with ``labels`` (transformers shifts them: every token but the first is a target),
``loss.backward()``, ``optimizer.step()``, ``optimizer.zero_grad()``. Eager PyTorch:
every call returns when the work is done, so wall time per step needs no extra sync.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ADAMW, batch_ids, flops_per_step, serve, worker_args  # noqa: E402


def hf_model(args):
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=max(4096, args.seq),
        tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10000.0,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    return model


def main():
    args = worker_args()
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    model = hf_model(args)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=ADAMW["lr"], betas=(ADAMW["b1"], ADAMW["b2"]),
                            eps=ADAMW["eps"], weight_decay=ADAMW["weight_decay"])
    ids = torch.from_numpy(batch_ids(args.batch, args.seq, args.vocab))
    losses = []

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss.detach()))

    info = dict(name="transformers + PyTorch (manual loop)",
                versions=dict(torch=torch.__version__, transformers=transformers.__version__),
                threads=torch.get_num_threads(),
                attn_implementation=model.config._attn_implementation,
                n_params=sum(p.numel() for p in model.parameters()),
                flops=flops_per_step(args.vocab, args.hidden, args.intermediate, args.layers,
                                     args.heads, args.kv_heads, args.batch, args.seq))

    def warm():
        step()
        info.setdefault("first_loss", losses[0])

    serve(warm, args.warmup, info)


if __name__ == "__main__":
    main()
