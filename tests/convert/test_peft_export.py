"""A LoRA run exports both ways and transformers reproduces it: `jalign convert
jalign-to-hf` merges the adapters into the base; `jalign convert jalign-to-peft` writes a
PEFT adapter directory that `peft` loads onto the transformers base. Both give jalign's
logits (a reward model's scores) to <= 1e-5 in float32, for tied and untied embeddings
with grouped-query attention, after training steps that made every adapter non-zero."""

import json

import numpy as np
import pytest
import torch
import transformers

from jalign.sources import load_checkpoint
from jalign.cli import main
from jalign.models.build import forward
from jalign.models.adapters import merge
from tests.hf_models import EXPORT_MAX_DLOGIT, make_hf_model, save_bundled_tokenizer
from tests.numerics import assert_f32_close, llama_logits_bound
from tests.train.test_loop import _run

try:
    import peft
except ImportError as e:  # fail loudly: the export test must not silently pass without peft
    raise ImportError("the PEFT export tests need peft: pip install -e '.[test]'") from e

from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "train"
LORA = ("LoraConfig.rank=4", "LoraConfig.alpha=8", "LoraConfig.layers=(0, 1)",
        "LoraConfig.targets=('q', 'k', 'v', 'o', 'gate', 'down')",
        "OptimizerConfig.learning_rate=0.02", "TrainConfig.steps=3", "TrainConfig.save_every=3",
        "TrainConfig.eval_batches=0")  # no evaluation: one program less to compile


def _hf_base(path, name):
    """A tiny transformers Llama whose logits are O(1): unit-scale tied embeddings would
    give logits of ~50, where float32's spacing alone (4e-6) approaches 1e-5."""
    model = make_hf_model(name, vocab_size=512, bos_token_id=1, eos_token_id=2)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(0.15)
    model.save_pretrained(path)
    save_bundled_tokenizer(path)


def _check(out, ref, bound_model, length):
    assert_f32_close(out, ref, **llama_logits_bound(bound_model, length))  # the derived bound
    assert float(np.abs(out - ref).max()) <= EXPORT_MAX_DLOGIT  # the requirement


@pytest.mark.parametrize("name", ["llama3_2", "llama3_1"])  # tied GQA 2:1, untied GQA 4:1
def test_lora_run_exports_merged_and_as_peft_adapter(tmp_path, name):
    hf = tmp_path / "hf"
    _hf_base(hf, name)
    _run(tmp_path, "run", *LORA, f"ModelInit.source='hf:{hf}'", config=str(HERE / "tiny_sft.gin"))
    run = tmp_path / "run"
    assert main(["convert", "jalign-to-hf", str(run), str(tmp_path / "merged")]) == 0
    assert main(["convert", "jalign-to-peft", str(run), str(tmp_path / "adapter")]) == 0

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == (
        "LORA", "CAUSAL_LM", 4, 8.0)
    assert config["base_model_name_or_path"] == str(hf.resolve())
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj",
                                                "q_proj", "v_proj"]

    _, adapted = load_checkpoint(run, adapters=True)
    b = np.abs(np.asarray(adapted.layers.w_down_lora_b[...]))
    # Trained on the chosen layers; llama3_1's third layer has none (scale 0, B stays 0),
    # and PEFT reads it from layers_to_transform.
    assert [bool(b[i].max() > 0) for i in range(b.shape[0])] == [i in (0, 1) for i in
                                                                  range(b.shape[0])]
    assert config["layers_to_transform"] == [0, 1]
    ids = np.random.default_rng(0).integers(3, 512, (2, 24)).astype(np.int32)
    out = np.asarray(forward(adapted, ids))

    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    base = transformers.AutoModelForCausalLM.from_pretrained(hf)
    with torch.no_grad():
        ref_base = base(torch.as_tensor(ids)).logits.numpy()
        with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")  # in place
        ref_merged = merged(torch.as_tensor(ids)).logits.numpy()
        ref_peft = with_adapter(torch.as_tensor(ids)).logits.numpy()
    bound_model = merge(adapted)
    _check(out, ref_merged, bound_model, ids.shape[1])
    _check(out, ref_peft, bound_model, ids.shape[1])
    assert float(np.abs(ref_peft - ref_base).max()) > 1e-2  # the adapter does change the model


def test_lora_reward_model_exports_as_a_seq_cls_adapter(tmp_path):
    hf = tmp_path / "hf"
    _hf_base(hf, "llama3_1")
    _run(tmp_path, "rm", *LORA, f"ModelInit.source='hf:{hf}'", config=str(HERE / "tiny_rm.gin"))
    assert main(["convert", "jalign-to-peft", str(tmp_path / "rm"), str(tmp_path / "adapter"),
                 "--overwrite"]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]

    _, adapted = load_checkpoint(tmp_path / "rm", adapters=True)
    ids = np.random.default_rng(1).integers(3, 512, (2, 20)).astype(np.int32)
    seg = np.ones_like(ids)
    out = np.asarray(adapted.sequence_scores(ids, seg))
    base = transformers.AutoModelForSequenceClassification.from_pretrained(hf, num_labels=1,
                                                                           pad_token_id=0)
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        ref = with_adapter(torch.as_tensor(ids)).logits[:, 0].numpy()
    _check(out, ref, merge(adapted), ids.shape[1])
