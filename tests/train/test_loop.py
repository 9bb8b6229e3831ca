"""The loop as users run it (`jalign train` in a subprocess): exact resume after SIGKILL,
interrupted saves, SIGTERM, non-finite losses, metrics and artifacts."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli import env, run_losses

from jalign.train.loop import EXIT_DISK_FULL, EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_PREEMPTED

CONFIG = str(Path(__file__).with_name("tiny_sft.gin"))
ROOT = Path(__file__).resolve().parents[2]


def _cmd(tmp_path, name, *bindings, config=CONFIG):
    return [sys.executable, "-m", "jalign.cli", "train", config,
            "--gin", f"TrainConfig.output_root='{tmp_path}'",
            "--gin", f"TrainConfig.run_name='{name}'", *sum((["--gin", b] for b in bindings), [])]


def _env(fault=""):
    return env(JALIGN_FAULT=fault)  # one device, as a user's single-host run


def _run(tmp_path, name, *bindings, fault="", expect=0, config=CONFIG):
    r = subprocess.run(_cmd(tmp_path, name, *bindings, config=config), capture_output=True, text=True,
                       env=_env(fault), cwd=ROOT, timeout=600)
    assert r.returncode == expect, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


_losses = run_losses


def _records(run_dir: Path, drop=()) -> list[dict]:
    """Every metrics record of a run, without the fields ``drop`` (wall-clock timings)."""
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _committed(run_dir: Path) -> list[int]:
    d = run_dir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    _run(root, "ref")
    return _losses(root / "ref"), root / "ref"


def test_uninterrupted_run_writes_everything(reference):
    losses, run_dir = reference
    assert sorted(losses) == list(range(1, 9))
    assert losses[8] < losses[1]
    assert _committed(run_dir) == [4, 8]
    assert (run_dir / "loss_curve.png").stat().st_size > 1000
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert "TrainConfig.steps = 8" in (run_dir / "operative_config.gin").read_text()
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in r for r in records)
    # Step times are read one step behind (the loop never waits for the device between
    # steps), so a millisecond step's time is noisy; each must still be a positive time.
    train = [r for r in records if "loss" in r]
    assert all(r["step_seconds"] > 0 and r["tokens_per_second_per_device"] > 0
               and r["mfu"] > 0 for r in train)


def test_resume_after_sigkill_is_bit_identical(tmp_path, reference):
    ref_losses, _ = reference
    _run(tmp_path, "killed", fault="sigkill_after_save:4", expect=-signal.SIGKILL)
    assert _committed(tmp_path / "killed") == [4]
    _run(tmp_path, "killed")
    assert _losses(tmp_path / "killed") == ref_losses  # exact by construction: resumed == uninterrupted


def test_sigkill_during_save_resumes_from_previous_commit(tmp_path, reference):
    ref_losses, _ = reference
    _run(tmp_path, "torn", fault="sigkill_during_save:8", expect=-signal.SIGKILL)
    assert _committed(tmp_path / "torn") == [4]  # step 8 never committed
    r = _run(tmp_path, "torn")
    assert "resumed" in r.stdout and "at step 4" in r.stdout
    assert _losses(tmp_path / "torn") == ref_losses  # exact by construction


def test_sigterm_saves_current_step_and_exits_distinctly(tmp_path, reference):
    ref_losses, _ = reference
    r = _run(tmp_path, "term", fault="sigterm_at_step:6", expect=EXIT_PREEMPTED)
    assert "SIGTERM: saved step 6" in r.stderr
    assert _committed(tmp_path / "term") == [4, 6]  # 6 is not a multiple of save_every=4
    r = _run(tmp_path, "term")
    assert "at step 6" in r.stdout
    assert _losses(tmp_path / "term") == ref_losses  # exact by construction


def test_changed_training_data_is_refused_on_resume_unless_allowed(tmp_path):
    """A local jsonl edited (or grown) between a run and its resume is a changed input:
    refused at start naming the file, unless --allow-config-change (then logged)."""
    from jalign.data import tasks
    data = tmp_path / "train.jsonl"
    records = tasks.sft_records("add", 48, 0, split="train")
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    bindings = (f"DataConfig.path='{data}'", "TrainConfig.eval_batches=0")
    _run(tmp_path, "edited", *bindings, "TrainConfig.steps=4")
    answer = records[5]["messages"][1]["content"]
    records[5]["messages"][1]["content"] = "0" * len(answer)  # an answer changed, same size
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    r = _run(tmp_path, "edited", *bindings, expect=2)
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "resuming step 4: the training data changed" in err
    assert f"{data} changed (content hash" in err and "same size" in err, err
    with open(data, "a") as f:  # 20 more lines
        f.write("".join(json.dumps(r) + "\n" for r in records[:20]))
    r = _run(tmp_path, "edited", *bindings, expect=2)
    assert "bytes)" in r.stderr and str(data) in r.stderr
    r = subprocess.run(_cmd(tmp_path, "edited", *bindings) + ["--allow-config-change"],
                       capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resume: data changed: {data} changed" in r.stdout
    assert max(_losses(tmp_path / "edited")) == 8


def test_a_full_disk_is_said_and_the_rerun_resumes_exactly(tmp_path, reference):
    """The final save fails as a full file system fails under orbax: one line (where, how
    much, which checkpoint is intact), exit 74, no traceback; rerun, it resumes there."""
    ref_losses, _ = reference
    r = _run(tmp_path, "full", fault="disk_full_at_save:8", expect=EXIT_DISK_FULL)
    err = r.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("jalign train: error: the disk is full: the checkpoint of step 8 "
                          f"could not be written to {tmp_path / 'full' / 'checkpoints'} (")
    assert "Checkpoint 4 is intact" in err and "a checkpoint of this run takes ~" in err
    r = _run(tmp_path, "full")
    assert "at step 4" in r.stdout
    assert _losses(tmp_path / "full") == ref_losses  # exact by construction


def test_a_busy_run_directory_and_ctrl_c(tmp_path):
    """While a run trains, a second `jalign train` on its run directory is refused at
    start, in one line naming the holder. Ctrl-C (from outside, mid-step) then finishes
    the step, saves it and exits 130; the same command continues from that step."""
    run_dir = tmp_path / "ext"
    proc = subprocess.Popen(_cmd(tmp_path, "ext", "TrainConfig.steps=100000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline and not (
            (run_dir / "metrics.jsonl").exists() and len(_losses(run_dir)) >= 2):
        time.sleep(0.05)
    second = _run(tmp_path, "ext", "OptimizerConfig.learning_rate=0.5", expect=2)
    err = second.stderr.strip()
    assert len(err.splitlines()) == 1 and f"in use by pid {proc.pid} on " in err, err
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert "Ctrl-C: finishing the step in flight" in err and "Traceback" not in err
    saved = _committed(run_dir)[-1]
    assert saved == max(_losses(run_dir)) and f"Ctrl-C: saved step {saved}" in err
    r = _run(tmp_path, "ext", f"TrainConfig.steps={saved + 1}")
    assert f"at step {saved}" in r.stdout and "taking it over" not in r.stdout


def test_nonfinite_abort_and_skip(tmp_path):
    r = _run(tmp_path, "nan_abort", fault="nan_at_step:6", expect=EXIT_NONFINITE)
    assert "non-finite loss" in r.stderr and "nan_policy='skip'" in r.stderr
    assert _committed(tmp_path / "nan_abort") == [4]  # nothing at or after step 6
    _run(tmp_path, "nan_skip", "TrainConfig.nan_policy='skip'", fault="nan_at_step:6")
    records = [json.loads(l) for l in (tmp_path / "nan_skip" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in records if r.get("skipped_nonfinite")]
    assert skipped == [6]
    assert _committed(tmp_path / "nan_skip") == [4, 8]


def test_bad_run_name_and_binding_are_clear_errors(tmp_path, capsys):
    """Both are refused before any device or compile: the command's own `main` (in this
    process) returns 2 with one line naming them."""
    from jalign.cli import main
    assert main(_cmd(tmp_path, "../escape")[3:]) == 2
    assert "invalid run name '../escape'" in capsys.readouterr().err
    assert main(_cmd(tmp_path, "x", "TrainConfig.stepz=3")[3:]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "stepz" in err, err


def _copy_run(reference, tmp_path, name):
    import shutil
    _, run_dir = reference
    shutil.copytree(run_dir, tmp_path / name)
    return tmp_path / name


def test_resume_refuses_a_changed_config_and_allows_safe_changes(tmp_path, reference):
    from tests.cli import assert_clean_error
    ref_losses, _ = reference
    run_dir = _copy_run(reference, tmp_path, "changed")
    r = subprocess.run(_cmd(tmp_path, "changed", "OptimizerConfig.learning_rate=1e-3",
                            "DataConfig.max_length=48", "TrainConfig.steps=9"),
                       capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    line = assert_clean_error(r, "resuming step 8 with a changed config",
                              "OptimizerConfig.learning_rate: 0.003 -> 0.001",
                              "DataConfig.max_length: 64 -> 48", "--allow-config-change")
    assert "TrainConfig.steps" not in line  # extending a run is not a change it refuses
    assert _committed(run_dir) == [4, 8]  # nothing was touched
    # Safe by nature: more steps, another logging cadence, no evaluation, full remat; said,
    # not refused, and applied (the step-9 checkpoint's model config has the new remat).
    r = _run(tmp_path, "changed", "TrainConfig.steps=9", "TrainConfig.log_every=3",
             "TrainConfig.eval_batches=0", "LlamaConfig.remat_policy='full'")
    assert "resume: changed TrainConfig.steps: 8 -> 9" in r.stdout
    assert "resume: changed TrainConfig.log_every: 1 -> 3" in r.stdout
    assert "resume: changed LlamaConfig.remat_policy: 'none' -> 'full'" in r.stdout
    assert sorted(_losses(run_dir)) == list(range(1, 10))
    from jalign.checkpoint import read_model_config
    assert read_model_config(run_dir, 9).remat_policy == "full"
    # A change the state cannot follow (another optimizer chain) is named as such, even
    # when allowed, instead of calling every checkpoint damaged.
    r = subprocess.run(_cmd(tmp_path, "changed", "TrainConfig.steps=9",
                            "OptimizerConfig.clip_norm=None") + ["--allow-config-change"],
                       capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    assert_clean_error(r, "holds other arrays than this run's state")
    assert not (run_dir / "damaged_checkpoints").exists()
    # An explicit override continues with the new value and says what changed.
    r = subprocess.run(_cmd(tmp_path, "changed", "TrainConfig.steps=10",
                            "OptimizerConfig.learning_rate=1e-3") + ["--allow-config-change"],
                       capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OptimizerConfig.learning_rate: 0.003 -> 0.001 (allowed by --allow-config-change)" in r.stdout
    assert _committed(run_dir)[-1] == 10


def _flip_bytes(step_dir: Path, item: str) -> Path:
    """Flip bytes in the middle of the largest array file of ``item`` (what a bad disk or
    a partial copy does); the array decodes, with different values."""
    files = [p for p in (step_dir / item).rglob("*") if p.is_file() and p.parent.name == "d"]
    target = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


def test_corrupted_checkpoint_resumes_from_the_newest_intact_step(tmp_path, reference):
    from tests.cli import assert_clean_error
    ref_losses, _ = reference
    run_dir = _copy_run(reference, tmp_path, "flipped")
    _flip_bytes(run_dir / "checkpoints" / "8", "params")
    r = _run(tmp_path, "flipped")
    assert "checkpoint step 8 skipped" in r.stdout and "'params'" in r.stdout
    assert "resumed" in r.stdout and "at step 4" in r.stdout
    assert _losses(run_dir) == ref_losses  # steps 5-8 retrained, bit-identical
    assert _committed(run_dir) == [4, 8]
    assert list((run_dir / "damaged_checkpoints").iterdir())  # kept, not deleted
    # When no step is intact, resume is refused with the item named.
    for step in (4, 8):
        _flip_bytes(run_dir / "checkpoints" / str(step), "train_state")
    r = subprocess.run(_cmd(tmp_path, "flipped"), capture_output=True, text=True, env=_env(),
                       cwd=ROOT, timeout=600)
    assert_clean_error(r, "no intact checkpoint", "'train_state'")


# The schedule over the run's own length (tiny_sft.gin pins it to 8 steps).
EPOCHS = ("DataConfig.num_epochs=2", "TrainConfig.steps=1000", "TrainConfig.save_every=1000",
          "OptimizerConfig.decay_steps=None")


def test_end_of_data_saves_evaluates_and_says_so(tmp_path):
    r = _run(tmp_path, "epochs", *EPOCHS)
    run_dir = tmp_path / "epochs"
    losses = _losses(run_dir)
    last = max(losses)
    assert 2 < last < 1000 and sorted(losses) == list(range(1, last + 1))
    assert f"data ended at step {last} of TrainConfig.steps=1000: 2 epochs of 48 examples" in r.stdout
    # The learning-rate schedule spans the steps the data allows, not 1000: by the last
    # step the cosine has decayed to its end (lr 3e-3 * end_lr_ratio 0.1).
    train = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["learning_rate"] for r in train if "loss" in r}
    assert lrs[last] < 3e-3 * 0.2
    assert _committed(run_dir) == [last]
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == last and "eval_loss" in records[-1]
    # Run again: nothing left to train; it resumes, trains nothing, and ends the same way.
    r = _run(tmp_path, "epochs", *EPOCHS)
    assert f"data ended at step {last}" in r.stdout and max(_losses(run_dir)) == last
