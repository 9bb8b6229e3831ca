"""What a data stream depends on, recorded with each checkpoint and compared on resume.

A checkpoint records where the data stream was (a position), which is meaningless if the
records under that position changed: a jsonl edited between a run and its resume would
train on without a word. ``data_fingerprint`` records, for the training data: each local
file's path, size, modification time and content hash (sha256); a ``save_to_disk``
directory's files likewise; a hub dataset's name, split and the content fingerprint
``datasets`` gives it; the bundled tasks' generator settings; and the tokenizer's vocabulary
and chat template. ``differences`` says what changed, naming the file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

VERSION = 1
_CHUNK = 1 << 22


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _file(path: Path) -> dict:
    stat = path.stat()
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": _sha256(path)}


def source_fingerprint(config, datasets_fingerprint=None) -> dict:
    """{name: identity} of what ``config.path`` reads (``datasets_fingerprint``: the
    content fingerprint of the ``datasets`` object read from a hub name)."""
    path = config.path
    if path.startswith("bundled:"):  # generated: the config decides it (its record)
        return {path: {"generated": True}}
    # Named as the config names them (not resolved): the same data read through another
    # mount point or working directory is the same data.
    p = Path(path)
    if p.is_file():
        return {path: _file(p)}
    if p.is_dir():
        return {f"{path}/{f.relative_to(p)}": _file(f) for f in sorted(p.rglob("*"))
                if f.is_file()}
    # a hub dataset: its name, split and the content fingerprint datasets computed
    return {f"hub:{path}[{config.split}]": {"fingerprint": datasets_fingerprint}}


def tokenizer_fingerprint(chat) -> str:
    """A hash of the tokenizer's vocabulary, its special tokens and the chat template."""
    tokenizer = chat.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    text += repr(getattr(tokenizer, "all_special_tokens", ())) + repr(chat.template)
    return hashlib.sha256(text.encode()).hexdigest()


def data_fingerprint(config, chat, datasets_fingerprint=None) -> dict:
    return {"version": VERSION, "source": source_fingerprint(config, datasets_fingerprint),
            "tokenizer": tokenizer_fingerprint(chat)}


def differences(old: dict, new: dict) -> list[str]:
    """What changed between two fingerprints, each naming the file (or the tokenizer)."""
    out = []
    before, after = old.get("source", {}), new.get("source", {})
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name), after.get(name)
        if a is None:
            out.append(f"{name} was not read before (a new file)")
        elif b is None:
            out.append(f"{name} is no longer read (removed or renamed)")
        elif "sha256" in a and (a["sha256"], a["bytes"]) != (b.get("sha256"), b.get("bytes")):
            size = (f", {a['bytes']:,} -> {b['bytes']:,} bytes" if a["bytes"] != b["bytes"]
                    else ", same size")
            out.append(f"{name} changed (content hash {a['sha256'][:12]} -> "
                       f"{b.get('sha256', '?')[:12]}{size})")
        elif "fingerprint" in a and a["fingerprint"] != b.get("fingerprint"):
            out.append(f"{name} changed (datasets fingerprint {a['fingerprint']} -> "
                       f"{b.get('fingerprint')})")
    if old.get("tokenizer") != new.get("tokenizer"):
        out.append("the tokenizer or its chat template changed")
    return out
