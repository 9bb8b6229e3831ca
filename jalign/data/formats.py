"""Reading records and normalising real dataset formats to jalign's internal shapes.

Internal shapes (plain dicts, so they serialise and print):
  conversation  {"messages": [{"role", "content"}, ...]}             (SFT, IFT)
  preference    {"prompt": [msgs ending with user], "chosen": [assistant msgs],
                 "rejected": [assistant msgs]}                       (RM, DPO)
  prompt        {"prompt": [msgs ending with user], "meta": {...}}   (PPO rollouts)

Every adapter raises ``BadRecord`` naming what is wrong; the caller adds the record index
and decides (by ``on_bad_record``) whether to stop or drop and count it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from jalign.errors import first_line

ROLES = ("system", "user", "assistant")


class BadRecord(ValueError):
    """A record that cannot be used; the message says why."""


class DataError(ValueError):
    """A data problem that stops the pipeline; the message names the record and the cause."""


# ---------------------------------------------------------------------------- reading

class FieldError(DataError):
    """A DataConfig field that cannot be honoured; the caller adds the binding's scope
    (``DataConfig`` or ``eval/DataConfig``) to make it a one-line config error."""

    def __init__(self, field: str, value, message: str):
        self.field, self.value, self.message = field, value, message
        super().__init__(f"{field}={value!r}: {message}")


def read_records(path: str, *, split: str = "train") -> Iterable[Mapping[str, Any]]:
    """Records from a local .json/.jsonl/.parquet file, a ``save_to_disk`` directory, or a
    hub dataset name (needs network). JSON is parsed here, one record at a time, so that
    records of mixed shape (a string in one, a list in the next) are fine; a .jsonl line
    that is not JSON (or not UTF-8) is kept aside by number (``Records.bad``) for the
    tokenizer to refuse or count. A source with splits (a JSON object of them, a
    DatasetDict, a hub dataset) gives ``split``, and a split it does not have is a
    FieldError; a single file without splits (.jsonl, .parquet, a JSON list) is one split,
    read whole whatever ``split`` names: a held-out file given as the eval data is the
    eval data (a run refuses its training file as its eval data: ``is_unsplit_file``)."""
    p = Path(path)
    if p.is_file():
        if p.suffix == ".json":
            try:
                data = json.loads(p.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{e.lineno}: invalid JSON ({e.msg})") from None
            except UnicodeDecodeError as e:
                raise DataError(f"{p}: not UTF-8 (byte 0x{e.object[e.start]:02x} at offset "
                                f"{e.start})") from None
            if isinstance(data, dict):  # {"data": [...]} or {split: [...]}
                if split in data:
                    data = data[split]
                elif "data" in data:
                    data = data["data"]
                else:
                    raise FieldError("split", split, f"{p} has no such key; it has "
                                     f"{sorted(data)}")
            if not isinstance(data, list):
                raise DataError(f"{p}: expected a JSON list of records")
            return data
        if p.suffix not in (".jsonl", ".parquet"):
            raise DataError(f"{p}: unsupported file type {p.suffix!r} (.json, .jsonl, .parquet)")
        if p.suffix == ".jsonl":
            return _read_jsonl(p)
        import datasets
        return datasets.load_dataset("parquet", data_files=str(p), split="train")
    if p.is_dir():
        import datasets
        try:
            ds = datasets.load_from_disk(str(p))
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"{p}: not a datasets save_to_disk directory ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise FieldError("split", split, f"{p} has splits {sorted(ds)}")
            ds = ds[split]
        return ds  # a Dataset: one split, as a single file
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) and p.suffix not in (".json", ".jsonl",
                                                                             ".parquet"):
        return _read_hub(str(path), split)
    raise FieldError("path", str(path), "no such file or directory, and not a hub dataset "
                     "name (owner/name)")


def is_unsplit_file(path: str) -> bool:
    """A local file or saved Dataset that is one split (.jsonl, .parquet, a JSON list, a
    save_to_disk Dataset): as eval data next to the same path as training data, it would
    measure the training records."""
    p = Path(path)
    if p.is_dir():
        return (p / "dataset_info.json").is_file()  # a DatasetDict keeps dataset_dict.json
    if not p.is_file():
        return False
    if p.suffix in (".jsonl", ".parquet"):
        return True
    with open(p, "rb") as f:
        return p.suffix == ".json" and f.read(4096).lstrip().startswith(b"[")


def _read_hub(name: str, split: str):
    """A hub dataset split; offline or unknown names and splits are one-line errors."""
    import datasets
    try:
        return datasets.load_dataset(name, split=split)
    except ValueError as e:  # datasets: "Unknown split ..." / "Bad split ..."
        if "split" in str(e).lower():
            raise FieldError("split", split, f"hub dataset {name}: {e}") from None
        raise DataError(f"hub dataset {name}: {e}") from None
    except (ConnectionError, OSError) as e:
        raise FieldError("path", name, f"cannot download hub dataset {name} (offline or not "
                         f"found: {type(e).__name__}: {first_line(e, 200)})") from None
    except Exception as e:  # datasets raises its own DatasetNotFoundError etc.
        if type(e).__name__ in ("DatasetNotFoundError", "DataFilesNotFoundError",
                                "HfHubHTTPError", "LocalEntryNotFoundError", "OfflineModeIsEnabled"):
            raise FieldError("path", name, f"cannot load hub dataset {name} ({type(e).__name__}: "
                             f"{first_line(e, 200)})") from None
        raise


class Records(list):
    """Records read from a file, with where each came from (``where``: ``file:line``,
    1-based) and the lines that were no record (``bad``: [(where, reason)]), which the
    tokenizer counts or refuses by ``DataConfig.on_bad_record``."""

    def __init__(self, items=(), where=(), bad=()):
        super().__init__(items)
        self.where, self.bad = list(where), list(bad)


def _read_jsonl(p: Path) -> Records:
    records, where, bad = [], [], []
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            at = f"{p}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.append((at, f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"))
                continue
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                bad.append((at, f"invalid JSON ({e.msg} at column {e.colno})"))
                continue
            where.append(at)
    return Records(records, where, bad)


# ---------------------------------------------------------------------------- checks

def _field(record: Mapping, name: str, columns: Mapping[str, str], *, optional=False):
    column = columns.get(name, name)
    if not isinstance(record, Mapping):
        raise BadRecord(f"record is a {type(record).__name__}, not an object")
    if column not in record or record[column] is None:
        if optional:
            return None
        raise BadRecord(f"missing field {column!r}")
    return record[column]


def _string(value, what: str) -> str:
    if not isinstance(value, str):
        raise BadRecord(f"{what} is a {type(value).__name__}, not a string")
    return value


def check_messages(messages, what: str = "messages", *, end_with: str | None = None) -> list[dict]:
    """Validate a chat: optional system first, then user/assistant alternating from user."""
    if not isinstance(messages, list):
        raise BadRecord(f"{what} is a {type(messages).__name__}, not a list")
    if not messages:
        raise BadRecord(f"{what} is an empty conversation")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise BadRecord(f"{what}[{i}] needs 'role' and 'content'")
        role = m["role"]
        if role not in ROLES:
            raise BadRecord(f"{what}[{i}] has unknown role {role!r}")
        out.append({"role": role, "content": _string(m["content"], f"{what}[{i}].content")})
    body = out[1:] if out[0]["role"] == "system" else out
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            k = i + (len(out) - len(body))
            raise BadRecord(f"wrong role order: {what}[{k}] is {m['role']!r}, expected "
                            f"{expected!r} (system first, then user/assistant alternating)")
    if not body:
        raise BadRecord(f"{what} has only a system message")
    if end_with and out[-1]["role"] != end_with:
        raise BadRecord(f"{what} must end with a {end_with!r} message, ends with "
                        f"{out[-1]['role']!r}")
    return out


def _as_messages(value, role: str, what: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        if not value:
            raise BadRecord(f"{what} is an empty conversation")
        for i, m in enumerate(value):
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                raise BadRecord(f"{what}[{i}] needs 'role' and 'content'")
            _string(m["content"], f"{what}[{i}].content")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise BadRecord(f"{what} is a {type(value).__name__}, not a string or message list")


# ---------------------------------------------------------------------------- adapters

def messages_adapter(record, columns) -> dict:
    return {"messages": check_messages(_field(record, "messages", columns),
                                       end_with="assistant")}


def alpaca_adapter(record, columns) -> dict:
    instruction = _string(_field(record, "instruction", columns), "instruction")
    extra = _field(record, "input", columns, optional=True)
    output = _string(_field(record, "output", columns), "output")
    user = instruction if not extra else f"{instruction}\n\n{_string(extra, 'input')}"
    if not user.strip():
        raise BadRecord("empty instruction")
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": output}]}


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _hh_turns(text: str, what: str) -> list[dict]:
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise BadRecord(f"{what} does not start with '\\n\\nHuman: '")
    roles = {"Human": "user", "Assistant": "assistant"}
    turns = [{"role": roles[parts[i]], "content": parts[i + 1]} for i in range(1, len(parts), 2)]
    if not turns:
        raise BadRecord(f"{what} has no 'Human:'/'Assistant:' turns")
    return turns


def hh_rlhf_adapter(record, columns) -> dict:
    chosen = _hh_turns(_string(_field(record, "chosen", columns), "chosen"), "chosen")
    rejected = _hh_turns(_string(_field(record, "rejected", columns), "rejected"), "rejected")
    for what, turns in (("chosen", chosen), ("rejected", rejected)):
        check_messages(turns, what, end_with="assistant")
    if chosen[:-1] != rejected[:-1]:
        raise BadRecord("chosen and rejected transcripts differ before their final "
                        "assistant response")
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


def _strip_prompt(prompt: list[dict], full: list[dict], what: str) -> list[dict]:
    """UltraFeedback stores chosen/rejected as whole conversations: drop the prompt part."""
    if full[: len(prompt)] == prompt:
        full = full[len(prompt):]
    elif full[0]["role"] != "assistant":
        raise BadRecord(f"{what} repeats a conversation that does not start with the prompt")
    if not full or any(m["role"] != "assistant" for m in full) or len(full) != 1:
        raise BadRecord(f"{what} must be one assistant response after the prompt")
    return full


def preference_adapter(record, columns) -> dict:
    prompt = check_messages(_as_messages(_field(record, "prompt", columns), "user", "prompt"),
                            "prompt", end_with="user")
    chosen = _as_messages(_field(record, "chosen", columns), "assistant", "chosen")
    rejected = _as_messages(_field(record, "rejected", columns), "assistant", "rejected")
    return {"prompt": prompt, "chosen": _strip_prompt(prompt, chosen, "chosen"),
            "rejected": _strip_prompt(prompt, rejected, "rejected")}


def prompt_adapter(record, columns) -> dict:
    prompt = check_messages(_as_messages(_field(record, "prompt", columns), "user", "prompt"),
                            "prompt", end_with="user")
    # Every other column of the record (a reward function's fields), and each mapped one
    # also under its jalign name.
    meta = {}
    if isinstance(record, Mapping):
        prompt_column = columns.get("prompt", "prompt")
        meta = {k: v for k, v in record.items() if k != prompt_column}
        meta.update({k: record[v] for k, v in columns.items() if k != "prompt" and v in record})
    return {"prompt": prompt, "meta": meta}


ADAPTERS: dict[str, tuple[str, Callable[[Mapping, Mapping], dict]]] = {
    # name -> (internal kind, adapter)
    "messages": ("conversation", messages_adapter),
    "alpaca": ("conversation", alpaca_adapter),
    "hh_rlhf": ("preference", hh_rlhf_adapter),
    "preference": ("preference", preference_adapter),
    "prompt": ("prompt", prompt_adapter),
}


def adapter(name: str):
    if name not in ADAPTERS:
        raise DataError(f"unknown data format {name!r}; one of {sorted(ADAPTERS)}")
    return ADAPTERS[name]


# Sequences per batch entry of each data kind (a preference pair is two rows).
ROWS_PER_EXAMPLE = {"conversation": 1, "preference": 2, "prompt": 1}


def rows_per_example(kind: str) -> int:
    return ROWS_PER_EXAMPLE[kind]
