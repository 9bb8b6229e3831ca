"""Compile time of the SFT benchmark step against depth: scanned layers vs unrolled.

The benchmark model's shape (benchmarks/train_step.py: hidden 512, intermediate 1408, 8 heads,
vocab 8192; 4 x 512 tokens) at several depths, the step built as the SFT worker builds it
and compiled ahead of time with the persistent compilation cache off; one line per depth.

    python benchmarks/compile_depth.py [--scan 4,8,16,32] [--unrolled 4,8,16]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_step_impls"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scan", default="4,8,16,32", help="depths with scanned layers")
    ap.add_argument("--unrolled", default="4,8,16", help="depths with unrolled layers")
    a = ap.parse_args()
    import jax
    jax.config.update("jax_enable_compilation_cache", False)
    from common import SHAPE
    from jalign_worker import build
    print("| layers | scanned compile s | unrolled compile s |\n|---:|---:|---:|")
    depths = sorted({int(x) for x in (a.scan + "," + a.unrolled).split(",") if x})
    for depth in depths:
        row = []
        for scan, wanted in ((True, a.scan), (False, a.unrolled)):
            if str(depth) not in wanted.split(","):
                row.append("")
                continue
            args = types.SimpleNamespace(**dict(SHAPE, layers=depth), max_steps=100)
            b = build(args, scan)
            t0 = time.perf_counter()
            b.step.lower(b.state, b.batch).compile()
            row.append(f"{time.perf_counter() - t0:.2f}")
            del b
        print(f"| {depth} | {row[0]} | {row[1]} |", flush=True)


if __name__ == "__main__":
    main()
