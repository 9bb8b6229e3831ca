"""The loop keeps steps in flight: step N+1 is dispatched before step N's metrics are
read (no host sync per step), while a non-finite step still never reaches a checkpoint."""


import jax.numpy as jnp

from jalign.config import parse
from jalign.losses.sft import sft_loss
from jalign.losses.types import LossOutput
from jalign.train import loop
from jalign.experiment import load_experiment

TINY = ["TrainConfig.steps=6", "TrainConfig.save_every=3", "TrainConfig.eval_batches=0",
        "TrainConfig.progress=False", "MeshConfig.fsdp=-1", "DataConfig.batch_size=8"]


def _experiment(tmp_path, *bindings):
    exp = load_experiment(["tests/train/tiny_sft.gin"],
                          TINY + [f"TrainConfig.output_root='{tmp_path}'", *bindings])
    parse([])  # leave gin clean for other tests
    return exp


def _train(exp, monkeypatch, loss_fn=sft_loss):
    events = []
    make = loop.make_train_step

    def recording_make(*args, **kwargs):
        step_fn = make(*args, **kwargs)

        def step(state, batch):
            out = step_fn(state, batch)
            events.append(("dispatch", len([e for e in events if e[0] == "dispatch"]) + 1))
            return out
        return step

    fetch = loop.fetch_metrics

    def recording_fetch(metrics):
        events.append(("fetch",))
        return fetch(metrics)

    monkeypatch.setattr(loop, "make_train_step", recording_make)
    monkeypatch.setattr(loop, "fetch_metrics", recording_fetch)
    try:
        summary = loop.train(loss_fn, exp.configs)
    except loop.NonFiniteError as e:
        return events, e
    return events, summary


def test_next_step_is_dispatched_before_metrics_are_read(tmp_path, monkeypatch):
    events, summary = _train(_experiment(tmp_path), monkeypatch)
    assert summary["final_step"] == 6
    kinds = [e[0] for e in events]
    # Every fetch but the ones before a save (step 3) and at the end follows the next
    # step's dispatch: dispatch 1, dispatch 2, fetch(1), dispatch 3, fetch(2), fetch(3) ...
    assert kinds[:4] == ["dispatch", "dispatch", "fetch", "dispatch"], kinds
    assert kinds.count("fetch") == 6 and kinds.count("dispatch") == 6


def test_a_nonfinite_step_before_a_save_is_never_saved(tmp_path, monkeypatch):
    def nan_at_3(model, batch, ctx):  # step 3 (the save step) is non-finite
        out = sft_loss(model, batch, ctx)
        return LossOutput(jnp.where(ctx.step == 2, jnp.nan, out.total), out.weight, out.aux)

    exp = _experiment(tmp_path)
    events, error = _train(exp, monkeypatch, nan_at_3)
    assert isinstance(error, loop.NonFiniteError) and "step 3" in str(error)
    run_dir = tmp_path / exp.train.run_name
    assert not (run_dir / "checkpoints").exists() or not any(
        p.name.isdigit() for p in (run_dir / "checkpoints").iterdir())
