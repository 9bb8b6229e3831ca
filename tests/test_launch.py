"""launch/local.sh restarts a preempted run, which then resumes and finishes."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from tests.cli import env as cli_env

ROOT = Path(__file__).resolve().parents[1]


def test_local_launcher_restarts_after_preemption(tmp_path):
    jalign = Path(sys.executable).parent / "jalign"
    assert jalign.exists(), f"{jalign} missing: pip install -e '.[test]'"
    env = cli_env(JALIGN=str(jalign), JALIGN_FAULT="sigterm_at_step:3")
    r = subprocess.run([str(ROOT / "launch" / "local.sh"), "tests/train/tiny_sft.gin",
                        "--gin", f"TrainConfig.output_root='{tmp_path}'",
                        "--gin", "TrainConfig.run_name='launched'", "--gin", "TrainConfig.steps=5"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "restart 1/100" in r.stderr
    steps = [json.loads(l)["step"] for l in (tmp_path / "launched" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(l)]
    assert steps == [1, 2, 3, 4, 5]


FAKE_RUN = r'''
import os, signal, sys, time
d = os.environ["FAKE_DIR"]
signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))  # as jalign: save, exit 75
open(os.path.join(d, "started"), "a").write("1")
time.sleep(20); sys.exit(3)
'''


def test_local_launcher_stops_with_the_runs_code_on_sigterm(tmp_path):
    """SIGTERM to the launcher reaches the run; the launcher exits with the run's 75 and does
    not restart it, even when the run is gone before the launcher looks (a slow shell)."""
    fake = tmp_path / "jalign"
    fake.write_text(f"#!{sys.executable}\n{FAKE_RUN}")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "slow_kill.sh").write_text(
        'kill() { builtin kill "$@"; local rc=$?; sleep 0.5; return $rc; }\n')
    env = {**os.environ, "JALIGN": str(fake), "FAKE_DIR": str(tmp_path),
           "BASH_ENV": str(tmp_path / "slow_kill.sh")}
    p = subprocess.Popen(["bash", str(ROOT / "launch" / "local.sh"), "x.gin"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "started").exists():
        assert time.monotonic() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 75, err
    assert (tmp_path / "started").read_text() == "1", "the run was restarted after SIGTERM"
