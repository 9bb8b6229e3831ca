"""One run per run directory (jalign.train.run_lock) and Ctrl-C's two meanings, in
process; tests/train/test_loop.py shows both on a real `jalign train`."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from jalign.cli import main
from jalign.errors import ConfigError
from jalign.train.hosts import Preemption
from jalign.train.run_lock import LOCK_NAME, RunLock

TINY = "tests/train/tiny_sft.gin"
ALL_DEVICES = ["--gin", "MeshConfig.fsdp = -1",  # this process has 8 host devices
               "--gin", "DataConfig.batch_size = 8"]


def test_a_held_lock_refuses_a_second_holder_and_is_free_once_released(tmp_path):
    first, notes = RunLock(tmp_path / "run"), []
    first.acquire(notes.append)
    with pytest.raises(ConfigError, match=f"in use by pid {os.getpid()} on "
                                          f"{socket.gethostname()} \\(since "):
        RunLock(tmp_path / "run").acquire(notes.append)
    first.release()
    second = RunLock(tmp_path / "run")
    second.acquire(notes.append)
    assert second.held and notes == []  # a released lock names no holder to take over from
    second.release()


def test_the_lock_of_a_dead_run_is_taken_over_saying_so(tmp_path):
    """A killed run releases its flock with its process; its name in the file remains."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_NAME).write_text(json.dumps(
        {"pid": int(dead), "host": socket.gethostname(), "since": "2026-01-01T00:00:00"}))
    notes = []
    lock = RunLock(tmp_path / "run")
    lock.acquire(notes.append)
    assert len(notes) == 1 and f"locked by pid {dead}" in notes[0] and "taking it over" in notes[0]
    assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_train_on_a_busy_run_directory_is_one_line_before_anything_is_written(tmp_path,
                                                                                capsys):
    holder = RunLock(tmp_path / "busy")
    holder.acquire()
    bindings = ["--gin", f"TrainConfig.output_root='{tmp_path}'",
                "--gin", "TrainConfig.run_name='busy'"]
    try:
        assert main(["train", TINY, *ALL_DEVICES, *bindings]) == 2
    finally:
        holder.release()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "TrainConfig.run_name: the run directory" in err
    assert {p.name for p in (tmp_path / "busy").iterdir()} == {LOCK_NAME}


def test_a_run_refused_at_start_leaves_no_run_directory(tmp_path, capsys):
    bindings = ["--gin", f"TrainConfig.output_root='{tmp_path}'",
                "--gin", "TrainConfig.run_name='refused'",
                "--gin", f"DataConfig.path='{tmp_path / 'missing.jsonl'}'"]
    assert main(["train", TINY, *ALL_DEVICES, *bindings]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_the_first_ctrl_c_asks_for_a_save_and_the_second_stops_at_once():
    """From Python's own Ctrl-C handler, as a run started from a terminal has it (a process
    started in the background by a non-interactive shell inherits SIGINT ignored), and back
    to it after."""
    said = []
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with Preemption(say=said.append) as p:
            os.kill(os.getpid(), signal.SIGINT)
            assert p.reached(1) and p.interrupted and "Ctrl-C again stops at once" in said[0]
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
