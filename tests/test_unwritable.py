"""Writing where one may not is one line and exit 2, before any work: a read-only output
root, a resume into a read-only run directory, a conversion into a read-only directory."""

import json
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.cli import ROOT, env

# The child first gives up, when it runs as root, the capabilities that let root ignore
# permission bits (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER): root keeps its
# identity, and the file system's permission checks decide as for any user.
CHILD = """
import contextlib, ctypes, io, json, os, sys
if os.geteuid() == 0:
    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # {effective, permitted, inheritable} x 2 words
    assert libc.capget(header, data) == 0, ctypes.get_errno()
    for i in (0, 1):
        data[i] &= ~((1 << 1) | (1 << 2) | (1 << 3)) & 0xFFFFFFFF
    assert libc.capset(header, data) == 0, ctypes.get_errno()
from jalign.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    out.append([rc, err.getvalue()])
print(json.dumps(out))
"""


def _read_only(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def test_unwritable_outputs_are_one_line_errors():
    base = Path(tempfile.mkdtemp(prefix="jalign_ro_"))
    try:
        (base / "ro_root").mkdir(mode=0o555)
        shutil.copytree(ROOT / "tests/legacy/v1/runs/sft", base / "runs" / "sft")
        _read_only(base / "runs")
        tiny = ["tests/train/tiny_sft.gin", "--gin", "TrainConfig.run_name='sft'"]
        cases = [
            ["train", *tiny, "--gin", f"TrainConfig.output_root='{base / 'ro_root'}'"],
            ["train", *tiny, "--gin", f"TrainConfig.output_root='{base / 'runs'}'"],
            ["convert", "jalign-to-hf", str(base / "runs" / "sft"), str(base / "ro_root" / "hf")],
        ]
        r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cases)], capture_output=True,
                           text=True, env=env(), cwd=ROOT, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        results = json.loads(r.stdout.strip().splitlines()[-1])
        wants = [f"cannot write {base / 'ro_root' / 'sft'}", f"cannot write {base / 'runs' / 'sft'}",
                 f"cannot write {base / 'ro_root' / 'hf'}"]
        for (rc, err), argv, want in zip(results, cases, wants):
            lines = err.strip().splitlines()
            assert rc == 2 and len(lines) == 1 and want in lines[0], (argv, rc, err)
        assert not (base / "ro_root" / "hf").exists()
    finally:
        for p in [base, *base.rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)
        shutil.rmtree(base)
