"""Damaged Hugging Face weights are refused by name: a truncated file before any tensor
is read, a tensor holding NaN/Inf unless the user asks for it."""

import numpy as np
from safetensors.numpy import load_file, save_file

from jalign.cli import main
from tests.cli import assert_clean_error, run_jalign
from tests.hf_models import save_hf_model


def _model(tmp_path):
    save_hf_model("llama3_2", tmp_path / "hf")
    return tmp_path / "hf", tmp_path / "hf" / "model.safetensors"


def test_truncated_file_is_one_line_error_naming_it(tmp_path):
    src, weights = _model(tmp_path)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])  # a download cut short
    r = run_jalign("convert", "hf-to-jalign", src, tmp_path / "out")
    assert_clean_error(r, "model.safetensors", "truncated")
    assert not (tmp_path / "out").exists()


def test_nonfinite_weights_are_refused_unless_allowed(tmp_path, capsys):
    src, weights = _model(tmp_path)
    tensors = load_file(weights)
    name = "model.layers.1.mlp.down_proj.weight"
    bad = tensors[name].copy()
    bad[3, 5], bad[0, 0] = np.nan, np.inf
    tensors[name] = bad
    save_file(tensors, weights, metadata={"format": "pt"})
    r = run_jalign("convert", "hf-to-jalign", src, tmp_path / "out")
    assert_clean_error(r, "model.safetensors", name, "2 non-finite", "--allow-nonfinite")
    assert not (tmp_path / "out").exists()
    # Asked for explicitly, the same file imports (in-process: the same CLI code path).
    assert main(["convert", "hf-to-jalign", str(src), str(tmp_path / "out2"),
                 "--allow-nonfinite"]) == 0
