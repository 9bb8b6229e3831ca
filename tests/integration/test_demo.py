"""`jalign demo` end to end with all three stages (SFT -> RM and DPO from it), shrunk to a
few steps: every stage trains, evaluates and exports, and the later stages start from
the SFT run."""

import json
import re

from jalign.cli import main

SHRINK = ["TrainConfig.steps=2", "TrainConfig.save_every=2", "TrainConfig.eval_every=0",
          "TrainConfig.eval_batches=1", "TrainConfig.progress=False",
          "DataConfig.bundled_size=64", "eval/DataConfig.bundled_size=32",
          "LlamaConfig.hidden_size=64", "LlamaConfig.intermediate_size=128",
          "LlamaConfig.num_layers=1", "LlamaConfig.num_heads=4", "LlamaConfig.num_kv_heads=2"]


def test_demo_runs_all_stages(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the demo writes runs/ under the working directory
    args = ["demo", "--fresh"] + sum((["--gin", b] for b in SHRINK), [])
    assert main(args) == 0
    out = capsys.readouterr().out
    values = {}
    for line in out.splitlines():
        if line.startswith("| ") and line.count("|") == 3:
            name, value = line[2:-2].split(" | ")
            values[name] = value
    for name in ("SFT: exact-match accuracy after", "RM: held-out pairwise accuracy",
                 "DPO: exact-match accuracy after", "DPO: held-out reward accuracy"):
        percent = float(values[name].split("%")[0])  # a number, never 'nan'
        assert 0.0 <= percent <= 100.0, (name, values[name])
    runs = tmp_path / "runs" / "demo"
    rm_cfg = json.loads((runs / "rm_add" / "hf" / "config.json").read_text())
    assert rm_cfg["architectures"] == ["LlamaForSequenceClassification"]
    assert (runs / "dpo_add" / "hf" / "config.json").exists()
    operative = re.sub(r"\\\n\s*", "", (runs / "dpo_add" / "operative_config.gin").read_text())
    assert f"ModelInit.source = 'jalign:{runs / 'sft_add'}'" in operative  # gin wraps lines
