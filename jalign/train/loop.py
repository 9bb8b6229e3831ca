"""The training loop: generic over the loss and the batch source, resumable, and careful
with the user's work. ``train`` opens the run (``jalign.train.run``) and runs the loop;
``run_loop`` draws batches from ``run.source.next(state)`` and saves the source's state
with every checkpoint.

- Resumes automatically from the latest committed checkpoint of the run directory
  (state, data position, metrics log truncated to that step).
- Never checkpoints a non-finite state: the step itself refuses non-finite updates; with
  ``nan_policy="abort"`` the loop stops (exit code EXIT_NONFINITE) before any later save.
- SIGTERM (preemption): finishes the current step, saves it, waits for the save to
  commit, and exits with EXIT_PREEMPTED so a scheduler can tell it apart from a crash.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding

from jalign.data.pipeline import DataConfig
from jalign.models.config import LlamaConfig
from jalign.sharding import DEFAULT_RULES, MeshConfig, global_rows
from jalign.train import metrics as M
from jalign.train.algorithm import Algorithm, custom
from jalign.train.optimizer import OptimizerConfig, trainable_mask
from jalign.train.hosts import Preemption, agree_min, merged
from jalign.train.run import Run, open_run
from jalign.train.setup import ModelInit, frozen_graphdefs
from jalign.train.step import batch_sharding, make_eval_step, make_train_step
from jalign.train.train_config import TrainConfig  # noqa: F401 (re-exported)

EXIT_PREEMPTED = 75   # EX_TEMPFAIL: saved on SIGTERM, restart to continue
EXIT_NONFINITE = 3    # aborted on a non-finite loss or gradient


# Fault injection for the robustness tests (and for users checking their own setup):
# JALIGN_FAULT="sigkill_after_save:4" kills the process with SIGKILL once step 4's
# checkpoint is committed; "sigkill_during_save:8" right after step 8's async save starts;
# "sigterm_at_step:6" sends this process SIGTERM after step 6; "sigterm_at_step:6@1" only
# process 1 of a multi-host run.
FAULT_ENV = "JALIGN_FAULT"


def _fault(kind: str, step: int) -> bool:
    """Whether ``JALIGN_FAULT`` asks for ``kind`` at ``step`` here ("kind:step", or
    "kind:step@P" for process P only)."""
    spec = os.environ.get(FAULT_ENV, "")
    here = f"{kind}:{step}"
    return any(part == here or part == f"{here}@{jax.process_index()}"
               for part in spec.split(","))


class NonFiniteError(RuntimeError):
    pass


class Preempted(Exception):
    pass


def _global_batch(batch: dict, sharding: NamedSharding) -> dict:
    """Global arrays of a batch: host-local rows are assembled; arrays a source already
    made on the devices (a rollout's minibatch) are placed as the step expects."""
    return {k: jax.device_put(v, sharding) if isinstance(v, jax.Array)
            else global_rows(sharding, v)
            for k, v in batch.items()}


def fetch_metrics(metrics: dict) -> dict:
    """A step's metrics on the host: the loop's only per-step wait for the device (a
    function of its own so that tests can see when it happens)."""
    return jax.device_get(metrics)


def train(algorithm: Algorithm | Callable, *, train_config: TrainConfig,
          optimizer_config: OptimizerConfig, data_config: DataConfig,
          eval_data_config: DataConfig | None, model_config: LlamaConfig,
          model_init: ModelInit, mesh_config: MeshConfig, operative_config: str = "",
          rules=DEFAULT_RULES, on_log: Callable[[dict], None] | None = None,
          allow_config_change: bool = False, lora_config=None) -> dict:
    """Run (or resume) a training run; returns a summary. Raises Preempted / NonFiniteError,
    and ConfigError (before anything is loaded or compiled) for a problem in the config.

    ``algorithm``: an Algorithm (loss, model kind, frozen models, ...) or a plain loss
    function on conversation data."""
    algo = algorithm if isinstance(algorithm, Algorithm) else custom(algorithm)
    run = open_run(algo, train_config=train_config, optimizer_config=optimizer_config,
                   data_config=data_config, eval_data_config=eval_data_config,
                   model_config=model_config, model_init=model_init, mesh_config=mesh_config,
                   operative_config=operative_config, rules=rules,
                   allow_config_change=allow_config_change, lora_config=lora_config)
    return run_loop(run, on_log=on_log)


def run_loop(run: Run, *, on_log: Callable[[dict], None] | None = None) -> dict:
    """Train ``run`` from ``run.start`` to ``run.end`` on batches from ``run.source``."""
    algo, tc, ckpt, source, state = run.algo, run.tc, run.ckpt, run.source, run.state
    mesh, rules, run_dir, log, is_main = run.mesh, run.rules, run.run_dir, run.log, run.is_main
    model_config, graphdef, shardings = run.model_config, run.graphdef, run.shardings
    optimizer, schedule, record = run.optimizer, run.schedule, run.record
    eval_data_config = run.eval_data_config
    eval_iter, eval_start, operative_config = run.eval_iter, run.eval_start, run.operative
    start, end, global_batch = run.start, run.end, run.global_batch
    layout = run.layout
    fdefs = frozen_graphdefs(layout)
    trainable = trainable_mask(state.params, run.optimizer_config)
    step_fn = make_train_step(algo.loss_fn, optimizer, graphdef, mesh=mesh,
                              state_sharding=shardings, global_batch=global_batch,
                              accum_steps=tc.accum_steps, rules=rules,
                              frozen_graphdefs=fdefs, schedule=schedule, trainable=trainable,
                              layout=layout)
    source.bind(run)
    eval_fn = eval_sh = None
    # A source with its own evaluation (a rollout source: rewards of greedy responses)
    # replaces the loss evaluation; either needs eval data.
    source_eval = getattr(source, "evaluate", None) if eval_data_config is not None else None
    if eval_data_config is not None and source_eval is None:
        eval_fn = make_eval_step(algo.loss_fn, graphdef, mesh=mesh, state_sharding=shardings,
                                 global_batch=eval_data_config.batch_size, rules=rules,
                                 frozen_graphdefs=fdefs, layout=layout)
        eval_sh = batch_sharding(mesh, eval_data_config.batch_size, rules)
    data_sh = batch_sharding(mesh, global_batch, rules)
    seq_len = run.row_length
    rows_per_step = global_batch * algo.rows_per_example
    flops_per_step = algo.flops_per_token(model_config, seq_len) * rows_per_step * seq_len
    if layout.adapters:  # no weight gradients for the frozen base: forward + input gradients
        flops_per_step *= 2 / 3
    weight_name = algo.weight_name
    peak, peak_source = M.peak_flops_per_device(tc.peak_flops)
    n_dev = mesh.devices.size
    writer = M.MetricsWriter(run_dir, resume_step=start, enabled=is_main)
    eval_batches = min(tc.eval_batches, agree_min(eval_iter.total_batches())) if eval_iter else 0
    can_eval = eval_fn is not None or source_eval is not None

    def evaluate(step: int) -> dict:
        if source_eval is not None:
            return source_eval(state, step)
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
        # Every process's data position (Orbax writes JSON items from process 0 only).
        ckpt.save(state, data_state=merged(source.get_state()), model_config=model_config,
                  operative=operative_config, config_record=record,
                  extra_metadata={"reason": reason, "model_kind": algo.model_kind,
                                  "algorithm": algo.name,
                                  "frozen": list(algo.frozen_models), **run.extra_metadata})
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
    pending: list[tuple[int, dict, float, dict]] = []  # (step, device metrics, dispatch time,
    #                                                   the source's host metrics)
    last_ready = time.perf_counter()

    def drain(keep_last: bool = False):
        nonlocal last_ready
        while len(pending) > (1 if keep_last else 0):
            done, metrics, t0, source_metrics = pending.pop(0)
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
            record_.update(source_metrics)
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
    with Preemption() as preemption:
        try:
            if can_eval and tc.eval_at_start and start == 0:
                writer.write(evaluate(0))  # the baseline the run is judged by
            for step in range(start, end):
                if source.waits_for_state():
                    # The source is about to run the current state (a rollout): the steps
                    # dispatched so far finish first anyway, so read their metrics now and
                    # their times do not include the source's work.
                    drain()
                try:
                    batch = source.next(state)
                except StopIteration:  # the count above is exact; this is a safety net
                    ended = step
                    break
                t_dispatch = time.perf_counter()
                state, metrics = step_fn(state, _global_batch(batch, data_sh))
                done = step + 1
                pending.append((done, metrics, t_dispatch, source.step_metrics()))
                drain(keep_last=True)
                if _fault("sigterm_at_step", done):
                    os.kill(os.getpid(), signal.SIGTERM)  # through the real handler
                # A source whose state is complete only between some steps (rollouts)
                # is saved there: preemption waits for its next boundary.
                if preemption.reached(done) and source.at_boundary():
                    drain()
                    save("sigterm", done)
                    ckpt.wait()
                    raise Preempted(f"SIGTERM: saved step {done} to {run_dir}; restart to continue")
                if can_eval and tc.eval_every and done % tc.eval_every == 0:
                    drain()
                    last_eval = evaluate(done)
                    writer.write(last_eval)
                    if on_log is not None:
                        on_log(last_eval)
                if done % tc.save_every == 0 and done != end and source.at_boundary():
                    drain()
                    save("interval", done)
            drain()
            final = int(jax.device_get(state.step))
            if final < tc.steps:
                ended = final
            saved = ckpt.latest_step() != final
            if saved:
                save("end_of_data" if ended is not None else "final", final)
            if can_eval and (last_eval is None or last_eval["step"] != final):
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
        log(f"data ended at step {ended} of TrainConfig.steps={tc.steps}: {source.describe()}"
            + ("; saved" if saved else "; its checkpoint was already saved")
            + (", evaluated" if last_eval else ""))
    if is_main:
        M.plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
    summary.update(final_step=int(jax.device_get(state.step)), ended_early=ended is not None,
                   eval=last_eval, data_stats=getattr(source, "stats", {}), peak_flops_source=peak_source,
                   state=state, model_config=model_config, graphdef=graphdef,
                   params=run.layout.full_params(state))
    run.state = state  # the donated input buffers are gone; the Run holds the live state
    return summary


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, Preempted):
        return EXIT_PREEMPTED
    if isinstance(exc, NonFiniteError):
        return EXIT_NONFINITE
    return 1
