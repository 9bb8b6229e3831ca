"""launch/local.sh restarts a preempted run, which then resumes and finishes."""

import json
import subprocess
import sys
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
