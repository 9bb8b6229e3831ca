"""The jalign command leaves glibc's allocator alone unless asked (JALIGN_TUNE_MALLOC=1):
measured, the tunables doubled peak memory for 0-9% of speed (benchmarks/allocator.py).
Asked, it tunes XLA:CPU on Linux/glibc only, and never over the user's own GLIBC_TUNABLES."""

import sys
import types

import pytest

from jalign import cli


@pytest.fixture
def plugins(monkeypatch):
    """Which modules pkgutil reports installed (accelerator plugins among them or not)."""
    installed = ["numpy", "jaxlib"]
    monkeypatch.setattr("pkgutil.iter_modules",
                        lambda *a, **k: [types.SimpleNamespace(name=n) for n in installed])
    monkeypatch.setattr(sys, "platform", "linux")
    return installed


ASK = {"JALIGN_TUNE_MALLOC": "1"}


def test_by_default_the_allocator_is_left_alone(plugins):
    assert cli.allocator_env({"PATH": "/bin"}, "glibc") is None


def test_asked_xla_cpu_on_glibc_is_tuned(plugins):
    env = cli.allocator_env({"PATH": "/bin", **ASK}, "glibc")
    assert env == {"PATH": "/bin", **ASK, "GLIBC_TUNABLES": cli.GLIBC_TUNING}


@pytest.mark.parametrize("plugin", ["jax_cuda12_plugin", "jax_rocm7_plugin", "libtpu"])
def test_an_installed_accelerator_is_not_tuned(plugins, plugin):
    plugins.append(plugin)
    assert cli.allocator_env(dict(ASK), "glibc") is None
    # ... unless JAX is told to run on the CPU
    assert cli.allocator_env({"JAX_PLATFORMS": "cpu", **ASK}, "glibc") is not None


@pytest.mark.parametrize("environ, libc", [
    ({"JAX_PLATFORMS": "cuda,cpu", **ASK}, "glibc"),
    ({"JALIGN_KEEP_MALLOC": "1", **ASK}, "glibc"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", **ASK}, "glibc"),  # the user's own
    ({"JALIGN_TUNE_MALLOC": "0"}, "glibc"),
    (dict(ASK), "musl"),
])
def test_left_alone(plugins, environ, libc):
    assert cli.allocator_env(environ, libc) is None
