"""`jalign plan`: the run's own step, compiled from configs alone (8 host devices here;
a TPU topology in tests/tpu, `pytest -m tpu_compile`)."""

import jax
import numpy as np
import pytest

from jalign.cli import main
from jalign.errors import ConfigError
from jalign.experiment import load_experiment
from jalign.plan import compile_step, open_plan, target_of, tpu_topology

TINY = ["tests/train/tiny_sft.gin"]
ON_8 = ["MeshConfig.fsdp = 8", "DataConfig.batch_size = 8", "LlamaConfig.scan_layers = True"]


def _libtpu() -> bool:
    try:
        tpu_topology("v5e:2x2")
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def tiny_plan():
    exp = load_experiment(TINY, ON_8)
    planned = open_plan(exp)
    return planned, compile_step(planned)


def test_the_compiled_state_is_the_planned_state_to_the_byte(tiny_plan):
    """The plan compiles the step a run builds (its recipe's batch, its state): the
    compiled arguments are the arithmetic plan's state plus the int32 batch."""
    planned, program = tiny_plan
    assert program.refused is None
    batch = sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in planned.batch.values()) // 8
    assert program.memory["argument_size_in_bytes"] - batch == planned.arithmetic.state
    assert program.memory["temp_size_in_bytes"] > 0
    # fsdp 8: the step gathers weights and reduces gradients
    assert program.collectives["all-gather"]["count"] > 0
    assert planned.rows == 8 and planned.length == 64
    assert program.flops == pytest.approx(
        planned.exp.recipe.flops_per_step(planned.models, 64, 8) / 8)


def test_plan_prints_the_arithmetic_and_compiled_step(capsys):
    rc = main(["plan", *TINY, *[a for b in ON_8 for a in ("--gin", b)], "--compile"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "arithmetic plan per chip: state" in out
    assert "compiled train step" in out and "collectives per step" in out


@pytest.mark.parametrize("binding,message", [
    ("MeshConfig.topology = 'v9:4x4'", "MeshConfig.topology: topology 'v9:4x4'"),
    ("MeshConfig.topology = 'v5e:4xfour'", "is not AxB[xC]"),
    ("MeshConfig.topology = 'v5e:2x2'", "has 4 chips, but MeshConfig.num_devices=8"),
])
def test_a_bad_topology_is_one_line_naming_the_binding(binding, message):
    exp = load_experiment(TINY, ON_8 + ["MeshConfig.num_devices = 8", binding])
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        open_plan(exp, target_of(exp.configs.mesh, devices_needed=False))


@pytest.mark.skipif(_libtpu(), reason="libtpu is installed: tests/tpu compiles for real")
def test_without_libtpu_compile_names_the_extra_and_the_plan_is_arithmetic(capsys):
    hw = ["--gin", "MeshConfig.topology = 'v5e:4x4'", "--gin", "MeshConfig.num_devices = 16",
          "--gin", "MeshConfig.fsdp = 16", "--gin", "DataConfig.batch_size = 16"]
    assert main(["plan", *TINY, *hw, "--compile"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'jalign[tpu]'" in err, err
    assert main(["plan", *TINY, *hw]) == 0
    out = capsys.readouterr().out
    assert "libtpu is not installed" in out and "arithmetic verdict: fits 16.00 GiB" in out


def test_the_first_batch_of_a_run_is_checked_against_the_recipes_spec():
    from jalign.train.batch_spec import check_batch, int32
    spec = {"input_ids": int32(2, 8)}
    check_batch(spec, {"input_ids": jax.ShapeDtypeStruct((2, 8), np.int32)}, "src")
    with pytest.raises(RuntimeError, match="input_ids: .*absent given; loss_mask: absent"):
        check_batch(spec, {"loss_mask": jax.ShapeDtypeStruct((2, 8), np.int32)}, "src")


def test_a_step_that_does_not_fit_names_the_knobs(tiny_plan):
    """A refused step (here: said so with a made-up HBM) lists what would bring it under,
    the recipe's own settings first."""
    import dataclasses

    from jalign.plan_report import verdict
    from jalign.chips import Chip
    planned, program = tiny_plan
    small = Chip("tiny", 1e12, 1024, 1e9, 1e9, "test")
    planned = dataclasses.replace(planned, target=dataclasses.replace(planned.target, chip=small))
    fits, lines = verdict(planned, program)
    assert fits is False and "does not fit by" in lines[0]
    assert "to fit, try:" in lines[-1] and "MeshConfig.fsdp" in lines[-1]
    exp = load_experiment(["tests/train/tiny_dpo.gin"], ON_8)
    dpo = open_plan(exp, target_of(exp.configs.mesh, devices_needed=False))
    assert "DPOConfig.reference='precomputed'" in " ".join(
        verdict(dataclasses.replace(dpo, target=planned.target), program)[1])
