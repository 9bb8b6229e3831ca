"""The jalign command tunes glibc's allocator only where it measured faster: XLA:CPU on
Linux/glibc, unless the user set GLIBC_TUNABLES or JALIGN_KEEP_MALLOC."""

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


def test_xla_cpu_on_glibc_is_tuned(plugins):
    env = cli.allocator_env({"PATH": "/bin"}, "glibc")
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": cli.GLIBC_TUNING}


@pytest.mark.parametrize("plugin", ["jax_cuda12_plugin", "jax_rocm7_plugin", "libtpu"])
def test_an_installed_accelerator_is_not_tuned(plugins, plugin):
    plugins.append(plugin)
    assert cli.allocator_env({}, "glibc") is None
    # ... unless JAX is told to run on the CPU
    assert cli.allocator_env({"JAX_PLATFORMS": "cpu"}, "glibc") is not None


@pytest.mark.parametrize("environ, libc", [
    ({"JAX_PLATFORMS": "cuda,cpu"}, "glibc"),
    ({"JALIGN_KEEP_MALLOC": "1"}, "glibc"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "glibc"),  # the user's own
    ({}, "musl"),
])
def test_left_alone(plugins, environ, libc):
    assert cli.allocator_env(environ, libc) is None
