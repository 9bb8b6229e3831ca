"""Config records across versions: a setting added since a checkpoint was written is not
a change while it is at its default; the roles of old checkpoints' metadata."""

import pytest

from jalign.errors import ConfigError
from jalign.train.roles import stored_roles
from jalign.losses.sft import SFTConfig
from jalign.train.resume import changes, check_resume, config_record, default_record
from jalign.train.train_config import TrainConfig


def _records(sft: SFTConfig):
    configs = {"TrainConfig": TrainConfig(), "SFTConfig": sft}
    old = config_record({"TrainConfig": TrainConfig()})  # written before SFTConfig existed
    return old, config_record(configs), default_record(configs)


def test_a_new_setting_at_its_default_is_not_a_change():
    old, new, defaults = _records(SFTConfig())
    assert changes(old, new, defaults) == ([], [])
    check_resume(old, new, step=4, allow=False, log=print, defaults=defaults)
    # Without the defaults it would read as a change from '<unset>'.
    assert changes(old, new)[1]


def test_a_new_setting_away_from_its_default_is_refused():
    old, new, defaults = _records(SFTConfig(normalize="sequences"))
    safe, unsafe = changes(old, new, defaults)
    assert unsafe == ["SFTConfig.normalize: '<unset>' -> 'sequences'"]
    with pytest.raises(ConfigError, match="SFTConfig.normalize"):
        check_resume(old, new, step=4, allow=False, log=print, defaults=defaults)


def test_a_nested_config_with_a_field_added_since_resumes():
    """PPOConfig.rewards gained RewardConfig.functions/function_weights after PPO runs were
    saved: at their defaults the old run resumes; set, it is a change."""
    from jalign.algos.ppo import PPOConfig
    from jalign.rl.rewards import RewardConfig
    configs = {"PPOConfig": PPOConfig()}
    new, defaults = config_record(configs), default_record(configs)
    old = {k: v for k, v in new.items()}
    old["PPOConfig.rewards"] = {k: v for k, v in new["PPOConfig.rewards"].items()
                                if k not in ("functions", "function_weights")}
    assert changes(old, new, defaults) == ([], [])
    changed = config_record({"PPOConfig": PPOConfig(rewards=RewardConfig(
        functions=("m:f",)))})
    assert changes(old, changed, defaults)[1][0].startswith("PPOConfig.rewards:")
    # an old field changed is a change, whatever was added
    changed = config_record({"PPOConfig": PPOConfig(rewards=RewardConfig(length_coef=0.5))})
    assert changes(old, changed, defaults)[1][0].startswith("PPOConfig.rewards:")


def test_a_run_recorded_before_lora_existed_resumes():
    """A checkpoint written before LoraConfig and LlamaConfig.lora existed: its record
    lacks both, and a run without adapters resumes it (found resuming a real old run)."""
    from jalign.models.config import preset
    from jalign.models.lora import LoraConfig
    from jalign.sources import EXECUTION_FIELDS, ModelInit
    from jalign.train.resume import model_record, resume_defaults

    configs = {"TrainConfig": TrainConfig(), "LoraConfig": LoraConfig()}
    model = preset("tiny")
    new = config_record(configs)
    new.update(model_record(model, ModelInit(), EXECUTION_FIELDS))
    old = {k: v for k, v in new.items()
           if not k.startswith("LoraConfig.") and k != "LlamaConfig.lora"}
    assert len(old) < len(new)
    check_resume(old, new, step=2, allow=False, log=print,
                 defaults=resume_defaults(configs, model))
    # With adapters now, it is a change.
    lora = {**configs, "LoraConfig": LoraConfig(rank=4)}
    with pytest.raises(ConfigError, match="LoraConfig.rank"):
        check_resume(old, config_record(lora), step=2, allow=False, log=print,
                     defaults=resume_defaults(lora, model))


def _frozen(metadata):
    return tuple(r.name for r in stored_roles(metadata).roles if not r.trained)


def test_frozen_models_of_old_and_new_metadata():
    assert _frozen({"reference": "in_step"}) == ("reference",)
    assert _frozen({"reference": "precomputed"}) == ()
    assert _frozen({"reference": None}) == ()
    assert _frozen({"frozen": ["reference"]}) == ("reference",)
    assert _frozen({"frozen": []}) == ()
    new = {"layout": 2, "roles": {"policy": {"head": "lm", "trains": "all"},
                                  "reference": {"head": "lm", "trains": "none",
                                                "like": "policy"}}}
    assert _frozen(new) == ("reference",)


def test_roles_of_old_model_kinds():
    """What checkpoints written before roles trained, by the model kind they recorded."""
    def roles(metadata):
        stored = stored_roles(metadata)
        return [(r.name, r.head, r.trains) for r in stored.roles], stored.bare
    assert roles({}) == ([("policy", "lm", "all")], True)
    assert roles({"model_kind": "scalar_head"}) == ([("reward", "scalar", "all")], True)
    assert roles({"model_kind": "policy_value", "frozen": ["reference"]}) == (
        [("policy", "lm", "all"), ("value", "scalar", "all"), ("reference", "lm", "none")],
        False)
    pointer = {"source": "jalign:/runs/sft", "step": 5, "seed": 3, "value_init": "policy",
               "use_execution_config": True}
    stored = stored_roles({"model_kind": "causal_lm", "lora_base": pointer})
    assert [(r.name, r.trains) for r in stored.roles] == [("policy", "adapters")]
    assert stored.records["policy"]["source"] == "jalign:/runs/sft@5"
    assert stored.records["policy"]["seed"] == 3


def test_a_grpo_run_saved_before_its_sampler_draw_and_prompt_sharing_resumes_only_as_it_ran():
    """GRPOConfig.sampler_draw and share_prompt were added with defaults that sample and
    shuffle otherwise than the code before them: a checkpoint without them ran with
    'gumbel' and no sharing. Resuming it with the new defaults is refused, naming both;
    binding the old values resumes it."""
    import dataclasses

    from jalign.algos.grpo import GRPOConfig
    saved = config_record({"GRPOConfig": GRPOConfig()})
    for key in ("GRPOConfig.sampler_draw", "GRPOConfig.share_prompt"):
        del saved[key]  # what a checkpoint written before these fields holds
    configs = {"GRPOConfig": GRPOConfig()}
    new, defaults = config_record(configs), default_record(configs)
    _, unsafe = changes(saved, new, defaults)
    assert unsafe == ["GRPOConfig.sampler_draw: 'gumbel' -> 'inverse_cdf'",
                      "GRPOConfig.share_prompt: False -> True"]
    with pytest.raises(ConfigError, match="GRPOConfig.sampler_draw"):
        check_resume(saved, new, step=4, allow=False, log=print, defaults=defaults)
    as_before = {"GRPOConfig": dataclasses.replace(GRPOConfig(), sampler_draw="gumbel",
                                                   share_prompt=False)}
    assert changes(saved, config_record(as_before), default_record(as_before)) == ([], [])
    # a run of another algorithm (no GRPOConfig in either record) is not affected
    from jalign.algos.ppo import PPOConfig
    ppo = {"PPOConfig": PPOConfig()}
    assert changes(config_record(ppo), config_record(ppo), default_record(ppo)) == ([], [])
