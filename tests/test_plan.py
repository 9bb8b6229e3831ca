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


GRPO = ["tests/train/tiny_grpo.gin"]
# beta > 0 and two epochs: the scoring pass runs the policy and the reference
ON_8_GRPO = ["MeshConfig.fsdp = 8", "DataConfig.batch_size = 8", "GRPOConfig.beta = 0.05",
             "GRPOConfig.epochs = 2"]


@pytest.fixture(scope="module")
def grpo_plan():
    from jalign.plan import compile_all
    planned = open_plan(load_experiment(GRPO, ON_8_GRPO))
    return planned, compile_all(planned)


def _shard_bytes(tree) -> int:
    """Bytes of device 0's shard of every abstract array in ``tree``."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape)
        item = 8 if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x.dtype.itemsize
        total += int(np.prod(shape, dtype=np.int64)) * item
    return total


def test_a_rollout_plan_compiles_the_runs_sampler_and_scoring_pass(grpo_plan):
    """Besides the train step, the plan compiles the programs the rollout source builds
    for a run — the same jitted sampler object — on the planned state and abstract inputs."""
    from jalign.rl.generate import make_generate_fn
    from jalign.rl.rollout import POLICY, REFERENCE
    from jalign.sharding import DEFAULT_RULES
    from jalign.train.metrics import train_flops_per_token
    planned, programs = grpo_plan
    assert list(programs) == ["train step", "sampler", "scoring pass"]
    assert all(p.refused is None and p.memory["temp_size_in_bytes"] > 0
               for p in programs.values())
    cfg, models = planned.exp.recipe.config, planned.models
    run_sampler = make_generate_fn(models.graphdef(POLICY), max_new_tokens=cfg.max_new_tokens,
                                   top_k=cfg.top_k, use_top_p=cfg.top_p is not None,
                                   mesh=planned.mesh, rules=DEFAULT_RULES,
                                   group_size=cfg.group_size, draw=cfg.sampler_draw)
    assert planned.programs["sampler"].fn is run_sampler
    # The compiled arguments are the abstract inputs' shards (weights included), but for
    # the scalars a program does not read (jit drops unused arguments: top_p without
    # top-p sampling, the KL coefficient when the KL is not a reward penalty).
    for name, read in (("sampler", 4), ("scoring pass", 7)):
        args = planned.programs[name].args
        assert (_shard_bytes(args[:read]) <= programs[name].memory["argument_size_in_bytes"]
                <= _shard_bytes(args)), name
    scoring = planned.programs["scoring pass"]
    assert set(scoring.args[0]) == {POLICY, REFERENCE}
    # FLOPs: one forward of the policy and of the reference over each prompt once per
    # forward group and every completion's tokens, per chip.
    b, g, n = 8, cfg.group_size, cfg.max_new_tokens
    p = planned.length - n
    tokens = b * g * n + b * g // cfg.forward_group * p
    per_token = train_flops_per_token(models.configs[POLICY], p + n) / 3
    assert scoring.flops == pytest.approx(2 * per_token * tokens / 8)
    sampler = programs["sampler"]
    assert sampler.unit == "decode step" and sampler.units == n
    assert sampler.collectives["all-gather"]["count"] > 0  # FSDP: weights gathered


def test_a_rollout_plan_reports_every_program_and_knobs_for_the_sampler(grpo_plan):
    import dataclasses

    from jalign.chips import Chip
    from jalign.plan_report import report, verdict
    planned, programs = grpo_plan
    fits, lines = report(planned, programs)
    text = "\n".join(lines)
    assert fits is None  # a host's devices: no HBM stated
    for name in ("train step", "sampler", "scoring pass"):
        assert f"compiled {name} (" in text
    assert "collectives per 6 decode steps and chip" in text
    small = Chip("tiny", 1e12, 1024, 1e9, 1e9, "test")
    planned = dataclasses.replace(planned, target=dataclasses.replace(planned.target, chip=small))
    fits, lines = verdict(planned, programs["sampler"], "sampler")
    assert fits is False and lines[0].startswith("compiled sampler (")
    assert "GRPOConfig.max_new_tokens" in lines[-1] and "MeshConfig.fsdp" in lines[-1]
    fits, lines = report(planned, programs)
    assert fits is False and "roofline per chip and decode step" in "\n".join(lines)
