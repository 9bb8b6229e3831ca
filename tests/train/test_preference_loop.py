"""Preference runs as users launch them (`jalign train` in a subprocess): a DPO run resumes
bit-identically after SIGKILL (in-step and precomputed reference), the precomputed pass
is cached, a reward-model run trains a scalar head and says so in its checkpoint."""

import json
import signal
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.train.test_loop import _committed, _losses, _run

HERE = Path(__file__).parent
DPO = str(HERE / "tiny_dpo.gin")
RM = str(HERE / "tiny_rm.gin")


def _step1_loss_bound() -> float:
    """How far two float32 evaluations of the first DPO loss may differ (policy == reference
    there): each of the four summed response log-probs (<= 64 tokens) is off by at most the
    float32 bound of the tiny model's chain (computed from its initial weights), the loss
    is softplus(-beta * margin) with |softplus'| <= 1, so beta * 4 such bounds."""
    from jalign import sources
    from jalign.config import model_config, parse
    from jalign.sharding import MeshConfig, make_mesh
    from tests.numerics import f32_tolerance, llama_logp_bound

    parse([DPO], ["MeshConfig.fsdp=-1"])
    config = model_config()
    parse([])
    _, model = sources.load("random", config=config, mesh=make_mesh(MeshConfig(1, 1, 1),
                                                                    jax.devices()[:1]))
    b = llama_logp_bound(model, 64, tokens=64)
    return 0.1 * 4 * f32_tolerance(b["terms"], b["scale"], b["depth"])


@pytest.fixture(scope="session")
def dpo_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    r = _run(root, "ref", "TrainConfig.progress=True", config=DPO)  # resumes compare to it
    _ref_console.append(r.stderr)
    return _losses(root / "ref"), root / "ref"


_ref_console = []  # the reference run's stderr (its progress bar)


def test_dpo_run_logs_pair_metrics(dpo_reference):
    losses, run_dir = dpo_reference
    assert sorted(losses) == list(range(1, 9))
    assert abs(losses[1] - np.log(2)) <= _step1_loss_bound()  # step 1: policy == reference
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert all(r["pairs"] == 4 and "rewards/accuracy" in r and "kl/chosen" in r for r in train)
    assert any("eval_rewards/accuracy" in r for r in records)
    assert "DPOConfig.beta = 0.1" in (run_dir / "operative_config.gin").read_text()
    # Step 1, policy == reference: every margin is float noise, so every pair is a tie
    # (none counted won).
    assert train[0]["rewards/ties"] == 1.0 and train[0]["rewards/accuracy"] == 0.0
    # The progress bar shows the pair accuracy, the evaluation and the MFU as it goes.
    final = _ref_console[0].replace("\r", "\n").splitlines()
    bar = [line for line in final if line.startswith("train:") and "8/8" in line][-1]
    for field in ("loss=", "acc=", "ties=", "eval_loss=", "eval_acc=", "mfu=", "tok_s="):
        assert field in bar, (field, bar)


def test_dpo_resume_after_sigkill_is_bit_identical(tmp_path, dpo_reference):
    ref_losses, _ = dpo_reference
    _run(tmp_path, "killed", config=DPO, fault="sigkill_after_save:4", expect=-signal.SIGKILL)
    assert _committed(tmp_path / "killed") == [4]
    _run(tmp_path, "killed", config=DPO)
    assert _losses(tmp_path / "killed") == ref_losses  # exact by construction: resumed run


def test_precomputed_reference_run_matches_and_resumes_from_cache(tmp_path, dpo_reference):
    ref_losses, _ = dpo_reference
    mode = "DPOConfig.reference='precomputed'"
    _run(tmp_path, "whole", mode, config=DPO)
    whole = _losses(tmp_path / "whole")
    _run(tmp_path, "pre", mode, config=DPO, fault="sigkill_after_save:4", expect=-signal.SIGKILL)
    cache = tmp_path / "pre" / "reference_train.s0of1.npz"  # shard 0 of 1
    assert cache.exists()
    with np.load(cache, allow_pickle=False) as z:
        assert z["ref_chosen_logps"].shape == (48,) and np.all(z["ref_chosen_logps"] < 0)
    r = _run(tmp_path, "pre", mode, config=DPO)
    assert "48 train pairs of shard s0of1 read from cache" in r.stdout
    assert _losses(tmp_path / "pre") == whole  # exact by construction: resumed == uninterrupted
    # Against the in-step reference: step 1 (before any update) agrees to the float32 bound
    # of the log-probs; later steps follow Adam, which turns rounding-level differences into
    # full-size updates, so they are not compared (tests/losses/test_dpo_train.py compares
    # the losses and gradients of one step).
    assert sorted(whole) == sorted(ref_losses)
    assert abs(whole[1] - ref_losses[1]) <= _step1_loss_bound()


def test_reward_model_run(tmp_path):
    from jalign.checkpoint import read_roles
    from jalign.models.heads import ScalarHeadModel
    from jalign.sources import load_checkpoint as load_model

    _run(tmp_path, "rm", "TrainConfig.eval_every=8", config=RM)
    run_dir = tmp_path / "rm"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_accuracy" in r for r in records)
    assert all("accuracy" in r and "margin" in r for r in records if "loss" in r)
    assert [(r.name, r.head) for r in read_roles(run_dir).roles] == [("reward", "scalar")]
    _, model = load_model(run_dir)
    assert isinstance(model, ScalarHeadModel)
    from jalign.cli import main
    assert main(["generate", str(run_dir), "--prompt", "1 + 1"]) == 2  # not a causal LM
    # An RM run directory cannot be resumed as a DPO run (other models).
    r = _run(tmp_path, "rm", config=DPO, expect=2)  # a config error, before any compile
    assert "reward (scalar head)" in r.stderr and "Traceback" not in r.stderr


def test_dpo_checkpoints_hold_no_reference_and_a_changed_source_is_refused(tmp_path):
    """The in-step reference is rebuilt from ModelInit on restore (the resume test above
    shows it bit-identical), not written: the checkpoint records only its checksums, and
    a source that changed since (here another random seed, waved through the config
    check) is refused by them."""
    import subprocess

    from jalign.checkpoint import read_metadata
    from tests.train.test_loop import ROOT, _cmd, _env
    _run(tmp_path, "noref", "TrainConfig.steps=4", config=DPO)
    meta = read_metadata(tmp_path / "noref", 4)
    assert meta["frozen_rebuilt"] and meta["roles"]["reference"]["trains"] == "none"
    # what the rebuilt reference must equal
    assert meta["checksums"]["fixed"] and all(
        k.startswith("reference/") for k in meta["checksums"]["fixed"])
    assert not [k for k in meta["checksums"]["train_state"] if "reference" in k]
    assert not list((tmp_path / "noref" / "checkpoints" / "4" / "train_state").glob("*frozen*"))
    r = subprocess.run(_cmd(tmp_path, "noref", "TrainConfig.steps=6", "ModelInit.seed=1", config=DPO) + ["--allow-config-change"],
                       capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    assert r.returncode != 0
    assert "frozen models rebuilt from ModelInit.source='random' differ" in r.stderr, r.stderr[-2000:]


def test_dpo_from_a_run_that_trains_on_still_resumes(tmp_path):
    """A DPO run from 'jalign:DIR' records the step it started from; when that SFT run
    has trained on since (a newer latest step), the resumed DPO run rebuilds its reference
    from the recorded step, not the latest."""
    from jalign.checkpoint import read_metadata
    _run(tmp_path, "sft_src", "TrainConfig.steps=2", "TrainConfig.save_every=2")
    src = f"ModelInit.source='jalign:{tmp_path / 'sft_src'}'"
    _run(tmp_path, "dpo", src, "TrainConfig.steps=2", "TrainConfig.save_every=2",
         config=DPO)
    pinned = f"jalign:{tmp_path / 'sft_src'}@2"
    assert read_metadata(tmp_path / "dpo", 2)["roles"]["policy"]["source"] == pinned
    _run(tmp_path, "sft_src", "TrainConfig.steps=4", "TrainConfig.save_every=2")  # trains on
    r = _run(tmp_path, "dpo", src, "TrainConfig.steps=4", "TrainConfig.save_every=2", config=DPO)
    assert "resumed" in r.stdout and _committed(tmp_path / "dpo") == [2, 4]
    assert read_metadata(tmp_path / "dpo", 4)["roles"]["policy"]["source"] == pinned
