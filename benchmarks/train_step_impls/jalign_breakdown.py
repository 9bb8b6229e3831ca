"""Where jalign's SFT train step spends its time (jalign's venv, XLA:CPU).

Times, each as its own jitted function on the benchmark shape (median of --reps calls
after one compile call; inputs not donated except for the full step):

  full step             the SFT recipe's make_train_step as in jalign_worker.py
  loss + grads          jax.value_and_grad of sft_loss w.r.t. the params (no optimizer)
  forward (loss)        sft_loss alone
  forward (backbone)    model.backbone: everything but the LM head and the loss
  backbone fwd+bwd      value_and_grad of a linear surrogate loss <backbone(ids), r>
                        (so: loss + grads without the LM head and the cross-entropy)
  head+CE fwd+bwd       LM-head matmul + cross-entropy and their gradients w.r.t. the
                        hidden states and the head, alone, in three formulations:
                          jalign   sft_loss's token_log_probs (take_along_axis - logsumexp)
                          chunked  the same math over 4 token chunks under lax.map with
                                   jax.checkpoint: never more than 1/4 of the logits live
                          no-CE    the matmul alone with a linear surrogate (GEMM floor)
  attention fwd+bwd     jalign.models.attention.attention on one layer's q/k/v, x layers;
                        also the same math on q/k/v transposed to [b, h, t, d] first (a
                        variant written here, not jalign code) and, for reference, torch's
                        scaled_dot_product_attention(is_causal=True) on the same shape
  optimizer             tx.update + optax.apply_updates on a full set of gradients
  GEMM floor            every weight matmul of the step (forward, and the two backward
                        products: dX = dY W^T, dW = X^T dY) timed alone and summed

"faults": minor page faults per call; "others": CPU cores used by other processes on
the machine meanwhile (it is shared: a line with others > 0 was measured under load).

Run:  .venv/bin/python benchmarks/train_step_impls/jalign_breakdown.py [--scan]
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import HZ, cpu_busy, flops_per_step, minor_faults, proc_cpu, worker_args  # noqa: E402
from jalign_worker import build  # noqa: E402


def main():
    args = worker_args(lambda ap: (ap.add_argument("--scan", action="store_true"),
                                   ap.add_argument("--reps", type=int, default=3)))
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from jalign.losses.sft import sft_loss, token_log_probs
    from jalign.models.attention import attention, make_mask
    from jalign.sharding import use_mesh

    b = build(args, args.scan)
    B, T, D, V = args.batch, args.seq, args.hidden, args.vocab
    H, G, F, L = args.heads, args.kv_heads, args.intermediate, args.layers
    hd = D // H
    fl = flops_per_step(V, D, F, L, H, G, B, T)
    rows = []

    def bench(label, fn, *xs, flops=None, note=""):
        out = fn(*xs)  # compile + first run
        jax.block_until_ready(out)
        del out
        ts, fs = [], []
        b0, p0, t0 = cpu_busy(), proc_cpu(os.getpid()), time.perf_counter()
        for _ in range(args.reps):
            f, s = minor_faults(), time.perf_counter()
            jax.block_until_ready(fn(*xs))
            ts.append(time.perf_counter() - s)
            fs.append(minor_faults() - f)
        others = max(0.0, ((cpu_busy() - b0) - (proc_cpu(os.getpid()) - p0)) / HZ
                     / (time.perf_counter() - t0))
        med = statistics.median(ts)
        rows.append((label, med, min(ts), statistics.median(fs), flops, note))
        gf = f"{flops / med / 1e9:6.1f} GFLOP/s" if flops else ""
        print(f"  {label:<44} median {med:7.3f} s  min {min(ts):7.3f} s  "
              f"faults {statistics.median(fs):>9,.0f}  others {others:.1f}  {gf} {note}",
              flush=True)
        return med

    params = b.state.params["policy"]
    batch = b.batch
    graphdef, mesh = b.models.graphdef("policy"), b.mesh
    print(f"jalign breakdown ({'scan' if args.scan else 'unrolled'} layers), "
          f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)

    # 1. full step (donating; keep the state flowing through).
    box = {"s": b.state}

    def full(_):
        box["s"], m = b.step(box["s"], batch)
        return m["loss"]

    t_full = bench("full train step", full, None, flops=fl["total"])
    params = box["s"].params["policy"]

    def loss_of(p, bt):
        with use_mesh(mesh):
            return sft_loss(nnx.merge(graphdef, p), bt).total

    def backbone_of(p, bt):
        with use_mesh(mesh):
            return nnx.merge(graphdef, p).backbone(bt["input_ids"], bt["positions"],
                                                    bt["segment_ids"])

    t_grad = bench("loss + grads (no optimizer)", jax.jit(jax.value_and_grad(loss_of)),
                   params, batch, flops=fl["total"])
    t_fwd = bench("forward (loss)", jax.jit(loss_of), params, batch, flops=fl["total"] / 3)
    bench("forward (backbone, no LM head)", jax.jit(backbone_of), params, batch,
          flops=(fl["total"] - 6 * D * V * B * T) / 3)
    r = jax.random.normal(jax.random.key(3), (B, T, D), jnp.float32)

    def surrogate(p, bt):
        return jnp.sum(backbone_of(p, bt) * r)

    t_bb = bench("backbone fwd+bwd (no LM head, no CE)", jax.jit(jax.value_and_grad(surrogate)),
                 params, batch, flops=fl["total"] - 6 * D * V * B * T)

    # LM head + CE alone.
    h = jax.random.normal(jax.random.key(4), (B, T, D), jnp.float32)
    w = params["lm_head"]
    ids = batch["input_ids"]
    head_flops = 6 * D * V * B * T

    def ce_jalign(h, w):
        logits = (h.reshape(B * T, D) @ w).reshape(B, T, V)
        return -jnp.sum(token_log_probs(logits[:, :-1], ids[:, 1:]))

    def ce_chunked(h, w, chunks=4):
        # Targets padded with a dummy for the last position, masked out.
        tgt = jnp.concatenate([ids[:, 1:], jnp.zeros((B, 1), ids.dtype)], axis=1)
        msk = jnp.concatenate([jnp.ones((B, T - 1)), jnp.zeros((B, 1))], axis=1)
        hc = h.reshape(chunks, B * T // chunks, D)
        tc = tgt.reshape(chunks, -1)
        mc = msk.reshape(chunks, -1)

        @jax.checkpoint
        def one(x):
            hh, tt, mm = x
            lg = hh @ w
            lp = jnp.take_along_axis(lg, tt[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(lg, -1)
            return -jnp.sum(lp * mm)

        return jnp.sum(jax.lax.map(one, (hc, tc, mc)))

    rv = jax.random.normal(jax.random.key(5), (B * T, V), jnp.float32)

    def head_only(h, w):
        return jnp.sum((h.reshape(B * T, D) @ w) * rv)

    t_ce = bench("head+CE fwd+bwd: jalign (full logits)",
                 jax.jit(jax.value_and_grad(ce_jalign, argnums=(0, 1))), h, w, flops=head_flops)
    bench("head+CE fwd+bwd: chunked x4 (remat)",
          jax.jit(jax.value_and_grad(ce_chunked, argnums=(0, 1))), h, w,
          flops=head_flops * 4 / 3, note="(+1 recomputed head matmul)")
    t_head = bench("head matmul fwd+bwd, no CE (GEMM floor)",
                   jax.jit(jax.value_and_grad(head_only, argnums=(0, 1))), h, w, flops=head_flops)

    # Attention alone, one layer, times L.
    kq = jax.random.split(jax.random.key(6), 4)
    q = jax.random.normal(kq[0], (B, T, H, hd))
    k = jax.random.normal(kq[1], (B, T, G, hd))
    v = jax.random.normal(kq[2], (B, T, G, hd))
    ro = jax.random.normal(kq[3], (B, T, H, hd))
    seg = jnp.ones((B, T), jnp.int32)
    idx = jnp.broadcast_to(jnp.arange(T), (B, T))
    mask = make_mask(seg, seg, idx, idx)

    def attn_loss(q, k, v):
        return jnp.sum(attention(q, k, v, mask) * ro)

    t_attn1 = bench("attention fwd+bwd, 1 layer",
                    jax.jit(jax.value_and_grad(attn_loss, argnums=(0, 1, 2))), q, k, v,
                    flops=fl["attention"] / L)
    # Variant (not jalign's code): the same math with q/k/v transposed to
    # [batch, heads, length, head_dim] before the two einsums.
    from jalign.models.attention import _MASK_VALUE

    def attn_bhtd(q, k, v):
        qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
        if G != H:
            kt, vt = (jnp.repeat(x, H // G, axis=1) for x in (kt, vt))
        s = jnp.einsum("bhtd,bhsd->bhts", qt, kt) * hd ** -0.5
        s = jnp.where(mask[:, None], s, _MASK_VALUE)
        o = jnp.einsum("bhts,bhsd->bhtd", jax.nn.softmax(s, axis=-1), vt)
        return jnp.sum(o.transpose(0, 2, 1, 3) * ro)

    t_attn_v = bench("attention variant: [b,h,t,d] layout, 1 layer",
                     jax.jit(jax.value_and_grad(attn_bhtd, argnums=(0, 1, 2))), q, k, v,
                     flops=fl["attention"] / L)
    t_sdpa = float("nan")
    try:  # reference: PyTorch's fused CPU attention (causal), same shape, 2 threads
        import torch
        torch.set_num_threads(args.threads)
        tq, tk, tv = (torch.randn(B, n, T, hd, requires_grad=True) for n in (H, G, G))
        tro = torch.randn(B, H, T, hd)

        def sdpa(*_):
            o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True,
                                                                 enable_gqa=G != H)
            (o * tro).sum().backward()
            return jnp.zeros(())

        t_sdpa = bench(f"torch SDPA causal fwd+bwd, 1 layer ({torch.__version__})", sdpa, None,
                       flops=fl["attention"] / L, note="(skips masked blocks)")
    except ImportError:
        pass

    # Optimizer alone.
    grads = jax.tree.map(lambda x: x * 1e-3, {"policy": params})
    opt_state = box["s"].opt_state

    def opt_step(g, o, p):
        upd, o = b.tx.update(g, o, p)
        return optax.apply_updates(p, upd), o

    t_opt = bench("optimizer (AdamW update + apply)", jax.jit(opt_step), grads, opt_state,
                  {"policy": params})

    # GEMM floor: every weight matmul, forward and both backward products, alone.
    M = B * T
    shapes = {"q/k/v/o": (D, D), "gate/up": (D, F), "down": (F, D)}
    mult = {"q/k/v/o": (H + 2 * G) * hd // D + 1, "gate/up": 2, "down": 1}
    gemm_total = 0.0
    mm = jax.jit(lambda a, b: a @ b)
    mm_tn = jax.jit(lambda a, b: a.T @ b)
    print("  GEMMs (M = batch*seq):", flush=True)
    for name, (kdim, ndim) in shapes.items():
        x = jax.random.normal(jax.random.key(7), (M, kdim))
        wt = jax.random.normal(jax.random.key(8), (kdim, ndim))
        dy = jax.random.normal(jax.random.key(9), (M, ndim))
        t1 = bench(f"    fwd  [{M}x{kdim}]@[{kdim}x{ndim}]", mm, x, wt, flops=2 * M * kdim * ndim)
        t2 = bench(f"    dX   [{M}x{ndim}]@[{ndim}x{kdim}]", mm, dy, wt.T,
                   flops=2 * M * kdim * ndim)
        t3 = bench(f"    dW   [{kdim}x{M}]@[{M}x{ndim}]", mm_tn, x, dy, flops=2 * M * kdim * ndim)
        gemm_total += L * mult[name] * (t1 + t2 + t3)
    gemm_total += t_head
    print()
    other = t_grad - t_bb
    print(f"summary (median s): full step {t_full:.3f} = loss+grads {t_grad:.3f} "
          f"+ optimizer/update/finite-check {t_full - t_grad:.3f}")
    print(f"  loss+grads {t_grad:.3f}: forward {t_fwd:.3f}; backbone fwd+bwd {t_bb:.3f}; "
          f"LM head + CE share (loss+grads - backbone) {other:.3f} "
          f"({100 * other / t_full:.0f}% of the step); head+CE alone {t_ce:.3f}, "
          f"of which the head GEMMs {t_head:.3f}")
    print(f"  attention fwd+bwd x {L} layers: {L * t_attn1:.3f} ({100 * L * t_attn1 / t_full:.0f}%)"
          f" for {100 * fl['attention'] / fl['total']:.0f}% of the FLOPs; [b,h,t,d] variant "
          f"{L * t_attn_v:.3f}; torch SDPA {L * t_sdpa:.3f}; optimizer alone {t_opt:.3f} "
          f"({100 * t_opt / t_full:.0f}%)")
    print(f"  GEMM floor (all weight matmuls alone, fwd + 2 bwd): {gemm_total:.3f} s "
          f"({100 * gemm_total / t_full:.0f}% of the step); GEMMs + attention + optimizer "
          f"{gemm_total + L * t_attn1 + t_opt:.3f} s vs full step {t_full:.3f} s")


if __name__ == "__main__":
    main()
