"""Write the checkpoints and exports of an older jalign, for tests/legacy/test_legacy.py.

    python tests/legacy/make_checkpoints.py [--commit COMMIT] [--out tests/legacy/v1]

Checks out COMMIT (default: the last commit before roles, fb957cc) with ``git archive``
into a temporary directory and runs *that* jalign (PYTHONPATH first, this venv's
packages) in a fresh OUT directory: tiny runs of every algorithm (SFT, RM, DPO in-step
and precomputed, IFT, PPO, LoRA and QLoRA SFT, LoRA PPO, an ``OptimizerConfig.trainable``
SFT), a converted model checkpoint, and HF and PEFT exports. Runs the tests resume are
trained to step 4 with checkpoints at 2 and 4 kept. Sources are relative paths (run from
OUT), so the tests use a copy of OUT as their working directory.

``manifest.json`` records the commit, the jax version, the XLA flags (the suite's) and the
CPU's vector extensions (a resumed run is compared bit for bit only where all of these
are the same: the same compiled programs), and for each checkpoint
what the old code loaded from it: the checksum of every parameter and the logits (or
scores) of a fixed input.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.cli import TEST_XLA_FLAGS  # noqa: E402 (the suite's flags: its programs compile alike)
DEFAULT_COMMIT = "fb957cc"  # the last commit before roles
TINY = ["LlamaConfig.hidden_size=32", "LlamaConfig.intermediate_size=64",
        "LlamaConfig.num_layers=1", "LlamaConfig.num_heads=2", "LlamaConfig.num_kv_heads=1",
        "LlamaConfig.tie_word_embeddings=True", "TrainConfig.keep=2",
        "TrainConfig.eval_batches=0", "DataConfig.bundled_size=32"]
TWO = ["TrainConfig.steps=2", "TrainConfig.save_every=2"]
FOUR = ["TrainConfig.steps=4", "TrainConfig.save_every=2"]  # resumed by the tests
LORA = ["LoraConfig.rank=2", "LoraConfig.alpha=4"]
PPO = ["PPOConfig.epochs=1", "PPOConfig.minibatches=2", "PPOConfig.max_new_tokens=4",
       "DataConfig.batch_size=4"]
GIN = "tests/train/tiny_{}.gin"

# name -> (gin file kind, bindings); in order (later runs start from earlier ones).
RUNS = {
    "sft": ("sft", FOUR),
    "rm": ("rm", TWO + ["ModelInit.source='jalign:runs/sft'", "ModelInit.step=2"]),
    "dpo": ("dpo", FOUR + ["ModelInit.source='jalign:runs/sft'"]),
    "dpo_pre": ("dpo", TWO + ["ModelInit.source='jalign:runs/sft'",
                              "DPOConfig.reference='precomputed'"]),
    "ift": ("ift", TWO + ["ModelInit.source='jalign:runs/sft'"]),
    "ppo": ("ppo", FOUR + PPO + ["ModelInit.source='jalign:runs/sft'"]),
    "trainable": ("sft", TWO + ["OptimizerConfig.trainable='layers/w(q|o)$'"]),
    "lora": ("sft", FOUR + LORA + ["ModelInit.source='hf:base_hf'"]),
    "qlora": ("sft", TWO + LORA + ["ModelInit.source='hf:base_hf'",
                                   "LoraConfig.quantize='nf4'", "LoraConfig.block_size=16"]),
    "ppo_lora": ("ppo", FOUR + PPO + LORA + ["ModelInit.source='jalign:runs/sft'"]),
}
RESUMED = ("sft", "dpo", "ppo", "lora", "ppo_lora")

# Run by the old code: what it loads from each checkpoint (printed as JSON).
EXPECTED = r'''
import json, sys
import jax, numpy as np
from jalign import checksum
from jalign.checkpoint import read_model_kind
from jalign.train.setup import load_run_model
from jalign.train.state import params_of
ids = np.arange(3, 19, dtype=np.int32).reshape(2, 8) * 7 % 500 + 3
out = {}
for name in sys.argv[1:]:
    path = name if name == "model" else f"runs/{name}"
    kind = read_model_kind(path)
    want = "causal_lm" if kind == "policy_value" else None
    config, model = load_run_model(path, model_kind=want)
    if kind == "scalar_head":
        values = model.sequence_scores(ids, np.ones_like(ids))
    else:
        values = model(ids)[:, :, :16]
    out[name] = {"kind": kind, "checksums": checksum.checksums(params_of(model)),
                 "values": np.asarray(values, np.float64).tolist()}
print(json.dumps(out))
'''


def _cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx", "fma", "sse", "amx")))


def _env(old: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(old), JALIGN_KEEP_MALLOC="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env["XLA_FLAGS"] = TEST_XLA_FLAGS  # one CPU device, as a user's run
    return env


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    print("+", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-3000:]}\n"
                         f"{r.stderr[-3000:]}")
    return r.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commit", default=DEFAULT_COMMIT)
    ap.add_argument("--out", default=str(ROOT / "tests" / "legacy" / "v1"))
    args = ap.parse_args()
    out = Path(args.out).resolve()
    commit = subprocess.run(["git", "rev-parse", args.commit], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "jalign"
        old.mkdir()
        archive = subprocess.run(["git", "archive", commit], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        env = _env(old)
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        cli = [sys.executable, "-m", "jalign.cli"]
        _generate(cli, old, out, env)
        expected = json.loads(_run([sys.executable, "-c", EXPECTED, "model", *RUNS], out, env)
                              .strip().splitlines()[-1])
        jax_version = _run([sys.executable, "-c", "import jax; print(jax.__version__)"], out,
                           env).strip()
    for junk in (*out.glob("runs/*/tensorboard"), *out.glob("runs/*/loss_curve.png")):
        shutil.rmtree(junk) if junk.is_dir() else junk.unlink()
    manifest = {"commit": commit, "jax": jax_version, "cpu": _cpu_flags(),
                "xla_flags": TEST_XLA_FLAGS,
                "tiny": TINY, "runs": {n: {"gin": GIN.format(kind), "bindings": b}
                                       for n, (kind, b) in RUNS.items()},
                "resumed": list(RESUMED), "expected": expected}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB)")
    return 0


def _generate(cli: list[str], old: Path, out: Path, env: dict) -> None:
    def train(name, kind, bindings):
        gins = [str(old / GIN.format(kind))]
        flags = [f for b in [*TINY, f"TrainConfig.run_name='{name}'", *bindings]
                 for f in ("--gin", b)]
        _run([*cli, "train", *gins, *flags], out, env)

    train("sft", *RUNS["sft"])
    # A Hugging Face base for the LoRA runs (and PEFT's base), and a converted checkpoint.
    _run([*cli, "convert", "jalign-to-hf", "runs/sft", "base_hf", "--step", "2"], out, env)
    _run([*cli, "convert", "hf-to-jalign", "base_hf", "model"], out, env)
    for name, (kind, bindings) in RUNS.items():
        if name != "sft":
            train(name, kind, bindings)
    _run([*cli, "convert", "jalign-to-hf", "runs/sft", "export_hf"], out, env)
    _run([*cli, "convert", "jalign-to-hf", "runs/rm", "export_rm_hf"], out, env)
    _run([*cli, "convert", "jalign-to-peft", "runs/lora", "export_peft"], out, env)


if __name__ == "__main__":
    sys.exit(main())
