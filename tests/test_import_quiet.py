"""What a user without torch sees: no advice from transformers that something is missing."""

import subprocess
import sys

# torch hidden, as on a machine with only `pip install -e .` (find_spec returns None).
PROBE = "import sys; sys.modules['torch'] = None; {imports}; import transformers"


def _stderr(imports: str) -> str:
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", PROBE.format(imports=imports)],
                          capture_output=True, text=True, env=env, timeout=120).stderr


def test_no_pytorch_advice_on_import():
    assert "PyTorch was not found" in _stderr("pass")  # what transformers alone prints
    assert "PyTorch was not found" not in _stderr("import jalign.data.tokenize")
