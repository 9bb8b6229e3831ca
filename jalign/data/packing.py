"""Fixed-shape rows from variable-length examples: padding, packing, pairs, prompts.

Row layout shared by every SFT/IFT batch (all int32, [rows, length]):
  input_ids    tokens (pad_id where empty)
  loss_mask    1 where the token is a training *target* (predicted from the token before)
  segment_ids  1, 2, ... per packed example, 0 on padding
  positions    restart at 0 for every example
The first token of every segment has loss_mask 0, so a target is never predicted across a
segment boundary.
"""

from __future__ import annotations

import numpy as np

SFT_FIELDS = ("input_ids", "loss_mask", "segment_ids", "positions")


def pad_example(example: dict, length: int, pad_id: int) -> dict:
    ids, mask = example["input_ids"], example["loss_mask"]
    n = len(ids)
    if n > length:
        raise ValueError(f"example of {n} tokens exceeds row length {length}")
    out = {"input_ids": np.full(length, pad_id, np.int32), "loss_mask": np.zeros(length, np.int32),
           "segment_ids": np.zeros(length, np.int32), "positions": np.zeros(length, np.int32)}
    out["input_ids"][:n] = ids
    out["loss_mask"][:n] = mask
    out["segment_ids"][:n] = 1
    out["positions"][:n] = np.arange(n)
    return out


def from_grain_packed(row: dict, pad_id: int) -> dict:
    """Rename grain's packed features to the shared row layout."""
    seg = row["input_ids_segment_ids"].astype(np.int32)
    ids = np.where(seg > 0, row["input_ids"], pad_id).astype(np.int32)
    return {"input_ids": ids, "loss_mask": (row["loss_mask"] * (seg > 0)).astype(np.int32),
            "segment_ids": seg, "positions": row["input_ids_positions"].astype(np.int32)}


def unpack_row(row: dict) -> list[dict]:
    """The examples of one packed row, in order (inverse of packing; used by tests/tools)."""
    out = []
    seg = np.asarray(row["segment_ids"])
    for s in [s for s in dict.fromkeys(seg.tolist()) if s > 0]:
        idx = np.flatnonzero(seg == s)
        out.append({"input_ids": np.asarray(row["input_ids"])[idx],
                    "loss_mask": np.asarray(row["loss_mask"])[idx],
                    "positions": np.asarray(row["positions"])[idx]})
    return out


def pad_pair(example: dict, length: int, pad_id: int) -> dict:
    """A preference pair as two right-padded rows sharing the prompt tokens.

    Loss masks cover each response (targets only; the first ``{side}_context`` tokens of a
    response are prompt tokens that only one side has, not targets); segment ids mark real
    tokens. Per-pair scalars attached before batching (``ref_*``: precomputed reference
    log-probs) travel with the pair.
    """
    prompt = example["prompt_ids"]
    out = {k: np.float32(v) for k, v in example.items() if k.startswith("ref_")}
    for side in ("chosen", "rejected"):
        response = example[f"{side}_ids"]
        context = int(example.get(f"{side}_context", 0))
        mask = np.ones(len(response), np.int32)
        mask[:context] = 0
        row = pad_example({"input_ids": np.concatenate([prompt, response]),
                           "loss_mask": np.concatenate([np.zeros(len(prompt), np.int32), mask])},
                          length, pad_id)
        out.update({f"{side}_{k}": v for k, v in row.items()})
    return out


def left_pad_prompt(example: dict, length: int, pad_id: int) -> dict:
    """A prompt right-aligned in its row, so generation continues every row at one index."""
    prompt = example["prompt_ids"]
    n = len(prompt)
    if n > length:
        raise ValueError(f"prompt of {n} tokens exceeds row length {length}")
    ids = np.full(length, pad_id, np.int32)
    mask = np.zeros(length, np.int32)
    ids[length - n:] = prompt
    mask[length - n:] = 1
    return {"prompt_ids": ids, "prompt_mask": mask,
            "record_index": np.int32(example.get("record_index", -1))}
