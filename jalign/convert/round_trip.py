"""The bundled default job until training lands: a conversion round trip that checks itself.

Creates a small random Llama, exports it as a Hugging Face checkpoint, imports that into a
jalign (Orbax) checkpoint, exports it again, and verifies that every tensor survived bit
for bit and the logits agree. When torch is installed, transformers also loads the export
and its logits are compared with jalign's.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jalign import checkpoint
from jalign.convert import hf
from jalign.convert.safetensors_io import SafetensorsCheckpoint
from jalign.models.build import create_model
from jalign.models.config import preset


def _tensors(directory: Path) -> dict[str, np.ndarray]:
    ckpt = SafetensorsCheckpoint(directory)
    return {name: ckpt.read(name) for name in ckpt.tensors}


def run_round_trip(out: Path) -> int:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    config = preset("small", rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 128})
    steps = []

    def step(name, fn):
        t0 = time.time()
        result = fn()
        steps.append((name, time.time() - t0))
        print(f"  {name:<34} {steps[-1][1]:6.2f}s", flush=True)
        return result

    print(f"jalign demo: conversion round trip of a {config.num_params() / 1e6:.1f}M-parameter "
          f"Llama ({config.num_layers} layers, GQA {config.num_heads}:{config.num_kv_heads}, "
          f"llama3 rope) in {out}")
    model = step("create random model", lambda: create_model(config, seed=0))
    step("export to HF (source)", lambda: hf.save_hf(config, model, out / "hf_source",
                                                     max_shard_bytes=2 * 2**20))
    cfg1, m1 = step("import HF -> jalign model", lambda: hf.load_hf(out / "hf_source"))
    step("save jalign (Orbax) checkpoint", lambda: checkpoint.save_model(out / "jalign", cfg1, m1))
    cfg2, m2 = step("restore jalign checkpoint", lambda: checkpoint.load_model(out / "jalign"))
    step("export jalign -> HF", lambda: hf.save_hf(cfg2, m2, out / "hf_export",
                                                   max_shard_bytes=2 * 2**20))

    src, dst = _tensors(out / "hf_source"), _tensors(out / "hf_export")
    mismatched = sorted(k for k in src if k not in dst or not np.array_equal(src[k], dst[k]))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 200)))
    ref = np.asarray(model(ids))
    dlogit = float(np.abs(np.asarray(m2(ids)) - ref).max())
    print(f"tensors: {len(src)} exported, {len(src) - len(mismatched)} bit-identical after the "
          f"round trip; max |dlogit| jalign before/after = {dlogit:.2e}")
    ok = not mismatched and set(src) == set(dst) and dlogit == 0.0
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("(torch not installed: skipping the transformers logit check; "
              "the test suite runs it)")
    else:
        hf_model = AutoModelForCausalLM.from_pretrained(out / "hf_export").eval()
        with torch.no_grad():
            hf_logits = hf_model(torch.as_tensor(np.array(ids))).logits.numpy()
        d_hf = float(np.abs(hf_logits - ref).max())
        print(f"transformers reloads the export: max |dlogit| vs jalign = {d_hf:.2e}")
        ok = ok and d_hf <= 1e-4
    print("round trip OK" if ok else f"round trip FAILED (mismatched: {mismatched[:5]})")
    return 0 if ok else 1
