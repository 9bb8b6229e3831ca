"""Model sources: parsed once (``random``, ``hf:``, ``jalign:DIR[@STEP]``), one loader for
every caller, and each role's initial model built from its source: PPO's value model from
the policy (its backbone, a fresh head) or from a reward-model checkpoint (refused at start
when that reward model has another architecture); the frozen reference is the policy."""

import jax
import numpy as np
import pytest

from jalign import sources
from jalign.algos.ppo import PPOConfig, roles
from jalign.checkpoint import save_model
from jalign.errors import ConfigError
from jalign.models.build import create_model, params_of
from jalign.models.config import preset
from jalign.sources import ModelSource
from jalign.train.preflight import check_role_sources
from jalign.train.roles import RunModels

CONFIG = preset("tiny").replace(vocab_size=512, scan_layers=False)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_same(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):  # exact by construction: copies of the same arrays
        np.testing.assert_array_equal(x, y)


def test_sources_parse_once_and_name_the_binding():
    assert ModelSource.parse("random") == ModelSource("random")
    assert ModelSource.parse("hf:org/model") == ModelSource("hf", "org/model")
    assert ModelSource.parse("jalign:runs/x@12") == ModelSource("jalign", "runs/x", 12)
    assert str(ModelSource.parse("jalign:runs/x@12")) == "jalign:runs/x@12"
    assert ModelSource.parse("runs/x", default_scheme="jalign") == ModelSource("jalign", "runs/x")
    for bad in ("hf", "ftp:x", "jalign:", "runs/x"):
        with pytest.raises(ValueError, match="ModelInit.source="):
            ModelSource.parse(bad)
    with pytest.raises(ValueError, match="ModelInit.step=3"):
        sources.ModelInit(source="hf:x", step=3)
    assert sources.ModelInit(source="jalign:d", step=3).model_source() == ModelSource(
        "jalign", "d", 3)


def _models(value_init):
    ppo_roles = roles(PPOConfig(value_init=value_init))
    return RunModels(ppo_roles, {r.name: CONFIG for r in ppo_roles})


def _initial(models, source):
    records = {r.name: {"source": None if r.like else (r.source or source), "seed": 0}
               for r in models.roles}
    return sources.InitialModels(models, records, gin_config=CONFIG, overrides={})


def test_value_model_from_the_policy_or_a_reward_model(tmp_path):
    policy = create_model(CONFIG, seed=1)
    save_model(tmp_path / "sft", CONFIG, policy)
    sft = f"jalign:{tmp_path / 'sft'}"
    initial = _initial(_models("policy"), sft)
    _assert_same(initial.full_tree("policy"), params_of(policy))
    assert initial.model("reference") is initial.model("policy")  # a copy is made in the state
    backbone = initial.full_tree("value")["backbone"]
    _assert_same(backbone, {k: v for k, v in params_of(policy).items() if k != "lm_head"})

    reward = create_model(CONFIG, seed=2, head="scalar")
    save_model(tmp_path / "rm", CONFIG, reward)
    initial = _initial(_models(f"jalign:{tmp_path / 'rm'}"), sft)
    _assert_same(initial.full_tree("value"), params_of(reward))
    _assert_same(initial.full_tree("policy"), params_of(policy))

    other = CONFIG.replace(hidden_size=CONFIG.hidden_size * 2)
    save_model(tmp_path / "big_rm", other, create_model(other, seed=3, head="scalar"))
    with pytest.raises(ConfigError, match=r"value_init=.*big_rm.*hidden_size"):
        check_role_sources(_models(f"jalign:{tmp_path / 'big_rm'}"), {})


def test_one_loader_reads_every_source_with_either_head(tmp_path):
    policy = create_model(CONFIG, seed=1)
    save_model(tmp_path / "sft", CONFIG, policy)
    _, lm = sources.load(f"jalign:{tmp_path / 'sft'}")
    _assert_same(params_of(lm), params_of(policy))
    # A causal LM read as a scalar head: its backbone and a fresh score from the seed.
    _, scalar = sources.load(f"jalign:{tmp_path / 'sft'}@0", head="scalar", seed=4)
    _assert_same(params_of(scalar)["backbone"],
                 {k: v for k, v in params_of(policy).items() if k != "lm_head"})
    _, again = sources.load(f"jalign:{tmp_path / 'sft'}", head="scalar", seed=4)
    _assert_same(params_of(scalar), params_of(again))
    _, fresh = sources.load("random", config=CONFIG, seed=1)
    _assert_same(params_of(fresh), params_of(policy))
    # A scalar checkpoint has no LM head: asking for one is an error naming the head.
    save_model(tmp_path / "rm", CONFIG, create_model(CONFIG, seed=2, head="scalar"))
    with pytest.raises(Exception, match="scalar head"):
        sources.load(f"jalign:{tmp_path / 'rm'}", head="lm")


def test_the_tokenizer_follows_the_model_source(tmp_path):
    """A model's tokenizer unless another is named: a random model's is the bundled one,
    an hf: directory's its own files (none there: an error naming the fix), a gguf file's
    its metadata, a jalign run's the copy it trained with (runs from before it kept one:
    what it recorded, else the bundled one)."""
    from jalign.data.tokenize import load_tokenizer
    from jalign.data.tokenizer_files import save_tokenizer
    assert sources.tokenizer_spec("random") == "bundled"
    hf = tmp_path / "hf"
    hf.mkdir()
    with pytest.raises(ValueError, match="has no tokenizer files.*'bundled'"):
        sources.tokenizer_spec(f"hf:{hf}")
    load_tokenizer().save_pretrained(str(hf))
    assert sources.tokenizer_spec(f"hf:{hf}") == str(hf)
    assert sources.tokenizer_spec("hf:someone/some-model") == "someone/some-model"  # a hub id
    assert sources.tokenizer_spec("gguf:/models/x.gguf") == "gguf:/models/x.gguf"
    run = tmp_path / "run"
    save_tokenizer(load_tokenizer(), run / sources.TOKENIZER_DIR, "{{ messages }}")
    assert sources.tokenizer_spec(f"jalign:{run}") == str(run / "tokenizer")
    assert load_tokenizer(str(run / "tokenizer")).chat_template == "{{ messages }}"
    assert not list(tmp_path.rglob("*.tmp-*"))  # written aside, moved into place
    assert sources.tokenizer_spec(f"jalign:{tmp_path / 'old_run'}") == "bundled"
