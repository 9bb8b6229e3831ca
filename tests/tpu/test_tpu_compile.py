"""jalign's programs compiled for real TPU slices without a TPU: ``pytest -m tpu_compile``
with the tpu extra installed (``pip install -e '.[test,tpu]'``; libtpu compiles for a
deviceless topology). Not in the default suite: it needs libtpu (~0.7 GB) and minutes.

Without libtpu every test here fails with one line naming the extra, never skips.
"""

from pathlib import Path

import pytest

from jalign.chips import GiB
from jalign.experiment import load_experiment
from jalign.plan import TPU_EXTRA, compile_step, open_plan, peak_bytes, target_of, tpu_topology

pytestmark = pytest.mark.tpu_compile
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def libtpu():
    why = None
    try:
        tpu_topology("v5e:2x2")
    except Exception as e:  # outside the handler below: one line, no chained traceback
        why = type(e).__name__
    if why:
        pytest.fail(f"libtpu is not usable ({why}): {TPU_EXTRA}", pytrace=False)


def plan(configs, bindings):
    exp = load_experiment([str(ROOT / c) for c in configs], bindings)
    planned = open_plan(exp, target_of(exp.configs.mesh))
    return planned, compile_step(planned)


def test_a_tiny_step_compiles_for_a_4_chip_slice():
    planned, program = plan(["tests/train/tiny_sft.gin"], [
        "MeshConfig.topology = 'v5e:2x2'", "MeshConfig.num_devices = 4", "MeshConfig.fsdp = 4",
        "DataConfig.batch_size = 4", "LlamaConfig.scan_layers = True"])
    assert planned.target.devices[0].platform == "tpu" and planned.mesh.devices.size == 4
    assert program.refused is None and peak_bytes(program.memory) < 16 * GiB
    assert program.collectives, "an FSDP step on 4 chips moves weights and gradients"


# Every TPU hardware config holds Llama 3.1 8B for SFT and DPO at 4096 tokens, one row
# (one pair) per chip, with the remat and attention the file states.
HW = sorted(p.stem for p in (ROOT / "configs" / "hw").glob("tpu_*.gin"))
ALGOS = {"sft": [], "dpo": ["DataConfig.max_prompt_length = 2048"]}


@pytest.mark.parametrize("algo", sorted(ALGOS))
@pytest.mark.parametrize("hw", HW)
def test_every_tpu_hw_config_holds_8b_at_4096(hw, algo):
    from jalign.sharding import MeshConfig  # noqa: F401 (gin registers it)
    chips = int(next(line.split("=")[1] for line in (ROOT / f"configs/hw/{hw}.gin").read_text()
                     .splitlines() if line.startswith("MeshConfig.num_devices")))
    planned, program = plan(["configs/model/llama3_1_8b.gin", f"configs/algo/{algo}.gin",
                             f"configs/hw/{hw}.gin"],
                            ["DataConfig.max_length = 4096", f"DataConfig.batch_size = {chips}",
                             *ALGOS[algo]])
    assert program.refused is None, program.refused
    assert peak_bytes(program.memory) <= planned.target.chip.hbm_bytes


def test_8b_grpo_on_v5e_16_compiles_its_sampler_and_scoring_pass():
    """A rollout recipe's plan compiles the run's sampler (prefill and token loop) and
    scoring pass besides the train step; with a KL term and two epochs the scoring pass
    runs the policy and the reference. All fit a v5e chip at 2048 + 256 tokens."""
    from jalign.plan import compile_all
    exp = load_experiment([str(ROOT / c) for c in ("configs/model/llama3_1_8b.gin",
                                                   "configs/algo/grpo.gin",
                                                   "configs/hw/tpu_v5e_16.gin")],
                          ["DataConfig.max_length = 4096", "DataConfig.max_prompt_length = 2048",
                           "DataConfig.batch_size = 16", "GRPOConfig.beta = 0.04",
                           "GRPOConfig.epochs = 2"])
    planned = open_plan(exp, target_of(exp.configs.mesh))
    programs = compile_all(planned)
    assert list(programs) == ["train step", "sampler", "scoring pass"]
    for name, program in programs.items():
        assert program.refused is None, (name, program.refused)
        assert peak_bytes(program.memory) <= planned.target.chip.hbm_bytes, name
    # the scoring pass holds the policy's and the reference's fp32 weights, 1/16 each
    weights = 2 * 4 * planned.models.configs["policy"].num_params() / 16
    assert programs["scoring pass"].memory["argument_size_in_bytes"] >= 0.99 * weights
    assert programs["sampler"].units == 256
