"""Opening a run: everything between a config and the first train step.

``open_run`` checks the config before anything is loaded or compiled (ConfigError naming
the binding), resolves the run directory, builds the mesh, reads and checks the data,
decides between resuming and starting fresh (refusing a changed config), builds the
optimizer and the sharded train state (restored, or fresh with its frozen models), and
returns a ``Run``: what the generic loop (``jalign.train.loop``) needs, with the batch
source it will draw from.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jalign.checkpoint import (CheckpointError, TrainCheckpointer, resolve_run_dir,
                               stored_frozen_models, verify_frozen)
from jalign.data.pipeline import DataConfig
from jalign.errors import ConfigError, first_line
from jalign.models.config import LlamaConfig
from jalign.models.lora import LoraConfig
from jalign.sharding import DEFAULT_RULES, MeshConfig, make_mesh
from jalign.train import preflight as P
from jalign.train import reference as R
from jalign.train.algorithm import Algorithm
from jalign.train.hosts import agree_min, agree_on, check_same_directory
from jalign.train.optimizer import OptimizerConfig
from jalign.train.partition import ParamLayout
from jalign.train.resume import check_resume, config_record, default_record, model_record
from jalign.train.setup import (EXECUTION_FIELDS, ModelInit, abstract_train_state,
                                build_optimizer, fresh_state, initial_model_config,
                                initial_policy, load_initial_model)
from jalign.train.source import BatchSource, DatasetSource, complete
from jalign.train.state import params_of
from jalign.train.train_config import TrainConfig


@dataclasses.dataclass
class Run:
    """An opened run: its configs, directory, mesh, checkpointer, state and batch source."""

    algo: Algorithm
    tc: TrainConfig
    optimizer_config: OptimizerConfig
    data_config: DataConfig
    eval_data_config: DataConfig | None
    model_config: LlamaConfig
    operative: str
    rules: Any
    run_dir: Any
    mesh: Any
    ckpt: TrainCheckpointer
    record: dict
    source: BatchSource
    eval_iter: Any
    eval_start: Any
    optimizer: Any
    schedule: Callable
    frozen_configs: dict | None
    layout: ParamLayout
    graphdef: Any
    shardings: Any
    state: Any
    start: int
    end: int
    is_main: bool
    log: Callable[[str], None]
    extra_metadata: dict = dataclasses.field(default_factory=dict)  # saved with each step

    @property
    def global_batch(self) -> int:
        """Rows of one train step (a rollout source's minibatch, or a data batch)."""
        return self.source.batch_rows()

    @property
    def row_length(self) -> int:
        return self.source.row_length()


def open_run(algo: Algorithm, *, train_config: TrainConfig, optimizer_config: OptimizerConfig,
             data_config: DataConfig, eval_data_config: DataConfig | None,
             model_config: LlamaConfig, model_init: ModelInit, mesh_config: MeshConfig,
             operative_config: str = "", rules=DEFAULT_RULES,
             allow_config_change: bool = False,
             make_source: Callable[[Any], BatchSource] | None = None,
             lora_config: LoraConfig | None = None) -> Run:
    """Open (resume or start) the run the configs describe. Raises ConfigError, before
    anything is loaded or compiled and before the run directory is created, for a problem
    in the config.

    ``make_source(data_iterator) -> BatchSource``: what the loop draws batches from
    (default: the dataset itself, ``DatasetSource``); a resumed run restores the source's
    saved state into it. ``lora_config`` with a rank: train adapters on the frozen
    (optionally quantised) initial model instead of the model itself."""
    tc = train_config
    lora_config = lora_config or LoraConfig()
    P.check_lora(lora_config, optimizer_config, algo)
    is_main = jax.process_index() == 0

    def log(text: str) -> None:
        if is_main:
            print(text, flush=True)

    if tc.eval_batches == 0:
        eval_data_config = None
    if eval_data_config is not None:  # one pass over the eval split, in order, every time
        eval_data_config = dataclasses.replace(eval_data_config, shuffle=False, num_epochs=1)
    # ---- start-time checks: nothing is loaded or compiled before they pass
    if algo.check is not None:
        algo.check(tc, data_config)
    P.check_data_kind(algo, data_config, "DataConfig")
    if eval_data_config is not None:
        P.check_data_kind(algo, eval_data_config, "eval/DataConfig")
    run_dir = resolve_run_dir(tc.output_root, tc.run_name)
    try:
        mesh = make_mesh(mesh_config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    processes = jax.process_count()
    P.check_batch_blocks(mesh, rules)
    P.check_batch_divides(mesh, data_config.batch_size, "DataConfig.batch_size",
                          accum_steps=tc.accum_steps, rules=rules, processes=processes)
    step_rows = data_config.batch_size // algo.batch_splits
    if algo.batch_splits > 1:  # a train step is a part of a data batch (PPO's minibatches)
        P.check_batch_divides(mesh, step_rows, f"the train step's batch (DataConfig.batch_size="
                              f"{data_config.batch_size} in {algo.batch_splits} parts)",
                              accum_steps=tc.accum_steps, rules=rules, processes=processes)
    if eval_data_config is not None:
        P.check_batch_divides(mesh, eval_data_config.batch_size, "eval/DataConfig.batch_size",
                              rules=rules, processes=processes)
    # Nothing is written before the data checks pass: no run directory for a failed start.
    ckpt = None
    # Every host must decide alike (opening the checkpointer is a collective on several).
    if agree_on((run_dir / "checkpoints").is_dir(), f"whether {run_dir} has checkpoints"):
        ckpt = TrainCheckpointer(run_dir, keep=tc.keep, async_save=tc.async_save)
    resume_step = (agree_on(ckpt.latest_step(), f"the latest checkpoint step of {run_dir}")
                   if ckpt is not None else None)
    # The data stream's shard count: the config's, else one per process of the run's start.
    data_shards = data_config.shards or processes
    configs = {"TrainConfig": tc, "OptimizerConfig": optimizer_config,
               "DataConfig": data_config, "eval/DataConfig": eval_data_config,
               "ModelInit": model_init, "MeshConfig": mesh_config,
               "LoraConfig": lora_config, type(algo.config).__name__: algo.config}
    record = config_record(configs)
    record.update(model_record(model_config, model_init, EXECUTION_FIELDS))
    if resume_step is not None:
        meta, resume_step = ckpt.newest_readable()
        stored = (meta.get("model_kind", "causal_lm"), stored_frozen_models(meta))
        if stored != (algo.model_kind, algo.frozen_models):
            raise ConfigError(
                f"{run_dir} holds a {stored[0]} run (frozen models: {list(stored[1])}); "
                f"algorithm {algo.name!r} trains a {algo.model_kind} (frozen models: "
                f"{list(algo.frozen_models)}): the train states differ, use another "
                "TrainConfig.run_name")
        check_resume(ckpt.read_config_record(resume_step), record, step=resume_step,
                     allow=allow_config_change, log=log,
                     defaults=resume_defaults(configs, model_config))
        model_config = _resumed_model_config(run_dir, resume_step, model_config, model_init)
        # Checkpoints from before shards were recorded come from one-process runs.
        data_shards = int(meta.get("data_shards", 1))
        if data_shards % processes:
            raise ConfigError(
                f"resuming {run_dir} step {resume_step}: its data stream is split into "
                f"{data_shards} shard(s) (DataConfig.shards, or the process count the run "
                f"started with), which {processes} processes cannot share evenly; resume "
                f"on a process count that divides {data_shards}, or start runs with "
                "DataConfig.shards set to a multiple of every process count you will use")
        # The step of a jalign: source the run started from (frozen models are rebuilt from
        # it, even when that run has trained on since).
        if meta.get("initial_model_step") is not None and model_init.step is None:
            model_init = dataclasses.replace(model_init, step=meta["initial_model_step"])
    else:
        model_init = _pin_source_step(model_init)
        model_config = _open_model_config(model_init, model_config)
    base_config = model_config.replace(lora=None)
    model_config = base_config.replace(lora=lora_config)  # None again for rank 0, plain base
    P.check_lora_shapes(lora_config, base_config)
    P.check_trainable(optimizer_config, model_config, algo.model_kind)
    # Tokenize both splits now: every split, file, format or tokenizer problem shows here.
    shard = {"process_index": jax.process_index(), "process_count": processes}
    data = P.open_data(data_config, "DataConfig", progress=tc.progress and is_main,
                       shards=data_shards, **shard)
    P.check_vocab(data, model_config.vocab_size, "DataConfig")
    eval_iter = None
    if eval_data_config is not None:
        # The train stream's shard count when it divides the eval batch: the same eval
        # rows after a resume on another process count.
        eval_shards = eval_data_config.shards or (
            data_shards if eval_data_config.batch_size % data_shards == 0 else None)
        eval_iter = P.open_data(eval_data_config, "eval/DataConfig", shards=eval_shards,
                                **shard)
        P.check_vocab(eval_iter, model_config.vocab_size, "eval/DataConfig")
        if agree_min(eval_iter.total_batches()) == 0:
            raise ConfigError(
                f"eval/DataConfig: {eval_iter.stats['examples']} eval examples per process "
                f"make no full batch of eval/DataConfig.batch_size={eval_data_config.batch_size}")
    run_dir.mkdir(parents=True, exist_ok=True)
    check_same_directory(run_dir, "TrainConfig.output_root")
    if is_main and operative_config:
        (run_dir / "operative_config.gin").write_text(operative_config)
    if ckpt is None:
        ckpt = TrainCheckpointer(run_dir, keep=tc.keep, async_save=tc.async_save)

    loaded = {}
    # What the precomputed reference scores depend on besides the data.
    reference_key = repr((model_init, model_config.to_dict(), algo.name))

    def initial_model():  # loaded at most once: for the reference pass and/or a fresh state
        if "model" not in loaded:
            lora = model_config.lora
            config, model = load_initial_model(
                model_init, base_config, mesh, rules, algo.model_kind,
                value_source=algo.value_init,
                quantize=(lora.quantize, lora.block_size) if lora and lora.quantize else None)
            if config != base_config:  # both read from the same source: a bug if not
                raise RuntimeError(f"model config changed while loading: {config} vs {base_config}")
            if model_config.lora is not None:  # fresh adapters on the base: B = 0
                from jalign.train.adapters import attach
                model = attach(model, model_config.lora, seed=model_init.seed, mesh=mesh,
                               rules=rules)
            loaded["model"] = model
        return loaded["model"]

    if algo.precompute is not None:
        for it, name in ((data, "train"), (eval_iter, "eval")):
            if it is None:
                continue

            def score(examples, chat, shard, it=it, name=name):
                # Scored now, while only one model is in memory (not next to the state);
                # cached per shard, so a resume on another process count reads it back.
                info = R.annotate(
                    examples, cache_path=run_dir / f"reference_{name}.{shard}.npz",
                    load_model=initial_model, score_fn=algo.precompute,
                    rows=it.config.batch_size // processes, length=it.config.max_length,
                    pad_id=chat.pad_id, mesh=mesh, rules=rules, model_key=reference_key,
                    progress=tc.progress and is_main)
                log(f"reference log-probs for {info['examples']} {name} pairs of shard "
                    f"{shard} {'read from cache' if info['cached'] else 'computed'}")
            it.annotate(score)
    eval_start = eval_iter.get_state() if eval_iter is not None else None

    # The schedule spans the steps the run will take: TrainConfig.steps, or fewer when the
    # data ends first (counted from the data's start, so the same on resume).
    source = complete((make_source or algo.make_source or DatasetSource)(data), data)
    if source.batch_rows() != step_rows:  # a bug in the source, not a config problem
        raise RuntimeError(f"{type(source).__name__} makes steps of {source.batch_rows()} rows; "
                           f"the algorithm said {step_rows}")
    total = source.total()
    schedule_steps = tc.steps if total is None else max(1, min(tc.steps, agree_min(total)))
    layout = ParamLayout(model_config, algo.model_kind, algo.frozen_models)
    optimizer, schedule = build_optimizer(optimizer_config, model_config, schedule_steps,
                                          algo.model_kind, layout)
    # With adapters the frozen models are views of the base: nothing extra in the state.
    frozen_configs = ({name: model_config for name in algo.frozen_models}
                      if algo.frozen_models and not layout.adapters else None)
    graphdef, abstract_state, shardings = abstract_train_state(
        model_config, optimizer, mesh, rules, frozen_configs, algo.model_kind, layout)
    if resume_step is not None:
        state, data_state, meta, restored_step = ckpt.restore_intact(abstract_state, log=log)
        if layout.adapters:  # the base is rebuilt from the source and checked, not stored
            state = state._replace(base=_rebuilt_base(initial_model, layout, meta, model_init,
                                                      run_dir, shardings))
        if state.frozen is None and frozen_configs:  # rebuilt from the source, as at the start
            try:
                # One copy per frozen model: the step donates the state, and one buffer
                # cannot be donated twice.
                frozen = {name: jax.tree.map(jnp.copy, params_of(initial_policy(initial_model())))
                          for name in algo.frozen_models}
            except (CheckpointError, OSError) as e:
                raise ConfigError(f"resuming {run_dir}: the frozen models "
                                  f"{list(algo.frozen_models)} are rebuilt from "
                                  f"ModelInit.source={model_init.source!r}, which fails to "
                                  f"load: {first_line(e)}") from None
            try:
                verify_frozen(meta, frozen, model_init.source)
            except CheckpointError as e:
                raise ConfigError(f"resuming {run_dir}: {e}") from None
            state = state._replace(frozen=jax.device_put(frozen, shardings.frozen))
            del frozen
        source.set_state(data_state)
        log(f"resumed {run_dir} at step {restored_step}")
    else:
        model = initial_model()
        # Every FrozenModel.init is 'initial_policy' (FROZEN_INITS): the initial model.
        frozen = ({name: params_of(initial_policy(model)) for name in algo.frozen_models}
                  if frozen_configs else None)
        state = fresh_state(model, optimizer, tc.seed, shardings, frozen, layout)
        del model, frozen
    loaded.clear()
    start = int(jax.device_get(state.step))
    if layout.adapters:
        trained = sum(int(x.size) for x in jax.tree.leaves(state.params))
        lora = model_config.lora
        log(f"LoRA rank {lora.rank} on {', '.join(lora.targets)}: training {trained:,} "
            f"parameters ({100 * trained / model_config.num_params():.2f}% of the "
            f"{model_config.num_params():,} of the base, which is frozen"
            + (f" and stored as {lora.quantize})" if lora.quantize else ")"))

    # With a finite number of epochs the data ends: every process stops at the same step.
    end = tc.steps
    if total is not None:
        end = min(tc.steps, start + agree_min(source.remaining()))
        if end < tc.steps:
            log(f"note: DataConfig.num_epochs={data_config.num_epochs} gives {total} batches: "
                f"training ends at step {end}, before TrainConfig.steps={tc.steps}")

    pinned = ({"initial_model_step": model_init.step}
              if model_init.source.startswith("jalign:") else {})
    pinned["data_shards"] = data_shards  # a resumed run reads the same stream
    if layout.adapters:  # where the base comes from: export and restore rebuild it
        from jalign.train.adapters import base_pointer
        pinned["lora_base"] = base_pointer(model_init, algo.value_init)
    return Run(algo=algo, tc=tc, optimizer_config=optimizer_config, data_config=data_config,
               eval_data_config=eval_data_config, model_config=model_config,
               operative=operative_config, rules=rules, run_dir=run_dir, mesh=mesh, ckpt=ckpt,
               record=record, source=source, eval_iter=eval_iter,
               eval_start=eval_start, optimizer=optimizer, schedule=schedule,
               frozen_configs=frozen_configs, layout=layout, graphdef=graphdef,
               shardings=shardings,
               state=state, start=start, end=end, is_main=is_main, log=log,
               extra_metadata=pinned)


def resume_defaults(configs: dict, model_config: LlamaConfig) -> dict:
    """The defaults a resumed run's record is compared with (a field an older checkpoint's
    record lacks, at its default now, is a setting added since): every config's, and the
    model's (its record holds LlamaConfig fields too, e.g. ``lora``, added with LoRA)."""
    return default_record({**configs, "LlamaConfig": model_config})


def _rebuilt_base(initial_model, layout: ParamLayout, meta: dict, model_init: ModelInit,
                  run_dir, shardings):
    """The frozen base of a resumed LoRA run, rebuilt from its source and refused when it
    differs from the one the run trained on (by the checksums saved with the step)."""
    from jalign import checksum
    try:
        _, base = layout.split(params_of(initial_model()))
    except (CheckpointError, OSError) as e:
        raise ConfigError(f"resuming {run_dir}: the adapters' base is rebuilt from "
                          f"ModelInit.source={model_init.source!r}, which fails to load: "
                          f"{first_line(e)}") from None
    expected = meta.get("checksums", {}).get("base")
    bad = checksum.mismatches(expected, base) if expected else []
    if bad:
        raise ConfigError(f"resuming {run_dir}: the base rebuilt from ModelInit.source="
                          f"{model_init.source!r} differs from the one the adapters were "
                          f"trained on ({len(bad)} arrays, e.g. {bad[:2]}): the source changed "
                          "since; restore it, or start another TrainConfig.run_name")
    return jax.device_put(base, shardings.base)


def _pin_source_step(model_init: ModelInit) -> ModelInit:
    """A jalign: source with its latest step made explicit (recorded with every checkpoint,
    so a resumed run rebuilds its frozen models from the same step)."""
    if not model_init.source.startswith("jalign:") or model_init.step is not None:
        return model_init
    from jalign.checkpoint import latest_step
    try:
        step = latest_step(model_init.source[len("jalign:"):])
    except (CheckpointError, OSError) as e:
        raise ConfigError(f"ModelInit.source={model_init.source!r}: {e}") from None
    return dataclasses.replace(model_init, step=step)


def _open_model_config(model_init: ModelInit, model_config: LlamaConfig) -> LlamaConfig:
    from jalign.checkpoint import CheckpointError
    from jalign.convert.safetensors_io import ConversionError
    try:
        return initial_model_config(model_init, model_config)
    except (CheckpointError, ConversionError, OSError) as e:
        raise ConfigError(f"ModelInit.source={model_init.source!r}: {e}") from None


def _resumed_model_config(run_dir, step: int, gin_config: LlamaConfig,
                          model_init: ModelInit) -> LlamaConfig:
    """The checkpoint's architecture with this run's execution fields (remat, scan, attention
    backend, compute dtype), as a fresh run from the same source would have them; the
    parameter dtype is the stored state's and cannot change on resume."""
    from jalign.checkpoint import read_model_config
    stored = read_model_config(run_dir, step)
    if model_init.source != "random" and not model_init.use_execution_config:
        return stored
    if gin_config.param_dtype != stored.param_dtype:
        raise ConfigError(f"LlamaConfig.param_dtype={gin_config.param_dtype!r}: the train state "
                          f"at step {step} is stored as {stored.param_dtype!r} and a resumed run "
                          "keeps it; convert the checkpoint or start another TrainConfig.run_name")
    return stored.replace(**{f: getattr(gin_config, f) for f in EXECUTION_FIELDS
                             if f != "param_dtype"})
