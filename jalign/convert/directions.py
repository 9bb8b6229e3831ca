"""``jalign convert`` directions: read a model and its tokenizer in one format, write them
in another. Any reader pairs with any writer (``hf``, ``gguf``, ``jalign`` in; ``hf``,
``jalign``, ``gguf`` out, plus ``jalign-to-peft`` for a LoRA run's adapters); a format is
one entry in each table, not a branch per direction.

Exports are self-contained: the tokenizer that comes with the source (an HF directory's
files, a GGUF file's metadata, the tokenizer a jalign run trained with, with its chat
template) goes with the weights: into an HF export's directory, a jalign model
checkpoint's ``tokenizer/`` and a GGUF file's metadata.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jalign import sources
from jalign.convert.safetensors_io import ConversionError


@dataclasses.dataclass
class Loaded:
    source: sources.ModelSource
    config: object
    model: object
    tokenizer: object | None  # a transformers tokenizer (its chat template inside), or None
    role: str | None = None   # the run's role read (a jalign source)


# ------------------------------------------------------------------ readers

def _tokenizer_of(source, say) -> object | None:
    """The tokenizer that comes with ``source``; None (said) where it has none."""
    from jalign.data.tokenize import load_tokenizer
    try:
        return load_tokenizer(sources.tokenizer_spec(source))
    except ValueError as e:
        say(f"note: {e}: the export carries no tokenizer")
        return None


def read_hf(args, say) -> Loaded:
    from jalign.convert.hf import load_hf
    config, model = load_hf(args.src, head=args.head, seed=args.seed, mesh=args.mesh_shape,
                            dtype=args.dtype, allow_nonfinite=args.allow_nonfinite)
    source = sources.ModelSource("hf", str(args.src))
    return Loaded(source, config, model, _tokenizer_of(source, say))


def read_gguf(args, say) -> Loaded:
    from jalign.convert.gguf import load_gguf
    config, model = load_gguf(args.src, head=args.head, seed=args.seed, mesh=args.mesh_shape,
                              dtype=args.dtype)
    source = sources.ModelSource("gguf", str(args.src))
    return Loaded(source, config, model, _tokenizer_of(source, say))


def exported_role(src, step, say) -> str:
    """The role a run's export holds: its first trained role (said when there are more)."""
    from jalign import checkpoint
    trained = [r for r in checkpoint.read_roles(src, step).roles if r.trained]
    if len(trained) > 1:
        say(f"{src} holds {' and '.join(r.name for r in trained)} (trained together): "
            f"exporting the {trained[0].name}")
    return trained[0].name


def read_jalign(args, say, adapters: bool = False) -> Loaded:
    """A run's first trained role (a PPO run: its policy) with whatever head it has; a
    LoRA run's base with the adapters merged in (kept apart with ``adapters``)."""
    role = exported_role(args.src, args.step, say)
    config, model = sources.load_checkpoint(args.src, step=args.step, mesh=args.mesh_shape,
                                            role=role, adapters=adapters)
    source = sources.ModelSource("jalign", str(args.src), args.step)
    return Loaded(source, config, model, _tokenizer_of(source, say), role)


READERS = {"hf": read_hf, "gguf": read_gguf, "jalign": read_jalign}


# ------------------------------------------------------------------ writers

def write_hf(loaded: Loaded, args, say) -> None:
    from jalign.convert.hf import save_hf
    save_hf(loaded.config, loaded.model, args.dst, dtype=args.dtype,
            max_shard_bytes=args.max_shard_bytes, overwrite=args.overwrite,
            pad_token_id=args.pad_token_id, tokenizer=loaded.tokenizer)


def write_jalign(loaded: Loaded, args, say) -> None:
    from jalign import checkpoint
    dst = Path(args.dst)
    if dst.exists() and any(dst.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{dst} exists and is not empty; pass --overwrite to replace it")
    checkpoint.save_model(dst, loaded.config, loaded.model, step=args.step or 0,
                          extra_metadata={"source": str(loaded.source)})
    if loaded.tokenizer is not None:
        from jalign.data.tokenizer_files import save_tokenizer
        save_tokenizer(loaded.tokenizer, dst / sources.TOKENIZER_DIR)


def write_gguf(loaded: Loaded, args, say) -> None:
    from jalign.convert.gguf import save_gguf
    dst = Path(args.dst)
    if dst.exists() and not args.overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
    if loaded.tokenizer is None:
        say("note: without a tokenizer llama.cpp cannot run this file")
    save_gguf(loaded.config, loaded.model, dst, kind=args.type, tokenizer=loaded.tokenizer)


def write_peft(loaded: Loaded, args, say) -> None:
    """A LoRA run's adapters as a PEFT directory naming the base model it was trained on
    (a local base as an absolute path: PEFT resolves it from wherever it is loaded)."""
    from jalign.convert import peft
    config = loaded.config
    if config.lora is None or not config.lora.enabled:
        raise ConversionError(f"{args.src} holds no LoRA adapters (trained with "
                              "LoraConfig.rank=0); export it with jalign-to-hf")
    base = peft.base_source(args.src, args.step, loaded.role)
    if config.lora.quantize:
        say(f"note: the adapters were trained on a {config.lora.quantize} base; PEFT applies "
            f"them to the base weights of {sources.describe(base)} as given")
    if base.scheme != "hf":
        say(f"note: the base is {str(base)!r}, not a Hugging Face model: PEFT needs it as one "
            f"(jalign convert {base.scheme}-to-hf)")
    name = sources.describe(base)
    if base.scheme == "hf" and Path(name).exists():
        name = str(Path(name).resolve())
    peft.save_peft(loaded.model, args.dst, base_name=name, overwrite=args.overwrite,
                   tokenizer=loaded.tokenizer)


WRITERS = {"hf": write_hf, "jalign": write_jalign, "gguf": write_gguf}
DIRECTIONS = tuple(f"{a}-to-{b}" for a in READERS for b in WRITERS if a != b) + ("jalign-to-peft",)


def convert(args, say=print) -> Loaded:
    """Run ``args.direction`` (one of ``DIRECTIONS``)."""
    from jalign.errors import check_writable
    reader, _, writer = args.direction.partition("-to-")
    check_writable(args.dst, f"jalign convert {args.direction} ... {args.dst}")
    if writer == "peft":
        loaded = read_jalign(args, say, adapters=True)
        write_peft(loaded, args, say)
        return loaded
    loaded = READERS[reader](args, say)
    from jalign.models.heads import head_of
    config = loaded.config
    say(f"loaded {args.src}: a {config.family} model with a {head_of(loaded.model)} head, "
        f"{config.num_params() / 1e6:.1f}M parameters, "
        f"{config.num_layers} layers, param dtype {config.param_dtype}"
        + ("" if loaded.tokenizer is None else f", a {len(loaded.tokenizer)}-token tokenizer"))
    WRITERS[writer](loaded, args, say)
    return loaded
