"""The jalign command's allocator rule (benchmarks/allocator.py, docs/benchmarks.md): on
XLA:CPU under Linux/glibc it asks for huge pages where the kernel gives them on request
(transparent huge pages "madvise"), keeps freed memory only when asked
(JALIGN_TUNE_MALLOC=1: two to three times the peak memory on SFT shapes), and never overrides
the user's own GLIBC_TUNABLES or JALIGN_KEEP_MALLOC=1."""

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


def test_by_default_huge_pages_where_the_kernel_gives_them_on_request(plugins):
    env = cli.allocator_env({"PATH": "/bin"}, "glibc", "madvise")
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": cli.HUGEPAGE_TUNING}


@pytest.mark.parametrize("tune", ["0", ""])
def test_tune_malloc_0_is_the_default(plugins, tune):
    env = cli.allocator_env({"JALIGN_TUNE_MALLOC": tune}, "glibc", "madvise")
    assert env["GLIBC_TUNABLES"] == cli.HUGEPAGE_TUNING


@pytest.mark.parametrize("environ", [{}, dict(ASK)])
def test_the_re_executed_command_does_not_re_execute(plugins, environ):
    first = cli.allocator_env(environ, "glibc", "madvise")
    assert first is not None and cli.allocator_env(first, "glibc", "madvise") is None


@pytest.mark.parametrize("thp", ["always", "never", ""])
def test_by_default_nothing_where_huge_pages_need_no_asking_or_are_off(plugins, thp):
    assert cli.allocator_env({"PATH": "/bin"}, "glibc", thp) is None


@pytest.mark.parametrize("thp", ["madvise", "always", "never", ""])
def test_asked_xla_cpu_on_glibc_keeps_freed_memory(plugins, thp):
    env = cli.allocator_env({"PATH": "/bin", **ASK}, "glibc", thp)
    assert env == {"PATH": "/bin", **ASK, "GLIBC_TUNABLES": cli.GLIBC_TUNING}


@pytest.mark.parametrize("plugin", ["jax_cuda12_plugin", "jax_rocm7_plugin", "libtpu"])
def test_an_installed_accelerator_is_not_tuned(plugins, plugin):
    plugins.append(plugin)
    assert cli.allocator_env(dict(ASK), "glibc", "madvise") is None
    assert cli.allocator_env({}, "glibc", "madvise") is None
    # ... unless JAX is told to run on the CPU
    assert cli.allocator_env({"JAX_PLATFORMS": "cpu", **ASK}, "glibc") is not None
    assert cli.allocator_env({"JAX_PLATFORMS": "cpu"}, "glibc", "madvise") is not None


@pytest.mark.parametrize("environ, libc", [
    ({"JAX_PLATFORMS": "cuda,cpu", **ASK}, "glibc"),
    ({"JALIGN_KEEP_MALLOC": "1", **ASK}, "glibc"),
    ({"JALIGN_KEEP_MALLOC": "1"}, "glibc"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", **ASK}, "glibc"),  # the user's own
    ({"GLIBC_TUNABLES": ""}, "glibc"),
    (dict(ASK), "musl"),
    ({}, "musl"),
])
def test_left_alone(plugins, environ, libc):
    assert cli.allocator_env(environ, libc, "madvise") is None


def test_not_on_other_systems(plugins, monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert cli.allocator_env(dict(ASK), "glibc", "madvise") is None
    assert cli.allocator_env({}, "glibc", "madvise") is None


@pytest.mark.parametrize("text, mode", [
    ("always [madvise] never\n", "madvise"), ("[always] madvise never\n", "always"),
    ("always madvise [never]\n", "never"), ("garbled\n", "")])
def test_the_kernel_mode_is_the_bracketed_word(tmp_path, text, mode):
    path = tmp_path / "enabled"
    path.write_text(text)
    assert cli.thp_mode(str(path)) == mode
    assert cli.thp_mode(str(tmp_path / "missing")) == ""
