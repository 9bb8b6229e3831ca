"""Where a run's initial model comes from, and building the sharded train state."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jalign.models.build import abstract_model, create_model
from jalign.models.config import LlamaConfig
from jalign.models.heads import model_class
from jalign.sharding import DEFAULT_RULES, Rules
from jalign.train.optimizer import OptimizerConfig, make_optimizer
from jalign.train.state import init_state, model_param_shardings, params_of, state_shardings

EXECUTION_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl")


@dataclasses.dataclass(frozen=True)
class ModelInit:
    """``source``: ``random`` (the gin LlamaConfig), ``hf:PATH_OR_HUB_ID`` or
    ``jalign:CHECKPOINT_DIR``. Execution fields (dtype, param_dtype, scan_layers,
    remat_policy, attention_impl) of the gin LlamaConfig apply to every source when
    ``use_execution_config`` is set, so a bf16 run can start from an fp32 checkpoint."""

    source: str = "random"
    seed: int = 0
    use_execution_config: bool = True
    step: int | None = None  # jalign: sources: which checkpoint step (None: the latest)

    def __post_init__(self):
        if self.step is not None and (not self.source.startswith("jalign:") or self.step < 0):
            raise ValueError(f"ModelInit.step={self.step} needs a 'jalign:DIR' source and a "
                             f"step >= 0 (source: {self.source!r})")
        if self.source != "random" and not self.source.startswith(("hf:", "jalign:")):
            raise ValueError(f"ModelInit.source={self.source!r}: use 'random', 'hf:PATH' or "
                             "'jalign:DIR'")


def _execution_overrides(config: LlamaConfig) -> dict:
    return {f: getattr(config, f) for f in EXECUTION_FIELDS}


def initial_model_config(init: ModelInit, gin_config: LlamaConfig) -> LlamaConfig:
    """The architecture a run will have, read from the source without loading weights."""
    overrides = _execution_overrides(gin_config) if init.use_execution_config else {}
    if init.source == "random":
        return gin_config.replace(lora=None)
    if init.source.startswith("hf:"):
        from jalign.convert.hf import _resolve_directory, read_hf_config
        return read_hf_config(_resolve_directory(init.source[3:], config_only=True), **overrides)
    from jalign.checkpoint import read_model_config
    # A LoRA run as the source starts this run from its merged weights: a plain model.
    return read_model_config(init.source[7:], init.step).replace(lora=None, **overrides)


def load_initial_model(init: ModelInit, gin_config: LlamaConfig, mesh, rules: Rules = DEFAULT_RULES,
                       model_kind: str = "causal_lm", value_source: str = "policy",
                       quantize: tuple[str, int] | None = None):
    """(config, model) placed on ``mesh``. ``model_kind="scalar_head"`` (a reward model)
    from a causal-LM source keeps its backbone and starts a fresh score head (seeded by
    ``init.seed``). ``policy_value`` (PPO): the policy from ``init``, the value model from
    ``value_source``: ``policy`` (its backbone, a fresh score head) or a ``jalign:DIR`` /
    ``hf:PATH`` reward model, which must have the policy's architecture. ``quantize`` =
    (kind, block size): an ``hf:`` source is read straight into projection codes (a QLoRA
    base that never exists whole in its parameter dtype; other sources load plain and are
    quantised when the adapters are attached)."""
    if model_kind == "policy_value":
        return _policy_value(init, gin_config, mesh, rules, value_source, quantize)
    gin_config = gin_config.replace(lora=None)  # sources load as plain models
    overrides = _execution_overrides(gin_config) if init.use_execution_config else {}
    if init.source == "random":
        return gin_config, create_model(gin_config, seed=init.seed, mesh=mesh, rules=rules,
                                        model_cls=model_class(model_kind))
    if init.source.startswith("hf:"):
        from jalign.convert.hf import load_hf
        dtype = overrides.pop("param_dtype", None)
        compute = overrides.pop("dtype", None)
        head = "scalar" if model_kind == "scalar_head" else "lm"
        config, model = load_hf(init.source[3:], mesh=mesh, dtype=dtype, compute_dtype=compute,
                                rules=rules, head=head, seed=init.seed, quantize=quantize,
                                **overrides)
        return config.replace(lora=None), model
    return load_run_model(init.source[7:], step=init.step, mesh=mesh, rules=rules,
                          model_kind=model_kind, seed=init.seed, **overrides)


def _policy_value(init: ModelInit, gin_config: LlamaConfig, mesh, rules: Rules,
                  value_source: str, quantize):
    from jalign.errors import ConfigError
    from jalign.models.heads import PolicyValueModel
    config, policy = load_initial_model(init, gin_config, mesh, rules, "causal_lm",
                                        quantize=quantize)
    if value_source == "policy":
        _, value = load_initial_model(init, gin_config, mesh, rules, "scalar_head",
                                      quantize=quantize)
    else:
        value_init = ModelInit(source=value_source, seed=init.seed,
                               use_execution_config=init.use_execution_config)
        value_config, value = load_initial_model(value_init, gin_config, mesh, rules,
                                                 "scalar_head", quantize=quantize)
        fields = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                  "vocab_size", "head_dim")
        differ = [f"{f}: {getattr(value_config, f)} vs {getattr(config, f)}" for f in fields
                  if getattr(value_config, f) != getattr(config, f)]
        if differ:
            raise ConfigError(f"PPOConfig.value_init={value_source!r}: the value model must "
                              f"have the policy's architecture ({'; '.join(differ)})")
    graphdef, abstract = abstract_model(policy.config, mesh, rules, PolicyValueModel)
    nnx.replace_by_pure_dict(abstract, {"policy": params_of(policy), "value": params_of(value)})
    return config, nnx.merge(graphdef, abstract)


def initial_policy(model):
    """The causal LM of an initial model (the policy of a policy-and-value model): what a
    frozen reference copies."""
    from jalign.models.heads import PARTS, kind_of
    return getattr(model, PARTS["causal_lm"]) if kind_of(model) == "policy_value" else model


def frozen_graphdefs(layout) -> dict:
    """name -> graphdef of each frozen (causal LM) model, for make_train_step: the
    trained model's architecture (with adapters: its base without them)."""
    return {name: abstract_model(layout.reference_config)[0] for name in layout.frozen_names}


def abstract_train_state(config: LlamaConfig, optimizer, mesh, rules: Rules = DEFAULT_RULES,
                         frozen_configs: dict | None = None, model_kind: str = "causal_lm",
                         layout=None):
    """(graphdef, abstract TrainState with shardings) — the restore target.
    ``frozen_configs``: name -> LlamaConfig of each frozen causal LM (e.g. the reference).
    ``layout`` with adapters: params are the adapters, the rest is ``base``."""
    graphdef, abstract = abstract_model(config, mesh, rules, model_class(model_kind))
    params_sh = model_param_shardings(abstract, mesh, rules)
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype),
                          nnx.to_pure_dict(abstract))
    base = base_sh = None
    if layout is not None and layout.adapters:
        (params, base), (params_sh, base_sh) = layout.split(params), layout.split(params_sh)
    frozen, frozen_sh = None, None
    if frozen_configs:
        frozen, frozen_sh = {}, {}
        for name, cfg in frozen_configs.items():
            _, fab = abstract_model(cfg, mesh, rules)
            frozen[name] = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype),
                                        nnx.to_pure_dict(fab))
            frozen_sh[name] = model_param_shardings(fab, mesh, rules)
    shapes = jax.eval_shape(lambda p, f, b: init_state(p, optimizer, 0, f, b), params, frozen,
                            base)
    sh = state_shardings(shapes, params_sh, mesh, frozen_sh, base_sh)
    abstract_state = jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h),
                                  shapes, sh)
    return graphdef, abstract_state, sh


def build_optimizer(opt: OptimizerConfig, config: LlamaConfig, total_steps: int,
                    model_kind: str = "causal_lm", layout=None):
    """The optimizer over what trains (with adapters: only them, so it holds no state for
    the frozen base)."""
    graphdef, abstract = abstract_model(config, model_cls=model_class(model_kind))
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype),
                          nnx.to_pure_dict(abstract))
    if layout is not None:
        params = layout.split(params)[0]
    return make_optimizer(opt, params, total_steps)


def fresh_state(model, optimizer, seed: int, shardings, frozen=None, layout=None):
    """Initial TrainState placed with ``shardings`` (optimizer state created in place).

    ``frozen`` may hold the very arrays of ``model`` (a reference = the initial policy):
    they are copied, because the step donates the state and one buffer cannot be donated
    twice. With adapters (``layout``) the model's frozen part becomes ``state.base``; its
    buffers are donated to the state (``model`` must not be used after)."""
    params, base = (params_of(model), None) if layout is None else layout.split(params_of(model))

    def init(p, f, b):
        return init_state(p, optimizer, seed, jax.tree.map(jnp.copy, f), b)

    return jax.jit(init, out_shardings=shardings, donate_argnums=(2,))(params, frozen, base)


# ------------------------------------------------------------------ checkpoints of runs

def load_run_model(directory, *, step: int | None = None, mesh=None, rules: Rules = DEFAULT_RULES,
                   model_kind: str | None = None, seed: int = 0, adapters: bool = False,
                   **config_overrides):
    """(config, model) of a jalign checkpoint step (default: the latest), as
    ``jalign.checkpoint.load_model`` reads it, and also of a LoRA run's: its base rebuilt
    from the source the run recorded (and refused when its checksums differ from the
    run's), its adapters restored onto it, then merged into plain weights unless
    ``adapters`` (the adapted model itself). ``model_kind`` as in ``load_model``."""
    from jalign.checkpoint import latest_step, load_model, read_model_config
    step = latest_step(directory) if step is None else step
    config = read_model_config(directory, step).replace(**config_overrides)
    if config.lora is None or not config.lora.enabled:
        return load_model(directory, step=step, mesh=mesh, rules=rules, model_kind=model_kind,
                          seed=seed, **config_overrides)
    return _lora_run_model(directory, step, config, model_kind, mesh, rules, seed, adapters)


def _lora_run_model(directory, step: int, config: LlamaConfig, wanted: str | None, mesh,
                    rules: Rules, seed: int, adapters: bool):
    from jalign.checkpoint import CheckpointError, read_metadata
    from jalign.models.heads import PARTS, fresh_score, scalar_params_from_lm
    from jalign.train.adapters import merge
    metadata = read_metadata(directory, step)
    stored = metadata.get("model_kind", "causal_lm")
    wanted = wanted or stored
    if "lora_base" not in metadata:
        raise CheckpointError(f"{directory} step {step}: a LoRA model without a recorded base "
                              "(metadata['lora_base'])")
    model = _adapted_model(directory, step, metadata, config, stored, mesh, rules)
    if not adapters:
        model = merge(model)
    if stored == "policy_value" and wanted in PARTS:  # a PPO run's policy or value model
        model = getattr(model, PARTS[wanted])
    elif (stored, wanted) == ("causal_lm", "scalar_head"):  # a reward model from an SFT run
        if adapters:
            raise CheckpointError(f"{directory}: a LoRA causal LM loads as a reward model only "
                                  "merged (adapters=False)")
        graphdef, abstract = abstract_model(model.config, mesh, rules, model_class(wanted))
        score = fresh_score(model.config, seed)
        if mesh is not None:
            score = jax.device_put(score, abstract["score"].sharding)
        nnx.replace_by_pure_dict(abstract, scalar_params_from_lm(params_of(model), score))
        model = nnx.merge(graphdef, abstract)
    elif stored != wanted:
        raise CheckpointError(f"{directory} step {step} holds a {stored} model; cannot load "
                              f"it as {wanted}")
    return model.config, model


def _adapted_model(directory, step: int, metadata: dict, config: LlamaConfig, kind: str, mesh,
                   rules: Rules):
    """A LoRA run's adapted model at ``step``: the base rebuilt as the run started from it,
    checked against the step's checksums, with the step's adapters."""
    from jalign import checksum
    from jalign.checkpoint import CheckpointError, restore_params
    from jalign.train.adapters import attach
    from jalign.train.partition import ParamLayout
    pointer, lora = metadata["lora_base"], config.lora
    init = ModelInit(source=pointer["source"], seed=pointer["seed"], step=pointer["step"],
                     use_execution_config=pointer["use_execution_config"])
    _, base_model = load_initial_model(
        init, config.replace(lora=None), mesh, rules, kind,
        value_source=pointer.get("value_init", "policy"),
        quantize=(lora.quantize, lora.block_size) if lora.quantize else None)
    model = attach(base_model, lora, seed=pointer["seed"], mesh=mesh, rules=rules)
    layout = ParamLayout(config, kind)
    _, base = layout.split(params_of(model))
    expected = metadata.get("checksums", {}).get("base")
    bad = checksum.mismatches(expected, base) if expected else []
    if bad:
        raise CheckpointError(
            f"{directory} step {step}: the base its adapters were trained on, rebuilt from "
            f"{pointer['source']!r}, differs from the one the run used ({len(bad)} arrays, "
            f"e.g. {bad[:2]}): the source changed since; restore it")
    graphdef, abstract = abstract_model(config, mesh, rules, type(model))
    trained_abstract, _ = layout.split(nnx.to_pure_dict(abstract))
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        trained_abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), trained_abstract)
    trained = restore_params(directory, step, trained_abstract, metadata)
    nnx.replace_by_pure_dict(abstract, layout.join(trained, base))
    return nnx.merge(graphdef, abstract)
