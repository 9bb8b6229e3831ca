"""Peak host memory of an SFT train step: full fine-tuning vs LoRA vs QLoRA (int8, NF4), in
jalign and in TRL + PEFT, at two shapes.

  sft   the train-step benchmark's shape (benchmarks/train_step.py): vocab 8192, hidden
        512, intermediate 1408, 8 layers, 8/8 heads, untied; batch 4 x 512 tokens
  1b    Llama 3.2 1B's shape (vocab 128256, hidden 2048, intermediate 8192, 16 layers,
        32/8 heads of 64, tied embeddings; 1.24B parameters), small batch: 1 x 256 tokens

Every row is a fresh process (benchmarks/lora_memory_impls/*) that reads the same random
model from a Hugging Face checkpoint (written once per shape into --cache-dir by jalign's
exporter; jalign's quantised rows quantise each projection as it is read), runs --steps
AdamW steps (float32, lr 1e-4, no clipping) and reports its resident memory
just before the steps (state, compiled program, runtime), the peak during the steps
(VmHWM, reset before them through /proc/self/clear_refs) and the process's peak (building
the model included). jalign's layers run under ``lax.scan`` (LlamaConfig's default;
``--unrolled`` for the Python loop, which holds a copy of every layer's weights during the
step on XLA:CPU). LoRA: rank 16, alpha 32, every attention and MLP projection; QLoRA: the
frozen projections as int8 or NF4 codes with a float32 scale per 64 inputs (embeddings
and the LM head stay float32, as in QLoRA). jalign rows also give the compiled step's
memory analysis (arguments + scratch); a row whose full state would not fit this machine
is compiled for its shapes only ("abstract": no arrays, analysis only). TRL runs with
gradient checkpointing off, like jalign (TRL's configs default to on).

    python benchmarks/lora_memory.py                # both shapes (about 15 minutes)
    python benchmarks/lora_memory.py --shapes sft

TRL's venv: see benchmarks/train_step.py, plus ``pip install peft==0.21.2`` in it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPLS = Path(__file__).resolve().parent / "lora_memory_impls"
SHAPES = {
    "sft": dict(vocab=8192, hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=8,
                batch=4, seq=512),
    "1b": dict(vocab=128256, hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8,
               head_dim=64, batch=1, seq=256),
}
TIED = {"sft": False, "1b": True}
# Rows: (implementation, mode, shapes where the state is built; elsewhere abstract/skipped)
JALIGN_MODES = ("full", "lora", "int8", "nf4")
TRL_MODES = ("full", "lora")
# 1.24B float32 parameters + gradients + two Adam moments = 20 GB: more than this box has.
TOO_BIG = {("jalign", "full", "1b"), ("TRL + PEFT", "full", "1b")}


def _trl_python() -> str:
    venvs = Path(os.environ.get("JALIGN_BENCH_VENVS", Path.home() / ".cache/jalign/bench-venvs"))
    return os.environ.get("JALIGN_BENCH_TRL_PYTHON", str(venvs / "trl" / "bin" / "python"))


def _run(cmd: list[str]) -> dict:
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    for line in r.stdout.splitlines():
        if line.startswith("@@"):
            return json.loads(line[2:])
    tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": f"exit {r.returncode}: {tail[0][:160]}"}


def _args(shape: str, steps: int, hf: Path) -> list[str]:
    out = [f"--{k.replace('_', '-')}={v}" for k, v in SHAPES[shape].items()]
    out += [f"--steps={steps}", f"--hf={hf}"]
    return out + (["--tied"] if TIED[shape] else [])


def _hf_checkpoint(shape: str, cache: Path) -> Path:
    """A random model of ``shape`` as a transformers checkpoint (made once, then reused)."""
    path = cache / f"random_{shape}"
    if (path / "config.json").exists():
        return path
    s = SHAPES[shape]
    code = (
        "from jalign.convert.hf import save_hf\n"
        "from jalign.models.build import create_model\n"
        "from jalign.models.config import LlamaConfig\n"
        f"c = LlamaConfig(vocab_size={s['vocab']}, hidden_size={s['hidden']}, "
        f"intermediate_size={s['intermediate']}, num_layers={s['layers']}, "
        f"num_heads={s['heads']}, num_kv_heads={s['kv_heads']}, head_dim={s.get('head_dim')}, "
        f"tie_word_embeddings={TIED[shape]}, max_position_embeddings=4096)\n"
        f"save_hf(c, create_model(c), {str(path)!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    return path


def _gib(n) -> str:
    return "—" if n is None else f"{n / 2**30:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--unrolled", action="store_true", help="jalign: unrolled layers")
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get(
        "JALIGN_BENCH_CACHE", Path.home() / ".cache" / "jalign" / "lora-memory")))
    args = ap.parse_args()
    rows = []
    for shape in args.shapes:
        hf = _hf_checkpoint(shape, args.cache_dir)
        for mode in JALIGN_MODES:
            abstract = ("jalign", mode, shape) in TOO_BIG
            cmd = [sys.executable, str(IMPLS / "jalign_worker.py"), f"--mode={mode}",
                   *_args(shape, args.steps, hf)] + (["--abstract"] if abstract else []) + (
                   [] if args.unrolled else ["--scan"])
            rows.append(("jalign", shape, mode, abstract, _run(cmd)))
            print(f"jalign {shape} {mode}: {rows[-1][-1].get('error', 'done')}", flush=True)
        python = _trl_python()
        for mode in TRL_MODES:
            if ("TRL + PEFT", mode, shape) in TOO_BIG:
                rows.append(("TRL + PEFT", shape, mode, False,
                             {"error": "not run: its state would not fit this machine"}))
                continue
            if not Path(python).exists():
                result = {"error": f"not run: no TRL venv at {python}"}
            else:
                result = _run([python, str(IMPLS / "trl_peft_worker.py"), f"--mode={mode}",
                               *_args(shape, args.steps, hf)])
            rows.append(("TRL + PEFT", shape, mode, False, result))
            print(f"TRL {shape} {mode}: {result.get('error', 'done')}", flush=True)
    print("\n| shape | implementation | mode | trained params | state: trained + optimizer + "
          "frozen base (GiB) | compiled step: arguments + scratch (GiB) | resident before the "
          "steps (GiB) | peak during the steps (GiB) | peak of the process (GiB) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for impl, shape, mode, abstract, r in rows:
        if "error" in r:
            print(f"| {shape} | {impl} | {mode} | {r['error']} | | | | | |")
            continue
        state = r.get("state_bytes")
        state_txt = ("—" if state is None else
                     f"{_gib(state['trained'])} + {_gib(state['optimizer'])} + "
                     f"{_gib(state['base'])}")
        a = r.get("analysis")
        comp = "—" if a is None else (f"{_gib(a['argument_size_in_bytes'])} + "
                                      f"{_gib(a['temp_size_in_bytes'])}")
        if abstract:
            measured = "abstract (compiled only) | — | —"
        else:
            measured = (f"{_gib(r.get('rss_state'))} | {_gib(r.get('rss_steps_peak'))} | "
                        f"{_gib(r['rss_peak'])}")
        print(f"| {shape} | {impl} | {mode} | {r['trained_params'] / 1e6:.2f}M | {state_txt} | "
              f"{comp} | {measured} |")
    if args.json:
        args.json.write_text(json.dumps([dict(r, impl=i, shape=s, mode=m, abstract=a)
                                         for i, s, m, a, r in rows], indent=2) + "\n")


if __name__ == "__main__":
    main()
