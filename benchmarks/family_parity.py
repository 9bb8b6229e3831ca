"""Logit parity per model family: jalign's logits vs transformers' on the tests' tiny
unit-scale configs (tests/hf_models.py), scanned, unrolled and sharded over 8 host devices,
as max |difference| against the float32 bound the tests assert (tests/numerics.py). Prints
a table; needs the test extra (torch). Run from the repository root:

    .venv/bin/python benchmarks/family_parity.py
"""
import os
import sys
import tempfile
from pathlib import Path

# 8 host devices for the sharded rows: set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.*

import numpy as np  # noqa: E402
from jalign.convert.hf import load_hf  # noqa: E402
from jalign.models.build import forward  # noqa: E402
from jalign.sharding import MeshConfig, make_mesh  # noqa: E402
from tests.hf_models import hf_logits, save_hf_model  # noqa: E402
from tests.numerics import f32_tolerance, llama_logits_bound  # noqa: E402

FAMILIES = ["llama3_2", "qwen2", "qwen3", "mistral"]  # tests/hf_models.CONFIGS
LENGTH = 40  # Mistral's window there is 8


def main() -> None:
    print("| family | layers | mesh | max abs logit | max abs diff | float32 bound | diff / bound |")
    print("|---|---|---|---:|---:|---:|---:|")
    for fam in FAMILIES:
        d = Path(tempfile.mkdtemp()) / "hf"
        hf = save_hf_model(fam, d)
        ids = np.random.default_rng(0).integers(3, hf.config.vocab_size, (4, LENGTH)).astype(np.int32)
        ref = hf_logits(hf, ids)
        for scan, mesh_shape in [(True, None), (False, None), (True, (2, 2, 2))]:
            mesh = make_mesh(MeshConfig(*mesh_shape)) if mesh_shape else None
            _, m = load_hf(d, mesh=mesh, scan_layers=scan)
            out = np.asarray(forward(m, ids, mesh=mesh), np.float64)
            tol = f32_tolerance(**llama_logits_bound(m, LENGTH))
            diff = np.abs(out - ref).max()
            print(f"| {fam} | {'scan' if scan else 'unrolled'} | {mesh_shape or 'one device'} | "
                  f"{np.abs(ref).max():.2f} | {diff:.2e} | {tol:.2e} | {diff / tol:.3f} |", flush=True)


if __name__ == "__main__":
    main()
