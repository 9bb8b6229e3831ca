"""Config records across versions: a setting added since a checkpoint was written is not
a change while it is at its default; the frozen models of old checkpoints' metadata."""

import pytest

from jalign.checkpoint import stored_frozen_models
from jalign.errors import ConfigError
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


def test_a_run_recorded_before_lora_existed_resumes():
    """A checkpoint written before LoraConfig and LlamaConfig.lora existed: its record
    lacks both, and a run without adapters resumes it (found resuming a real old run)."""
    from jalign.models.config import preset
    from jalign.models.lora import LoraConfig
    from jalign.train.run import resume_defaults
    from jalign.train.resume import model_record
    from jalign.train.setup import EXECUTION_FIELDS, ModelInit

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


def test_frozen_models_of_old_and_new_metadata():
    assert stored_frozen_models({"reference": "in_step"}) == ("reference",)
    assert stored_frozen_models({"reference": "precomputed"}) == ()
    assert stored_frozen_models({"reference": None}) == ()
    assert stored_frozen_models({"frozen": ["reference"]}) == ("reference",)
    assert stored_frozen_models({"frozen": []}) == ()
