"""Shared by every train-step worker: the benchmark shape and the driver protocol.

Standard library only: it is imported by workers running in different virtual
environments (jalign's, the TRL one, the Tunix one).

Protocol. A worker builds its model and optimizer, runs ``warmup`` steps (compile,
allocator warm-up), then sends ``ready`` and waits for commands on stdin:
``run K`` runs K more steps and answers ``times`` (seconds per step, wall clock);
``exit`` ends the process. Messages go to the worker's *original* stdout as one JSON
line each, prefixed ``@@``; everything libraries print is sent to stderr instead (the
driver keeps it in a log file), so a progress bar can never corrupt the protocol.
Keeping workers alive between rounds lets the driver alternate implementations
(A, B, C, A, B, C, ...) without paying each one's start-up and compile every round.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

# Benchmark shape (overridable from the command line; the driver passes its own).
SHAPE = dict(vocab=8192, hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=8,
             batch=4, seq=512)
# AdamW hyper-parameters used by every implementation (no clipping, no decay, constant lr).
ADAMW = dict(lr=1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0)


def worker_args(extra=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    for k, v in SHAPE.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=v)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=1000,
                    help="upper bound on steps (trainer loops need it up front)")
    if extra:
        extra(ap)
    return ap.parse_args()


def batch_ids(batch: int, seq: int, vocab: int, seed: int = 0):
    """The same random token ids for every implementation (numpy, int64)."""
    import numpy as np
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq), dtype=np.int64)


# DPO benchmark: each of the ``batch`` pairs is one prompt of DPO_PROMPT tokens followed by
# a chosen or a rejected response of ``seq - DPO_PROMPT`` tokens (so every sequence is
# ``seq`` long); sigmoid loss with this beta; frozen reference = the initial policy.
DPO_PROMPT = 128
DPO_BETA = 0.1
EOS_ID = 2  # the toy tokenizer's EOS (trl_worker.toy_tokenizer)


def pair_ids(pairs: int, prompt: int, seq: int, vocab: int, seed: int = 0):
    """The same random preference pairs for every implementation: (prompt [pairs, prompt],
    chosen [pairs, seq - prompt], rejected [pairs, seq - prompt]) numpy int64 ids. Both
    responses end in EOS_ID (TRL appends an EOS to a response that lacks one; this way it
    appends nothing and every implementation sees the same ids); otherwise chosen and
    rejected differ everywhere they happen to be drawn differently."""
    import numpy as np
    rng = np.random.default_rng(seed)
    response = seq - prompt
    if not 0 < prompt < seq:
        raise ValueError(f"prompt length {prompt} must be in (0, seq={seq})")
    p = rng.integers(0, vocab, size=(pairs, prompt), dtype=np.int64)
    c = rng.integers(0, vocab, size=(pairs, response), dtype=np.int64)
    r = rng.integers(0, vocab, size=(pairs, response), dtype=np.int64)
    c[:, -1] = EOS_ID
    r[:, -1] = EOS_ID
    return p, c, r


# GRPO benchmark (benchmarks/grpo_iteration.py): one iteration = sample GRPO_GROUP
# completions of GRPO_COMPLETION tokens for each of GRPO_PROMPTS prompts of GRPO_PROMPT
# random words, score them with ``even_word_reward``, compute group advantages (group
# mean and std), one AdamW update on the GRPO_PROMPTS x GRPO_GROUP rows (token-level
# "dapo" loss, clip 0.2, beta 0: no reference model). Prompts are text of the toy word
# tokenizer (trl_worker.toy_tokenizer(split_words=True)): word i is token i.
GRPO_PROMPTS = 4
GRPO_GROUP = 8
GRPO_PROMPT = 64
GRPO_COMPLETION = 128
GRPO_CLIP = 0.2


def grpo_args(ap) -> None:
    """The GRPO workers' extra options (``worker_args(grpo_args)``)."""
    ap.add_argument("--prompts", type=int, default=GRPO_PROMPTS)
    ap.add_argument("--group", type=int, default=GRPO_GROUP)
    ap.add_argument("--prompt-len", type=int, default=GRPO_PROMPT)
    ap.add_argument("--completion", type=int, default=GRPO_COMPLETION)


def grpo_prompt_texts(count: int, length: int, vocab: int, seed: int = 0) -> list[str]:
    """``count`` prompts of ``length`` words (token ids >= 4: no special token), the same
    for every implementation."""
    import numpy as np
    ids = np.random.default_rng(seed).integers(4, vocab, size=(count, length))
    return [" ".join(f"t{i}" for i in row) for row in ids]


def even_word_reward(completions) -> list[float]:
    """The benchmark's reward: the fraction of a completion's words that are even-numbered
    tokens ("t6" yes, "t7" no; special tokens are skipped by the decoders). Cheap and
    different across the completions of a group, so advantages are not all zero."""
    out = []
    for text in completions:
        words = [w for w in text.split() if w[:1] == "t" and w[1:].isdigit()]
        out.append(sum(int(w[1:]) % 2 == 0 for w in words) / len(words) if words else 0.0)
    return out


def even_word_reward_fn(prompts, completions, **fields) -> list[float]:
    """``even_word_reward`` with the signature of a jalign user reward function."""
    return even_word_reward(completions)


def grpo_flops(vocab, hidden, intermediate, layers, heads, kv_heads, rows, prompt, completion,
               head_dim=None) -> dict:
    """Matmul FLOPs of the update of one GRPO iteration: fwd + bwd over ``rows`` sequences of
    prompt + completion tokens (``flops_per_step``). Sampling and scoring are not counted:
    their cost depends on how each implementation decodes (KV cache, shared prefill)."""
    return flops_per_step(vocab, hidden, intermediate, layers, heads, kv_heads, rows,
                          prompt + completion, head_dim)


class Channel:
    """The worker's side of the protocol."""

    def __init__(self):
        self._out = os.fdopen(os.dup(1), "w", buffering=1)
        sys.stdout.flush()
        os.dup2(2, 1)  # from now on, library prints land in stderr

    def send(self, event: str, **fields):
        self._out.write("@@" + json.dumps({"event": event, **fields}) + "\n")
        self._out.flush()

    def recv(self) -> tuple[str, int]:
        line = sys.stdin.readline()
        if not line:
            return "exit", 0
        parts = line.split()
        return parts[0], int(parts[1]) if len(parts) > 1 else 0

    def exit(self):
        self._out.flush()
        sys.stderr.flush()
        os._exit(0)


HZ = os.sysconf("SC_CLK_TCK")


def cpu_busy() -> int:
    """Busy jiffies of the whole machine (all cores) since boot."""
    f = open("/proc/stat").read().split("\n", 1)[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return user + nice + system + irq + softirq + steal


def proc_cpu(pid: int) -> int:
    """CPU jiffies (user + system, all threads) used by one process so far."""
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return int(f[11]) + int(f[12])
    except (OSError, IndexError, ValueError):
        return 0


def wait_quiet(below: float, limit: float) -> float:
    """Wait (at most ``limit`` s) until other processes use less than ``below`` cores
    over a 1 s window (call it while this process is idle, so that all load is someone
    else's). Returns the seconds waited."""
    start = time.perf_counter()
    while limit > 0:
        b0 = cpu_busy()
        time.sleep(1.0)
        if (cpu_busy() - b0) / HZ < below or time.perf_counter() - start >= limit:
            break
    return time.perf_counter() - start


def minor_faults() -> int:
    """Minor page faults of this process so far (a fresh page from the OS costs one)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def serve(step, warmup: int, info: dict):
    """Drive a loop we own: ``step()`` runs one full step and returns after the device
    finished it (optionally returning ``{phase: seconds}``, sent along with the times)."""
    chan = Channel()
    t0 = time.perf_counter()
    warm = []
    for _ in range(warmup):
        s = time.perf_counter()
        step()
        warm.append(time.perf_counter() - s)
    info = dict(info, warmup_times=warm, warmup_total_s=time.perf_counter() - t0)
    chan.send("ready", info=info)
    while True:
        cmd, k = chan.recv()
        if cmd != "run":
            chan.exit()
        times, faults, phases = [], [], []
        for _ in range(k):
            f, s = minor_faults(), time.perf_counter()
            parts = step()
            times.append(time.perf_counter() - s)
            faults.append(minor_faults() - f)
            phases.append(parts if isinstance(parts, dict) else {})
        chan.send("times", times=times, faults=faults, phases=phases)


class Gate:
    """Drive a loop someone else owns (a Trainer): call ``begin()`` when a step starts
    and ``end()`` when it has finished; the gate reports to the driver and blocks for the
    next command at the right moments. ``phases`` (a dict) may be filled during a step with
    seconds per phase; it is sent with the step's time and cleared by ``begin()``."""

    def __init__(self, warmup: int, info: dict):
        self.chan = Channel()
        self.warmup = warmup
        self.info = info
        self.done = 0          # steps finished
        self.pending = None    # steps left in the current "run K" (None: warming up)
        self.times = []
        self.faults = []
        self.warm = []
        self.phases = {}
        self._phases = []
        self._t = None
        self._f = 0
        self._t_start = time.perf_counter()

    def begin(self):
        self.phases = {}
        self._f = minor_faults()
        self._t = time.perf_counter()

    def timed(self, name: str, fn, after=None):
        """``fn`` wrapped to add its seconds to phase ``name`` (and pass its result to
        ``after``): for timing the phases of a trainer's own methods."""
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0
            if after:
                after(out)
            return out
        return wrapper

    def end(self):
        dt = time.perf_counter() - self._t
        df = minor_faults() - self._f
        self.done += 1
        if self.pending is None:
            self.warm.append(dt)
            if self.done < self.warmup:
                return
            info = dict(self.info, warmup_times=self.warm,
                        warmup_total_s=time.perf_counter() - self._t_start)
            self.chan.send("ready", info=info)
        else:
            self.times.append(dt)
            self.faults.append(df)
            self._phases.append(dict(self.phases))
            self.pending -= 1
            if self.pending > 0:
                return
            self.chan.send("times", times=self.times, faults=self.faults, phases=self._phases)
        self._wait()

    def _wait(self):
        cmd, k = self.chan.recv()
        if cmd != "run" or k <= 0:
            self.chan.exit()
        self.pending, self.times, self.faults, self._phases = k, [], [], []


def flops_per_step(vocab, hidden, intermediate, layers, heads, kv_heads, batch, seq,
                   head_dim=None) -> dict:
    """Matmul FLOPs of one SFT step (forward + backward = 3x forward).

    6 * N * tokens with N the parameters that take part in matmuls (q/k/v/o, the MLP, the
    LM head; not the embedding lookup, not the norms), plus attention's two batched
    matmuls (QK^T and PV) computed over the full T x T score matrix, as all four
    implementations do (the causal mask is applied to a dense matrix).
    """
    hd = head_dim or hidden // heads
    n_layer = hidden * hd * (heads + 2 * kv_heads) + heads * hd * hidden + 3 * hidden * intermediate
    n_matmul = layers * n_layer + hidden * vocab
    tokens = batch * seq
    dense = 6 * n_matmul * tokens
    attn = 3 * layers * 2 * (2 * batch * heads * seq * seq * hd)
    return dict(n_matmul_params=n_matmul, tokens=tokens, dense=dense, attention=attn,
                total=dense + attn)


def ift_flops_per_step(sft: dict) -> dict:
    """Matmul FLOPs of one IFT step: the SFT step's (``flops_per_step``) plus pass 1, a
    forward over the same tokens without gradient (a third of the SFT step)."""
    return dict(sft, sft=sft["total"], extra_forward=sft["total"] / 3,
                total=sft["total"] * 4 / 3)


def dpo_flops_per_step(vocab, hidden, intermediate, layers, heads, kv_heads, pairs, seq,
                       head_dim=None) -> dict:
    """Matmul FLOPs of one DPO step with an in-step reference: the policy's forward +
    backward over the 2 * pairs sequences (chosen and rejected; ``flops_per_step`` with
    batch 2 * pairs) plus the frozen reference's forward over the same sequences (a third
    of that: forward only). Like the SFT count, the LM head is counted on every position,
    prompt included: jalign computes it there; TRL's fused head and Tunix project only the
    positions that predict a response token (then ~3.5% fewer FLOPs at this shape)."""
    policy = flops_per_step(vocab, hidden, intermediate, layers, heads, kv_heads, 2 * pairs,
                            seq, head_dim)
    reference = policy["total"] // 3
    return dict(policy, policy=policy["total"], reference=reference,
                total=policy["total"] + reference, pairs=pairs)
