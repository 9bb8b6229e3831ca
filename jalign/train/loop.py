"""The training loop: generic over the loss, resumable, and careful with the user's work.

- Resumes automatically from the latest committed checkpoint of the run directory
  (state, data position, metrics log truncated to that step).
- Never checkpoints a non-finite state: the step itself refuses non-finite updates; with
  ``nan_policy="abort"`` the loop stops (exit code EXIT_NONFINITE) before any later save.
- SIGTERM (preemption): finishes the current step, saves it, waits for the save to
  commit, and exits with EXIT_PREEMPTED so a scheduler can tell it apart from a crash.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from typing import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding

from jalign.checkpoint import TrainCheckpointer, resolve_run_dir, stored_frozen_models
from jalign.data.pipeline import DataConfig
from jalign.errors import ConfigError
from jalign.models.config import LlamaConfig
from jalign.sharding import DEFAULT_RULES, MeshConfig, make_mesh
from jalign.train import metrics as M
from jalign.train import preflight as P
from jalign.train import reference as R
from jalign.train.algorithm import Algorithm, custom
from jalign.train.optimizer import OptimizerConfig, trainable_mask
from jalign.train.resume import check_resume, config_record, default_record, model_record
from jalign.train.setup import (EXECUTION_FIELDS, ModelInit, abstract_train_state,
                                build_optimizer, fresh_state, frozen_graphdefs,
                                initial_model_config, load_initial_model)
from jalign.train.state import params_of
from jalign.train.step import batch_sharding, make_eval_step, make_train_step
from jalign.train.train_config import TrainConfig

EXIT_PREEMPTED = 75   # EX_TEMPFAIL: saved on SIGTERM, restart to continue
EXIT_NONFINITE = 3    # aborted on a non-finite loss or gradient


# Fault injection for the robustness tests (and for users checking their own setup):
# JALIGN_FAULT="sigkill_after_save:4" kills the process with SIGKILL once step 4's
# checkpoint is committed; "sigkill_during_save:8" right after step 8's async save starts;
# "sigterm_at_step:6" sends this process SIGTERM after step 6.
FAULT_ENV = "JALIGN_FAULT"


def _fault(kind: str, step: int) -> bool:
    spec = os.environ.get(FAULT_ENV, "")
    return any(part == f"{kind}:{step}" for part in spec.split(","))


class NonFiniteError(RuntimeError):
    pass


class Preempted(Exception):
    pass


def _global_batch(batch: dict, sharding: NamedSharding) -> dict:
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


class _SigtermFlag:
    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            self.raised = True
        try:
            self._previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def fetch_metrics(metrics: dict) -> dict:
    """A step's metrics on the host: the loop's only per-step wait for the device (a
    function of its own so that tests can see when it happens)."""
    return jax.device_get(metrics)


def _agree_min(value: int) -> int:
    """The smallest ``value`` over all processes (every process must call this)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    return int(np.min(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def _open_model_config(model_init: ModelInit, model_config: LlamaConfig) -> LlamaConfig:
    from jalign.checkpoint import CheckpointError
    from jalign.convert.safetensors_io import ConversionError
    try:
        return initial_model_config(model_init, model_config)
    except (CheckpointError, ConversionError, OSError) as e:
        raise ConfigError(f"ModelInit.source={model_init.source!r}: {e}") from None


def train(algorithm: Algorithm | Callable, *, train_config: TrainConfig,
          optimizer_config: OptimizerConfig, data_config: DataConfig,
          eval_data_config: DataConfig | None, model_config: LlamaConfig,
          model_init: ModelInit, mesh_config: MeshConfig, operative_config: str = "",
          rules=DEFAULT_RULES, on_log: Callable[[dict], None] | None = None,
          allow_config_change: bool = False) -> dict:
    """Run (or resume) a training run; returns a summary. Raises Preempted / NonFiniteError,
    and ConfigError (before anything is loaded or compiled) for a problem in the config.

    ``algorithm``: an Algorithm (loss, model kind, reference model) or a plain loss
    function on conversation data."""
    algo = algorithm if isinstance(algorithm, Algorithm) else custom(algorithm)
    tc = train_config
    is_main = jax.process_index() == 0

    def log(text: str) -> None:
        if is_main:
            print(text, flush=True)

    if tc.eval_batches == 0:
        eval_data_config = None
    if eval_data_config is not None:  # one pass over the eval split, in order, every time
        eval_data_config = dataclasses.replace(eval_data_config, shuffle=False, num_epochs=1)
    # ---- start-time checks: nothing is loaded or compiled before they pass
    P.check_data_kind(algo, data_config, "DataConfig")
    if eval_data_config is not None:
        P.check_data_kind(algo, eval_data_config, "eval/DataConfig")
    run_dir = resolve_run_dir(tc.output_root, tc.run_name)
    try:
        mesh = make_mesh(mesh_config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    processes = jax.process_count()
    P.check_batch_divides(mesh, data_config.batch_size, "DataConfig.batch_size",
                          accum_steps=tc.accum_steps, rules=rules, processes=processes)
    if eval_data_config is not None:
        P.check_batch_divides(mesh, eval_data_config.batch_size, "eval/DataConfig.batch_size",
                              rules=rules, processes=processes)
    # Nothing is written before the data checks pass: no run directory for a failed start.
    ckpt = None
    if (run_dir / "checkpoints").is_dir():
        ckpt = TrainCheckpointer(run_dir, keep=tc.keep, async_save=tc.async_save)
    resume_step = ckpt.latest_step() if ckpt is not None else None
    configs = {"TrainConfig": tc, "OptimizerConfig": optimizer_config,
               "DataConfig": data_config, "eval/DataConfig": eval_data_config,
               "ModelInit": model_init, "MeshConfig": mesh_config,
               type(algo.config).__name__: algo.config}
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
                     allow=allow_config_change, log=log, defaults=default_record(configs))
        model_config = _resumed_model_config(run_dir, resume_step, model_config, model_init)
    else:
        model_config = _open_model_config(model_init, model_config)
    P.check_trainable(optimizer_config, model_config, algo.model_kind)
    # Tokenize both splits now: every split, file, format or tokenizer problem shows here.
    shard = {"process_index": jax.process_index(), "process_count": processes}
    data = P.open_data(data_config, "DataConfig", progress=tc.progress and is_main, **shard)
    P.check_vocab(data, model_config.vocab_size, "DataConfig")
    eval_iter = None
    if eval_data_config is not None:
        eval_iter = P.open_data(eval_data_config, "eval/DataConfig", **shard)
        P.check_vocab(eval_iter, model_config.vocab_size, "eval/DataConfig")
        if _agree_min(eval_iter.total_batches()) == 0:
            raise ConfigError(
                f"eval/DataConfig: {eval_iter.stats['examples']} eval examples per process "
                f"make no full batch of eval/DataConfig.batch_size={eval_data_config.batch_size}")
    global_batch = data_config.batch_size
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main and operative_config:
        (run_dir / "operative_config.gin").write_text(operative_config)
    if ckpt is None:
        ckpt = TrainCheckpointer(run_dir, keep=tc.keep, async_save=tc.async_save)

    loaded = {}
    # What the precomputed reference scores depend on besides the data.
    reference_key = repr((model_init, model_config.to_dict(), algo.name))

    def initial_model():  # loaded at most once: for the reference pass and/or a fresh state
        if "model" not in loaded:
            config, model = load_initial_model(model_init, model_config, mesh, rules,
                                               algo.model_kind)
            if config != model_config:  # both read from the same source: a bug if not
                raise RuntimeError(f"model config changed while loading: {config} vs {model_config}")
            loaded["model"] = model
        return loaded["model"]

    if algo.precompute is not None:
        for it, name in ((data, "train"), (eval_iter, "eval")):
            if it is None:
                continue

            def score(examples, chat, it=it, name=name):
                # Scored now, while only one model is in memory (not next to the state).
                info = R.annotate(
                    examples, cache_path=run_dir / f"reference_{name}.p{jax.process_index()}.npz",
                    load_model=initial_model, score_fn=algo.precompute,
                    rows=it.config.batch_size // processes, length=it.config.max_length,
                    pad_id=chat.pad_id, mesh=mesh, rules=rules, model_key=reference_key,
                    progress=tc.progress and is_main)
                log(f"reference log-probs for {info['examples']} {name} pairs "
                    f"{'read from cache' if info['cached'] else 'computed'}")
            it.annotate(score)
    eval_start = eval_iter.get_state() if eval_iter is not None else None

    # The schedule spans the steps the run will take: TrainConfig.steps, or fewer when the
    # data ends first (counted from the data's start, so the same on resume).
    total = data.total_batches()
    schedule_steps = tc.steps if total is None else max(1, min(tc.steps, _agree_min(total)))
    optimizer, schedule = build_optimizer(optimizer_config, model_config, schedule_steps,
                                          algo.model_kind)
    frozen_configs = ({name: model_config for name in algo.frozen_models}
                      if algo.frozen_models else None)
    graphdef, abstract_state, shardings = abstract_train_state(
        model_config, optimizer, mesh, rules, frozen_configs, algo.model_kind)
    if resume_step is not None:
        state, data_state, _, restored_step = ckpt.restore_intact(abstract_state, log=log)
        data.set_state(data_state)
        log(f"resumed {run_dir} at step {restored_step}")
    else:
        model = initial_model()
        # Every FrozenModel.init is 'initial_policy' (FROZEN_INITS): the initial model.
        frozen = ({name: params_of(model) for name in algo.frozen_models}
                  if frozen_configs else None)
        state = fresh_state(model, optimizer, tc.seed, shardings, frozen)
        del model, frozen
    loaded.clear()
    start = int(jax.device_get(state.step))

    # With a finite number of epochs the data ends: every process stops at the same step.
    end = tc.steps
    if total is not None:
        end = min(tc.steps, start + _agree_min(total - data.batches))
        if end < tc.steps:
            log(f"note: DataConfig.num_epochs={data_config.num_epochs} gives {total} batches: "
                f"training ends at step {end}, before TrainConfig.steps={tc.steps}")

    fdefs = frozen_graphdefs(frozen_configs)
    trainable = trainable_mask(state.params, optimizer_config)
    step_fn = make_train_step(algo.loss_fn, optimizer, graphdef, mesh=mesh,
                              state_sharding=shardings, global_batch=global_batch,
                              accum_steps=tc.accum_steps, rules=rules,
                              frozen_graphdefs=fdefs, schedule=schedule, trainable=trainable)
    eval_fn = eval_sh = None
    if eval_data_config is not None:
        eval_fn = make_eval_step(algo.loss_fn, graphdef, mesh=mesh, state_sharding=shardings,
                                 global_batch=eval_data_config.batch_size, rules=rules,
                                 frozen_graphdefs=fdefs)
        eval_sh = batch_sharding(mesh, eval_data_config.batch_size, rules)
    data_sh = batch_sharding(mesh, global_batch, rules)
    seq_len = data_config.max_length
    rows_per_step = global_batch * algo.rows_per_example
    flops_per_step = algo.flops_per_token(model_config, seq_len) * rows_per_step * seq_len
    weight_name = algo.weight_name
    peak, peak_source = M.peak_flops_per_device(tc.peak_flops)
    n_dev = mesh.devices.size
    writer = M.MetricsWriter(run_dir, resume_step=start, enabled=is_main)
    eval_batches = min(tc.eval_batches, _agree_min(eval_iter.total_batches())) if eval_iter else 0

    def evaluate(step: int) -> dict:
        eval_iter.set_state(eval_start)
        total = weight = 0.0
        aux: dict[str, list[float]] = {}
        for _, batch in zip(range(eval_batches), eval_iter):
            out = eval_fn(state, _global_batch(batch, eval_sh))
            total += float(out.total)
            weight += float(out.weight)
            for name, (s, c) in jax.device_get(out.aux).items():
                acc = aux.setdefault(name, [0.0, 0.0])
                acc[0] += float(s)
                acc[1] += float(c)
        if weight == 0:
            raise ValueError(f"eval data {eval_data_config.path} ({eval_data_config.split}) "
                             f"gave no {weight_name.replace('_', ' ')}")
        loss = total / weight
        result = {"step": step, "eval_loss": loss, "eval_" + weight_name: weight}
        if aux.get("nll", (0, 0))[1]:  # a loss's per-token NLL, whatever its normalisation
            result["eval_perplexity"] = float(np.exp(min(aux["nll"][0] / aux["nll"][1], 50)))
        elif weight_name == "target_tokens":  # a per-token loss without an nll metric
            result["eval_perplexity"] = float(np.exp(min(loss, 50)))
        result.update({f"eval_{name}": s / c for name, (s, c) in aux.items() if c})
        return result

    def save(reason: str, step: int):
        ckpt.save(state, data_state=data.get_state(), model_config=model_config,
                  operative=operative_config, config_record=record,
                  extra_metadata={"reason": reason, "model_kind": algo.model_kind,
                                  "algorithm": algo.name,
                                  "frozen": list(algo.frozen_models)})
        if _fault("sigkill_during_save", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if _fault("sigkill_after_save", step):
            ckpt.wait()
            os.kill(os.getpid(), signal.SIGKILL)

    bar = None
    if tc.progress and is_main:
        from tqdm.auto import tqdm
        # Redraw often on a terminal; in a log file (no terminal) only every 30 s.
        bar = tqdm(total=end, initial=start, desc="train", unit="step", dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 30.0)
    summary = {"run_dir": str(run_dir), "start_step": start, "skipped": 0}
    last_eval = None
    # Metrics are read one step behind: step N+1 is dispatched before step N's metrics
    # come to the host, so the device never waits for the host. No non-finite update can
    # reach a checkpoint: the step itself never applies one, and every save, eval and exit
    # first reads (and checks) the metrics of all steps dispatched so far.
    pending: list[tuple[int, dict, float]] = []  # (step, metrics on device, dispatch time)
    last_ready = time.perf_counter()

    def drain(keep_last: bool = False):
        nonlocal last_ready
        while len(pending) > (1 if keep_last else 0):
            done, metrics, t0 = pending.pop(0)
            m = {k: float(v) for k, v in fetch_metrics(metrics).items()}
            # A step's time: from when the device could start it (its dispatch, or the end
            # of the step before) to when its result is here.
            now = time.perf_counter()
            dt, last_ready = now - max(t0, last_ready), now
            record_ = {"step": done, "loss": m["loss"], "grad_norm": m["grad_norm"],
                       "learning_rate": m.get("learning_rate", 0.0), "step_seconds": dt,
                       "tokens_per_second_per_device": rows_per_step * seq_len / dt / n_dev,
                       weight_name: m["loss_weight"]}
            if peak:
                record_["mfu"] = flops_per_step / dt / (peak * n_dev)
            record_.update({k: v for k, v in m.items()
                            if k not in ("loss", "grad_norm", "learning_rate", "finite",
                                         "loss_weight")})
            if not m["finite"]:
                record_["skipped_nonfinite"] = 1
                summary["skipped"] += 1
                if tc.nan_policy == "abort":
                    writer.write(record_)
                    raise NonFiniteError(
                        f"step {done}: non-finite loss ({m['loss']}) or gradient norm "
                        f"({m['grad_norm']}); the update was not applied and nothing was "
                        f"saved past step {ckpt.latest_step()}. Set "
                        "TrainConfig.nan_policy='skip' to skip such steps instead.")
            writer.write(record_)
            if on_log is not None and (done % tc.log_every == 0 or done == end):
                on_log(record_)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(refresh=False, loss=f"{m['loss']:.4f}",
                                tok_s=f"{record_['tokens_per_second_per_device'] * n_dev:,.0f}")

    ended = None
    with _SigtermFlag() as sigterm:
        try:
            if eval_fn is not None and tc.eval_at_start and start == 0:
                writer.write(evaluate(0))  # the baseline the run is judged by
            for step in range(start, end):
                try:
                    batch = next(data)
                except StopIteration:  # the count above is exact; this is a safety net
                    ended = step
                    break
                t_dispatch = time.perf_counter()
                state, metrics = step_fn(state, _global_batch(batch, data_sh))
                done = step + 1
                pending.append((done, metrics, t_dispatch))
                drain(keep_last=True)
                if _fault("sigterm_at_step", done):
                    os.kill(os.getpid(), signal.SIGTERM)  # through the real handler
                if sigterm.raised:
                    drain()
                    save("sigterm", done)
                    ckpt.wait()
                    raise Preempted(f"SIGTERM: saved step {done} to {run_dir}; restart to continue")
                if eval_fn is not None and tc.eval_every and done % tc.eval_every == 0:
                    drain()
                    last_eval = evaluate(done)
                    writer.write(last_eval)
                    if on_log is not None:
                        on_log(last_eval)
                if done % tc.save_every == 0 and done != end:
                    drain()
                    save("interval", done)
            drain()
            final = int(jax.device_get(state.step))
            if final < tc.steps:
                ended = final
            saved = ckpt.latest_step() != final
            if saved:
                save("end_of_data" if ended is not None else "final", final)
            if eval_fn is not None and (last_eval is None or last_eval["step"] != final):
                last_eval = evaluate(final)
                writer.write(last_eval)
                if on_log is not None:
                    on_log(last_eval)
        finally:
            if bar is not None:
                bar.close()
            ckpt.close()
            writer.close()
    if ended is not None:
        epochs = data_config.num_epochs
        log(f"data ended at step {ended} of TrainConfig.steps={tc.steps}: {epochs} epoch"
            f"{'s' if epochs != 1 else ''} of {data.stats['examples']} examples per process "
            f"({data.batches} batches of {data.rows} rows) seen"
            + ("; saved" if saved else "; its checkpoint was already saved")
            + (", evaluated" if last_eval else ""))
    if is_main:
        M.plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
    summary.update(final_step=int(jax.device_get(state.step)), ended_early=ended is not None,
                   eval=last_eval, data_stats=data.stats, peak_flops_source=peak_source,
                   state=state, model_config=model_config, graphdef=graphdef)
    return summary


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


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, Preempted):
        return EXIT_PREEMPTED
    if isinstance(exc, NonFiniteError):
        return EXIT_NONFINITE
    return 1
