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


def test_frozen_models_of_old_and_new_metadata():
    assert stored_frozen_models({"reference": "in_step"}) == ("reference",)
    assert stored_frozen_models({"reference": "precomputed"}) == ()
    assert stored_frozen_models({"reference": None}) == ()
    assert stored_frozen_models({"frozen": ["reference"]}) == ("reference",)
    assert stored_frozen_models({"frozen": []}) == ()
