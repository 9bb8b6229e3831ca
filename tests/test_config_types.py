"""A bound value of the wrong type is one error naming the binding, before anything runs
(jalign.config_types)."""

import pytest

from jalign.cli import main
from jalign.errors import ConfigError
from jalign.experiment import load_experiment

SFT, GRPO = "tests/train/tiny_sft.gin", "tests/train/tiny_grpo.gin"


@pytest.mark.parametrize("config,binding,message", [
    (SFT, "TrainConfig.steps='eight'", "TrainConfig.steps = 'eight': expected an int, got a string"),
    (SFT, "OptimizerConfig.learning_rate='3e-3'",
     "expected a number, got a string (a number is written without quotes: "
     "OptimizerConfig.learning_rate = 3e-3)"),
    # bound unscoped, read by both splits: named as written
    (SFT, "DataConfig.max_length='64'", "DataConfig.max_length = '64': expected an int"),
    (SFT, "eval/DataConfig.batch_size='8'", "eval/DataConfig.batch_size = '8': expected an int"),
    (SFT, "DataConfig.batch_size=4.5", "DataConfig.batch_size = 4.5: expected an int, got a float"),
    (SFT, "TrainConfig.steps=True", "TrainConfig.steps = True: expected an int, got a bool"),
    (SFT, "LlamaConfig.num_layers=2.0", "LlamaConfig.num_layers = 2.0: expected an int"),
    (SFT, "MeshConfig.topology=5", "MeshConfig.topology = 5: expected a string or None"),
    (GRPO, "RewardConfig.names=('task', 3)", "got a tuple holding 3, an int"),
    (GRPO, "GRPOConfig.group_size='4'", "GRPOConfig.group_size = '4': expected an int"),
])
def test_a_wrongly_typed_binding_names_itself(config, binding, message):
    with pytest.raises(ConfigError) as e:
        load_experiment([config], [binding])
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("binding", ["OptimizerConfig.learning_rate=1",  # an int is a number
                                     "DataConfig.tokenizer=None", "GRPOConfig.top_p=1"])
def test_values_of_the_right_type_pass(binding):
    load_experiment([GRPO], [binding])


def test_train_with_a_wrongly_typed_binding_is_one_line_exit_2(capsys):
    assert main(["train", SFT, "--gin", "TrainConfig.steps='eight'"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("jalign train: error: TrainConfig.steps = 'eight': expected an int, got a "
                   "string"), err


def test_gins_own_note_does_not_make_a_second_line():
    with pytest.raises(ConfigError) as e:
        load_experiment([GRPO], ["LoraConfig.targets=('q_proj',)"])
    assert str(e.value).startswith("LoraConfig.targets=") and "\n" not in str(e.value)


@pytest.mark.parametrize("binding,message", [
    ("TrainConfig.stepz=3", "doesn't have a parameter named 'stepz'"),
    ("TrainConfig.steps=", "Unable to parse value in --gin binding 'TrainConfig.steps='"),
    ("TrainConfig.steps=[1,", "in --gin binding 'TrainConfig.steps=[1,'"),  # left open
    ("TrainConfig.steps=(2", "in --gin binding 'TrainConfig.steps=(2'"),
    ("TrainConfig.steps=3 4", "in --gin binding 'TrainConfig.steps=3 4'"),
    ("TrainConfig.run_name=foo", "'foo' in --gin binding 'TrainConfig.run_name=foo'"),
    ("import no_such_module_here", "No module named 'no_such_module_here'"),
    ("TrainConfig.steps=@no_such_thing", "'@no_such_thing'"),
    ("TrainConfig.steps=%STEPS", "TrainConfig.steps = %STEPS: the macro STEPS is never bound"),
    ("eval/DataConfig.split=(%SPLIT,)", "eval/DataConfig.split = %SPLIT: the macro SPLIT"),
])
def test_a_malformed_binding_is_one_line_naming_it(capsys, binding, message):
    """Malformed gin (an unknown parameter, an unparsable or unclosed value, a failed
    import, an unbound macro) is exit 2 with one line, never a traceback."""
    assert main(["train", SFT, "--gin", "TrainConfig.save_every=4", "--gin", binding]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("jalign train: error: bad gin "), err
    assert message in err, err


def test_a_file_left_open_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.gin"
    bad.write_text("include 'tests/train/tiny_sft.gin'\nTrainConfig.steps = (3,\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"in config file {bad}" in err, err
