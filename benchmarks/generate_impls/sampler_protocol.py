"""Shared by the sampler workers (jalign, transformers, Tunix; each in its own process and
virtual environment, so standard library + numpy only): their arguments and their side
of the benchmark harness's protocol (train_step_impls/common.py ``serve``).

A worker loads the driver's exported weights (``--hf-dir``) and its left-padded prompts
(``--prompts``, a .npy of ids [batch, width], pad ``--pad``), makes ``call(seed)``: one
sampler call of ``--mode`` (greedy, or sampled at temperature 1 with no top-k/top-p) that
generates ``--new`` tokens per row with EOS disabled and returns them once computed, and
hands it to ``serve_sampler``. The first call (seed 0; compile included) is timed on its
own and its tokens go to the driver with ``ready`` (for the greedy agreement check); then
``--warmup`` more calls, then one timed call per step the driver asks for, each with the
next seed.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                "train_step_impls"))
from common import serve  # noqa: E402

NO_EOS = -1  # an id no token takes


def sampler_args(extra=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf-dir", required=True, help="HF Llama checkpoint (safetensors)")
    ap.add_argument("--prompts", required=True, help=".npy of left-padded prompt ids")
    ap.add_argument("--pad", type=int, default=0)
    ap.add_argument("--new", type=int, required=True)
    ap.add_argument("--mode", choices=("greedy", "sampled"), required=True)
    ap.add_argument("--warmup", type=int, default=1, help="calls after the first")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    if extra:
        extra(ap)
    return ap.parse_args()


def serve_sampler(call, info: dict, warmup: int, extra_info=None) -> None:
    """``extra_info()``: more info, known after the first call."""
    import numpy as np
    t0 = time.perf_counter()
    first = np.asarray(call(0))
    info = dict(info, first_call_s=time.perf_counter() - t0, tokens=first.tolist(),
                **(extra_info() if extra_info else {}))
    seeds = itertools.count(1)
    serve(lambda: call(next(seeds)), warmup, info)
