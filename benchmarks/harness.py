"""The benchmark harness: each row of a table is its own long-lived worker process, driven
the same way for every workload (SFT, DPO and IFT steps, GRPO iterations; see
benchmarks/train_step.py, grpo_iteration.py and generate.py) and every peer (jalign, PyTorch, TRL, Tunix).

A worker speaks the protocol of train_step_impls/common.py (``serve`` for a loop the worker
owns, ``Gate`` for one a Trainer owns): it warms up, says ``ready`` with its info (versions,
compile seconds, first loss...), then answers each ``run K`` with K timed steps (their
times, minor page faults and optional phases). The driver here starts the workers one after
the other, then runs rounds in a rotating order, waiting for a quiet machine before each
timed run and recording how much CPU other processes used meanwhile; it reads each worker's
peak resident memory before telling it to exit.
"""

from __future__ import annotations

import json
import queue
import shlex
import statistics
import subprocess
import threading
import time
from pathlib import Path

from common import HZ, cpu_busy, proc_cpu, wait_quiet  # train_step_impls/ (on sys.path)

REPO = Path(__file__).resolve().parent.parent


class Worker:
    """One implementation's process and its side of the protocol (common.py)."""

    def __init__(self, key: str, label: str, cmd: list[str], env: dict, log_path: Path):
        self.key, self.label, self.cmd, self.log_path = key, label, cmd, log_path
        self.times: list[float] = []
        self.phases: list[dict] = []  # per timed step: {phase: seconds} when the worker says
        self.faults: list[int] = []
        self.others: list[float] = []  # other processes' CPU use (cores) during each run
        self.waited: list[float] = []
        self.info: dict = {}
        self.peak_rss = float("nan")  # GiB, read just before the worker is told to exit
        self.error: str | None = None
        self.log = open(log_path, "w")
        self.log.write("$ " + shlex.join(cmd) + "\n")
        self.log.flush()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, env=env, cwd=REPO, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith("@@"):
                self.lines.put(json.loads(line[2:]))
            else:
                self.log.write(line)
        self.lines.put(None)

    def wait(self, event: str, timeout: float):
        try:
            msg = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.fail(f"no '{event}' after {timeout:.0f} s")
            return None
        if msg is None or msg.get("event") != event:
            self.proc.wait(timeout=30)
            self.fail(f"worker exited (rc {self.proc.returncode}): {self._last_log_line()}")
            return None
        return msg

    def _last_log_line(self) -> str:
        self.log.flush()
        lines = [ln.strip() for ln in self.log_path.read_text(errors="replace").splitlines()
                 if ln.strip()]
        return (lines[-1][:200] if lines else "no output") + f" (log: {self.log_path})"

    def send(self, text: str):
        try:
            self.proc.stdin.write(text + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def fail(self, reason: str):
        self.error = reason
        self.stop()

    def peak_rss_gib(self) -> float:
        """The worker's peak resident memory so far (VmHWM; nan once it has exited)."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2 ** 20
        except OSError:
            pass
        return float("nan")

    def stop(self):
        if self.proc.poll() is None:
            self.peak_rss = self.peak_rss_gib()
            self.send("exit")
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


ALLOCATOR_VARS = ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF", "JALIGN_KEEP_MALLOC",
                  "JALIGN_TUNE_MALLOC")


def command_env(env: dict) -> dict:
    """``env`` as the ``jalign`` command would run its steps in it: whatever allocator
    settings this shell has dropped, then the command's own default applied
    (``jalign.cli.allocator_env``: huge pages where the kernel gives them on request), so
    a row labelled as the command measures the command's allocator."""
    import platform
    import sys

    if str(REPO) not in sys.path:  # a driver run with a python that has jalign uninstalled
        sys.path.insert(0, str(REPO))
    from jalign.cli import allocator_env, thp_mode
    base = {k: v for k, v in env.items() if k not in ALLOCATOR_VARS}
    return allocator_env(base, platform.libc_ver()[0], thp_mode()) or base


def launch(key: str, label: str, cmd, env: dict, reason: str | None, log_path: Path,
           timeout: float, skipped: dict) -> Worker | None:
    """Start one row's worker and wait for it to be ready (its ``info`` set); None, with
    the reason printed and kept in ``skipped``, for a row that cannot run or failed."""
    if not reason:
        w = Worker(key, label, cmd, env, log_path)
        msg = w.wait("ready", timeout)
        if msg is not None:
            w.info = msg["info"]
            return w
        reason = w.error
    print(f"[{label}] not run: {reason}", flush=True)
    skipped[key] = (label, reason)
    return None


def first_step(w: "Worker") -> str:
    """The compile column: a jalign worker's measured compile, else the first warm-up step's
    time beyond the median step (what a first call costs a framework that compiles lazily)."""
    if "compile_s" in w.info:
        return f"{w.info['compile_s']:.1f}"
    warm = w.info.get("warmup_times") or []
    if warm and w.times:
        return f"~{max(0.0, warm[0] - statistics.median(w.times)):.1f}"
    return "n/a"


def mem_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return float("nan")


def select(rows: list, only_arg: str, known: tuple) -> list:
    only = set(only_arg.split(",")) if only_arg else set(known)
    unknown = only - set(known)
    if unknown:
        raise SystemExit(f"--only: unknown rows {sorted(unknown)}; known: {', '.join(known)}")
    return [r for r in rows if r[0] in only]



def run_rounds(workers: list, rounds: int, steps_of, quiet_below: float, quiet_wait: float, *,
               unit: str = "s/step", shown: list | None = None, timeout_s: float = 600,
               timeout_per_step_s: float = 120) -> None:
    """``rounds`` rounds, each giving every worker ``steps_of(worker)`` timed steps, the order
    rotating every round; fills each worker's times, faults, phases, others (other processes'
    CPU use during its run, in cores) and waited; a worker that fails is reported and left
    out of later rounds (``timeout_s + timeout_per_step_s * steps`` without an answer is a
    failure). Then every worker is stopped (its peak RSS read first)."""
    for r in range(rounds if workers else 0):
        order = workers[r % len(workers):] + workers[:r % len(workers)]
        for w in order:
            if w.error:
                continue
            k = steps_of(w)
            waited = wait_quiet(quiet_below, quiet_wait)
            b0, p0, t0 = cpu_busy(), proc_cpu(w.proc.pid), time.perf_counter()
            w.send(f"run {k}")
            msg = w.wait("times", timeout_s + timeout_per_step_s * k)
            if msg is None:
                print(f"[{w.label}] failed in round {r + 1}: {w.error}", flush=True)
                continue
            b1, p1, t1 = cpu_busy(), proc_cpu(w.proc.pid), time.perf_counter()
            w.times += msg["times"]
            w.faults += msg.get("faults", [])
            w.phases += msg.get("phases", [{}] * len(msg["times"]))
            w.others.append(max(0.0, ((b1 - b0) - (p1 - p0)) / HZ / (t1 - t0)))
            w.waited.append(waited)
        line = ", ".join(f"{w.key} {statistics.median(w.times[-steps_of(w):]):.2f}"
                         f" ({w.others[-1]:.1f})"
                         for w in (shown if shown is not None else workers)
                         if w.times and not w.error)
        print(f"round {r + 1}/{rounds} {unit} (others' CPU, cores): {line}", flush=True)
    for w in workers:
        w.stop()
