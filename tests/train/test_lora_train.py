"""LoRA training, in-process on the real run setup (open_run): only adapters train (the
optimizer's state is 2 x the adapters for AdamW, gradients exist for them alone and the
compiled step keeps no buffers the size of the base), the DPO reference is the base read
without adapters (the same loss as an explicit frozen copy, one model held), a quantised
base trains, and problems are refused at the start."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jalign.errors import ConfigError
from jalign.experiment import load_experiment
from jalign.models.adapters import adapter_count
from jalign.models.build import params_of
from jalign.train.loop import _global_batch
from jalign.train.roles import NONE, Role, RunModels
from jalign.train.run import open_run
from jalign.train.step import accumulate, batch_sharding, make_train_step

HERE = Path(__file__).parent
SFT, DPO = str(HERE / "tiny_sft.gin"), str(HERE / "tiny_dpo.gin")


def _open(tmp_path, config, *bindings):
    exp = load_experiment([config], [f"TrainConfig.output_root='{tmp_path}'",
                                     "TrainConfig.run_name='lora'",
                                     # 8 test devices: adapters sharded over tensor too
                                     "MeshConfig.fsdp=2", "MeshConfig.tensor=4", *bindings])
    return open_run(exp.recipe, dataclasses.replace(exp.configs, eval_data=None),
                    operative=exp.operative)


def _step(run, models=None, **kwargs):
    return make_train_step(run.recipe.loss_fn, run.optimizer, models or run.models,
                           mesh=run.mesh, state_sharding=kwargs.pop("shardings", run.shardings),
                           global_batch=run.global_batch, **kwargs)


def _nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def test_only_adapters_train_and_the_optimizer_holds_two_moments_each(tmp_path):
    run = _open(tmp_path, SFT, "LoraConfig.rank=4", "LoraConfig.targets=('q', 'v', 'down')")
    state = run.state
    trained = traverse_util.flatten_dict(state.params["policy"])
    assert trained and all(k[-1].endswith(("_lora_a", "_lora_b")) for k in trained)
    n = adapter_count(state.params["policy"])
    assert n == sum(int(v.size) for v in trained.values())
    # AdamW: mu and nu per adapter entry; the rest of its state is scalar counts.
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sum(int(x.size) for x in moments) == 2 * n
    base = traverse_util.flatten_dict(state.fixed["policy"])
    assert ("embed",) in base and ("layers", "wq") in base and set(state.fixed) == {"policy"}

    # Gradients: one per adapter entry, nothing for the base (the step's output structure).
    batch = _global_batch(run.source.next(state), batch_sharding(run.mesh, run.global_batch))
    out, grads = jax.eval_shape(lambda s, b: accumulate(
        run.recipe.loss_fn, run.models, s.params, s.fixed, b, jax.random.key(0), 1,
        mesh=run.mesh), state, batch)
    assert jax.tree.structure(grads) == jax.tree.structure(state.params)

    # The compiled step's scratch memory holds no gradient of the base: full fine-tuning's
    # step needs at least the base's size (its gradients) more scratch per device than the
    # LoRA step on the same batch (activations are alike in both).
    step = _step(run, donate=False)
    temp = step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
    full = _open(tmp_path / "full", SFT)
    full_step = _step(full, donate=False)
    full_temp = full_step.lower(full.state, batch).compile().memory_analysis().temp_size_in_bytes
    base_bytes = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state.fixed))
    assert full_temp - temp >= base_bytes, (full_temp, temp, base_bytes)


def test_dpo_reference_is_the_base_without_adapters(tmp_path):
    """The same losses and updates as DPO with an explicit frozen copy of the initial model,
    while the state holds one model."""
    from jalign import sources

    lora = ("LoraConfig.rank=4", "LoraConfig.alpha=16", "OptimizerConfig.learning_rate=0.01")
    run = _open(tmp_path / "a", DPO, *lora)
    assert set(run.state.fixed) == {"policy"}  # the reference reads the policy's base
    step = _step(run, donate=False)

    # The explicit copy: the initial model as a full DPO run loads it, as a frozen role of
    # its own (not started like the policy, so not a view of its base).
    plain = run.model_config.replace(lora=None)
    _, initial = sources.load("random", config=plain, mesh=run.mesh)
    copy = jax.tree.map(jnp.copy, params_of(initial))
    explicit = RunModels((run.models.role("policy"), Role("reference", trains=NONE)),
                         {"policy": run.model_config, "reference": plain})
    shardings = run.shardings._replace(fixed={**run.shardings.fixed, "reference": jax.tree.map(
        lambda x: x.sharding, copy)})
    step_copy = _step(run, explicit, shardings=shardings, donate=False)
    sh = batch_sharding(run.mesh, run.global_batch)
    a, b = run.state, run.state._replace(fixed={**run.state.fixed, "reference": copy})
    assert _nbytes(b) - _nbytes(a) == _nbytes(copy)  # the copy is a whole model more
    for i in range(3):
        batch = _global_batch(run.source.next(a), sh)
        a, ma = step(a, batch)
        b, mb = step_copy(b, batch)
        # after step 1 the policy differs from the reference: the loss is not log 2
        assert abs(float(ma["loss"]) - float(mb["loss"])) <= 1e-6, (i, ma["loss"], mb["loss"])
    assert abs(float(ma["loss"]) - np.log(2)) > 1e-3
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                         atol=1e-6), a.params, b.params)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_a_quantised_base_trains_its_adapters(tmp_path, kind):
    run = _open(tmp_path, SFT, "LoraConfig.rank=4", f"LoraConfig.quantize='{kind}'",
                "LoraConfig.block_size=32", "OptimizerConfig.learning_rate=0.01")
    layers = run.state.fixed["policy"]["layers"]
    assert layers["wq"].dtype == (jnp.int8 if kind == "int8" else jnp.uint8)
    assert "wq_scale" in layers
    step = _step(run)
    sh = batch_sharding(run.mesh, run.global_batch)
    state, losses = run.state, []
    batch = _global_batch(run.source.next(run.state), sh)
    for _ in range(4):  # on one batch: its loss goes down
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses


@pytest.mark.parametrize("bindings, message", [
    (("LoraConfig.quantize='nf4'",), "LoraConfig.quantize='nf4' needs LoraConfig.rank > 0"),
    (("LoraConfig.rank=4", "OptimizerConfig.trainable='layers'"), "OptimizerConfig.trainable"),
    (("LoraConfig.rank=4", "LoraConfig.layers=(0, 5)"), "LoraConfig.layers=(0, 5): the model "
                                                          "has 2 layers"),
    (("LoraConfig.rank=4", "LoraConfig.quantize='int8'", "LoraConfig.block_size=48"),
     "LoraConfig.block_size=48 does not divide"),
])
def test_bad_lora_configs_fail_at_start(tmp_path, bindings, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _open(tmp_path, SFT, *bindings)
    assert not (tmp_path / "lora" / "checkpoints").exists()


@pytest.mark.parametrize("config", ["tiny_sft.gin", "tiny_rm.gin", "tiny_dpo.gin",
                                    "tiny_ift.gin"])
def test_every_algorithm_trains_adapters_only(tmp_path, config):
    """(PPO: tests/train/test_lora_loop.py.) One step of each algorithm with LoRA: what
    trains is adapters (and a reward model's fresh score head), they move, and the base
    does not (bit for bit)."""
    run = _open(tmp_path, str(HERE / config), "LoraConfig.rank=2",
                "OptimizerConfig.learning_rate=0.01", "OptimizerConfig.warmup_steps=0")
    (role,) = run.models.trained
    names = {k[-1] for k in traverse_util.flatten_dict(run.state.params[role])}
    want = {f"{w}_lora_{ab}" for w in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
            for ab in "ab"}
    assert names == (want | {"score"} if run.models.role(role).head == "scalar" else want)
    step = _step(run)
    before = jax.tree.map(np.asarray, run.state.params[role])
    base_before = jax.tree.map(np.asarray, run.state.fixed)
    state, m = step(run.state, _global_batch(run.source.next(run.state),
                                             batch_sharding(run.mesh, run.global_batch)))
    assert np.isfinite(float(m["loss"])) and bool(m["finite"])
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.fixed),
                 base_before)  # exact: the step never writes the base
    moved = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), b), state.params[role],
                         before)
    layers = moved["layers"] if "layers" in moved else moved["backbone"]["layers"]
    assert all(layers[n] for n in want if n.endswith("_b")), moved


def test_a_trainable_regex_is_the_same_split_as_adapters(tmp_path):
    """OptimizerConfig.trainable in a real run: the state's params hold the matched
    parameters only, the optimizer state mirrors exactly those (AdamW: two moments each,
    nothing for the frozen ones), and the rest is the frozen part, which a step never
    writes."""
    run = _open(tmp_path, SFT, "OptimizerConfig.trainable='layers/w(q|o)$'",
                "OptimizerConfig.learning_rate=0.01")
    trained = traverse_util.flatten_dict(run.state.params["policy"])
    assert sorted(trained) == [("layers", "wo"), ("layers", "wq")]
    assert ("layers", "wq") not in traverse_util.flatten_dict(run.state.fixed["policy"])
    moments = [x for x in jax.tree.leaves(run.state.opt_state) if x.ndim > 0]
    assert sum(int(x.size) for x in moments) == 2 * sum(int(v.size) for v in trained.values())
    fixed_before = jax.tree.map(np.asarray, run.state.fixed)
    state, m = _step(run)(run.state, _global_batch(run.source.next(run.state),
                                                   batch_sharding(run.mesh, run.global_batch)))
    assert bool(m["finite"])
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.fixed),
                 fixed_before)


@pytest.mark.parametrize("config", ["tiny_dpo.gin", "tiny_ppo.gin"])
def test_a_trainable_regex_with_a_frozen_copy_of_the_policy(tmp_path, config):
    """The reference is read from the policy's initial model, whose frozen rest the policy
    holds too: the state gets its own copy (one buffer cannot be donated twice), and a
    step runs (found: a crash in the state's creation)."""
    run = _open(tmp_path, str(HERE / config), "OptimizerConfig.trainable='w(q|o)$'")
    ref = {id(x) for x in jax.tree.leaves(run.state.fixed["reference"])}
    others = {id(x) for x in jax.tree.leaves((run.state.params, run.state.fixed["policy"]))}
    assert not ref & others
    if config == "tiny_dpo.gin":
        batch = _global_batch(run.source.next(run.state),
                              batch_sharding(run.mesh, run.global_batch))
        state, m = _step(run)(run.state, batch)
        assert bool(m["finite"])


def test_lora_ppo_gives_the_value_model_adapters_of_its_own(tmp_path):
    """Policy and value adapters start from different random A (one seed each), as when
    they were attached to one combined model."""
    run = _open(tmp_path, str(HERE / "tiny_ppo.gin"), "LoraConfig.rank=2")
    a_policy = np.asarray(run.state.params["policy"]["layers"]["wq_lora_a"])
    a_value = np.asarray(run.state.params["value"]["backbone"]["layers"]["wq_lora_a"])
    assert a_policy.shape == a_value.shape and not np.array_equal(a_policy, a_value)


def test_two_roles_from_one_source_get_their_own_arrays(tmp_path):
    """A teacher read from the very source the policy trains adapters on: attaching the
    policy's adapters consumes its own copy of the model, never the teacher's, and the
    QLoRA base's float weights are not kept once quantised."""
    from jalign import sources
    from jalign.models.config import preset
    from jalign.models.lora import LoraConfig
    from jalign.sharding import MeshConfig, make_mesh
    from jalign.train.roles import ADAPTERS, role_config
    from jalign.train.state_init import abstract_train_state, build_optimizer, fresh_state
    from jalign.train.optimizer import OptimizerConfig

    config = preset("tiny").replace(vocab_size=512)
    lora = LoraConfig(rank=2, quantize="int8", block_size=16)
    roles = (Role("policy", trains=ADAPTERS), Role("teacher", trains=NONE))
    models = RunModels(roles, {r.name: role_config(config, r, roles, lora) for r in roles})
    records = {r.name: {"source": "random", "seed": 0} for r in roles}
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    initial = sources.InitialModels(models, records, gin_config=config, overrides={}, mesh=mesh)
    tx, _ = build_optimizer(OptimizerConfig(), models, 10)
    _, sh = abstract_train_state(models, tx, mesh, sources.DEFAULT_RULES)
    state = fresh_state(models, initial, tx, 0, sh)
    assert all(not x.is_deleted() for x in jax.tree.leaves(state))
    assert state.fixed["policy"]["layers"]["wq"].dtype == jnp.int8
    assert state.fixed["teacher"]["layers"]["wq"].dtype == jnp.float32
    # The policy's float model was its own and is gone; only the teacher's is cached.
    assert len(initial._plain) == 1
