"""A new algorithm is a recipe: this file writes one (distillation: the policy learns a
frozen teacher's next-token distribution, a loss on two roles) and trains it through the
real CLI path, with no edit anywhere in jalign. The teacher is read from a checkpoint of
its own, held in the state but never trained or saved, and rebuilt on resume."""

from __future__ import annotations

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.algos import registry
from jalign.losses.types import LossOutput
from jalign.train.recipe import POLICY, Recipe
from jalign.train.roles import NONE, Role

TEACHER = "teacher"


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    teacher: str = ""          # the teacher's model source
    temperature: float = 1.0


def distill_loss(models, batch, ctx, *, temperature):
    """Σ over target tokens of KL(teacher ‖ policy) at ``temperature``; weight = tokens."""
    ids, seg, pos = batch["input_ids"], batch["segment_ids"], batch["positions"]
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
    logp = jax.nn.log_softmax(models[POLICY](ids, pos, seg)[:, :-1] / temperature)
    logq = jax.nn.log_softmax(models[TEACHER](ids, pos, seg)[:, :-1] / temperature)
    kl = jnp.sum(jnp.exp(logq) * (logq - logp), axis=-1)
    return LossOutput(jnp.sum(kl * mask), jnp.sum(mask), {})


def recipe(config: DistillConfig) -> Recipe:
    roles = (Role(POLICY), Role(TEACHER, source=config.teacher, trains=NONE,
                                set_by="DistillConfig.teacher"))
    return Recipe("distill", lambda m, b, c: distill_loss(m, b, c, temperature=config.temperature),
                  roles, config=config)


@pytest.fixture
def distill(monkeypatch, tmp_path):
    """The toy algorithm as one table entry; its teacher a saved random model."""
    from jalign.checkpoint import save_model
    from jalign.models.build import create_model
    from jalign.models.config import preset
    teacher = create_model(preset("tiny").replace(vocab_size=512, scan_layers=False), seed=9)
    save_model(tmp_path / "teacher", teacher.config, teacher)
    entry = types.SimpleNamespace(CONFIG=None, SUMMARY="distillation (a test)",
                                  recipe=lambda _: recipe(DistillConfig(
                                      teacher=f"jalign:{tmp_path / 'teacher'}")))
    monkeypatch.setitem(registry.RECIPES, "distill", entry)
    return tmp_path


def _train(root, steps):
    from jalign.config import parse
    from jalign.experiment import load_experiment, run
    exp = load_experiment(["tests/train/tiny_sft.gin"], [
        "TrainConfig.algorithm='distill'", f"TrainConfig.output_root='{root}'",
        "TrainConfig.run_name='distill'", f"TrainConfig.steps={steps}",
        "TrainConfig.save_every=2", "TrainConfig.eval_batches=0", "MeshConfig.fsdp=-1",
        "DataConfig.batch_size=8", "OptimizerConfig.learning_rate=1e-2"])
    parse([])
    return run(exp)


def test_a_two_role_recipe_trains_resumes_and_keeps_its_teacher(distill):
    from jalign.checkpoint import read_metadata
    from jalign.cli import main
    from tests.cli import run_losses

    first = _train(distill, 2)
    teacher = jax.tree.map(np.asarray, first["state"].fixed[TEACHER])
    assert set(first["state"].params) == {POLICY}  # the teacher is not trained
    meta = read_metadata(distill / "distill", 2)
    assert meta["roles"][TEACHER]["source"] == f"jalign:{distill / 'teacher'}@0"
    assert not any(k.startswith(TEACHER) for k in meta["checksums"]["params"])
    resumed = _train(distill, 6)  # the teacher rebuilt from its source and checked
    assert resumed["start_step"] == 2
    losses = run_losses(distill / "distill")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and losses[6] < losses[1]
    jax.tree.map(np.testing.assert_array_equal, teacher,
                 jax.tree.map(np.asarray, resumed["state"].fixed[TEACHER]))
    # The run's policy exports like any run's.
    assert main(["convert", "jalign-to-hf", str(distill / "distill"),
                 str(distill / "hf")]) == 0
