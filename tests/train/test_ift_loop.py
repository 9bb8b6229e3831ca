"""An IFT run as users start it (`jalign train` in a subprocess): it trains, logs IFT's
metrics, and resumes after SIGKILL bit-identically, its step-dependent λ (schedule and
per-step jitter) included."""

import signal
from pathlib import Path

import pytest

from tests.train.test_loop import _committed, _records as records, _run

CONFIG = str(Path(__file__).with_name("tiny_ift.gin"))
TIMING = ("step_seconds", "tokens_per_second_per_device", "mfu")


def _records(run_dir: Path) -> list[dict]:
    return records(run_dir, drop=TIMING)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("ift")
    _run(root, "ref", config=CONFIG)
    return _records(root / "ref")


def test_ift_run_trains_and_logs_its_metrics(uninterrupted):
    train = [r for r in uninterrupted if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert train[-1]["loss"] < train[0]["loss"]
    for r in train:
        assert {"nll", "nll_mixed", "lambda", "replaced", "sequences"} <= set(r)
    lams = [r["lambda"] for r in train]
    assert len(set(lams)) == len(lams)  # jittered per step
    assert all(0.0 <= x <= 1.0 for x in lams)
    evals = [r for r in uninterrupted if "eval_loss" in r]
    assert evals and evals[-1]["eval_lambda"] == pytest.approx(0.2)  # no jitter in eval
    assert "eval_perplexity" in evals[-1]


def test_ift_resume_after_sigkill_is_bit_identical(tmp_path, uninterrupted):
    _run(tmp_path, "killed", fault="sigkill_after_save:4", expect=-signal.SIGKILL, config=CONFIG)
    assert _committed(tmp_path / "killed") == [4]
    _run(tmp_path, "killed", config=CONFIG)
    # exact by construction: resumed == uninterrupted, every metric of every step
    assert _records(tmp_path / "killed") == uninterrupted
