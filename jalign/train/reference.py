"""Precomputed reference scores: one pass of the frozen reference over the dataset.

DPO needs the reference model's log-probs of every pair. Computing them once before
training and storing them with the examples means the train state holds one model, not
two (half the parameter memory for big models). The pass is cached in the run directory,
keyed by a fingerprint of the tokenized examples, so a resumed run does not redo it and
changed data never reuses stale values. The cache is a plain ``.npz`` of float arrays,
read with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jalign.data import packing
from jalign.sharding import DEFAULT_RULES, global_rows, use_mesh
from jalign.train.step import batch_sharding

CACHE_VERSION = 2  # 2: pairs encoded as one sequence, with {side}_context


def fingerprint(examples: list[dict], model_key: str = "") -> str:
    """Hash of what the scores depend on: the reference model (``model_key``: its source,
    config and the scoring algorithm) and every example's record index and token ids."""
    h = hashlib.sha256(f"v{CACHE_VERSION}|{model_key}".encode())
    for ex in examples:
        h.update(str(ex.get("record_index", -1)).encode())
        for key in sorted(k for k in ex if k.endswith(("_ids", "_context"))):
            h.update(key.encode())
            h.update(np.ascontiguousarray(ex[key], np.int32).tobytes())
    return h.hexdigest()


def _read_cache(path: Path, expected: str, n: int) -> dict | None:
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as z:
        if str(z["fingerprint"]) != expected:
            print(f"{path}: written for different data or another reference model; "
                  "recomputing", flush=True)
            return None
        values = {k: z[k] for k in z.files if k != "fingerprint"}
    if any(len(v) != n for v in values.values()):
        return None
    return values


def _write_cache(path: Path, fp: str, values: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, fingerprint=np.asarray(fp), **values)
    os.replace(tmp, path)  # a reader never sees a half-written cache


def compute_scores(model, examples: list[dict], score_fn: Callable, *, rows: int, length: int,
                   pad_id: int, mesh, rules=DEFAULT_RULES, progress: bool = False) -> dict:
    """score_fn over this process's examples, ``rows`` per process per batch; returns
    {field: float32 [len(examples)]}. Every process runs the same number of batches (the
    last ones padded with repeats, not kept), as the global jitted call requires."""
    n = len(examples)
    batches = -(-n // rows)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        batches = int(np.max(multihost_utils.process_allgather(np.asarray(batches))))
    in_sh = batch_sharding(mesh, rows * jax.process_count(), rules)
    graphdef, params = nnx.split(model)

    def score(p, batch):
        with use_mesh(mesh, rules):
            return score_fn(nnx.merge(graphdef, p), batch)

    fn = jax.jit(score, in_shardings=(None, in_sh), out_shardings=in_sh)
    out: dict[str, list] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=batches, desc="reference log-probs", unit="batch")
    for b in range(batches):
        chunk = [examples[min(i, n - 1)] for i in range(b * rows, (b + 1) * rows)]
        padded = [packing.pad_pair(ex, length, pad_id) for ex in chunk]
        local = {k: np.stack([p[k] for p in padded]) for k in padded[0]}
        batch = {k: global_rows(in_sh, v) for k, v in local.items()}
        result = fn(params, batch)
        for k, v in result.items():
            host = _local_rows(v, mesh)
            out.setdefault(k, []).append(host)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return {k: np.concatenate(v)[:n].astype(np.float32) for k, v in out.items()}


def _local_rows(x: jax.Array, mesh) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.global_array_to_host_local_array(
        x, mesh, x.sharding.spec if isinstance(x.sharding, NamedSharding) else PartitionSpec()))


def annotate(examples: list[dict], *, cache_path: Path, load_model: Callable, score_fn: Callable,
             rows: int, length: int, pad_id: int, mesh, rules=DEFAULT_RULES,
             model_key: str = "", progress: bool = False) -> dict:
    """Attach score fields to each example (from the cache, or computed and cached).
    Returns {"cached": bool, "examples": n}."""
    fp = fingerprint(examples, model_key)
    values = _read_cache(cache_path, fp, len(examples))
    cached = values is not None
    if jax.process_count() > 1:
        # The pass is a collective (global jitted calls): recompute on every process
        # unless every process holds a valid cache.
        from jax.experimental import multihost_utils
        cached = bool(np.all(multihost_utils.process_allgather(np.asarray(cached))))
    if not cached:
        values = compute_scores(load_model(), examples, score_fn, rows=rows, length=length,
                                pad_id=pad_id, mesh=mesh, rules=rules, progress=progress)
        _write_cache(cache_path, fp, values)
    for i, ex in enumerate(examples):
        for k, v in values.items():
            ex[k] = v[i]
    return {"cached": cached, "examples": len(examples)}


def annotate_splits(data, ctx, score_fn: Callable, *, role: str, key: str) -> None:
    """Annotate the train and eval examples with ``score_fn`` of role ``role``'s initial
    model (``ctx.initial``), each shard cached in the run directory
    (``reference_<split>.<shard>.npz``; a resume on another process count reads them
    back). ``key`` names what is scored (the recipe), part of the cache fingerprint."""
    processes = jax.process_count()
    model_key = repr((ctx.initial_key(role), key))
    for it, name in ((data, "train"), (ctx.eval_data, "eval")):
        if it is None:
            continue

        def score(examples, chat, shard, it=it, name=name):
            # Scored now, while only one model is in memory (not next to the state).
            info = annotate(
                examples, cache_path=ctx.run_dir / f"reference_{name}.{shard}.npz",
                load_model=lambda: ctx.initial(role), score_fn=score_fn,
                rows=it.config.batch_size // processes, length=it.config.max_length,
                pad_id=chat.pad_id, mesh=ctx.mesh, rules=ctx.rules, model_key=model_key,
                progress=ctx.progress)
            ctx.log(f"reference log-probs for {info['examples']} {name} pairs of shard "
                    f"{shard} {'read from cache' if info['cached'] else 'computed'}")
        it.annotate(score)
