"""Exports as files a user can use: modes that follow the umask, nothing left by a killed
convert, and an old export kept until its replacement is in place (jalign.atomic_dir)."""

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from jalign import atomic_dir
from jalign.atomic_dir import atomic_directory
from jalign.cli import main

RUN = Path(__file__).resolve().parents[1] / "legacy" / "v1" / "runs" / "sft"


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)


def _modes(root: Path) -> set:
    return {(p.is_dir(), stat.S_IMODE(p.stat().st_mode)) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_an_hf_export_follows_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        assert main(["convert", "jalign-to-hf", str(RUN), str(tmp_path / "hf")]) == 0
    finally:
        os.umask(previous)
    assert _modes(tmp_path / "hf") == {(True, 0o777 & ~umask), (False, 0o666 & ~umask)}
    assert not list(tmp_path.glob(".hf.*"))


def test_what_a_killed_convert_left_is_removed_by_the_next(tmp_path, capsys):
    host, dead = socket.gethostname(), _dead_pid()
    stale = tmp_path / f".hf.tmp-{host}-{dead}-abc123"
    live = tmp_path / f".hf.tmp-{host}-{os.getpid()}-def456"  # a convert still running
    other = tmp_path / f".hf.tmp-otherhost-{dead}-ghi789"     # another host's: not judged
    for d in (stale, live, other):
        (d / "part").mkdir(parents=True)
    with atomic_directory(tmp_path / "hf") as tmp:
        (tmp / "config.json").write_text("{}")
    assert not stale.exists() and live.exists() and other.exists()
    assert f"removed {stale.name}, left by an interrupted write of hf" in capsys.readouterr().err


def test_an_interrupted_overwrite_keeps_the_old_export(tmp_path, monkeypatch):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("old")
    real, calls = os.replace, []

    def fail_moving_in(src, dst):
        if Path(dst) == out and not calls:  # the new one moving in: interrupted, once
            calls.append(src)
            raise KeyboardInterrupt
        return real(src, dst)
    monkeypatch.setattr(atomic_dir.os, "replace", fail_moving_in)
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "config.json").write_text("new")
    monkeypatch.undo()
    assert (out / "config.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_an_old_export_a_killed_replacement_moved_aside_is_put_back(tmp_path, capsys):
    aside = tmp_path / f".hf.old-{socket.gethostname()}-{_dead_pid()}-abc123"
    aside.mkdir()
    (aside / "config.json").write_text("old")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        with atomic_directory(tmp_path / "hf"):
            pass
    assert (tmp_path / "hf" / "config.json").read_text() == "old" and not aside.exists()
    assert "put back" in capsys.readouterr().err
