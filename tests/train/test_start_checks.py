"""Problems knowable before training are one-line errors naming the binding, raised
before any model is loaded or anything compiled (so no checkpoint directory appears)."""

from pathlib import Path

import pytest

from jalign.cli import main
from tests.cli import assert_clean_error, run_jalign

CONFIG = str(Path(__file__).with_name("tiny_sft.gin"))
RM = str(Path(__file__).with_name("tiny_rm.gin"))
PPO = str(Path(__file__).with_name("tiny_ppo.gin"))
SAMPLES = Path(__file__).resolve().parents[2] / "jalign" / "assets" / "samples"


def test_batch_the_mesh_cannot_split_is_refused_by_the_cli(tmp_path):
    r = run_jalign("train", CONFIG, "--gin", f"TrainConfig.output_root='{tmp_path}'",
                   "--gin", "MeshConfig.fsdp=-1", "--gin", "DataConfig.batch_size=6",
                   devices=8)
    assert_clean_error(r, "DataConfig.batch_size=6", "8 devices", "data=1 x fsdp=8",
                       "multiple of 8")
    assert not list(tmp_path.rglob("checkpoints"))


CASES = {
    "micro-batches": (["TrainConfig.accum_steps=2"],
                      ["TrainConfig.accum_steps=2", "micro-batches of 4", "8 devices"]),
    "eval batch": (["eval/DataConfig.batch_size=12"], ["eval/DataConfig.batch_size=12"]),
    "eval split": (["eval/DataConfig.split='validation'"],
                   ["eval/DataConfig.split='validation'", "'train' and 'eval'"]),
    "missing file": (["DataConfig.path='no/such/train.jsonl'"],
                     ["DataConfig.path='no/such/train.jsonl'", "no such file"]),
    # eval/DataConfig.path falls back to DataConfig.path: the training file, refused
    "eval data is the training file": ([f"DataConfig.path='{SAMPLES / 'messages.jsonl'}'",
                                        "eval/DataConfig.split='test'"],
                                       ["eval/DataConfig.path=", "messages.jsonl",
                                        "is the training data", "held-out file"]),
    "format for the algorithm": (["TrainConfig.algorithm='rm'"],
                                 ["DataConfig.format='messages'", "'rm'", "preference"]),
    "tokenizer": (["DataConfig.tokenizer='/no/such/tokenizer'"],
                  ["DataConfig.tokenizer='/no/such/tokenizer'"]),
    "vocabulary": (["LlamaConfig.vocab_size=64"],
                   ["DataConfig.tokenizer=None", "LlamaConfig.vocab_size=64"]),
    "model source": (["ModelInit.source='jalign:/no/such/run'"],
                     ["ModelInit.source='jalign:/no/such/run'"]),
    "trainable matches nothing": (["OptimizerConfig.trainable='^no_such_param$'"],
                                  ["OptimizerConfig.trainable='^no_such_param$'", "matches no"]),
    "trainable not a regex": (["OptimizerConfig.trainable='(layers'"],
                              ["OptimizerConfig.trainable='(layers'", "not a regex"]),
    "chat template syntax": (["DataConfig.chat_template='{% for m in messages %}'"],
                             ["DataConfig.chat_template=", "does not parse"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_start_problem_is_a_one_line_error(tmp_path, capsys, case):
    bindings, needles = CASES[case]
    base = [f"TrainConfig.output_root='{tmp_path}'", "TrainConfig.progress=False",
            "MeshConfig.fsdp=-1", "DataConfig.batch_size=8"]  # in-process: 8 devices
    _assert_one_line_error(CONFIG, base + bindings, needles, tmp_path, capsys)


def _assert_one_line_error(config, bindings, needles, tmp_path, capsys):
    """`jalign train config` exits 2 with one error line holding every needle, and leaves
    no checkpoint directory."""
    argv = ["train", config] + sum((["--gin", b] for b in bindings), [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not list(tmp_path.rglob("checkpoints"))


def test_out_of_memory_is_one_line_advice(monkeypatch, capsys):
    """XLA running out of memory names what to change instead of ending in a traceback."""
    import jalign.cli as cli

    def oom(args):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 60929549504 bytes.")

    monkeypatch.setattr(cli, "cmd_train", oom)
    assert cli.main(["train", CONFIG]) == 2
    err = capsys.readouterr().err
    assert "out of memory (Out of memory allocating 60929549504 bytes.)" in err
    assert "DataConfig.batch_size" in err and "Traceback" not in err


PPO_CASES = {
    "steps inside a rollout": (["TrainConfig.steps=10"],
                               ["TrainConfig.steps=10", "multiple of", "epochs", "= 4"]),
    "save inside a rollout": (["TrainConfig.save_every=6"],
                              ["TrainConfig.save_every=6", "rollout boundary"]),
    "minibatches": (["PPOConfig.minibatches=3", "TrainConfig.save_every=12"],
                    ["DataConfig.batch_size=8", "PPOConfig.minibatches=3"]),
    "conversation data": (["DataConfig.format='messages'"],
                          ["DataConfig.format='messages'", "'ppo'", "prompt data"]),
    "minibatch over the mesh": (["DataConfig.batch_size=8", "PPOConfig.minibatches=4",
                                 "TrainConfig.steps=16", "TrainConfig.save_every=8"],
                                ["train step's batch", "=2", "8 devices"]),
    "unknown reward": (["RewardConfig.names=('task', 'nope')", "RewardConfig.weights=(1., 1.)"],
                       ["RewardConfig", "'nope'"]),
    "reward model source": (["RewardConfig.names=('reward_model',)", "RewardConfig.weights=(1.,)"],
                            ["RewardConfig.reward_model", "'jalign:DIR'"]),
    "value model source": (["PPOConfig.value_init='critic'"], ["PPOConfig.value_init='critic'"]),
}


@pytest.mark.parametrize("case", sorted(PPO_CASES))
def test_ppo_start_problem_is_a_one_line_error(tmp_path, capsys, case):
    bindings, needles = PPO_CASES[case]
    base = [f"TrainConfig.output_root='{tmp_path}'", "MeshConfig.fsdp=-1"]  # 8 devices
    _assert_one_line_error(PPO, base + bindings, needles, tmp_path, capsys)
