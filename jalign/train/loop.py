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

from jalign.checkpoint import TrainCheckpointer, resolve_run_dir
from jalign.data.pipeline import DataConfig, build_iterator
from jalign.losses.dpo import REFERENCE_NAME
from jalign.models.config import LlamaConfig
from jalign.sharding import DEFAULT_RULES, MeshConfig, make_mesh
from jalign.train import metrics as M
from jalign.train import reference as R
from jalign.train.algorithms import Algorithm, custom
from jalign.train.optimizer import OptimizerConfig
from jalign.train.setup import (ModelInit, abstract_train_state, build_optimizer, fresh_state,
                                frozen_graphdefs, initial_model_config, load_initial_model)
from jalign.train.state import params_of
from jalign.train.step import batch_sharding, make_eval_step, make_train_step

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


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    run_name: str = "run"
    output_root: str = "runs"
    steps: int = 1000
    accum_steps: int = 1
    seed: int = 0
    save_every: int = 500
    keep: int = 3
    async_save: bool = True
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 16
    log_every: int = 10
    nan_policy: str = "abort"
    algorithm: str = "sft"
    peak_flops: float | None = None  # per device; None: spec sheet, or measured on CPU
    progress: bool = True

    def __post_init__(self):
        if self.nan_policy not in ("abort", "skip"):
            raise ValueError(f"TrainConfig.nan_policy={self.nan_policy!r}; 'abort' or 'skip'")
        for name in ("steps", "accum_steps", "save_every", "keep", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")


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


def _check_data_kind(algo: Algorithm, config: DataConfig, what: str) -> None:
    from jalign.data.formats import adapter
    kind, _ = adapter(config.format)
    if kind != algo.data_kind:
        raise ValueError(f"algorithm {algo.name!r} trains on {algo.data_kind} data but "
                         f"{what}.format={config.format!r} gives {kind} data")


def train(algorithm: Algorithm | Callable, *, train_config: TrainConfig,
          optimizer_config: OptimizerConfig, data_config: DataConfig,
          eval_data_config: DataConfig | None, model_config: LlamaConfig,
          model_init: ModelInit, mesh_config: MeshConfig, operative_config: str = "",
          rules=DEFAULT_RULES, on_log: Callable[[dict], None] | None = None) -> dict:
    """Run (or resume) a training run; returns a summary. Raises Preempted / NonFiniteError.

    ``algorithm``: an Algorithm (loss, model kind, reference model) or a plain loss
    function on conversation data."""
    algo = algorithm if isinstance(algorithm, Algorithm) else custom(algorithm)
    tc = train_config
    _check_data_kind(algo, data_config, "DataConfig")
    if eval_data_config is not None:
        _check_data_kind(algo, eval_data_config, "eval/DataConfig")
    run_dir = resolve_run_dir(tc.output_root, tc.run_name)
    run_dir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    if is_main and operative_config:
        (run_dir / "operative_config.gin").write_text(operative_config)
    mesh = make_mesh(mesh_config)
    global_batch = data_config.batch_size

    ckpt = TrainCheckpointer(run_dir, keep=tc.keep,
                             async_save=tc.async_save)
    resume_step = ckpt.latest_step()
    if resume_step is not None:
        from jalign.checkpoint import read_metadata, read_model_config
        model_config = read_model_config(run_dir, resume_step)
        meta = read_metadata(run_dir, resume_step)
        stored = (meta.get("model_kind", "causal_lm"), meta.get("reference"))
        if stored != (algo.model_kind, algo.reference):
            raise ValueError(
                f"{run_dir} holds a {stored[0]} run (reference model: {stored[1]}); "
                f"algorithm {algo.name!r} trains a {algo.model_kind} (reference: "
                f"{algo.reference}): the train states differ, use another TrainConfig.run_name")
    else:
        model_config = initial_model_config(model_init, model_config)

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

    def annotator(config: DataConfig, name: str):
        if algo.reference != "precomputed":
            return None

        def annotate(examples, chat):
            info = R.annotate(
                examples, cache_path=run_dir / f"reference_{name}.p{jax.process_index()}.npz",
                load_model=initial_model, score_fn=algo.reference_scores,
                rows=config.batch_size // jax.process_count(), length=config.max_length,
                pad_id=chat.pad_id, mesh=mesh, rules=rules, model_key=reference_key,
                progress=tc.progress and is_main)
            if is_main:
                print(f"reference log-probs for {info['examples']} {name} pairs "
                      f"{'read from cache' if info['cached'] else 'computed'}", flush=True)
        return annotate

    data = build_iterator(data_config, process_index=jax.process_index(),
                          process_count=jax.process_count(), progress=tc.progress and is_main,
                          annotate=annotator(data_config, "train"))
    eval_iter = eval_start = None
    if eval_data_config is not None and algo.reference == "precomputed":
        # Score the eval split now, while only one model is in memory (not next to the state).
        eval_iter = build_iterator(eval_data_config, process_index=jax.process_index(),
                                   process_count=jax.process_count(),
                                   annotate=annotator(eval_data_config, "eval"))
        eval_start = eval_iter.get_state()

    optimizer, schedule = build_optimizer(optimizer_config, model_config, tc.steps, algo.model_kind)
    frozen_configs = {REFERENCE_NAME: model_config} if algo.reference == "in_step" else None
    graphdef, abstract_state, shardings = abstract_train_state(
        model_config, optimizer, mesh, rules, frozen_configs, algo.model_kind)
    if resume_step is not None:
        state, data_state, _ = ckpt.restore(abstract_state, resume_step)
        data.set_state(data_state)
        print(f"resumed {run_dir} at step {resume_step}", flush=True)
    else:
        model = initial_model()
        frozen = {REFERENCE_NAME: params_of(model)} if frozen_configs else None
        state = fresh_state(model, optimizer, tc.seed, shardings, frozen)
        del model, frozen
    loaded.clear()
    start = int(jax.device_get(state.step))

    fdefs = frozen_graphdefs(frozen_configs)
    step_fn = make_train_step(algo.loss_fn, optimizer, graphdef, mesh=mesh,
                              state_sharding=shardings, global_batch=global_batch,
                              accum_steps=tc.accum_steps, rules=rules,
                              frozen_graphdefs=fdefs, schedule=schedule)
    eval_fn = None
    if eval_data_config is not None:
        eval_fn = make_eval_step(algo.loss_fn, graphdef, mesh=mesh, state_sharding=shardings,
                                 global_batch=eval_data_config.batch_size, rules=rules,
                                 frozen_graphdefs=fdefs)
    data_sh = batch_sharding(mesh, global_batch, rules)
    eval_sh = (batch_sharding(mesh, eval_data_config.batch_size, rules)
               if eval_data_config is not None else None)
    seq_len = data_config.max_length
    rows_per_step = global_batch * algo.rows_per_example
    flops_per_step = M.train_flops_per_token(model_config, seq_len) * rows_per_step * seq_len
    if algo.reference == "in_step":  # plus the reference's forward (a third of fwd+bwd)
        flops_per_step *= 4 / 3
    weight_name = "target_tokens" if algo.data_kind == "conversation" else "pairs"
    peak, peak_source = M.peak_flops_per_device(tc.peak_flops)
    n_dev = mesh.devices.size
    writer = M.MetricsWriter(run_dir, resume_step=start, enabled=is_main)

    def evaluate(step: int) -> dict:
        nonlocal eval_iter, eval_start
        if eval_iter is None:  # tokenize the eval split once; rewind it for every eval
            eval_iter = build_iterator(eval_data_config, process_index=jax.process_index(),
                                       process_count=jax.process_count(),
                                       annotate=annotator(eval_data_config, "eval"))
            eval_start = eval_iter.get_state()
        it = eval_iter
        it.set_state(eval_start)
        total = weight = 0.0
        aux: dict[str, list[float]] = {}
        for _, batch in zip(range(tc.eval_batches), it):
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
        result = {"step": step, "eval_loss": loss}
        if algo.data_kind == "conversation":  # per-token losses: perplexity means something
            result["eval_perplexity"] = float(np.exp(min(loss, 50)))
        result.update({f"eval_{name}": s / c for name, (s, c) in aux.items() if c})
        return result

    def save(reason: str):
        step = ckpt.save(state, data_state=data.get_state(), model_config=model_config,
                         operative=operative_config,
                         extra_metadata={"reason": reason, "model_kind": algo.model_kind,
                                         "algorithm": algo.name, "reference": algo.reference})
        if _fault("sigkill_during_save", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if _fault("sigkill_after_save", step):
            ckpt.wait()
            os.kill(os.getpid(), signal.SIGKILL)

    bar = None
    if tc.progress and is_main:
        from tqdm.auto import tqdm
        # Redraw often on a terminal; in a log file (no terminal) only every 30 s.
        bar = tqdm(total=tc.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 30.0)
    summary = {"run_dir": str(run_dir), "start_step": start, "skipped": 0}
    last_eval = None
    t_last = time.perf_counter()
    with _SigtermFlag() as sigterm:
        try:
            for step in range(start, tc.steps):
                batch = _global_batch(next(data), data_sh)
                state, metrics = step_fn(state, batch)
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                dt, t_last = now - t_last, now
                done = step + 1
                record = {"step": done, "loss": m["loss"], "grad_norm": m["grad_norm"],
                          "learning_rate": m.get("learning_rate", 0.0), "step_seconds": dt,
                          "tokens_per_second_per_device": rows_per_step * seq_len / dt / n_dev,
                          weight_name: m["loss_weight"]}
                if peak:
                    record["mfu"] = flops_per_step / dt / (peak * n_dev)
                record.update({k: v for k, v in m.items()
                               if k not in ("loss", "grad_norm", "learning_rate", "finite",
                                            "loss_weight")})
                if not m["finite"]:
                    record["skipped_nonfinite"] = 1
                    summary["skipped"] += 1
                    if tc.nan_policy == "abort":
                        writer.write(record)
                        raise NonFiniteError(
                            f"step {done}: non-finite loss ({m['loss']}) or gradient norm "
                            f"({m['grad_norm']}); the update was not applied and nothing was "
                            f"saved past step {ckpt.latest_step()}. Set "
                            "TrainConfig.nan_policy='skip' to skip such steps instead.")
                if eval_fn is not None and tc.eval_every and done % tc.eval_every == 0:
                    last_eval = evaluate(done)
                    record.update(last_eval)
                writer.write(record)
                if on_log is not None and (done % tc.log_every == 0 or done == tc.steps):
                    on_log(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{m['loss']:.4f}",
                                    tok_s=f"{record['tokens_per_second_per_device'] * n_dev:,.0f}")
                if _fault("sigterm_at_step", done):
                    os.kill(os.getpid(), signal.SIGTERM)  # through the real handler
                if sigterm.raised:
                    save("sigterm")
                    ckpt.wait()
                    raise Preempted(f"SIGTERM: saved step {done} to {run_dir}; restart to continue")
                if done % tc.save_every == 0 and done != tc.steps:
                    save("interval")
            if ckpt.latest_step() != tc.steps:
                save("final")
            if eval_fn is not None and (last_eval is None or last_eval["step"] != tc.steps):
                last_eval = evaluate(tc.steps)
                writer.write(last_eval)
        finally:
            if bar is not None:
                bar.close()
            ckpt.close()
            writer.close()
    if is_main:
        M.plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
    summary.update(final_step=tc.steps, eval=last_eval, data_stats=data.stats,
                   peak_flops_source=peak_source, state=state, model_config=model_config,
                   graphdef=graphdef)
    return summary


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, Preempted):
        return EXIT_PREEMPTED
    if isinstance(exc, NonFiniteError):
        return EXIT_NONFINITE
    return 1
