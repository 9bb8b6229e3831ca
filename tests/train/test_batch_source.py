"""The loop draws from a batch source, not a dataset: it hands the source the current
train state (what a rollout source samples with) and saves the source's own state in
every checkpoint, which a resumed run gives back to it."""

import jax

from jalign.config import parse
from jalign.experiment import load_experiment
from jalign.losses.sft import sft_loss
from jalign.train.loop import run_loop
from jalign.train.recipe import custom
from jalign.train.run import open_run
from jalign.train.source import DatasetSource

TINY = ["TrainConfig.steps=4", "TrainConfig.save_every=2", "TrainConfig.eval_batches=0",
        "TrainConfig.progress=False", "MeshConfig.fsdp=-1", "DataConfig.batch_size=8"]


class RecordingSource:
    """A dataset source that records the state it is asked with, and adds a counter of its
    own to the state it saves."""

    def __init__(self, inner, calls):
        self.inner, self.calls, self.drawn = inner, calls, 0

    def next(self, state):
        self.calls.append(int(jax.device_get(state.step)))
        self.drawn += 1
        return self.inner.next(state)

    def get_state(self):
        return {"inner": self.inner.get_state(), "drawn": self.drawn}

    def set_state(self, state):
        self.inner.set_state(state["inner"])
        self.drawn = state["drawn"]

    def total(self):
        return None

    def remaining(self):
        return None

    def describe(self):
        return f"{self.drawn} batches"

    @property
    def stats(self):
        return self.inner.stats


def _open(tmp_path, steps, calls):
    exp = load_experiment(["tests/train/tiny_sft.gin"],
                          TINY + [f"TrainConfig.output_root='{tmp_path}'",
                                  f"TrainConfig.steps={steps}"])
    parse([])
    return open_run(custom(sft_loss), exp.configs,
                    make_source=lambda it: RecordingSource(DatasetSource(it), calls))


def test_the_loop_asks_the_source_with_the_current_state_and_saves_its_state(tmp_path):
    calls = []
    run = _open(tmp_path, 2, calls)
    summary = run_loop(run)
    assert summary["final_step"] == 2 and calls == [0, 1]
    # The checkpoint holds the source's own state; a resumed run hands it back.
    run = _open(tmp_path, 4, calls)
    assert run.start == 2 and run.source.drawn == 2
    run_loop(run)
    assert calls == [0, 1, 2, 3] and run.source.drawn == 4


def test_resume_rebuilds_several_frozen_models(tmp_path):
    """Two frozen copies of the initial model, rebuilt on resume: each gets its own buffers
    (the step donates the state; one buffer given twice would fail to donate)."""
    import dataclasses

    from jalign.train.roles import NONE, Role
    algo = dataclasses.replace(custom(sft_loss), name="two_frozen", roles=(
        Role("policy"), Role("a", like="policy", trains=NONE),
        Role("b", like="policy", trains=NONE)))

    def open_(steps):
        exp = load_experiment(["tests/train/tiny_sft.gin"],
                              TINY + [f"TrainConfig.output_root='{tmp_path}'",
                                      f"TrainConfig.steps={steps}"])
        parse([])
        return open_run(algo, exp.configs)

    run_loop(open_(2))
    run = open_(4)
    assert run.start == 2 and set(run.state.fixed) == {"a", "b"}
    summary = run_loop(run)
    assert summary["final_step"] == 4 and run.state is summary["state"]
