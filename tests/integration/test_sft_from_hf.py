"""SFT from a Hugging Face checkpoint, then export, reload in transformers, generate, eval."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

from jalign.cli import main
from tests.cli import env
from tests.hf_models import IMPORT_MAX_DLOGIT, save_hf_model
from tests.numerics import assert_f32_close, llama_logits_bound

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "tests" / "train" / "tiny_sft.gin")


def _jalign(*args, expect=0):
    r = subprocess.run([sys.executable, "-m", "jalign.cli", *map(str, args)], capture_output=True,
                       text=True, env=env(), cwd=ROOT, timeout=600)
    assert r.returncode == expect, f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def test_sft_from_hf_then_export_generate_eval(tmp_path, capsys):
    hf_src = tmp_path / "hf_src"
    save_hf_model("llama3_2", hf_src, vocab_size=512, bos_token_id=1, eos_token_id=2,
                  tokenizer=True)
    r = _jalign("train", CONFIG, "--gin", f"TrainConfig.output_root='{tmp_path}'",
            "--gin", "TrainConfig.run_name='from_hf'", "--gin", f"ModelInit.source='hf:{hf_src}'",
            "--gin", "TrainConfig.steps=3", "--gin", "TrainConfig.save_every=3")
    run_dir = tmp_path / "from_hf"
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # The operative config, printed and saved, describes the model trained (the HF
    # checkpoint's 48-wide layers), not the gin file's 64-wide one it never built.
    operative = (run_dir / "operative_config.gin").read_text()
    shown = r.stdout[r.stdout.index("operative config:"):]
    for text in (operative, shown):
        assert "LlamaConfig.hidden_size = 48" in text and "hidden_size = 64" not in text
        assert f"as read from hf:{hf_src}" in text
    # The tokenizer it trained with (the checkpoint's own) is kept with the run.
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file()
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]

    # The trained model changed, and exports to a directory transformers loads cleanly.
    # (The commands after `jalign train` run in-process: the same CLI code, without
    # starting Python and JAX again for each.)
    assert main(["convert", "jalign-to-hf", str(run_dir), str(tmp_path / "hf_out")]) == 0
    trained, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf_out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    src = transformers.AutoModelForCausalLM.from_pretrained(hf_src)
    assert trained.config.tie_word_embeddings and trained.config.num_key_value_heads == 2
    delta = (trained.model.layers[0].mlp.up_proj.weight - src.model.layers[0].mlp.up_proj.weight)
    assert float(delta.abs().max()) > 0

    # jalign's logits of the checkpoint == transformers' logits of the export.
    from jalign.sources import load_checkpoint as load_model
    from jalign.models.build import forward
    _, model = load_model(run_dir)
    ids = np.random.default_rng(0).integers(0, 512, (1, 20)).astype(np.int32)
    with torch.no_grad():
        ref = trained(torch.as_tensor(ids)).logits.numpy()
    out = np.asarray(forward(model, ids))
    # Two float32 programs for one forward: the logits chain's bound, then README's parity
    # requirement (tighter than that bound; see tests.hf_models).
    assert_f32_close(out, ref, **llama_logits_bound(model, 20))
    assert np.abs(out - ref).max() <= IMPORT_MAX_DLOGIT

    capsys.readouterr()
    assert main(["generate", str(run_dir), "--prompt", "What is 2 + 2?",
                 "--max-new-tokens", "4"]) == 0
    assert "> What is 2 + 2?" in capsys.readouterr().out
    assert main(["eval", str(run_dir), "--task", "add", "--n", "16", "--data", "bundled:add",
                 "--max-length", "64", "--max-batches", "2"]) == 0
    stdout = capsys.readouterr().out
    out = json.loads(stdout[stdout.index("{"):])
    assert out["task"]["total"] == 16 and 0.0 <= out["task"]["accuracy"] <= 1.0
    assert out["data"]["loss"] > 0 and out["data"]["batches"] == 2
    # A held-out file is the eval data, with `jalign eval`'s default --split.
    samples = ROOT / "jalign" / "assets" / "samples" / "messages.jsonl"
    assert main(["eval", str(run_dir), "--data", str(samples), "--max-length", "64"]) == 2
    assert "no complete batch of batch_size=8" in capsys.readouterr().err  # not a loss of 0
    assert main(["eval", str(run_dir), "--data", str(samples), "--max-length", "64",
                 "--batch-size", "2"]) == 0
    stdout = capsys.readouterr().out
    out = json.loads(stdout[stdout.index("{"):])
    assert out["data"]["tokens"] > 0
