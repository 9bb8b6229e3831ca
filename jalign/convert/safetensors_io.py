"""Reading and writing (sharded) safetensors checkpoints without torch and without pickle.

The reader looks at every file's header first so that a checkpoint can be validated
(names, shapes, duplicates) before a single tensor is read, then hands out tensors one at
a time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jalign.atomic_dir import atomic_directory  # noqa: F401 (exports' writers import it here)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the offending item."""


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str
    shape: tuple[int, ...]


# Bytes per element of each safetensors dtype.
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _read_header(path: Path) -> dict:
    """The header of a safetensors file, checked against the file's size: a truncated or
    damaged file is named here, before any tensor is read."""
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        size_bytes = f.read(8)
        if len(size_bytes) != 8:
            raise ConversionError(f"{path}: not a safetensors file (too short)")
        n = int.from_bytes(size_bytes, "little")
        if n > 100_000_000 or 8 + n > file_size:
            raise ConversionError(f"{path}: not a safetensors file or truncated (header of {n} "
                                  f"bytes in a file of {file_size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_size = file_size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            shape, dtype = info["shape"], info["dtype"]
            count = int(np.prod(shape, dtype=np.int64))
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{path}: corrupt safetensors header entry for tensor "
                                  f"{key!r}") from None
        if dtype not in _ITEMSIZE:
            raise ConversionError(f"{path}: tensor {key!r} has dtype {dtype!r}, which jalign "
                                  f"does not read (known: {sorted(_ITEMSIZE)})")
        need = count * _ITEMSIZE[dtype]
        if end - begin != need or begin < 0:
            raise ConversionError(f"{path}: corrupt safetensors header: tensor {key!r} "
                                  f"({info['dtype']} {info['shape']}) spans {end - begin} "
                                  f"bytes, needs {need}")
        if end > data_size:
            raise ConversionError(f"{path}: truncated: tensor {key!r} ends at byte {end} of "
                                  f"the data section, which has only {data_size} bytes "
                                  f"(file of {file_size} bytes)")
    return header


def refuse_pickle_only(directory: Path) -> None:
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    raise ConversionError(
        f"{directory}: no *.safetensors weights found"
        + (f"; only pickle-based files {pickled}. jalign never unpickles weights (loading a "
           "pickle can run arbitrary code). Convert them to safetensors first in a trusted "
           "environment, e.g. transformers' save_pretrained(..., safe_serialization=True)"
           if pickled else ""))


class SafetensorsCheckpoint:
    """All tensors of a checkpoint directory, indexed by name from the file headers.

    ``read`` refuses a floating-point tensor holding NaN or Inf (damaged weights would
    train or serve garbage) unless ``allow_nonfinite``."""

    def __init__(self, directory: str | os.PathLike, *, allow_nonfinite: bool = False):
        self.directory = Path(directory)
        self.allow_nonfinite = allow_nonfinite
        index_path = self.directory / INDEX_NAME
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (KeyError, json.JSONDecodeError) as e:
                raise ConversionError(f"{index_path}: unreadable index ({e!r})") from None
            files = sorted(set(weight_map.values()))
        else:
            weight_map = None
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            refuse_pickle_only(self.directory)
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            path = self.directory / name
            if not path.exists():
                raise ConversionError(f"{INDEX_NAME} lists shard {name!r}, which does not exist")
            for key, info in _read_header(path).items():
                if key == "__metadata__":
                    continue
                if key in self.tensors:
                    raise ConversionError(f"duplicated tensor {key!r}: in both "
                                          f"{self.tensors[key].file} and {name}")
                self.tensors[key] = TensorInfo(name, info["dtype"], tuple(info["shape"]))
        if weight_map is not None:
            for key, name in sorted(weight_map.items()):
                if key not in self.tensors:
                    raise ConversionError(f"{INDEX_NAME} maps tensor {key!r} to {name}, "
                                          "but no shard contains it")
                if self.tensors[key].file != name:
                    raise ConversionError(f"{INDEX_NAME} maps tensor {key!r} to {name}, but it "
                                          f"is stored in {self.tensors[key].file}")
        self._open: dict[str, object] = {}

    def read(self, key: str) -> np.ndarray:
        info = self.tensors[key]
        path = self.directory / info.file
        try:
            handle = self._open.get(info.file)
            if handle is None:
                handle = safe_open(str(path), framework="numpy")
                self._open[info.file] = handle
            array = handle.get_tensor(key)
        except Exception as e:  # safetensors raises its own SafetensorError
            raise ConversionError(f"{path}: cannot read tensor {key!r} "
                                  f"({type(e).__name__}: {e})") from None
        if not self.allow_nonfinite and info.dtype.startswith(("F", "BF")):
            finite = np.isfinite(array.astype(np.float32, copy=False))
            if not finite.all():
                bad = int(finite.size - finite.sum())
                raise ConversionError(
                    f"{path}: tensor {key!r} holds {bad} non-finite value(s) (NaN/Inf) of "
                    f"{finite.size}: damaged weights; pass allow_nonfinite=True "
                    "(CLI: --allow-nonfinite) to import them anyway")
        return array

    def close(self) -> None:
        self._open.clear()


def write_sharded(tensors_in_order, directory: Path, max_shard_bytes: int) -> list[str]:
    """Write tensors as safetensors shards (+ index when more than one).

    ``tensors_in_order`` is a list of (name, shape, dtype, produce) where ``produce()``
    returns the numpy array; arrays are produced one shard at a time, so host memory holds
    at most one shard.
    """
    shards: list[list] = [[]]
    size = 0
    for item in tensors_in_order:
        nbytes = int(np.prod(item[1])) * np.dtype(item[2]).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    n = len(shards)
    names = [SINGLE_NAME] if n == 1 else [
        f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, total = {}, 0
    for file_name, shard in zip(names, shards):
        arrays = {}
        for name, shape, dtype, produce in shard:
            arr = np.ascontiguousarray(produce())
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise AssertionError(f"export of {name}: got {arr.shape} {arr.dtype}, "
                                     f"planned {tuple(shape)} {np.dtype(dtype)}")
            arrays[name] = arr
            weight_map[name] = file_name
            total += arr.nbytes
        save_file(arrays, str(directory / file_name), metadata={"format": "pt"})
        del arrays
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


