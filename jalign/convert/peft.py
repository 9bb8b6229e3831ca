"""Export a LoRA run's adapters as a PEFT adapter directory.

``adapter_config.json`` (``peft_type`` LORA, ``task_type`` CAUSAL_LM or SEQ_CLS, ``r``,
``lora_alpha``, ``target_modules``, ``layers_to_transform``, ``base_model_name_or_path``)
and ``adapter_model.safetensors`` with, per adapted layer ``i`` and module,
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` [r, in] and
``...lora_B.weight`` [out, r] (a reward model also carries its trained score head,
``base_model.model.score.weight`` [1, hidden], listed in ``modules_to_save``).
``peft.PeftModel.from_pretrained(hf_base, DIR)`` then computes what jalign computed:
transformers' weights are [out, in] and jalign's [in, *out], and jalign's flattened
head dims are transformers' order, so each A and B is a reshape and a transpose.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import save_file

from jalign.convert.safetensors_io import atomic_directory
from jalign.models.build import params_of
from jalign.models.heads import LM, SCALAR, head_of


def hf_modules(config) -> dict[str, str]:
    """jalign weight -> the transformers module it lives in (under ``model.layers.{i}.``),
    read from the HF converter's tensor map (one table of HF names, not two)."""
    from jalign.models.families import family_of
    out = {}
    for m in family_of(config).tensor_maps(config):
        name = m.jalign_path[-1]
        if m.stacked and m.hf_name.endswith(".weight") and len(m.jalign_path) == 2:
            out[name] = m.hf_name.split("layers.{i}.", 1)[1][:-len(".weight")]
    return out

TASK_TYPES = {LM: "CAUSAL_LM", SCALAR: "SEQ_CLS"}
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


def adapter_tensors(model) -> dict[str, np.ndarray]:
    """PEFT's tensors (float32) of an adapted causal LM or scalar-head model."""
    from jalign.convert.hf import _to_host
    head = head_of(model)
    lora = model.config.lora
    params = params_of(model)
    layers = params["layers"] if head == LM else params["backbone"]["layers"]
    chosen = range(model.config.num_layers) if lora.layers is None else lora.layers
    modules = hf_modules(model.config)
    out = {}
    for w in lora.weights():
        a = _to_host(layers[w + "_lora_a"]).astype(np.float32)
        b = _to_host(layers[w + "_lora_b"]).astype(np.float32)
        n, r = a.shape[0], lora.rank
        a2, b2 = a.reshape(n, -1, r), b.reshape(n, r, -1)
        for i in chosen:
            prefix = f"base_model.model.model.layers.{i}.{modules[w]}"
            out[prefix + ".lora_A.weight"] = np.ascontiguousarray(a2[i].T)  # [r, in]
            out[prefix + ".lora_B.weight"] = np.ascontiguousarray(b2[i].T)  # [out, r]
    if head == SCALAR:
        out["base_model.model.score.weight"] = _to_host(params["score"]).astype(
            np.float32).reshape(1, -1)
    return out


def adapter_config(model, base_name: str) -> dict:
    head = head_of(model)
    lora = model.config.lora
    return {
        "peft_type": "LORA", "task_type": TASK_TYPES[head], "r": lora.rank,
        "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "target_modules": sorted(hf_modules(model.config)[w].split(".")[1]
                                 for w in lora.weights()),
        "layers_to_transform": None if lora.layers is None else sorted(lora.layers),
        "base_model_name_or_path": base_name, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
        "use_dora": False, "modules_to_save": ["score"] if head == SCALAR else None,
        "rank_pattern": {}, "alpha_pattern": {},
    }


def save_peft(model, path, *, base_name: str, overwrite: bool = False,
              tokenizer=None) -> Path:
    """Write ``model``'s adapters (a causal LM or scalar head carrying ``config.lora``) as
    a PEFT LoRA directory (with ``tokenizer``'s files, as PEFT adapters are shared);
    written beside ``path`` and moved into place at the end."""
    lora = model.config.lora
    if lora is None or not lora.enabled:
        raise ValueError("the model has no LoRA adapters to export (LoraConfig.rank=0); "
                         "export it with jalign-to-hf instead")
    out = Path(path)
    if out.exists() and any(out.iterdir()) and not overwrite:  # before any work is done
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    tensors = adapter_tensors(model)  # every process joins the gathers; process 0 writes
    if jax.process_index() != 0:
        return out
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(
            json.dumps(adapter_config(model, base_name), indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            from jalign.data.tokenizer_files import write_tokenizer
            write_tokenizer(tokenizer, tmp)
    return out


def base_source(directory, step, role: str):
    """The model source a run's role was started from (its LoRA base): what PEFT's
    ``base_model_name_or_path`` names."""
    from jalign.checkpoint import read_roles
    from jalign.sources import ModelSource
    stored = read_roles(directory, step)
    roles = {r.name: r for r in stored.roles}
    while roles[role].like is not None and not stored.records[role].get("source"):
        role = roles[role].like
    return ModelSource.parse(stored.records[role]["source"], what=f"role {role!r} source")
