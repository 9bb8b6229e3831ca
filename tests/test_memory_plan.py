"""The memory planner: its state bytes follow the sharding rules (replication included),
its hand-written models are Llama 3.1 8B / 70B, and it agrees with the compiled train
step's ``memory_analysis()`` on small shapes (8 host devices, conftest)."""

import subprocess
import sys
from pathlib import Path

import pytest

from jalign import memory_plan as mp
from jalign.models.config import preset
from jalign.sharding import MeshConfig, abstract_mesh

ROOT = Path(__file__).resolve().parents[1]
ARCH = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
        "num_kv_heads", "resolved_head_dim", "tie_word_embeddings")


@pytest.mark.parametrize("name,preset_name", [("8B", "llama3_1_8b"), ("70B", "llama3_1_70b")])
def test_models_are_llama_3_1(name, preset_name):
    ours, ref = mp.MODELS[name], preset(preset_name)
    assert [getattr(ours, a) for a in ARCH] == [getattr(ref, a) for a in ARCH]
    assert round(ours.num_params() / 1e9, 2) == {"8B": 8.03, "70B": 70.55}[name]


def test_state_bytes_by_hand_with_replicated_kv_heads():
    """Tiny model on tensor=4: 2 KV heads cannot split 4 ways, so wk / wv are whole on
    every device; everything else with a vocab / q_heads / mlp dim is split 4 ways."""
    cfg = preset("tiny")  # vocab 256, hidden 64, mlp 128, 2 layers, 4 q / 2 kv heads of 16
    v, d, f, n, nq, nkv, h = 256, 64, 128, 2, 4, 2, 16
    mesh = abstract_mesh(MeshConfig(1, 1, 4), 4)
    per_layer = (d + d * nq * h // 4 + 2 * d * nkv * h + nq * h * d // 4 + d + 3 * d * f // 4)
    elements = v * d // 4 + d * v // 4 + d + n * per_layer
    params, opt, count = mp.state_bytes(cfg, mesh)
    assert count == elements and params == 4 * elements
    # AdamW's mu and nu (float32) and step counts (Adam's, the schedule's: int32), and the
    # train state's step, skipped (int32) and rng (2 x uint32).
    assert opt == 2 * 4 * elements + 2 * 4 + 16


def test_layer_residuals_by_policy():
    cfg = mp.CHECK_MODEL  # hidden 256, mlp 512, 8 q / 4 kv heads of 32, float32
    mesh = abstract_mesh(MeshConfig(1, 8, 1), 8)
    d, f, q, kv, n, s = 256, 512, 256, 128, 8, 128
    assert mp.layer_residuals(cfg, mesh, s, "full") == 4 * d
    assert mp.layer_residuals(cfg, mesh, s, "dots_no_batch") == 4 * (d + q + 2 * kv + d + 2 * f)
    assert mp.layer_residuals(cfg, mesh, s, "dots") == 4 * (d + q + 2 * kv + q + d + 2 * f) \
        + 4 * n * s
    # cuDNN attention: no scores, and to 'dots' no attention matmuls.
    assert mp.layer_residuals(cfg, mesh, s, "dots", "cudnn") == 4 * (d + q + 2 * kv + d + 2 * f)
    # Tensor parallelism splits the heads and the mlp, not the [tokens, hidden] tensors.
    tp = abstract_mesh(MeshConfig(1, 2, 4), 8)
    assert mp.layer_residuals(cfg, tp, s, "dots_no_batch") == \
        4 * (d + q // 4 + 2 * kv // 4 + d + 2 * f // 4)


# Compiled check. Tolerances (jalign.memory_plan.TEMP_RATIO and below) and why:
# - the state (the step's arguments less the int32 batch) must equal the plan to the byte:
#   both come from the same shardings, so any difference is a counting bug;
# - compiled scratch / planned temporaries within (0.5, 1.25): the plan counts every
#   residual autodiff names and XLA fuses about a fifth of them away (measured 0.57-0.99
#   on these shapes), so it may overstate; it must never understate much, or a "fits"
#   in the table would be wrong. A plan that forgot the gradients, the logits or the
#   layer backward falls below 1/1.25 of the compiled size; one that counted the
#   activations twice rises above 2x;
# - the activations alone (the none - full difference of one shape) within the same range.
CASES = ["fsdp8 none", "fsdp8 full", "fsdp4 tp2 dots"]


@pytest.fixture(scope="module")
def checked():
    return mp.check(CASES)


@pytest.mark.parametrize("i", range(len(CASES)), ids=CASES)
def test_plan_matches_the_compiled_step(checked, i):
    row = checked[i]
    assert row["compiled_state"] == row["planned_state"], row
    lo, hi = mp.TEMP_RATIO
    assert lo <= row["ratio"] <= hi, (row["name"], row["planned_temp"], row["compiled_temp"])


def test_activation_count_matches_the_compiled_step(checked):
    planned, compiled = mp.activation_check(checked)
    lo, hi = mp.TEMP_RATIO
    assert lo <= compiled / planned <= hi, (planned, compiled)


def test_a_wrong_plan_would_fail(checked):
    """The tolerance has teeth: dropping the gradients and logits, or doubling the
    activations, takes the ratio out of range."""
    lo, hi = mp.TEMP_RATIO
    row = checked[CASES.index("fsdp4 tp2 dots")]
    p = row["plan"]
    assert row["compiled_temp"] / (p.temporaries - p.grads - p.logits - p.recompute) > hi
    assert row["compiled_temp"] / (p.temporaries + 2 * p.activations) < lo


def test_the_script_prints_a_row_per_config_and_model():
    r = subprocess.run([sys.executable, "benchmarks/memory_plan.py", "--hw", "tpu_v5p_128"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| tpu_v5p_128 ")]
    assert [row.split("|")[2].strip() for row in rows] == ["8B", "70B"], r.stdout
    assert "| yes " in rows[1]  # 70B fits v5p-128 with full remat (docs/memory_plan.md)
