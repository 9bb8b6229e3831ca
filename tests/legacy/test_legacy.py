"""Checkpoints and exports written by jalign before roles (tests/legacy/v1, made by
tests/legacy/make_checkpoints.py from the commit in its manifest): every run still loads
as the old code loaded it, and for eval, generate, convert and as a ``jalign:`` source;
resuming one continues exactly (its state back in the slots it was saved from, the next
steps as the old code trained them) or is refused in one line saying why."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jalign import checksum, sources
from jalign.cli import main
from jalign.models.build import params_of
from tests.cli import TEST_XLA_FLAGS, assert_clean_error, env
from tests.numerics import assert_f32_close, llama_logits_bound

FIXTURES = Path(__file__).with_name("v1")
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
EXPECTED = MANIFEST["expected"]
LORA = ("lora", "qlora", "ppo_lora")  # merged on load: computed, not read back
TIMING = ("step_seconds", "tokens_per_second_per_device", "mfu", "sample_seconds",
          "reward_seconds", "score_seconds")


def _path(name: str) -> str:
    return name if name == "model" else f"runs/{name}"


def _head(name: str) -> str:
    return "scalar" if EXPECTED[name]["kind"] == "scalar_head" else "lm"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A copy of the fixtures (their sources are paths relative to it)."""
    d = tmp_path_factory.mktemp("legacy") / "v1"
    shutil.copytree(FIXTURES, d)
    return d


def _values(model, head: str):
    ids = np.arange(3, 19, dtype=np.int32).reshape(2, 8) * 7 % 500 + 3  # as the old code
    if head == "scalar":
        return np.asarray(model.sequence_scores(ids, np.ones_like(ids)))
    return np.asarray(model(ids))[:, :, :16]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_an_old_checkpoint_loads_as_the_old_code_loaded_it(work, monkeypatch, name):
    monkeypatch.chdir(work)
    _, model = sources.load_checkpoint(_path(name), head=_head(name))
    want = EXPECTED[name]
    if name not in LORA:  # read back, not computed: the very bytes
        assert checksum.checksums(params_of(model)) == want["checksums"]
    # The same function of the same weights (LoRA: W + A B merged again, here).
    assert_f32_close(_values(model, _head(name)), want["values"],
                     **llama_logits_bound(model, 8), err_msg=name)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_an_old_checkpoint_evaluates_generates_and_converts(work, monkeypatch, tmp_path, name):
    from jalign.convert.hf import load_hf
    monkeypatch.chdir(work)
    path = _path(name)
    if _head(name) == "lm":
        assert main(["eval", path, "--task", "add", "--n", "4", "--show", "0"]) == 0
        assert main(["generate", path, "--prompt", "1 + 1", "--max-new-tokens", "3"]) == 0
    assert main(["convert", "jalign-to-hf", path, str(tmp_path / "hf")]) == 0
    _, exported = load_hf(tmp_path / "hf", head=_head(name))
    _, model = sources.load_checkpoint(path, head=_head(name))
    assert checksum.checksums(params_of(exported)) == checksum.checksums(params_of(model))
    if name == "lora":
        assert main(["convert", "jalign-to-peft", path, str(tmp_path / "peft")]) == 0
        config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
        # a local base by its absolute path: PEFT finds it from wherever it loads
        assert config["base_model_name_or_path"] == str(Path("base_hf").resolve())
        assert config["r"] == 2


@pytest.mark.parametrize("name", ["sft", "rm", "ppo", "lora"])
def test_an_old_run_starts_a_new_one_as_a_jalign_source(work, monkeypatch, name):
    """A new run from ``jalign:runs/NAME`` starts from exactly the model it loads."""
    import dataclasses

    from jalign.experiment import load_experiment
    from jalign.train.run import open_run
    monkeypatch.chdir(work)
    gin = "tests/train/tiny_rm.gin" if _head(name) == "scalar" else "tests/train/tiny_sft.gin"
    exp = load_experiment([str(Path(__file__).parents[2] / gin)], [
        f"ModelInit.source='jalign:runs/{name}'", "TrainConfig.run_name='from_old'",
        "TrainConfig.output_root='new'", "TrainConfig.eval_batches=0", "MeshConfig.fsdp=-1",
        "DataConfig.bundled_size=16", "DataConfig.batch_size=8"])
    run = open_run(exp.recipe, dataclasses.replace(exp.configs, eval_data=None))
    (role,) = run.models.trained
    _, model = sources.load_checkpoint(_path(name), head=_head(name))
    if name in LORA:  # merged here on 8 devices, there on one: W + s A B of rank 2
        for a, b in zip(jax.tree.leaves(run.state.params[role]),
                        jax.tree.leaves(params_of(model)), strict=True):
            assert_f32_close(np.asarray(a), np.asarray(b), terms=3)
    else:
        assert checksum.checksums(run.state.params[role]) == checksum.checksums(
            params_of(model))
    run.ckpt.close()


def _same_programs() -> bool:
    """Whether this machine compiles the suite's programs as the fixtures' did: the same
    jax, XLA flags and CPU vector extensions (then results are equal bit for bit)."""
    from tests.legacy.make_checkpoints import _cpu_flags
    return (MANIFEST["jax"] == jax.__version__ and MANIFEST["xla_flags"] == TEST_XLA_FLAGS
            and MANIFEST["cpu"] == _cpu_flags())


# Logged since the fixtures were made: DPO's pairs counted as ties (issue 22); how far the
# sampler's log-probs are from the trainer's, each rollout (issue 23).
ADDED_METRICS = {"rewards/ties", "sampler_kl", "sampler_logp_diff_max"}


def _records(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", MANIFEST["resumed"])
def test_an_old_run_resumes_where_it_was_saved(work, name):
    """The old run's step-2 checkpoint (its step 4 taken away) resumed by this jalign with
    the run's own operative config: every restored array is in the slot it was saved from
    (by the paths of the checksums saved with it), and steps 3 and 4 are trained as the old
    code trained them (bit for bit where the programs compile alike)."""
    copy = work / "runs" / f"{name}_resumed"
    shutil.copytree(work / "runs" / name, copy)
    shutil.rmtree(copy / "checkpoints" / "4")
    _check_restored_slots(work, name, copy)
    r = subprocess.run([sys.executable, "-m", "jalign.cli", "train",
                        f"runs/{name}/operative_config.gin", "--gin",
                        f"TrainConfig.run_name='{name}_resumed'"],
                       capture_output=True, text=True, env=env(), cwd=work, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed" in r.stdout and "step 2" in r.stdout, r.stdout[-2000:]
    old, new = _records(work / "runs" / name), _records(copy)
    assert [x["step"] for x in new] == [x["step"] for x in old]
    # Metrics this jalign logs that the old one did not; every old metric is still logged.
    assert all(set(o) <= set(x) <= set(o) | ADDED_METRICS for x, o in zip(new[2:], old[2:]))
    new = new[:2] + [{k: v for k, v in x.items() if k not in ADDED_METRICS} for x in new[2:]]
    assert all(np.isfinite(x["loss"]) for x in new if "loss" in x)
    assert new[:2] == old[:2]  # the first two steps are the old run's own log, kept
    if _same_programs():
        assert new == old
    elif name in FIRST_STEP_BOUND:  # the same function of the same state and batch
        bound = FIRST_STEP_BOUND[name](work)
        assert abs(new[2]["loss"] - old[2]["loss"]) <= bound, (new[2], old[2], bound)
    # (PPO's first resumed step samples a rollout: rounding may flip a sampled token, so
    # elsewhere only its exact restore above is checked.)


def _logp_bound(work: Path, name: str, tokens: int, mean: bool) -> float:
    from tests.numerics import f32_tolerance, llama_logp_bound
    # From ``work``, the subprocesses' cwd, which the runs' relative paths (a LoRA run's
    # base model) are relative to. This branch runs only where the machine compiles
    # differently from the fixtures' (another CPU's vector extensions): an AVX2 machine
    # was the first to reach it, and it loaded from this process's cwd.
    with contextlib.chdir(work):
        _, model = sources.load_checkpoint(f"runs/{name}", step=2)
    b = llama_logp_bound(model, 64, tokens=tokens, mean=mean)
    return f32_tolerance(b["terms"], b["scale"], b["depth"])


# The float32 bound of the first resumed step's loss, for the loss kinds it is derived for
# (tests/numerics.py): SFT's mean NLL over at most 4 x 64 targets; DPO's sigmoid loss,
# |d loss / d h| <= beta = 0.1 times four summed log-probs of at most 64 tokens each.
FIRST_STEP_BOUND = {
    "sft": lambda work: _logp_bound(work, "sft", 4 * 64, True),
    "lora": lambda work: _logp_bound(work, "lora", 4 * 64, True),
    "dpo": lambda work: 0.1 * 4 * _logp_bound(work, "dpo", 64, False),
}


def _check_restored_slots(work: Path, name: str, copy: Path) -> None:
    """Open the resumed run in this process: its params and optimizer state, keyed by
    role, hold at each path the array the old run saved at that path (the old layout had
    no role around a single model)."""
    from jalign import config as jconfig
    from jalign.checkpoint import read_metadata
    from jalign.experiment import load_experiment
    from jalign.train.run import open_run

    exp = load_experiment([str(work / "runs" / name / "operative_config.gin")],
                          [f"TrainConfig.output_root='{work / 'runs'}'",
                           f"TrainConfig.run_name='{name}_resumed'", "MeshConfig.fsdp=1",
                           "MeshConfig.tensor=8"])  # 8 test devices; batches of 2-4 rows
    jconfig.parse([])
    import os
    cwd = os.getcwd()
    os.chdir(work)
    try:
        run = open_run(exp.recipe, exp.configs)
    finally:
        os.chdir(cwd)
    saved = read_metadata(copy, 2)["checksums"]
    bare = saved["params"] and not any(k.startswith("policy/") for k in saved["params"])

    def old_paths(sums: dict, prefix: str = "") -> dict:
        out = {}
        for path, value in sums.items():
            parts = path.split("/")
            if bare:  # the one trained role's name was not in the old paths
                parts = [p for p in parts if p not in run.models.trained]
            out[prefix + "/".join(parts)] = value
        return out

    assert old_paths(checksum.checksums(run.state.params)) == saved["params"]
    opt = old_paths(checksum.checksums(run.state.opt_state), "opt_state/")
    assert opt and all(saved["train_state"][k] == v for k, v in opt.items()), name
    assert int(run.state.step) == 2
    run.ckpt.close()


def test_an_old_run_trained_with_a_trainable_regex_is_refused_in_one_line(work):
    """Its optimizer state holds moments for the parameters it froze, which runs no longer
    keep: resuming it says so (exporting and starting from it still work, above)."""
    r = subprocess.run([sys.executable, "-m", "jalign.cli", "train",
                        "runs/trainable/operative_config.gin", "--gin", "TrainConfig.steps=4"],
                       capture_output=True, text=True, env=env(), cwd=work, timeout=600)
    assert_clean_error(r, "written before roles with OptimizerConfig.trainable",
                       "ModelInit.source='jalign:")


def test_old_hf_and_peft_exports_still_load(work, monkeypatch, capsys):
    """What the old `jalign convert` wrote: HF exports load (as the runs they came from),
    and the PEFT adapter loads onto its HF base in peft, computing the LoRA run's logits."""
    import peft
    import torch
    import transformers

    from jalign.convert.hf import load_hf
    monkeypatch.chdir(work)
    for export, run in (("export_hf", "sft"), ("export_rm_hf", "rm")):
        _, exported = load_hf(export, head=_head(run))
        _, model = sources.load_checkpoint(_path(run), head=_head(run))
        assert checksum.checksums(params_of(exported)) == checksum.checksums(params_of(model))
    # Old exports carry no tokenizer: named, they run; unnamed, one line says so (the
    # bundled one is no longer assumed for an hf: model).
    assert main(["eval", "hf:export_hf", "--task", "add", "--n", "4", "--show", "0"]) == 2
    assert "hf:export_hf has no tokenizer files" in capsys.readouterr().err
    assert main(["eval", "hf:export_hf", "--task", "add", "--n", "4", "--show", "0",
                 "--tokenizer", "bundled"]) == 0
    base = transformers.AutoModelForCausalLM.from_pretrained("base_hf", dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, "export_peft").eval()
    ids = np.arange(3, 19, dtype=np.int64).reshape(2, 8) * 7 % 500 + 3
    with torch.no_grad():
        ref = adapted(input_ids=torch.from_numpy(ids)).logits.numpy()
    _, lora = sources.load_checkpoint("runs/lora")
    assert_f32_close(np.asarray(lora(ids.astype(np.int32))), ref, **llama_logits_bound(lora, 8))
