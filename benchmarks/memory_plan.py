"""Per-device memory of full fine-tuning Llama 3.1 8B and 70B (AdamW) under every
hardware config in configs/hw/, planned without the hardware (jalign/memory_plan.py has
the model of what is counted and why).

For each configs/hw/*.gin that states ``MeshConfig.num_devices`` (cpu.gin does not), the
file is parsed with jalign's gin loading; its mesh is built as an abstract mesh of that
many devices and its LlamaConfig execution fields (dtype, param_dtype, remat_policy,
attention_impl) are applied to each model. The table gives GiB per device: parameters,
optimizer state, gradients (+ the optimizer's float32 updates), weight copies (compute-
dtype casts, fsdp all-gathers), saved activations, one layer's backward working set,
loss logits, and the total against the chip's HBM; "fits" leaves 10% headroom; "max b"
is the largest power-of-two batch rows per data x fsdp shard that fits (0: none).

    python benchmarks/memory_plan.py                    # seq 4096, 1 row per batch shard
    python benchmarks/memory_plan.py --seq 8192 --batch 2 --remat full
    python benchmarks/memory_plan.py --hw 'tpu_v5p*' --remat all   # every policy
    python benchmarks/memory_plan.py --check            # the plan vs compiled steps (CPU)

``--check`` compiles the real SFT train step at small shapes on 8 host CPU devices and
compares its ``memory_analysis()`` with the plan: the arguments (the state) must match
to the byte, the scratch must lie within jalign.memory_plan.TEMP_RATIO of the planned
temporaries. Results: docs/memory_plan.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HW_DIR = ROOT / "configs" / "hw"


def _table(args) -> int:
    from jalign import memory_plan as mp
    from jalign.models.config import REMAT_POLICIES

    policies = REMAT_POLICIES if args.remat == "all" else [args.remat]
    cols = ("hw", "model", "mesh d/f/t", "chip", "remat", "attn", "params", "opt", "grads",
            "copies", "acts", "layer bwd", "logits", "total", "HBM", "fits", "max b")
    rows = []
    for path in sorted(HW_DIR.glob(f"{args.hw}.gin")):
        mesh_config, hw = mp.read_hw(path)
        if mesh_config.num_devices is None:
            continue  # cpu.gin: any device count, no chip to plan for
        platform, chip, hbm = mp.chip(path.stem)
        n = mesh_config.num_devices
        shape = "/".join(map(str, mesh_config.shape(n)))
        for model_name, model in mp.MODELS.items():
            for policy in policies:
                config = mp.with_execution(model, hw)
                if policy is not None:
                    config = config.replace(remat_policy=policy)
                kw = dict(platform=platform, chunk_tokens=args.chunk, logits=args.logits)
                p = mp.plan(config, mesh_config, n, batch=args.batch, seq_len=args.seq, **kw)
                best = mp.max_batch(config, mesh_config, n, seq_len=args.seq,
                                    hbm_bytes=int(hbm * mp.GiB), **kw)
                gib = [f"{x / mp.GiB:.1f}" for x in (p.params, p.opt_state, p.grads, p.copies,
                                                     p.activations, p.recompute, p.logits,
                                                     p.total)]
                fits = "yes" if p.total <= 0.9 * hbm * mp.GiB else (
                    "tight" if p.total <= hbm * mp.GiB else "no")
                rows.append((path.stem, model_name, shape, f"{n}x {chip}", config.remat_policy,
                             mp.resolve_attention(config, platform), *gib, f"{hbm:.0f}", fits,
                             str(best)))
    if not rows:
        print(f"no configs/hw/{args.hw}.gin states MeshConfig.num_devices", file=sys.stderr)
        return 2
    print(f"seq {args.seq}, {args.batch} row(s) per data x fsdp shard, logits {args.logits} "
          f"(chunk {args.chunk} tokens), AdamW, GiB per device")
    _print_table(cols, rows)
    return 0


def _print_table(cols, rows) -> None:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |")


def _check() -> int:
    from jalign import memory_plan as mp

    rows = mp.check()
    mb = lambda x: f"{x / 1e6:.2f}"  # noqa: E731
    print(f"compiled SFT step on 8 CPU devices vs plan, per device (temporaries in MB); "
          f"compiled / planned temporaries must lie in {mp.TEMP_RATIO}")
    _print_table(("case", "state plan (bytes)", "state compiled (bytes)", "temp plan",
                  "temp compiled", "ratio", "ok"),
                 [(r["name"], str(r["planned_state"]), str(r["compiled_state"]),
                   mb(r["planned_temp"]), mb(r["compiled_temp"]), f"{r['ratio']:.2f}",
                   "ok" if r["ok"] else "NO") for r in rows])
    planned, compiled = mp.activation_check(rows)
    print(f"activations (fsdp8 none - fsdp8 full): planned {mb(planned)} MB, compiled "
          f"{mb(compiled)} MB, ratio {compiled / planned:.2f}")
    return 0 if all(r["ok"] for r in rows) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=4096, help="tokens per row")
    ap.add_argument("--batch", type=int, default=1, help="rows per data x fsdp shard")
    ap.add_argument("--remat", default=None,
                    help="override every config's remat_policy (a policy name, or 'all')")
    ap.add_argument("--logits", choices=["chunked", "full"], default="chunked")
    ap.add_argument("--chunk", type=int, default=2048, help="the loss's chunk_tokens")
    ap.add_argument("--hw", default="*", help="configs/hw file stems to plan (a glob)")
    ap.add_argument("--check", action="store_true", help="plan vs compiled steps on CPU")
    args = ap.parse_args()
    if args.check:
        # 8 host devices; XLA reads the flag once, when jax is first imported.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_force_host_platform_device_count=8").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        return _check()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # planning needs no accelerator
    return _table(args)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
