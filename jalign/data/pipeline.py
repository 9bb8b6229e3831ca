"""grain pipelines: records -> tokenized examples -> shuffled, sharded, packed, batched rows.

Records are read, normalised and tokenized once, up front (with progress), for this
process's share only. That makes the statistics exact (every record is counted once, not
once per epoch) and leaves the grain part cheap, deterministic and resumable: shuffle by
seed (reshuffled each epoch), repeat, first-fit packing, batching to fixed shapes. The
iterator state is a small JSON-serialisable dict; restoring it continues exactly where
the saved iterator stopped.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from typing import Any, Iterable, Mapping, Sequence

import grain
import numpy as np
from grain.experimental import FirstFitPackIterDataset, ThreadPrefetchIterDataset

from jalign.data import formats, packing
from jalign.data.formats import BadRecord, DataError, FieldError
from jalign.errors import first_line
from jalign.data.tokenize import (TOKENIZERS, ChatTokenizer, PromptTooLong, TokenizeConfig,
                                  load_tokenizer)

STATE_VERSION = 1  # one shard's iterator state
SHARDED_STATE_VERSION = 2  # {"shards": S, "positions": {shard: one shard's state}}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where records come from and how they become batches.

    path: a .json/.jsonl/.parquet file, a ``save_to_disk`` directory, a hub dataset name,
    or ``bundled:TASK`` for the synthetic tasks shipped with jalign. format: an adapter
    name (``messages``, ``alpaca``, ``hh_rlhf``, ``preference``, ``prompt``). columns:
    (internal field, your column) pairs. batch_size is global (rows, or pairs for
    preference data) and is split evenly across processes.
    """

    path: str = "bundled:add"
    format: str = "messages"
    split: str = "train"
    columns: tuple[tuple[str, str], ...] = ()
    tokenizer: str | None = None
    max_length: int = 512
    max_prompt_length: int | None = None
    train_on: str = "all_assistant"
    chat_template: str | None = None
    on_bad_record: str = "error"
    packing: bool = False
    batch_size: int = 8
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = None  # None: repeat forever
    bundled_size: int = 2000  # records generated for ``bundled:TASK``
    prefetch: int = 2  # batches prepared ahead in a background thread (0: none)
    # The data stream is split into this many shards, each read by one process (a process
    # may read several); None: one per process of the run that starts. A resumed run
    # keeps the stream of its start, so it may run on any process count dividing it.
    shards: int | None = None

    def __post_init__(self):
        if self.on_bad_record not in ("error", "skip"):
            raise ValueError(f"on_bad_record={self.on_bad_record!r}; 'error' or 'skip'")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.shards is not None and self.shards <= 0:
            raise ValueError(f"shards must be positive (or None: one per process), got "
                             f"{self.shards}")
        formats.adapter(self.format)
        self.tokenize_config()  # validates the tokenization fields

    def tokenize_config(self) -> TokenizeConfig:
        return TokenizeConfig(self.max_length, self.max_prompt_length, self.train_on,
                              self.chat_template)


def _source_records(config: DataConfig) -> Iterable[Mapping]:
    if config.path.startswith("bundled:"):
        from jalign.data import tasks

        task = config.path.split(":", 1)[1]
        if task not in tasks.TASKS:
            raise FieldError("path", config.path, f"bundled tasks are "
                             f"{', '.join('bundled:' + t for t in sorted(tasks.TASKS))}")
        # 'test' is what most datasets (and configs/algo/*.gin) call the held-out split.
        split = {"test": "eval"}.get(config.split, config.split)
        if split not in tasks.SPLITS:
            raise FieldError("split", config.split, f"bundled data has the splits "
                             f"{' and '.join(map(repr, tasks.SPLITS))} ('test' is 'eval')")
        make = {"messages": tasks.sft_records, "preference": tasks.preference_records,
                "prompt": tasks.prompt_records}.get(config.format)
        if make is None:
            raise FieldError("format", config.format, "bundled data comes as 'messages', "
                             "'preference' or 'prompt'")
        return make(task, config.bundled_size, config.seed, split=split)
    return formats.read_records(config.path, split=config.split)


def open_tokenizer(config: DataConfig) -> ChatTokenizer:
    """The config's tokenizer and chat template; problems name the field."""
    try:
        tokenizer = load_tokenizer(config.tokenizer)
    except DataError:
        raise
    except (OSError, ValueError) as e:
        raise FieldError("tokenizer", config.tokenizer, f"cannot load it ({type(e).__name__}: "
                         f"{first_line(e, 200)})") from None
    try:
        return ChatTokenizer(tokenizer, config.chat_template)
    except DataError as e:
        raise FieldError("chat_template", config.chat_template, str(e)) from None


def tokenize_records(records: Iterable[Mapping], config: DataConfig, chat: ChatTokenizer, *,
                     process_index: int = 0, process_count: int = 1,
                     progress: bool = False) -> tuple[list[dict], dict]:
    """Normalise and tokenize this process's records; return (examples, stats).

    A bad record (a line that is not JSON or not UTF-8, a record the format's adapter
    refuses, one the chat template refuses, a prompt too long for the row) stops here
    under ``on_bad_record='error'``, naming ``file:line`` (1-based; ``record N`` for a
    source without lines) and the reason; under ``skip`` it is dropped and counted by
    reason (``stats['skipped_reasons']``)."""
    kind, adapt = formats.adapter(config.format)
    tok_cfg = config.tokenize_config()
    columns = dict(config.columns)
    fn = TOKENIZERS[kind]
    stats: dict[str, Any] = {"records": 0, "examples": 0, "skipped_bad_record": 0,
                             "skipped_too_long": 0, "skipped_reasons": {}, "tokens": 0,
                             "target_tokens": 0, "max_token_id": -1}
    examples = []
    records = list(records) if not isinstance(records, Sequence) else records
    where = _locator(records, config)
    for at, reason in getattr(records, "bad", ()):  # lines that were no record
        if process_index == 0:  # counted once, by the first shard
            stats["records"] += 1
            _bad(stats, config, at, reason, "skipped_bad_record")
        elif config.on_bad_record == "error":
            _bad(stats, config, at, reason, "skipped_bad_record")
    mine = range(process_index, len(records), process_count)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(mine), desc="tokenize", unit="rec",
                   mininterval=2 if sys.stderr.isatty() else 30)
    for index in mine:
        stats["records"] += 1
        if bar is not None:
            bar.update(1)
        try:
            example = fn(chat, adapt(records[index], columns), tok_cfg)
        except PromptTooLong as e:
            _bad(stats, config, where(index), str(e), "skipped_too_long")
            continue
        except BadRecord as e:  # the adapter's, the template's, the tokenizer's
            _bad(stats, config, where(index), str(e), "skipped_bad_record")
            continue
        example["record_index"] = index
        examples.append(example)
        stats["max_token_id"] = max([stats["max_token_id"]] + [
            int(v.max()) for k, v in example.items() if k.endswith("_ids") and len(v)])
        stats["examples"] += 1
        if kind == "conversation":
            stats["tokens"] += len(example["input_ids"])
            stats["target_tokens"] += int(example["loss_mask"].sum())
        else:
            stats["tokens"] += sum(len(v) for k, v in example.items() if k.endswith("_ids"))
    if bar is not None:
        bar.close()
    if not examples:
        raise DataError(f"{config.path}: no usable examples out of {stats['records']} records "
                        f"({stats['skipped_bad_record']} bad, {stats['skipped_too_long']} "
                        f"too long){_examples_note(stats)}")
    return examples, stats


def _locator(records, config: DataConfig):
    """index -> where record ``index`` came from: ``file:line`` when the reader kept lines,
    else ``PATH: record N`` (1-based)."""
    lines = getattr(records, "where", None)
    if lines:
        return lines.__getitem__
    return lambda index: f"{config.path}: record {index + 1}"


def _examples_note(stats):
    shown = stats.get("skipped_examples", [])[:3]
    return "; e.g. " + "; ".join(shown) if shown else ""


def _bad(stats, config, at: str, message: str, counter: str):
    """Stop (``on_bad_record='error'``) or drop and count a bad record found ``at``."""
    if config.on_bad_record == "error":
        raise DataError(f"{at}: {message} (DataConfig.on_bad_record='skip' drops such "
                        "records and counts them)")
    stats[counter] += 1
    reason = re.sub(r"\[\d+\]", "[i]", message.splitlines()[0].split(" (")[0])
    stats["skipped_reasons"][reason] = stats["skipped_reasons"].get(reason, 0) + 1
    shown = stats.setdefault("skipped_examples", [])
    if len(shown) < 20:
        shown.append(f"{at}: {message.splitlines()[0]}")


def skipped_summary(stats: dict) -> str | None:
    """One line of what ``on_bad_record='skip'`` dropped, by reason, or None."""
    reasons = stats.get("skipped_reasons") or {}
    if not reasons:
        return None
    parts = ", ".join(f"{n} {reason}" for reason, n in
                      sorted(reasons.items(), key=lambda kv: -kv[1]))
    return (f"skipped {sum(reasons.values())} of {stats['records']} records: {parts}"
            f"{_examples_note(stats)}")


class DataIterator:
    """Batches as dicts of numpy arrays, with exact save/restore of the position."""

    def __init__(self, make_dataset, examples: list[dict], chat: ChatTokenizer, stats: dict,
                 config: DataConfig, kind: str, rows: int):
        self._make = make_dataset  # prefetch -> the grain dataset (rebuilt to count batches)
        self._examples = examples
        self.chat = chat
        self._iter = None  # built on first use, so annotate() can still add fields
        self.stats = stats
        self.config = config
        self.kind = kind
        self.rows = rows
        self.batches = 0
        self._total = None

    def annotate(self, fn) -> None:
        """``fn(examples, chat)`` adds per-example fields (e.g. precomputed reference
        log-probs) before the first batch is made."""
        if self._iter is not None:
            raise RuntimeError("annotate() after batches were made")
        fn(self._examples, self.chat)

    def _it(self):
        if self._iter is None:
            self._iter = iter(self._make(self.config.prefetch))
        return self._iter

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it())
        self.batches += 1
        mask = batch.get("loss_mask", batch.get("chosen_loss_mask"))
        if mask is not None and not mask.any():  # by construction impossible; never train on it
            raise DataError(f"batch {self.batches} has no trainable tokens")
        return {k: v for k, v in batch.items()}

    def total_batches(self) -> int | None:
        """Batches this iterator yields from the start to the end of its data (None when
        it repeats forever). Without packing this is arithmetic; packed rows are counted
        by running the packing once (deterministic, so the count is exact)."""
        if self.config.num_epochs is None:
            return None
        if self._total is None:
            if self.kind == "conversation" and self.config.packing:
                self._total = sum(1 for _ in self._make(0))
            else:
                self._total = self.stats["examples"] * self.config.num_epochs // self.rows
        return self._total

    def get_state(self) -> dict:
        return {"version": STATE_VERSION, "batches": self.batches,
                "grain": self._it().get_state()}

    def set_state(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data iterator state version {state.get('version')} is not "
                            f"{STATE_VERSION}")
        self._it().set_state(state["grain"])
        self.batches = state["batches"]


def build_iterator(config: DataConfig, *, records: Iterable[Mapping] | None = None,
                   chat: ChatTokenizer | None = None, process_index: int = 0,
                   process_count: int = 1, shards: int | None = None,
                   progress: bool = False) -> "ShardedIterator":
    """The batch iterator for this process (``process_index`` of ``process_count``).

    The records are split into ``shards`` streams (default ``config.shards``, else one
    per process); record i belongs to shard i mod shards. Each shard is shuffled, packed
    and batched on its own, and this process reads the consecutive shards
    [index * k, (index + 1) * k), k = shards / process_count, its rows of a global batch
    being their batches side by side. So the global batches depend on the shard count,
    never on how many processes read them: a run may resume on another process count.

    Records are tokenized now; batches are made on first use, so ``annotate`` can still
    add per-example fields (e.g. precomputed reference log-probs)."""
    shards = shards or config.shards or process_count
    if shards % process_count:
        raise FieldError("shards", shards, f"the data's {shards} shards cannot be split "
                         f"evenly over {process_count} processes")
    if config.batch_size % shards:
        what = "processes" if shards == process_count else "shards"
        raise FieldError("batch_size", config.batch_size,
                         f"not divisible by the {shards} {what}")
    kind, _ = formats.adapter(config.format)
    if config.packing and kind != "conversation":
        raise FieldError("packing", True, "packing applies to conversation (SFT/IFT) data only")
    if chat is None:
        chat = open_tokenizer(config)
    t0 = time.time()
    records = _source_records(config) if records is None else records
    datasets_fingerprint = getattr(records, "_fingerprint", None)  # a datasets object's
    records = list(records) if not isinstance(records, Sequence) else records
    per = shards // process_count
    mine = range(process_index * per, (process_index + 1) * per)
    parts = []
    for shard in mine:
        examples, stats = tokenize_records(records, config, chat, process_index=shard,
                                           process_count=shards, progress=progress)
        parts.append(DataIterator(_dataset_maker(config, kind, examples, chat,
                                                 config.batch_size // shards),
                                  examples, chat, stats, config, kind,
                                  config.batch_size // shards))
    it = ShardedIterator(parts, list(mine), shards)
    it.stats["tokenize_seconds"] = round(time.time() - t0, 3)
    it.datasets_fingerprint = datasets_fingerprint
    if kind == "prompt":
        it.records = records  # for record_fields (every process holds all of them)
    return it


def _dataset_maker(config: DataConfig, kind: str, examples: list[dict], chat: ChatTokenizer,
                   rows: int):
    """prefetch -> one shard's grain dataset of ``rows``-row batches."""

    def make_dataset(prefetch: int):
        ds = grain.MapDataset.source(examples)
        if config.shuffle:
            ds = ds.shuffle(seed=config.seed)
        ds = ds.repeat(config.num_epochs)
        length, pad = config.max_length, chat.pad_id
        if kind == "conversation" and config.packing:
            ds = ds.map(lambda e: {"input_ids": e["input_ids"], "loss_mask": e["loss_mask"]})
            ds = FirstFitPackIterDataset(
                ds.to_iter_dataset(), length_struct={"input_ids": length, "loss_mask": length},
                num_packing_bins=rows, shuffle_bins=False)
            ds = ds.map(lambda r: packing.from_grain_packed(r, pad))
        elif kind == "conversation":
            ds = ds.map(lambda e: packing.pad_example(e, length, pad)).to_iter_dataset()
        elif kind == "preference":
            ds = ds.map(lambda e: packing.pad_pair(e, length, pad)).to_iter_dataset()
        else:
            prompt_len = config.max_prompt_length or length - 1
            ds = ds.map(lambda e: packing.left_pad_prompt(e, prompt_len, pad)).to_iter_dataset()
        ds = ds.batch(rows, drop_remainder=True)
        if prefetch:
            # Packs and batches while the accelerator (or XLA:CPU) runs the step. grain keeps
            # the state of the last *consumed* batch, so save/restore stays exact.
            ds = ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
        return ds

    return make_dataset


class ShardedIterator:
    """This process's shards (``DataIterator`` each) read in lockstep: a batch is their
    batches concatenated row-wise in shard order. Its state names each shard, so the
    states of all processes merge into one (``jalign.train.hosts.merged``) that any
    process count dividing the shard count can resume from."""

    def __init__(self, parts: list[DataIterator], shard_ids: list[int], shards: int):
        self.parts, self.shard_ids, self.shards = parts, shard_ids, shards
        self.records = None
        self.datasets_fingerprint = None
        self.chat, self.config, self.kind = parts[0].chat, parts[0].config, parts[0].kind
        self.rows = sum(p.rows for p in parts)
        self.stats = _merged_stats([p.stats for p in parts])

    def record_fields(self, indexes) -> dict[str, list]:
        """The prompt records' columns other than the prompt (``prompt`` data: its ``meta``;
        e.g. ``answer``) for the records ``indexes`` (any process's: every process holds
        all records), one list per column aligned with ``indexes`` (None where a record
        lacks the column)."""
        if self.kind != "prompt" or self.records is None:
            return {}
        _, adapt = formats.adapter(self.config.format)
        columns = dict(self.config.columns)
        if any(int(i) < 0 for i in indexes):
            raise ValueError("record_fields: a prompt row without its record index")
        metas = [adapt(self.records[int(i)], columns)["meta"] for i in indexes]
        keys = list(dict.fromkeys(k for m in metas for k in m))
        return {k: [m.get(k) for m in metas] for k in keys}

    @property
    def batches(self) -> int:
        return self.parts[0].batches

    def fingerprint(self) -> dict:
        """What this stream depends on (``jalign.data.fingerprint``): its files' hashes
        are computed now."""
        from jalign.data.fingerprint import data_fingerprint
        return data_fingerprint(self.config, self.chat, self.datasets_fingerprint)

    def annotate(self, fn) -> None:
        """``fn(examples, chat, shard)`` for each of this process's shards (``shard``: a
        name such as 's1of4', the same whichever process reads the shard, for caches).
        Every process makes the same number of calls (shards / processes)."""
        for s, p in zip(self.shard_ids, self.parts):
            name = f"s{s}of{self.shards}"
            p.annotate(lambda examples, chat, name=name: fn(examples, chat, name))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        got = [next(p) for p in self.parts]
        if len(got) == 1:
            return got[0]
        return {k: np.concatenate([g[k] for g in got]) for k in got[0]}

    def total_batches(self) -> int | None:
        totals = [p.total_batches() for p in self.parts]
        return None if totals[0] is None else min(totals)

    def get_state(self) -> dict:
        return {"version": SHARDED_STATE_VERSION, "shards": self.shards,
                "positions": {str(s): p.get_state() for s, p in zip(self.shard_ids, self.parts)}}

    def set_state(self, state: dict) -> None:
        if state.get("version") == STATE_VERSION and self.shards == 1:
            state = {"version": SHARDED_STATE_VERSION, "shards": 1, "positions": {"0": state}}
        if state.get("version") != SHARDED_STATE_VERSION:
            raise DataError(f"data iterator state version {state.get('version')} is not "
                            f"{SHARDED_STATE_VERSION} (or {STATE_VERSION} of one shard)")
        if state["shards"] != self.shards:
            raise DataError(f"the saved data state has {state['shards']} shards, this iterator "
                            f"{self.shards}")
        missing = [s for s in self.shard_ids if str(s) not in state["positions"]]
        if missing:
            raise DataError(f"the saved data state has no position for shard(s) {missing} "
                            f"(it holds {sorted(state['positions'], key=int)})")
        for s, p in zip(self.shard_ids, self.parts):
            p.set_state(state["positions"][str(s)])


def _merged_stats(parts: list[dict]) -> dict:
    if len(parts) == 1:
        return parts[0]
    out: dict[str, Any] = {}
    for stats in parts:
        for k, v in stats.items():
            if k == "max_token_id":
                out[k] = max(out.get(k, -1), v)
            elif k == "skipped_examples":
                out.setdefault(k, []).extend(v)
            elif k == "skipped_reasons":
                for reason, n in v.items():
                    out.setdefault(k, {})[reason] = out.get(k, {}).get(reason, 0) + n
            elif isinstance(v, (int, float)):
                out[k] = out.get(k, 0) + v
    return out
