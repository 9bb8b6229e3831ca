"""Where jalign's DPO train step spends its time (jalign's venv, XLA:CPU).

Each line is its own jitted function on the DPO benchmark batch (jalign_dpo_worker: 4
pairs, 128 + 384 tokens), median of --reps calls after one compile call:

  full step               the benchmarked step: the DPO recipe's make_train_step with
                          the in-step reference (donating, state flowing through)
  full step, no reference the same step with DPOConfig(reference_free=True) and no frozen
                          model: policy forward + backward + AdamW only
  full step, 1 LM-head chunk  DPOConfig(chunk_tokens=4096): the 2 x 4 x 511 = 4088 scored
                          positions fit one chunk, so the LM head + log-softmax run once on
                          full logits instead of 2 chunks under lax.map + jax.checkpoint
                          (which recomputes the head matmul in the backward pass)
  loss + grads            value_and_grad of the DPO loss incl. the reference (no optimizer)
  reference forward       pair_logps(reference model, batch) alone (no grad)
  variant: response-only head   (not jalign code) the full-step loss with the LM head and
                          log-softmax applied only to the positions that predict response
                          tokens (what TRL's fused head and Tunix do): policy + reference

"faults": minor page faults per call; "others": CPU cores used by other processes
meanwhile (the machine is shared: lines with others > 0 were measured under load; before
each call the script waits up to --quiet-wait s for them to go quiet).

Run:  .venv/bin/python benchmarks/train_step_impls/jalign_dpo_breakdown.py [--scan]
(with GLIBC_TUNABLES=... in the environment for the allocator setting of the glibc row)
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (DPO_BETA, DPO_PROMPT, HZ, cpu_busy, dpo_flops_per_step,  # noqa: E402
                    minor_faults, proc_cpu, wait_quiet, worker_args)
from jalign_dpo_worker import dpo_batch  # noqa: E402
from jalign_worker import build  # noqa: E402


QUIET = {"below": 0.3, "wait": 120.0}


def bench(label, fn, *xs, reps=3, flops=None):
    """Median seconds of ``reps`` calls after a first (compiling) one; before each call,
    wait (at most QUIET["wait"] s) for other processes to go quiet; "others" = the median
    of their CPU use (cores) during the calls."""
    import jax

    jax.block_until_ready(fn(*xs))  # compile + first run
    ts, fs, others = [], [], []
    for _ in range(reps):
        wait_quiet(QUIET["below"], QUIET["wait"])
        b0, p0 = cpu_busy(), proc_cpu(os.getpid())
        f, s = minor_faults(), time.perf_counter()
        jax.block_until_ready(fn(*xs))
        ts.append(time.perf_counter() - s)
        fs.append(minor_faults() - f)
        others.append(max(0.0, ((cpu_busy() - b0) - (proc_cpu(os.getpid()) - p0)) / HZ
                          / ts[-1]))
    med = statistics.median(ts)
    gf = f"{flops / med / 1e9:6.1f} GFLOP/s" if flops else ""
    print(f"  {label:<48} median {med:7.3f} s  min {min(ts):7.3f} s  "
          f"faults {statistics.median(fs):>9,.0f}  others {statistics.median(others):.1f}  {gf}",
          flush=True)
    return med


def main():
    args = worker_args(lambda ap: (ap.add_argument("--scan", action="store_true"),
                                   ap.add_argument("--prompt", type=int, default=DPO_PROMPT),
                                   ap.add_argument("--reps", type=int, default=3),
                                   ap.add_argument("--quiet-wait", type=float, default=120)))
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jalign.losses import dpo as D
    from jalign.losses.sft import chunked_log_probs
    from jalign.sharding import use_mesh
    from jalign.algos import dpo

    QUIET["wait"] = args.quiet_wait
    fl = dpo_flops_per_step(args.vocab, args.hidden, args.intermediate, args.layers,
                            args.heads, args.kv_heads, args.batch, args.seq)
    print(f"jalign DPO breakdown ({'scan' if args.scan else 'unrolled'} layers), "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}, "
          f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}", flush=True)
    np_batch = dpo_batch(args)

    def full_step(label, config, reference, flops):  # (the recipe holds a reference
        b = build(args, args.scan, recipe=dpo.recipe(config), batch=np_batch)  # when needed)
        assert ("reference" in (b.state.fixed or {})) == reference
        box = {"s": b.state}

        def run(_):
            box["s"], m = b.step(box["s"], b.batch)
            return m["loss"]

        t = bench(label, run, None, reps=args.reps, flops=flops)
        return t, b, box["s"]

    base = D.DPOConfig(beta=DPO_BETA, loss_type="sigmoid")
    t_full, b, state = full_step("full step", base, True, fl["total"])
    t_noref, *_ = full_step("full step, no reference (reference_free)",
                            D.DPOConfig(beta=DPO_BETA, reference_free=True), False, fl["policy"])
    t_1chunk, *_ = full_step("full step, 1 LM-head chunk (chunk_tokens=4096)",
                             D.DPOConfig(beta=DPO_BETA, chunk_tokens=4096), True, fl["total"])

    graphdef, mesh, batch = b.models.graphdef("policy"), b.mesh, b.batch
    params, ref = state.params["policy"], state.fixed["reference"]
    loss_fn = D.make_dpo_loss(base)

    def loss_of(p, r, bt):
        with use_mesh(mesh):
            return loss_fn(nnx.merge(graphdef, p), bt, reference=nnx.merge(graphdef, r)).total

    t_grad = bench("loss + grads (policy fwd+bwd + reference fwd)",
                   jax.jit(jax.value_and_grad(loss_of)), params, ref, batch, reps=args.reps,
                   flops=fl["total"])

    def ref_fwd(r, bt):
        with use_mesh(mesh):
            return D.pair_logps(nnx.merge(graphdef, r), bt)[:2]

    t_ref = bench("reference forward alone (pair_logps)", jax.jit(ref_fwd), ref, batch,
                  reps=args.reps, flops=fl["reference"])

    # Variant, not jalign code: score only the positions that predict a response token.
    P = args.prompt

    def resp_logps(model, bt):
        def both(k):
            return jnp.concatenate([bt[f"chosen_{k}"], bt[f"rejected_{k}"]])
        ids = both("input_ids")
        h = model.backbone(ids, both("positions"), both("segment_ids"))
        n, t, d = h.shape
        hr = h[:, P - 1:-1].reshape(-1, d)  # position t predicts token t+1 (a response token)
        lp = chunked_log_probs(hr, model.lm_head_weight().astype(h.dtype),
                               ids[:, P:].reshape(-1), 1 << 30)
        s = jnp.sum(lp.reshape(n, t - P), axis=1)
        return s[:n // 2], s[n // 2:]

    def loss_resp(p, r, bt):
        with use_mesh(mesh):
            pc, pr = resp_logps(nnx.merge(graphdef, p), bt)
            rc, rr = jax.lax.stop_gradient(resp_logps(nnx.merge(graphdef, r), bt))
            losses, _ = D.dpo_loss(pc, pr, rc, rr, beta=DPO_BETA)
            return jnp.sum(losses)

    t_var = bench("variant: response-only LM head, loss + grads",
                  jax.jit(jax.value_and_grad(loss_resp)), params, ref, batch, reps=args.reps,
                  flops=fl["total"])
    print()
    print(f"summary (median s): full step {t_full:.3f} = loss+grads {t_grad:.3f} + optimizer/"
          f"update {t_full - t_grad:.3f}; without the reference {t_noref:.3f} (the in-step "
          f"reference costs {t_full - t_noref:.3f} s, {100 * (t_full - t_noref) / t_full:.0f}% "
          f"of the step; alone it takes {t_ref:.3f} s); one LM-head chunk {t_1chunk:.3f} "
          f"({t_1chunk - t_full:+.3f}); response-only head (loss+grads) {t_var:.3f} vs "
          f"{t_grad:.3f} ({t_var - t_grad:+.3f})")


if __name__ == "__main__":
    main()
