"""LoRA runs as users launch them (`jalign train` in a subprocess): a PPO run with adapters
(its reference the base without them, its value model a second adapter set with its own
head on the same base) resumes bit-identically after SIGKILL; a run's checkpoint holds
the adapters and where its base came from, and a base that changed since is refused."""

import signal
from pathlib import Path

import pytest

from jalign.checkpoint import CheckpointError, read_metadata
from jalign.cli import EXIT_BAD_INPUT
from jalign.sources import load_checkpoint
from tests.hf_models import save_hf_model
from tests.train.test_loop import _committed, _records, _run
from tests.train.test_ppo_loop import TIMING

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
PPO, SFT = str(HERE / "tiny_ppo.gin"), str(HERE / "tiny_sft.gin")
# No evaluation: its greedy sampler is one more program to compile, and resume exactness is
# about the rollouts and updates (tests/train/test_ppo_loop.py covers evaluation).
LORA = ("LoraConfig.rank=4", "LoraConfig.alpha=8", "TrainConfig.steps=8",
        "TrainConfig.save_every=4", "TrainConfig.eval_batches=0")


def test_ppo_with_lora_resumes_bit_identically(tmp_path):
    _run(tmp_path, "ref", *LORA, config=PPO)
    ref = _records(tmp_path / "ref", drop=TIMING)
    train = [r for r in ref if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert train[4]["kl"] > 0  # the second rollout's policy differs from the reference
    meta = read_metadata(tmp_path / "ref", 8)
    # The base's source is recorded with the policy; the value model reads its backbone.
    assert meta["roles"]["policy"]["source"] == "random"
    assert meta["roles"]["value"]["like"] == "policy" and meta["checksums"]["fixed"]
    assert {k.split("/")[0] for k in meta["checksums"]["fixed"]} == {"policy"}
    # The checkpoint's params item holds adapters and score heads only.
    saved = meta["checksums"]["params"]
    assert saved and all(k.split("/")[-1].endswith(("_lora_a", "_lora_b", "score"))
                         for k in saved), sorted(saved)[:4]
    assert not any(k.startswith("value/backbone/layers/wq") and "lora" not in k for k in saved)
    _, policy = load_checkpoint(tmp_path / "ref", head="lm")  # merged, plain
    assert policy.config.lora is None

    _run(tmp_path, "killed", *LORA, fault="sigkill_after_save:4", expect=-signal.SIGKILL,
         config=PPO)
    assert _committed(tmp_path / "killed") == [4]
    _run(tmp_path, "killed", *LORA, config=PPO)
    # exact by construction: the same rollouts (rewards, KL, coefficient) and losses
    assert _records(tmp_path / "killed", drop=TIMING) == ref


def test_a_changed_base_is_refused_on_resume_and_export(tmp_path):
    hf = tmp_path / "hf"
    save_hf_model("llama3_2", hf, vocab_size=512, bos_token_id=1, eos_token_id=2,
                  tokenizer=True)
    bindings = ("LoraConfig.rank=4", f"ModelInit.source='hf:{hf}'", "TrainConfig.eval_batches=0",
                "TrainConfig.steps=2", "TrainConfig.save_every=2")
    _run(tmp_path, "run", *bindings, config=SFT)
    meta = read_metadata(tmp_path / "run")
    assert meta["roles"]["policy"]["source"] == f"hf:{hf}"
    load_checkpoint(tmp_path / "run")  # the base as it was: loads
    save_hf_model("llama3_2", hf, seed=1, vocab_size=512, bos_token_id=1, eos_token_id=2,
                  tokenizer=True)
    r = _run(tmp_path, "run", *bindings[:3], "TrainConfig.steps=4", config=SFT,
             expect=EXIT_BAD_INPUT)
    assert "(its base) rebuilt from ModelInit.source=" in r.stderr, r.stderr[-2000:]
    assert "differs from the one this run trained with" in r.stderr, r.stderr[-2000:]
    assert _committed(tmp_path / "run") == [2]
    with pytest.raises(CheckpointError, match="the source changed since"):
        load_checkpoint(tmp_path / "run")
