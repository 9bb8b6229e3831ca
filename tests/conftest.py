"""Test setup shared by the whole suite.

Eight host CPU devices for the sharding tests: XLA reads this flag once, when jax is
first imported, so it is set here before anything imports jax. A persistent compilation
cache makes repeated runs (and pytest-xdist workers) reuse compiled programs.
"""

import os

from tests.cli import TEST_XLA_FLAGS  # noqa: E402 (no jax import there)

os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), TEST_XLA_FLAGS,
                                    "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The persistent compilation cache, set through the environment so that the `jalign`
# subprocesses the tests start (and that process's re-exec) read and fill it too: most
# of a short `jalign train` run is compiling.
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.abspath(os.environ.get(
    "JALIGN_TEST_JAX_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache")))
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # cache every program

# The `jalign` command's allocator default (jalign.cli.allocator_env: glibc huge pages
# where the kernel gives them on request), for the pytest-xdist workers this process
# starts and the subprocesses they start; glibc reads GLIBC_TUNABLES only when a process
# starts, so this process itself keeps stock glibc. Unset with JALIGN_KEEP_MALLOC=1.
import platform  # noqa: E402

from jalign.cli import allocator_env, thp_mode  # noqa: E402 (no jax import there)

os.environ.update(allocator_env(os.environ, platform.libc_ver()[0], thp_mode()) or {})

import jax  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    if jax.device_count() != 8:
        pytest.fail(f"tests need 8 host devices (XLA_FLAGS); got {jax.device_count()}: "
                    "was jax imported before tests/conftest.py ran?")


@pytest.fixture(autouse=True)
def _chunks_recomputed(request, monkeypatch):
    """The tiny test models' logits would all fit the budget under which the token chunks
    of a log-prob run as one, kept for the backward (``jalign.losses.sft.KEEP_LOGITS_BYTES``),
    so the tests that set small chunks would no longer run any: in-process they recompute
    chunks as a large model's do, except where marked ``keep_logits`` (the rule's own
    tests). ``jalign`` subprocesses keep the library's rule."""
    if request.node.get_closest_marker("keep_logits") is None:
        from jalign.losses import sft
        monkeypatch.setattr(sft, "KEEP_LOGITS_BYTES", 0)
