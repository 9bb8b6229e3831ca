"""The decode step's weight GEMMs alone on CPU (XLA), as docs/benchmarks.md "Where the
sampler's time goes" quotes them.

1. A GRPO sampler's step: the 8 layers' weight GEMMs of the benchmark model (hidden 512,
   intermediate 1408) at M = 32 rows, in a ``fori_loop`` of 64 steps over weights taken
   once outside it (as ``decode.split_layers`` does): q, k, v and gate, up as separate
   GEMMs (jalign's decode) and fused into one each (the same values: a fusion measured,
   not built).
2. The plain sampler's M = 8: ``[8, 512] x [512, 1408]`` over 40 distinct weights (115 MB,
   beyond the caches) per call, weights [in, out] (jalign's layout) and [out, in]; the
   rate at which the GEMMs stream weights from memory.

    python benchmarks/decode_gemms.py [--rounds 4]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

D, F, LAYERS, STEPS = 512, 1408, 8, 64


def _layers(key):
    keys = iter(jax.random.split(key, 7 * LAYERS))

    def w(*shape):
        return jax.random.normal(next(keys), shape) * 0.02

    return [dict(q=w(D, D), k=w(D, D), v=w(D, D), o=w(D, D), g=w(D, F), u=w(D, F), d=w(F, D))
            for _ in range(LAYERS)]


def _separate(ls, x):
    for p in ls:
        x = x + ((x @ p["q"]) * (x @ p["k"]) + x @ p["v"]) @ p["o"]
        x = x + (jax.nn.silu(x @ p["g"]) * (x @ p["u"])) @ p["d"]
    return x


def _fused(ls, x):
    for p in ls:
        qkv = x @ p["qkv"]
        x = x + (qkv[:, :D] * qkv[:, D:2 * D] + qkv[:, 2 * D:]) @ p["o"]
        gu = x @ p["gu"]
        x = x + (jax.nn.silu(gu[:, :F]) * gu[:, F:]) @ p["d"]
    return x


def _timed(f, *args) -> float:
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    return time.perf_counter() - t


def decode_chain(rounds: int, rows: int = 32) -> None:
    ls = _layers(jax.random.key(0))
    fl = [dict(qkv=jnp.concatenate([p["q"], p["k"], p["v"]], 1), o=p["o"],
               gu=jnp.concatenate([p["g"], p["u"]], 1), d=p["d"]) for p in ls]
    x = jax.random.normal(jax.random.key(1), (rows, D))
    runs = {name: (jax.jit(lambda w, x, f=f: jax.lax.fori_loop(
        0, STEPS, lambda i, x: f(w, x) * 0.5, x)), w)
        for name, f, w in (("separate", _separate, ls), ("fused q/k/v, gate/up", _fused, fl))}
    outs = {n: f(w, x) for n, (f, w) in runs.items()}  # compiled here
    diff = float(jnp.max(jnp.abs(outs["separate"] - outs["fused q/k/v, gate/up"])))
    times = {n: [] for n in runs}
    for _ in range(rounds):
        for n, (f, w) in runs.items():
            times[n].append(_timed(f, w, x) / STEPS)
    flops = 2 * rows * LAYERS * (4 * D * D + 3 * D * F)
    print(f"\n{LAYERS} layers' weight GEMMs per decode step, M = {rows} rows "
          f"(max |difference| between the two: {diff})\n")
    print("| GEMMs | min ms/step | median ms/step | GFLOP/s |\n|---|---:|---:|---:|")
    for n, ts in times.items():
        ts = sorted(ts)
        print(f"| {n} | {ts[0] * 1e3:.2f} | {ts[len(ts) // 2] * 1e3:.2f} | "
              f"{flops / ts[0] / 1e9:.0f} |")


def weight_stream(rounds: int, rows: int = 8, count: int = 40) -> None:
    keys = jax.random.split(jax.random.key(2), count)
    w_io = [jax.random.normal(k, (D, F)) for k in keys]
    w_oi = [w.T.copy() for w in w_io]
    x = jnp.ones((rows, D))
    runs = {"[in, out]: x @ W": (jax.jit(lambda x, ws: sum((x @ w)[:, :1] for w in ws)), w_io),
            "[out, in]: x @ W^T": (jax.jit(lambda x, ws: sum(
                jnp.einsum("md,nd->mn", x, w)[:, :1] for w in ws)), w_oi)}
    for f, ws in runs.values():
        jax.block_until_ready(f(x, ws))
    best = {n: min(_timed(f, x, ws) for _ in range(rounds * 3)) for n, (f, ws) in runs.items()}
    size = count * D * F * 4
    print(f"\nM = {rows} rows over {count} distinct [{D}, {F}] weights ({size / 1e6:.0f} MB)\n")
    print("| weights | best ms | GB/s of weights | GFLOP/s |\n|---|---:|---:|---:|")
    for n, t in best.items():
        print(f"| {n} | {t * 1e3:.1f} | {size / t / 1e9:.1f} | "
              f"{2 * rows * D * F * count / t / 1e9:.0f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    decode_chain(args.rounds)
    weight_stream(args.rounds)


if __name__ == "__main__":
    main()
