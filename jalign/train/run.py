"""Opening a run: everything between a config and the first train step.

``open_run`` goes through named stages:
1. ``check_start``: problems knowable from the configs alone (ConfigError naming the
   binding), before anything is loaded, compiled or written;
2. ``find_resume``: whether the run directory holds a checkpoint to continue (agreed by
   every host), and what it recorded (``resume.ResumePoint``, refusing a changed config);
3. ``resolve_models``: the recipe's roles with the user's choices (LoRA, a trainable
   regex) and their model configs, each role's source pinned;
4. ``open_data``: both splits read and tokenized (every split, file, format or
   tokenizer problem shows here);
5. the batch source (``recipe.batch_source``), the optimizer over what trains, and the
   train state: restored (its unsaved fixed parts rebuilt from their sources and checked)
   or fresh.
It returns a ``Run``: what the generic loop (``jalign.train.loop``) needs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from jalign import sources
from jalign.checkpoint import CheckpointError, TrainCheckpointer, resolve_run_dir
from jalign.data.pipeline import DataConfig
from jalign.data.tokenizer_files import save_tokenizer
from jalign.errors import ConfigError, check_writable, first_line
from jalign.models.lora import LoraConfig
from jalign.sharding import DEFAULT_RULES, MeshConfig, abstract_mesh, make_mesh
from jalign.train import preflight as P
from jalign.train import roles as R
from jalign.train.hosts import (agree_min, agree_on, all_states, check_same_directory,
                                 from_process_0)
from jalign.train.operative import operative_for_models
from jalign.train.optimizer import OptimizerConfig
from jalign.train.recipe import Recipe
from jalign.train.run_lock import LOCK_NAME, RunLock
from jalign.train.resume import ResumePoint, config_record, model_record, read_resume_point
from jalign.train.source import SourceContext, complete
from jalign.train.state_init import build_state
from jalign.train.train_config import TrainConfig


@dataclasses.dataclass(frozen=True)
class RunConfigs:
    """The configs of one run, as gin built them."""

    train: TrainConfig
    optimizer: OptimizerConfig
    data: DataConfig
    eval_data: DataConfig | None
    model: Any                     # the gin model config (a random source's architecture)
    model_init: sources.ModelInit
    mesh: MeshConfig
    lora: LoraConfig = LoraConfig()

    def by_binding(self, recipe: Recipe) -> dict:
        """{binding: config} of everything recorded and compared on resume."""
        out = {"TrainConfig": self.train, "OptimizerConfig": self.optimizer,
               "DataConfig": self.data, "eval/DataConfig": self.eval_data,
               "ModelInit": self.model_init, "MeshConfig": self.mesh, "LoraConfig": self.lora}
        if recipe.config is not None:
            out[type(recipe.config).__name__] = recipe.config
        return out


@dataclasses.dataclass
class Run:
    """An opened run: what the loop reads."""

    recipe: Recipe
    configs: RunConfigs
    models: R.RunModels
    operative: str
    rules: Any
    run_dir: Any
    mesh: Any
    ckpt: TrainCheckpointer
    record: dict
    source: Any
    eval_iter: Any
    eval_start: Any
    optimizer: Any
    schedule: Callable
    shardings: Any
    state: Any
    start: int
    end: int
    log: Callable[[str], None]
    metadata: dict = dataclasses.field(default_factory=dict)  # saved with each step
    lock: Any = None  # the run directory's RunLock, released when the loop ends

    @property
    def tc(self) -> TrainConfig:
        return self.configs.train

    @property
    def model_config(self):
        """The model config of the run's primary role (what its checkpoints record)."""
        return self.models.configs[self.models.primary]

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    @property
    def global_batch(self) -> int:
        """Rows of one train step (a rollout source's minibatch, or a data batch)."""
        return self.source.batch_rows()

    @property
    def row_length(self) -> int:
        return self.source.row_length()


def _log_main(text: str) -> None:
    if jax.process_index() == 0:
        print(text, flush=True)


def open_run(recipe: Recipe, configs: RunConfigs, *, operative: str = "",
             rules=DEFAULT_RULES, allow_config_change: bool = False,
             make_source: Callable | None = None, show_operative: bool = False) -> Run:
    """Open (resume or start) the run the configs describe. Raises ConfigError, before
    anything is loaded or compiled (and leaving no new run directory behind), for a
    problem in the config or a run directory another run holds. ``make_source(
    data_iterator) -> BatchSource`` replaces the recipe's batch source (tests); a resumed
    run restores the source's saved state into it. The returned run holds its directory's
    lock (``run_lock``) until the loop ends."""
    log = _log_main
    configs = normalized(configs)
    mesh, run_dir = check_start(recipe, configs, rules)
    created = not run_dir.exists()
    lock = take_run_lock(run_dir, log, f"TrainConfig.output_root={configs.train.output_root!r} "
                                       f"(run_name {configs.train.run_name!r})")
    try:
        run = _open_locked(recipe, configs, mesh, run_dir, operative=operative, rules=rules,
                           allow_config_change=allow_config_change, make_source=make_source,
                           show_operative=show_operative, log=log)
    except BaseException:
        if created:  # a run refused at start leaves nothing behind (removed while locked)
            remove_empty_run_dir(run_dir)
        lock.release()
        raise
    run.lock = lock
    return run


def take_run_lock(run_dir, log, what: str) -> RunLock:
    """The run directory's lock, taken by process 0 for every process (the same
    ConfigError everywhere when another run holds it, or when ``what``, the binding of the
    run directory, names a place this user cannot write)."""
    lock = RunLock(run_dir)
    error = ""
    if jax.process_index() == 0:
        try:
            check_writable(run_dir, what)
            check_writable(run_dir / "checkpoints" / "next", what)  # a resumed run's saves
            lock.acquire(log)
        except ConfigError as e:
            error = str(e)
        except OSError as e:  # the run's first write: an unwritable place shows here
            error = f"{what}: cannot write {run_dir}: {e.strerror}"
        except Exception as e:  # whatever it is, every process must stop alike
            error = f"{what}: cannot take the lock of {run_dir} ({type(e).__name__}: {e})"
    error = from_process_0(error)
    if error:
        raise ConfigError(error)
    return lock


def remove_empty_run_dir(run_dir) -> None:
    """Remove a run directory that holds nothing but its lock file."""
    if jax.process_index() != 0:
        return
    try:
        if {p.name for p in run_dir.iterdir()} <= {LOCK_NAME}:
            (run_dir / LOCK_NAME).unlink(missing_ok=True)
            run_dir.rmdir()
    except OSError:
        pass


def _open_locked(recipe: Recipe, configs: RunConfigs, mesh, run_dir, *, operative, rules,
                 allow_config_change, make_source, show_operative, log) -> Run:
    point = find_resume(recipe, configs, run_dir, allow_config_change, log)
    models = resolve_models(recipe, configs, point)
    # Each role's pinned source, saved with each step: process 0's (a source run saving
    # meanwhile could give hosts different latest steps).
    records = from_process_0(point.role_records(models))
    operative = operative_for_models(operative, models, records)
    if operative and show_operative:
        log("operative config:\n" + operative)
    configs, named = resolve_tokenizers(configs, point, run_dir)
    data, eval_iter = open_data(configs, point, models, named)
    skipped = report_skipped(data, eval_iter, log)
    fingerprint = check_data_unchanged(point, data, allow_config_change, log)
    ckpt = prepare_run_dir(run_dir, configs.train, operative, point, data.chat)
    initial = initial_models(models, records, point, configs, mesh, rules)
    ctx = SourceContext(mesh=mesh, rules=rules, seed=configs.train.seed, models=models,
                        initial=initial.model, initial_key=lambda n: _initial_key(initial, n),
                        run_dir=run_dir, eval_data=eval_iter,
                        eval_batches=configs.train.eval_batches,
                        accum_steps=configs.train.accum_steps,
                        progress=configs.train.progress and jax.process_index() == 0, log=log)
    source = complete((make_source or (lambda d: recipe.batch_source(d, ctx)))(data), data)
    step_rows = recipe.step_rows(configs.data.batch_size)
    if source.batch_rows() != step_rows:  # a bug in the source, not a config problem
        raise RuntimeError(f"{type(source).__name__} makes steps of {source.batch_rows()} rows; "
                           f"the recipe said {step_rows}")
    # A source that lays rows out for the step's micro-batches (GRPO's whole groups) must
    # have been told how many there are.
    if getattr(source, "accum_steps", configs.train.accum_steps) != configs.train.accum_steps:
        raise RuntimeError(f"{type(source).__name__} lays out {source.accum_steps} micro-batches "
                           f"per step; TrainConfig.accum_steps={configs.train.accum_steps}")
    eval_start = eval_iter.get_state() if eval_iter is not None else None
    built = build_state(models, initial, configs, mesh, rules, ckpt, point, source, run_dir,
                        log)
    initial.clear()
    start = int(jax.device_get(built.state.step))
    _describe_training(models, built.state, log)
    return Run(recipe=recipe, configs=configs, models=models, operative=operative,
               rules=rules, run_dir=run_dir, mesh=mesh, ckpt=ckpt, record=point.record,
               source=source, eval_iter=eval_iter, eval_start=eval_start,
               optimizer=built.optimizer, schedule=built.schedule, shardings=built.shardings,
               state=built.state, start=start, end=_end_step(configs, source, start, log),
               log=log, metadata={"roles": records, "data_shards": point.data_shards,
                                  "data_fingerprint": fingerprint, "data_skipped": skipped})


# ------------------------------------------------------------------ 1. checks at start

def normalized(configs: RunConfigs) -> RunConfigs:
    """No eval data when no evaluation; the eval split read once, in order, every time."""
    eval_data = configs.eval_data
    if configs.train.eval_batches == 0:
        eval_data = None
    if eval_data is not None:
        eval_data = dataclasses.replace(eval_data, shuffle=False, num_epochs=1)
    return dataclasses.replace(configs, eval_data=eval_data)


def check_start(recipe: Recipe, configs: RunConfigs, rules, devices=None,
                processes: int | None = None, abstract: int | None = None) -> tuple:
    """(mesh, run directory) after every check the configs alone allow, for ``devices`` in
    ``processes`` processes (default: this run's; ``jalign plan``: a topology's), or for
    an abstract mesh of ``abstract`` devices (no process layout to check)."""
    tc = configs.train
    P.check_lora(configs.lora, configs.optimizer)
    recipe.check(configs)
    P.check_data_kind(recipe, configs.data, "DataConfig")
    if configs.eval_data is not None:
        P.check_data_kind(recipe, configs.eval_data, "eval/DataConfig")
    run_dir = resolve_run_dir(tc.output_root, tc.run_name)
    try:
        mesh = (make_mesh(configs.mesh, devices) if abstract is None
                else abstract_mesh(configs.mesh, abstract))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    except (NotImplementedError, AssertionError) as e:  # jax.make_mesh on a device layout
        raise ConfigError(f"MeshConfig {configs.mesh.shape(len(devices or jax.devices()))} "
                          f"cannot be laid out on these devices' interconnect "
                          f"({first_line(str(e)) or type(e).__name__}): choose axis sizes "
                          "that follow the slice's shape") from None
    processes = jax.process_count() if processes is None else processes
    if abstract is None:
        P.check_batch_blocks(mesh, rules)
    batch = configs.data.batch_size
    P.check_batch_divides(mesh, batch, "DataConfig.batch_size", accum_steps=tc.accum_steps,
                          rules=rules, processes=processes)
    step_rows = recipe.step_rows(batch)
    if step_rows != batch:  # a train step is a part of a data batch (PPO's minibatches)
        P.check_batch_divides(mesh, step_rows, f"the train step's batch (DataConfig.batch_size="
                              f"{batch} in {batch // step_rows} parts)",
                              accum_steps=tc.accum_steps, rules=rules, processes=processes)
    if configs.eval_data is not None:
        P.check_batch_divides(mesh, configs.eval_data.batch_size, "eval/DataConfig.batch_size",
                              rules=rules, processes=processes)
    return mesh, run_dir


# ------------------------------------------------------------------ 2. resume or start

def find_resume(recipe: Recipe, configs: RunConfigs, run_dir, allow: bool, log) -> ResumePoint:
    """What the run continues from: nothing (a fresh start, its sources pinned) or the
    newest readable checkpoint, checked against this run's recipe and configs."""
    by_binding = configs.by_binding(recipe)
    record = config_record(by_binding)
    record.update(model_record(configs.model, configs.model_init, sources.EXECUTION_FIELDS))
    # Every host must decide alike (opening the checkpointer is a collective on several).
    has = agree_on((run_dir / "checkpoints").is_dir(), f"whether {run_dir} has checkpoints")
    ckpt = TrainCheckpointer(run_dir, keep=configs.train.keep,
                             async_save=configs.train.async_save) if has else None
    step = agree_on(ckpt.latest_step(), f"the latest checkpoint step of {run_dir}") if has else None
    if step is None:
        return fresh_point(configs, record, ckpt)
    return read_resume_point(ckpt, step, recipe, configs, by_binding, record, allow=allow,
                             log=log)


def fresh_point(configs: RunConfigs, record: dict, ckpt=None,
                processes: int | None = None) -> ResumePoint:
    """A start from ``ModelInit.source`` (pinned; its architecture read, no weights)."""
    init = configs.model_init
    try:
        source = init.model_source().pinned()
        model_config = sources.read_config(source, configs.model, _overrides(configs))
    except (CheckpointError, OSError, ValueError) as e:
        raise ConfigError(f"ModelInit.source={init.source!r}: {first_line(e)}") from None
    processes = jax.process_count() if processes is None else processes
    return ResumePoint(record=record, source=source, model_config=model_config,
                       ckpt=ckpt, data_shards=configs.data.shards or processes,
                       seed=init.seed, use_execution_config=init.use_execution_config)


def _overrides(configs: RunConfigs) -> dict | None:
    """The gin config's execution fields when they apply to the source's model."""
    return sources.execution(configs.model) if configs.model_init.use_execution_config else {}


# ------------------------------------------------------------------ 3. the roles

def resolve_models(recipe: Recipe, configs: RunConfigs, point: ResumePoint) -> R.RunModels:
    """The recipe's roles with the user's choices, each with its model config."""
    lora = configs.lora
    roles = R.with_user_choices(recipe.roles, lora=lora, trainable=configs.optimizer.trainable)
    base = point.model_config.replace(lora=None)
    P.check_lora_shapes(lora, base)
    lora_or_none = lora if (lora.enabled or lora.quantize) else None
    role_configs = {r.name: R.role_config(base, r, roles, lora_or_none) for r in roles}
    models = R.RunModels(roles, role_configs, lora.value_base)
    P.check_trainable(models, configs.optimizer)
    if point.step is None:
        P.check_role_sources(models, _overrides(configs))
    return models


# ------------------------------------------------------------------ 4. data

def resolve_tokenizers(configs: RunConfigs, point: ResumePoint, run_dir) -> tuple:
    """(configs with every DataConfig.tokenizer named, {binding: how it was chosen}).

    None is the model's own tokenizer (``sources.tokenizer_spec``: an ``hf:``/``gguf:``
    model's files, a ``jalign:`` run's, the bundled one for a random model); a resumed run
    keeps the one it trained with (its run directory's copy; runs written before they kept
    one used the bundled tokenizer for None)."""
    spec = None
    if point.step is not None:
        own = run_dir / sources.TOKENIZER_DIR
        spec = str(own) if own.is_dir() else "bundled"
    named = {}
    out = {}
    for binding, field in (("DataConfig", "data"), ("eval/DataConfig", "eval_data")):
        dc = getattr(configs, field)
        if dc is None or dc.tokenizer is not None:
            named[binding] = f"{binding}.tokenizer={None if dc is None else dc.tokenizer!r}"
            continue
        if spec is None:
            try:
                spec = sources.tokenizer_spec(point.source)
            except ValueError as e:
                raise ConfigError(f"{binding}.tokenizer=None: {e}") from None
        out[field] = dataclasses.replace(dc, tokenizer=spec)
        named[binding] = f"{binding}.tokenizer=None (the model's own: {spec!r})"
    return dataclasses.replace(configs, **out), named


def open_data(configs: RunConfigs, point: ResumePoint, models: R.RunModels, named: dict):
    """(train iterator, eval iterator or None), tokenized and checked against the model."""
    vocab = models.configs[models.primary]  # its vocabulary size bounds the token ids
    processes = jax.process_count()
    shard = {"process_index": jax.process_index(), "process_count": processes}
    tc = configs.train
    data = P.open_data(configs.data, "DataConfig", progress=tc.progress and shard["process_index"] == 0,
                       shards=point.data_shards, **shard)
    P.check_vocab(data, vocab, named["DataConfig"])
    eval_iter, ec = None, configs.eval_data
    if ec is not None and _same_unsplit_data(configs.data.path, ec.path):
        raise ConfigError(f"eval/DataConfig.path={ec.path!r} is the training data "
                          "(DataConfig.path), a file without splits: evaluating on it "
                          "measures the records trained on; give a held-out file")
    if ec is not None:
        # The train stream's shard count when it divides the eval batch: the same eval
        # rows after a resume on another process count.
        eval_shards = ec.shards or (point.data_shards if ec.batch_size % point.data_shards == 0
                                    else None)
        eval_iter = P.open_data(ec, "eval/DataConfig", shards=eval_shards, **shard)
        P.check_vocab(eval_iter, vocab, named["eval/DataConfig"])
        if agree_min(eval_iter.total_batches()) == 0:
            raise ConfigError(
                f"eval/DataConfig: {eval_iter.stats['examples']} eval examples per process "
                f"make no full batch of eval/DataConfig.batch_size={ec.batch_size}")
    return data, eval_iter


def report_skipped(data, eval_iter, log) -> dict:
    """Say what ``on_bad_record='skip'`` dropped from each split (every process's counts
    summed), by reason; returns {binding: {reason: count}} for the checkpoints' metadata."""
    from jalign.data.pipeline import skipped_summary
    out = {}
    for binding, it in (("DataConfig", data), ("eval/DataConfig", eval_iter)):
        if it is None:
            continue
        parts = all_states({"reasons": it.stats.get("skipped_reasons", {}),
                            "records": it.stats["records"],
                            "shown": it.stats.get("skipped_examples", [])[:3]})
        reasons: dict = {}
        for part in parts:
            for reason, n in part["reasons"].items():
                reasons[reason] = reasons.get(reason, 0) + n
        line = skipped_summary({"skipped_reasons": reasons,
                                "records": sum(p["records"] for p in parts),
                                "skipped_examples": [x for p in parts for x in p["shown"]]})
        if line:
            log(f"{binding}: {line}")
            out[binding] = reasons
    return out


def check_data_unchanged(point: ResumePoint, data, allow: bool, log) -> dict:
    """The training data's fingerprint (``jalign.data.fingerprint``), compared on resume
    with the checkpoint's: a changed file (or tokenizer) is refused like a changed config,
    naming it, unless ``allow`` (then logged)."""
    from jalign.data.fingerprint import differences
    # Process 0's: its record is the one saved (Orbax writes JSON items from process 0),
    # and every process must decide alike; the files are hashed once.
    new = from_process_0(data.fingerprint() if jax.process_index() == 0 else None)
    if point.step is None:
        return new
    old = (point.metadata or {}).get("data_fingerprint")
    if old is None:
        log(f"note: the checkpoint at step {point.step} predates data fingerprints; the "
            "training data was not compared")
        return new
    changed = differences(old, new)
    if changed and not allow:
        raise ConfigError(f"resuming step {point.step}: the training data changed since "
                          f"(DataConfig.path={data.config.path!r}): " + "; ".join(changed)
                          + ". Restore it, use another TrainConfig.run_name, or pass "
                          "--allow-config-change to continue on the new data")
    for line in changed:
        log(f"resume: data changed: {line} (allowed by --allow-config-change)")
    return new


def _same_unsplit_data(train_path: str, eval_path: str) -> bool:
    from pathlib import Path

    from jalign.data.formats import is_unsplit_file
    return is_unsplit_file(train_path) and Path(train_path).resolve() == Path(eval_path).resolve()


def prepare_run_dir(run_dir, tc: TrainConfig, operative: str, point: ResumePoint, chat):
    """The run directory (created now that every check passed), its operative config, the
    tokenizer it trains with (a ``jalign:`` source or an export of the run reads it back)
    and the checkpointer."""
    run_dir.mkdir(parents=True, exist_ok=True)
    check_same_directory(run_dir, "TrainConfig.output_root")
    if jax.process_index() == 0:
        if operative:
            (run_dir / "operative_config.gin").write_text(operative)
        if not (run_dir / sources.TOKENIZER_DIR).is_dir():  # a resumed run keeps its own
            save_tokenizer(chat.tokenizer, run_dir / sources.TOKENIZER_DIR, chat.template)
    return point.ckpt or TrainCheckpointer(run_dir, keep=tc.keep, async_save=tc.async_save)


# ------------------------------------------------------------------ 5. initial models

def initial_models(models: R.RunModels, records: dict, point: ResumePoint,
                   configs: RunConfigs, mesh, rules) -> sources.InitialModels:
    """Each role's initial model, loaded at most once when first asked for (a fresh
    state, a resumed run's fixed parts, a precomputed pass)."""
    return sources.InitialModels(models, records,
                                 default=point.source, gin_config=configs.model,
                                 overrides=_overrides(configs), mesh=mesh, rules=rules)


def _initial_key(initial: sources.InitialModels, name: str) -> str:
    source, seed, _ = initial.source_of(name)
    return repr((str(source), seed, initial.models.configs[name].to_dict()))


def _end_step(configs: RunConfigs, source, start: int, log) -> int:
    """The last step: TrainConfig.steps, or where a finite data stream ends (every
    process at the same step)."""
    tc, total = configs.train, source.total()
    end = tc.steps
    if total is not None:
        end = min(tc.steps, start + agree_min(source.remaining()))
        if end < tc.steps:
            log(f"note: DataConfig.num_epochs={configs.data.num_epochs} gives {total} batches: "
                f"training ends at step {end}, before TrainConfig.steps={tc.steps}")
    return end


def _describe_training(models: R.RunModels, state, log) -> None:
    """Say what trains when it is not everything (LoRA, a trainable regex)."""
    parts = [n for n in models.trained if models.role(n).trains != R.ALL]
    if not parts:
        return
    trained = sum(int(x.size) for x in jax.tree.leaves(state.params))
    config = models.configs[models.primary]
    total = config.replace(lora=None).num_params()
    lora = config.lora
    if not models.adapters:
        log(f"OptimizerConfig.trainable={models.role(parts[0]).trains!r}: training "
            f"{trained:,} parameters ({100 * trained / total:.2f}% of the model's {total:,}; "
            "the rest is frozen)")
        return
    log(f"LoRA rank {lora.rank} on {', '.join(lora.targets)}: training {trained:,} parameters "
        f"({100 * trained / total:.2f}% of the {total:,} of the base, which is frozen"
        + (f" and stored as {lora.quantize})" if lora.quantize else ")"))
