"""A model's tokenizer files on disk: written into an export, or kept as a run's own."""

from __future__ import annotations


def write_tokenizer(tokenizer, directory, chat_template: str | None = None) -> None:
    """Write a tokenizer's files into ``directory`` (an export's, being written), with
    ``chat_template`` (the one it is used with) in place of its own when given."""
    kept = tokenizer.chat_template
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    try:
        tokenizer.save_pretrained(str(directory))
    finally:
        tokenizer.chat_template = kept


def save_tokenizer(tokenizer, directory, chat_template: str | None = None) -> None:
    """Keep a model's tokenizer (and the chat template it is used with) in ``directory``:
    a run's or a converted checkpoint's own, which ``jalign:`` sources read back. Written
    aside and moved into place: a crash leaves no half-written tokenizer to be taken for
    the real one."""
    from jalign.convert.safetensors_io import atomic_directory
    with atomic_directory(directory, overwrite=True) as tmp:
        write_tokenizer(tokenizer, tmp, chat_template)
