"""The training loop: generic over the recipe and the batch source, resumable, and careful
with the user's work. ``train`` opens the run (``jalign.train.run``) and runs the loop;
``run_loop`` (a ``Training``) draws batches from ``run.source.next(state)`` and saves the
source's state with every checkpoint.

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
from typing import Callable, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding

from jalign.checkpoint_space import DiskFull, quiet_saves
from jalign.faults import FAULT_ENV, fault  # noqa: F401 (FAULT_ENV re-exported)
from jalign.losses.types import combine_aux
from jalign.data.formats import rows_per_example
from jalign.sharding import DEFAULT_RULES, global_rows
from jalign.train import metrics as M
from jalign.train.hosts import Preemption, agree_min, merged
from jalign.train.batch_spec import check_batch
from jalign.train.recipe import Recipe, custom
from jalign.train.run import Run, RunConfigs, open_run
from jalign.train.step import batch_sharding, make_eval_step, make_train_step
from jalign.train.train_config import TrainConfig  # noqa: F401 (re-exported)

EXIT_PREEMPTED = 75   # EX_TEMPFAIL: saved on SIGTERM, restart to continue
EXIT_NONFINITE = 3    # aborted on a non-finite loss or gradient
EXIT_INTERRUPTED = 130  # 128 + SIGINT: stopped by Ctrl-C (saved on the first one)
EXIT_DISK_FULL = 74   # EX_IOERR: a checkpoint did not fit its file system


class NonFiniteError(RuntimeError):
    pass


class Preempted(Exception):
    pass


class Interrupted(Preempted):
    """Ctrl-C: the step in flight was saved; not a preemption a launcher restarts."""


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


def train(recipe: Recipe | Callable, configs: RunConfigs, *, operative: str = "",
          rules=DEFAULT_RULES, on_log: Callable[[dict], None] | None = None,
          allow_config_change: bool = False, show_operative: bool = False) -> dict:
    """Run (or resume) a training run; returns a summary. Raises Preempted / NonFiniteError,
    and ConfigError (before anything is loaded or compiled) for a problem in the config.
    ``show_operative``: print the operative config (of the models trained) at the start.

    ``recipe``: a Recipe (roles, loss, data kind, ...) or a plain loss function
    ``loss(model, batch, ctx)`` on conversation data."""
    recipe = recipe if isinstance(recipe, Recipe) else custom(recipe)
    run = open_run(recipe, configs, operative=operative, rules=rules,
                   allow_config_change=allow_config_change, show_operative=show_operative)
    return run_loop(run, on_log=on_log)


def run_loop(run: Run, *, on_log: Callable[[dict], None] | None = None) -> dict:
    """Train ``run`` from ``run.start`` to ``run.end`` on batches from ``run.source``."""
    return Training(run, on_log).execute()


class Pending(NamedTuple):
    step: int
    metrics: dict        # on the devices
    dispatched: float    # perf_counter at dispatch
    source_metrics: dict  # the source's host metrics of the batch


def recipe_train_step(recipe: Recipe, optimizer, models, mesh, shardings, global_batch: int,
                      accum_steps: int, rules, schedule):
    """The jitted train step of a run (and of ``jalign plan``'s compile of it)."""
    return make_train_step(recipe.loss_fn, optimizer, models, mesh=mesh,
                           state_sharding=shardings, global_batch=global_batch,
                           accum_steps=accum_steps, rules=rules, schedule=schedule)


class Training:
    """One pass of the loop over a run: compiled steps, metrics one step behind,
    evaluation, checkpoints and preemption."""

    def __init__(self, run: Run, on_log: Callable[[dict], None] | None):
        self.run, self.on_log = run, on_log
        self.tc, self.source, self.state = run.tc, run.source, run.state
        self.step_fn = recipe_train_step(run.recipe, run.optimizer, run.models, run.mesh,
                                         run.shardings, run.global_batch, self.tc.accum_steps,
                                         run.rules, run.schedule)
        self.data_sh = batch_sharding(run.mesh, run.global_batch, run.rules)
        self.evaluator = Evaluator(run)
        seq_len = run.row_length
        self.rows_per_step = run.global_batch * rows_per_example(run.recipe.data_kind)
        self.tokens_per_step = self.rows_per_step * seq_len
        self.flops_per_step = run.recipe.flops_per_step(run.models, seq_len, self.rows_per_step)
        self.peak, self.peak_source = M.peak_flops_per_device(self.tc.peak_flops)
        self.n_dev = run.mesh.devices.size
        self.writer = M.MetricsWriter(run.run_dir, resume_step=run.start, enabled=run.is_main)
        self.summary = {"run_dir": str(run.run_dir), "start_step": run.start, "skipped": 0}
        self.pending: list[Pending] = []
        self.last_ready = time.perf_counter()
        self.last_eval = None
        self.last_record = None
        self.ended = None
        self.saved = False
        self.bar = None

    # ------------------------------------------------------------ the loop

    def execute(self) -> dict:
        run = self.run
        try:
            with Preemption() as preemption, quiet_saves():
                try:
                    self._loop(preemption)
                finally:
                    if self.bar is not None:
                        self.bar.close()
                    try:
                        run.ckpt.close()  # may raise (a full disk under the last save)
                    finally:
                        self.writer.close()
            return self._summarise()
        finally:  # the run directory is free again, however the run ended
            if run.lock is not None:
                run.lock.release()

    def _loop(self, preemption) -> None:
        run = self.run
        self._open_bar()
        if self.evaluator.enabled and self.tc.eval_at_start and run.start == 0:
            self.last_eval = self.evaluator(self.state, 0)  # the baseline
            self.writer.write(self.last_eval)
        for step in range(run.start, run.end):
            if not self._one_step(step, preemption):
                break
        self._finish()

    def _one_step(self, step: int, preemption) -> bool:
        """Dispatch one step and do what falls due after it; False when the data ended."""
        if self.source.waits_for_state():
            # The source is about to run the current state (a rollout): the steps
            # dispatched so far finish first anyway, so read their metrics now and
            # their times do not include the source's work.
            self.drain()
        try:
            batch = self.source.next(self.state)
        except StopIteration:  # the count of steps is exact; this is a safety net
            self.ended = step
            return False
        batch = _global_batch(batch, self.data_sh)
        own = getattr(self.source, "_source", self.source)  # through source.complete's view
        if step == self.run.start and type(own).__module__.startswith("jalign."):
            # jalign's own sources make the batch `jalign plan` compiles the step for (a
            # user's source may lay out its own)
            spec = self.run.recipe.batch_spec(self.run.models, self.run.global_batch,
                                              self.run.row_length)
            check_batch(spec, batch, type(self.source).__name__)
        t_dispatch = time.perf_counter()
        self.state, metrics = self.step_fn(self.state, batch)
        done = step + 1
        self.pending.append(Pending(done, metrics, t_dispatch, self.source.step_metrics()))
        self.drain(keep_last=True)
        if fault("sigterm_at_step", done):
            os.kill(os.getpid(), signal.SIGTERM)  # through the real handler
        # A source whose state is complete only between some steps (rollouts) is saved
        # there: preemption waits for its next boundary.
        if preemption.reached(done) and self.source.at_boundary():
            self.drain()
            if preemption.interrupted:
                self.save("interrupt", done)
                self.run.ckpt.wait()
                raise Interrupted(f"Ctrl-C: saved step {done} to {self.run.run_dir}; run the "
                                  "same command again to continue from it")
            self.save("sigterm", done)
            self.run.ckpt.wait()
            raise Preempted(f"SIGTERM: saved step {done} to {self.run.run_dir}; restart to "
                            "continue")
        if self.evaluator.enabled and self.tc.eval_every and done % self.tc.eval_every == 0:
            self.drain()
            self._evaluate(done)
        if (done % self.tc.save_every == 0 and done != self.run.end
                and self.source.at_boundary()):
            self.drain()
            self.save("interval", done)
        return True

    def _finish(self) -> None:
        """Read every step's metrics, save and evaluate the final step."""
        self.drain()
        final = int(jax.device_get(self.state.step))
        if final < self.tc.steps:
            self.ended = final
        self.saved = self.run.ckpt.latest_step() != final
        if self.saved:
            self.save("end_of_data" if self.ended is not None else "final", final)
        if self.evaluator.enabled and (self.last_eval is None or self.last_eval["step"] != final):
            self._evaluate(final)

    def _evaluate(self, step: int) -> None:
        self.last_eval = self.evaluator(self.state, step)
        self.writer.write(self.last_eval)
        if self.bar is not None:
            self._show()
        if self.on_log is not None:
            self.on_log(self.last_eval)

    # ------------------------------------------------------------ metrics

    def drain(self, keep_last: bool = False) -> None:
        """Read the metrics of the steps dispatched so far (all but the newest with
        ``keep_last``): the loop's only waits for the device. No non-finite update can
        reach a checkpoint: the step never applies one, and every save, eval and exit
        first drains."""
        while len(self.pending) > (1 if keep_last else 0):
            self._record(self.pending.pop(0))

    def _record(self, p: Pending) -> None:
        m = {k: float(v) for k, v in fetch_metrics(p.metrics).items()}
        # A step's time: from when the device could start it (its dispatch, or the end of
        # the step before) to when its result is here.
        now = time.perf_counter()
        dt, self.last_ready = now - max(p.dispatched, self.last_ready), now
        record = {"step": p.step, "loss": m["loss"], "grad_norm": m["grad_norm"],
                  "learning_rate": m.get("learning_rate", 0.0), "step_seconds": dt,
                  "tokens_per_second_per_device": self.tokens_per_step / dt / self.n_dev,
                  self.run.recipe.weight_name: m["loss_weight"]}
        if self.peak:
            record["mfu"] = self.flops_per_step / dt / (self.peak * self.n_dev)
        record.update({k: v for k, v in m.items()
                       if k not in ("loss", "grad_norm", "learning_rate", "finite",
                                    "loss_weight")})
        record.update(p.source_metrics)
        if not m["finite"]:
            self._nonfinite(record, m)
        self.writer.write(record)
        if self.on_log is not None and (p.step % self.tc.log_every == 0 or p.step == self.run.end):
            self.on_log(record)
        self.last_record = record
        if self.bar is not None:
            self.bar.update(1)
            self._show()

    def _show(self) -> None:
        """The progress bar's postfix: the latest step's metrics and evaluation."""
        record = self.last_record or {}
        fields = M.console_fields(record, self.last_eval)
        if record:
            fields["tok_s"] = f"{record['tokens_per_second_per_device'] * self.n_dev:,.0f}"
        self.bar.set_postfix(fields, refresh=False)  # in CONSOLE_METRICS' order

    def _nonfinite(self, record: dict, m: dict) -> None:
        record["skipped_nonfinite"] = 1
        self.summary["skipped"] += 1
        if self.tc.nan_policy == "abort":
            self.writer.write(record)
            raise NonFiniteError(
                f"step {record['step']}: non-finite loss ({m['loss']}) or gradient norm "
                f"({m['grad_norm']}); the update was not applied and nothing was saved past "
                f"step {self.run.ckpt.latest_step()}. Set TrainConfig.nan_policy='skip' to "
                "skip such steps instead.")

    def _open_bar(self) -> None:
        if self.tc.progress and self.run.is_main:
            from tqdm.auto import tqdm
            # Redraw often on a terminal; in a log file (no terminal) only every 30 s.
            self.bar = tqdm(total=self.run.end, initial=self.run.start, desc="train",
                            unit="step", dynamic_ncols=True,
                            mininterval=0.5 if sys.stderr.isatty() else 30.0)

    # ------------------------------------------------------------ checkpoints

    def save(self, reason: str, step: int) -> None:
        run = self.run
        # Every process's data position (Orbax writes JSON items from process 0 only).
        meta = dict(run.metadata)
        run.ckpt.save(self.state, data_state=merged(self.source.get_state()),
                      model_config=run.model_config, operative=run.operative,
                      config_record=run.record, roles=meta.pop("roles"),
                      extra_metadata={"reason": reason, "algorithm": run.recipe.name, **meta})
        if fault("sigkill_during_save", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if fault("sigkill_after_save", step):
            run.ckpt.wait()
            os.kill(os.getpid(), signal.SIGKILL)

    def _summarise(self) -> dict:
        run, tc = self.run, self.tc
        if self.ended is not None:
            run.log(f"data ended at step {self.ended} of TrainConfig.steps={tc.steps}: "
                    f"{self.source.describe()}"
                    + ("; saved" if self.saved else "; its checkpoint was already saved")
                    + (", evaluated" if self.last_eval else ""))
        if run.is_main:
            M.plot_loss_curve(run.run_dir / "metrics.jsonl", run.run_dir / "loss_curve.png")
        run.state = self.state  # the donated input buffers are gone; the Run holds the live state
        self.summary.update(
            final_step=int(jax.device_get(self.state.step)), ended_early=self.ended is not None,
            eval=self.last_eval, data_stats=getattr(self.source, "stats", {}),
            peak_flops_source=self.peak_source, state=self.state, models=run.models,
            model_config=run.model_config)
        # The primary role as one model: nnx.merge(summary["graphdef"], summary["params"]).
        primary = run.models.primary
        self.summary.update(graphdef=run.models.graphdef(primary),
                            params=run.models.tree(primary, self.state.params, self.state.fixed))
        return self.summary


class Evaluator:
    """The run's evaluation: the source's own (a rollout source: rewards of greedy
    responses), or the loss over ``TrainConfig.eval_batches`` batches of the eval split."""

    def __init__(self, run: Run):
        self.run = run
        self.source_eval = getattr(run.source, "evaluate", None) if run.eval_iter is not None else None
        self.eval_fn = self.sharding = None
        self.batches = 0
        if run.eval_iter is not None and self.source_eval is None:
            size = run.eval_iter.config.batch_size
            self.eval_fn = make_eval_step(run.recipe.loss_fn, run.models, mesh=run.mesh,
                                          state_sharding=run.shardings, global_batch=size,
                                          rules=run.rules)
            self.sharding = batch_sharding(run.mesh, size, run.rules)
        if run.eval_iter is not None:
            self.batches = min(run.tc.eval_batches, agree_min(run.eval_iter.total_batches()))

    @property
    def enabled(self) -> bool:
        return self.eval_fn is not None or self.source_eval is not None

    def __call__(self, state, step: int) -> dict:
        if self.source_eval is not None:
            return self.source_eval(state, step)
        run = self.run
        run.eval_iter.set_state(run.eval_start)
        total = weight = 0.0
        aux: dict[str, tuple[float, float]] = {}
        for _, batch in zip(range(self.batches), run.eval_iter):
            out = self.eval_fn(state, _global_batch(batch, self.sharding))
            total += float(out.total)
            weight += float(out.weight)
            part = {k: (float(s), float(c)) for k, (s, c) in jax.device_get(out.aux).items()}
            aux = combine_aux(aux, part, add=float.__add__, maximum=max) if aux else part
        weight_name = run.recipe.weight_name
        if weight == 0:
            ec = run.configs.eval_data
            raise ValueError(f"eval data {ec.path} ({ec.split}) gave no "
                             f"{weight_name.replace('_', ' ')}")
        loss = total / weight
        result = {"step": step, "eval_loss": loss, "eval_" + weight_name: weight}
        if aux.get("nll", (0, 0))[1]:  # a loss's per-token NLL, whatever its normalisation
            result["eval_perplexity"] = float(np.exp(min(aux["nll"][0] / aux["nll"][1], 50)))
        elif weight_name == "target_tokens":  # a per-token loss without an nll metric
            result["eval_perplexity"] = float(np.exp(min(loss, 50)))
        result.update({f"eval_{name}": s / c for name, (s, c) in aux.items() if c})
        return result


def trained_model(summary: dict, role: str | None = None):
    """The NNX model of a finished run's role (default: its primary role, e.g. the policy;
    the frozen parts joined back) from a ``train``/``run_loop`` summary."""
    models, state = summary["models"], summary["state"]
    name = role or models.primary
    return models.merged({name: models.tree(name, state.params, state.fixed)})[name]


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, (Interrupted, KeyboardInterrupt)):
        return EXIT_INTERRUPTED
    if isinstance(exc, Preempted):
        return EXIT_PREEMPTED
    if isinstance(exc, NonFiniteError):
        return EXIT_NONFINITE
    if isinstance(exc, DiskFull):
        return EXIT_DISK_FULL
    return 1
