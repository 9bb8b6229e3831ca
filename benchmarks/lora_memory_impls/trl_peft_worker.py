"""TRL's SFTTrainer (the TRL venv, with peft) in one mode: full fine-tuning, or PEFT LoRA
(rank r, alpha 2r, dropout 0, every attention and MLP projection); prints one JSON line
with the peak resident memory after ``--steps`` steps. Gradient checkpointing off (as
jalign's rows run); ``--checkpointing`` turns it on (TRL's configs default to on).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "train_step_impls")]
from memory import peak_rss, reset_peak, status  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["full", "lora"], required=True)
    for k, v in dict(vocab=8192, hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=8,
                     head_dim=0, batch=4, seq=512, rank=16, steps=3, threads=2).items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=v)
    ap.add_argument("--tied", action="store_true")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--hf", default=None, help="read the model from this HF checkpoint")
    args = ap.parse_args()
    import datasets
    import numpy as np
    import torch
    import transformers
    import trl
    from trl import SFTConfig, SFTTrainer

    from trl_worker import toy_tokenizer

    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    before = peak_rss()
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.head_dim or None,
        max_position_embeddings=max(4096, args.seq), tie_word_embeddings=args.tied,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    if args.hf:
        model = transformers.LlamaForCausalLM.from_pretrained(args.hf, torch_dtype=torch.float32)
    else:
        model = transformers.LlamaForCausalLM(config).to(torch.float32)
    peft_config = None
    if args.mode == "lora":
        import peft
        peft_config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                      task_type="CAUSAL_LM",
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                      "gate_proj", "up_proj", "down_proj"])
    ids = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq))
    rows = [ids[i % args.batch].tolist() for i in range(args.batch * (args.steps + 1))]
    dataset = datasets.Dataset.from_dict({"input_ids": rows})
    cfg = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_mem_"), max_steps=args.steps,
        per_device_train_batch_size=args.batch, learning_rate=1e-4, adam_beta2=0.95,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0, max_length=args.seq,
        packing=False, logging_strategy="no", save_strategy="no", eval_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=True, bf16=False, fp16=False,
        dataloader_num_workers=0, seed=0, gradient_checkpointing=args.checkpointing)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=dataset,
                         processing_class=toy_tokenizer(args.vocab), peft_config=peft_config)
    trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    import gc
    gc.collect()
    rss_state = status("VmRSS")
    reset_peak()
    trainer.train()  # creates the optimizer (its moments) in its first step
    print("@@" + json.dumps({"mode": args.mode, "trained_params": trained,
                             "rss_before": before, "rss_peak": peak_rss(), "rss_state": rss_state,
                             "rss_steps_peak": status("VmHWM"),
                             "versions": {"trl": trl.__version__, "torch": torch.__version__}}),
          flush=True)


if __name__ == "__main__":
    main()
