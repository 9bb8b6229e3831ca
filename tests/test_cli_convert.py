"""`jalign convert` round trips through the real command line."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from jalign.cli import main
from jalign.convert.safetensors_io import SafetensorsCheckpoint
from tests.cli import env
from tests.hf_models import save_hf_model


def _tensors(path):
    ckpt = SafetensorsCheckpoint(path)
    return {k: ckpt.read(k) for k in ckpt.tensors}


def _jalign(*args):
    return subprocess.run([sys.executable, "-m", "jalign.cli", *map(str, args)],
                          capture_output=True, text=True, env=env(), timeout=300)


@pytest.mark.parametrize("name,dtype", [("llama3_1", None), ("llama3_2", torch.bfloat16)])
def test_cli_round_trip_is_bit_identical(tmp_path, name, dtype):
    save_hf_model(name, tmp_path / "hf", dtype=dtype)
    r = _jalign("convert", "hf-to-jalign", tmp_path / "hf", tmp_path / "jalign")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "jalign" / "0").is_dir()  # an Orbax step directory
    r = _jalign("convert", "jalign-to-hf", tmp_path / "jalign", tmp_path / "out",
                "--max-shard-size", "40KB")
    assert r.returncode == 0, r.stderr
    src, out = _tensors(tmp_path / "hf"), _tensors(tmp_path / "out")
    assert set(src) == set(out)
    for k in src:  # exact by construction: a format round trip of the same bytes
        assert src[k].dtype == out[k].dtype, k
        assert np.array_equal(src[k].view(np.uint8), out[k].view(np.uint8)), k
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 1


def test_cli_reports_bad_input_and_refuses_overwrite(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["convert", "hf-to-jalign", str(tmp_path / "empty"), str(tmp_path / "x")]) == 2
    assert "no *.safetensors weights found" in capsys.readouterr().err
    assert main(["convert", "jalign-to-hf", str(tmp_path / "nothing"), str(tmp_path / "y")]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err

    save_hf_model("llama2", tmp_path / "hf")
    assert main(["convert", "hf-to-jalign", str(tmp_path / "hf"), str(tmp_path / "j")]) == 0
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("user data")
    assert main(["convert", "jalign-to-hf", str(tmp_path / "j"), str(tmp_path / "taken")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "user data"
