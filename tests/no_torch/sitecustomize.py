"""Imported at start-up by the `jalign` subprocesses the tests run (tests/cli.py puts this
folder first on PYTHONPATH): torch is hidden, as on a user's machine, where jalign never
needs it. So every subprocess run also checks that the CLI works without torch, and none
pays for importing it (transformers and tensorboardX import it when they find it)."""

import sys

sys.modules["torch"] = None  # `import torch` raises ImportError; find_spec says absent
