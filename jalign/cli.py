"""The ``jalign`` command line: ``jalign train|convert|generate|eval|pairs|demo``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EXIT_BAD_INPUT = 2


def _parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for unit, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def _mesh_arg(text: str | None):
    if not text:
        return None
    from jalign.sharding import MeshConfig, make_mesh
    try:
        data, fsdp, tensor = (int(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"--mesh expects DATA,FSDP,TENSOR (e.g. 1,-1,1), got {text!r}") from None
    return make_mesh(MeshConfig(data, fsdp, tensor))


def _exported_role(src: str, step) -> str:
    """The role a run's export holds: its first trained role (said when there are more)."""
    from jalign import checkpoint
    trained = [r for r in checkpoint.read_roles(src, step).roles if r.trained]
    if len(trained) > 1:
        print(f"{src} holds {' and '.join(r.name for r in trained)} (trained together): "
              f"exporting the {trained[0].name}")
    return trained[0].name


def cmd_convert(args) -> int:
    from jalign import checkpoint, sources
    from jalign.convert import hf
    from jalign.models.heads import head_of

    t0 = time.time()
    if args.direction == "hf-to-jalign":
        config, model = hf.load_hf(args.src, head=args.head, seed=args.seed,
                                   mesh=_mesh_arg(args.mesh), dtype=args.dtype,
                                   allow_nonfinite=args.allow_nonfinite)
        print(f"loaded {args.src} with a {head_of(model)} head: "
              f"{config.num_params() / 1e6:.1f}M parameters, {config.num_layers} layers, "
              f"param dtype {config.param_dtype}")
        checkpoint.save_model(args.dst, config, model, step=args.step or 0,
                              extra_metadata={"source": str(args.src)})
    elif args.direction == "jalign-to-peft":
        from jalign.convert import peft
        role = _exported_role(args.src, args.step)
        config, model = sources.load_checkpoint(args.src, step=args.step, role=role,
                                                mesh=_mesh_arg(args.mesh), adapters=True)
        if config.lora is None or not config.lora.enabled:
            print(f"jalign convert: {args.src} holds no LoRA adapters (trained with "
                  "LoraConfig.rank=0); export it with jalign-to-hf", file=sys.stderr)
            return 2
        base = peft.base_source(args.src, args.step, role)
        if config.lora.quantize:
            print(f"note: the adapters were trained on a {config.lora.quantize} base; PEFT "
                  f"applies them to the base weights of {sources.describe(base)} as given")
        if base.scheme != "hf":
            print(f"note: the base is {str(base)!r}, not a Hugging Face model: PEFT needs it "
                  "as one (jalign convert jalign-to-hf on the base's run)")
        peft.save_peft(model, args.dst, base_name=sources.describe(base),
                       overwrite=args.overwrite)
    else:
        # A run exports its first trained role (a PPO run: its policy) with whatever head
        # it has; a LoRA run its base with the adapters merged into the weights.
        config, model = sources.load_checkpoint(args.src, step=args.step,
                                                role=_exported_role(args.src, args.step),
                                                mesh=_mesh_arg(args.mesh))
        hf.save_hf(config, model, args.dst, dtype=args.dtype,
                   max_shard_bytes=_parse_size(args.max_shard_size), overwrite=args.overwrite,
                   pad_token_id=args.pad_token_id)
    print(f"wrote {args.dst} in {time.time() - t0:.1f}s")
    return 0


def cmd_train(args) -> int:
    from jalign.train import loop
    from jalign.experiment import load_experiment, run

    from jalign import distributed
    exp = load_experiment(args.configs, args.gin)
    # Joined before anything touches a device; from here on only process 0 talks.
    main = distributed.initialize(exp.distributed)["process_id"] == 0
    if main:
        print("operative config:\n" + exp.operative, flush=True)

    def log(record):
        if not main:
            return
        keys = ("loss", "eval_loss", "eval_accuracy", "eval_rewards/accuracy", "reward", "kl",
                "kl_coef", "eval_reward", "grad_norm", "learning_rate", "mfu")
        text = " ".join(f"{k}={record[k]:.4g}" for k in keys if k in record)
        print(f"step {record['step']}: {text}", flush=True)

    try:
        summary = run(exp, on_log=log if not exp.train.progress else None,
                      allow_config_change=args.allow_config_change)
    except (loop.Preempted, loop.NonFiniteError) as e:
        print(f"jalign train: {e}", file=sys.stderr, flush=True)
        return loop.exit_code_for(e)
    if not main:
        return 0
    ev = summary["eval"] or {}
    shown = ", ".join(f"{k.replace('_', ' ')} {ev[k]:.4f}"
                      for k in ("eval_loss", "eval_reward") if k in ev)
    print(f"done: {summary['run_dir']} (final step {summary['final_step']}"
          + (f", {shown}" if shown else "") + ")")
    return 0


def _load_any(text: str, step=None):
    """A causal LM from ``hf:PATH_OR_ID`` or a jalign checkpoint / run directory (written
    bare or as ``jalign:DIR[@STEP]``; a reward model there is a clear error, not a crash
    in generation)."""
    from jalign import sources
    from jalign.models.heads import LM
    try:
        source = sources.ModelSource.parse(text, what="MODEL", default_scheme="jalign")
        source = source.with_step(step)
    except ValueError as e:
        raise SystemExit(f"jalign: {e}") from None
    return sources.load(source, head=LM)


def cmd_generate(args) -> int:
    import jax
    import numpy as np

    from jalign.data.packing import left_pad_prompt
    from jalign.data.tokenize import ChatTokenizer, load_tokenizer
    from jalign.rl.generate import decode_text, generate

    config, model = _load_any(args.model, args.step)
    chat = ChatTokenizer(load_tokenizer(args.tokenizer), args.chat_template)
    prompts = args.prompt
    encoded = [chat.encode_prompt([{"role": "user", "content": p}]) for p in prompts]
    length = max(len(e) for e in encoded)
    rows = [left_pad_prompt({"prompt_ids": e}, length, chat.pad_id) for e in encoded]
    out = generate(model, np.stack([r["prompt_ids"] for r in rows]),
                   np.stack([r["prompt_mask"] for r in rows]), max_new_tokens=args.max_new_tokens,
                   rng=jax.random.key(args.seed), temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, eos_id=chat.eos_id, pad_id=chat.pad_id)
    for prompt, text in zip(prompts, decode_text(chat, out["tokens"], out["lengths"])):
        print(f"> {prompt}\n{text}\n")
    return 0


def cmd_eval(args) -> int:
    import json as _json

    from jalign.data.pipeline import DataConfig
    from jalign.data.tokenize import ChatTokenizer, load_tokenizer
    from jalign.evaluate import dataset_loss, task_accuracy

    config, model = _load_any(args.model, args.step)
    results = {}
    if args.task:
        chat = ChatTokenizer(load_tokenizer(args.tokenizer), args.chat_template)
        acc = task_accuracy(model, chat, args.task, n=args.n, show=args.show)
        for prompt, answer, ok in acc.pop("samples"):
            print(f"  {prompt!r} -> {answer!r} {'correct' if ok else 'WRONG'}")
        results["task"] = acc
    if args.data:
        dc = DataConfig(path=args.data, format=args.format, split=args.split,
                        tokenizer=args.tokenizer, chat_template=args.chat_template,
                        max_length=args.max_length, batch_size=args.batch_size, shuffle=False,
                        num_epochs=1, bundled_size=args.n)
        results["data"] = dataset_loss(model, dc, max_batches=args.max_batches)
    if not results:
        raise SystemExit("jalign eval: pass --task and/or --data")
    print(_json.dumps(results, indent=2))
    return 0


def cmd_pairs(args) -> int:
    from jalign.data.tokenize import ChatTokenizer, load_tokenizer
    from jalign.rl.pairs import policy_pairs, write_jsonl

    _, model = _load_any(args.model, args.step)
    chat = ChatTokenizer(load_tokenizer(args.tokenizer), args.chat_template)
    records, stats = policy_pairs(model, chat, args.task, n=args.n, seed=args.seed,
                                  split=args.split, samples=args.samples,
                                  temperature=args.temperature,
                                  fill_synthetic=not args.no_synthetic)
    out = write_jsonl(records, args.out)
    print(f"{len(records)} pairs -> {out}: {stats}")
    return 0


def cmd_demo(args) -> int:
    if args.convert_only:
        from jalign.convert.round_trip import run_round_trip
        return run_round_trip(Path(args.out))
    from jalign.demo import run_demo
    return run_demo(args.gin, fresh=args.fresh, stages=tuple(args.stages.split(",")),
                    eval_n=args.eval_n, full=args.full)


def _model_args(p) -> None:
    p.add_argument("model", help="jalign run/checkpoint directory, or hf:PATH_OR_HUB_ID")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir or hub id (default bundled)")
    p.add_argument("--chat-template", default=None,
                   help="template name (jalign, chatml, llama3, llama2) if the tokenizer has none")


def _convert_parser(sub) -> None:
    conv = sub.add_parser("convert", help="convert between Hugging Face and jalign checkpoints")
    conv.add_argument("direction", choices=["hf-to-jalign", "jalign-to-hf", "jalign-to-peft"],
                      help="jalign-to-peft: a LoRA run's adapters as a PEFT adapter directory "
                           "(jalign-to-hf merges them into the base instead)")
    conv.add_argument("src", help="source directory (or a hub id for hf-to-jalign)")
    conv.add_argument("dst", help="destination directory")
    conv.add_argument("--dtype", default=None,
                      help="parameter dtype to write (default: keep the source's)")
    conv.add_argument("--step", type=int, default=None,
                      help="checkpoint step (jalign-to-hf: default latest; hf-to-jalign: 0)")
    conv.add_argument("--mesh", default=None, help="DATA,FSDP,TENSOR mesh to load onto")
    conv.add_argument("--max-shard-size", default="2GiB", help="safetensors shard size")
    conv.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    conv.add_argument("--head", choices=["lm", "scalar"], default="lm",
                      help="hf-to-jalign: model to build; 'scalar' is a reward/value model, read "
                           "from a LlamaForSequenceClassification checkpoint or started from a "
                           "causal LM (LM head dropped, score head freshly initialised)")
    conv.add_argument("--allow-nonfinite", action="store_true",
                      help="hf-to-jalign: import tensors holding NaN/Inf (refused by default)")
    conv.add_argument("--seed", type=int, default=0,
                      help="hf-to-jalign --head scalar from a causal LM: score head init seed")
    conv.add_argument("--pad-token-id", type=int, default=None,
                      help="jalign-to-hf: pad_token_id for config.json (default: the model "
                           "config's; a scalar head without one gets 0). transformers scores a "
                           "sequence at its rightmost non-pad token")
    conv.set_defaults(func=cmd_convert)


def _train_parser(sub) -> None:
    tr = sub.add_parser("train", help="train from gin configs (resumes a run automatically)")
    tr.add_argument("configs", nargs="+", help="gin files, applied in order")
    tr.add_argument("--gin", action="append", default=[], metavar="BINDING",
                    help="extra gin binding, e.g. --gin 'TrainConfig.steps=100' (repeatable)")
    tr.add_argument("--allow-config-change", action="store_true",
                    help="resume a run although model, data, optimizer or loss bindings "
                         "differ from its checkpoint's (the changes are listed and logged)")
    tr.set_defaults(func=cmd_train)


def _model_parsers(sub) -> None:
    """generate, eval and pairs: commands on a model (a run or an hf: source)."""
    gen = sub.add_parser("generate", help="sample completions (KV cache, one compiled loop)")
    _model_args(gen)
    gen.add_argument("--prompt", action="append", required=True, help="user message (repeatable)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=cmd_generate)

    ev = sub.add_parser("eval", help="task accuracy and/or loss and perplexity on a dataset")
    _model_args(ev)
    ev.add_argument("--task", default=None, help="bundled task for exact-match accuracy (add, mul, reverse)")
    ev.add_argument("--n", type=int, default=512, help="problems (or bundled records) to evaluate")
    ev.add_argument("--show", type=int, default=5, help="sample answers to print")
    ev.add_argument("--data", default=None, help="dataset for loss/perplexity (path, hub id, bundled:TASK)")
    ev.add_argument("--format", default="messages")
    ev.add_argument("--split", default="eval")
    ev.add_argument("--max-length", type=int, default=512)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--max-batches", type=int, default=50)
    ev.set_defaults(func=cmd_eval)

    pairs = sub.add_parser("pairs", help="preference pairs (JSONL) from a model's own answers "
                                         "to a bundled task: chosen = correct, rejected = its mistake")
    _model_args(pairs)
    pairs.add_argument("--task", required=True, help="bundled task (add, mul, reverse)")
    pairs.add_argument("--out", required=True, help="output .jsonl")
    pairs.add_argument("--n", type=int, default=4000, help="problems")
    pairs.add_argument("--split", default="train")
    pairs.add_argument("--seed", type=int, default=0)
    pairs.add_argument("--samples", type=int, default=2, help="sampled answers per problem")
    pairs.add_argument("--temperature", type=float, default=1.0)
    pairs.add_argument("--no-synthetic", action="store_true",
                       help="leave out problems the model never got wrong (default: use the "
                            "task's synthetic wrong answer)")
    pairs.set_defaults(func=cmd_pairs)


def _demo_parser(sub) -> None:
    demo = sub.add_parser("demo", help="the bundled end-to-end job (see README)")
    demo.add_argument("--gin", action="append", default=[], metavar="BINDING",
                      help="override a binding of every stage's configs/demo/*.gin (repeatable)")
    demo.add_argument("--fresh", action="store_true", help="delete the demo runs and start over")
    demo.add_argument("--stages", default="sft,rm,dpo",
                      help="comma-separated stages: sft (from scratch), rm, dpo and ift (from "
                           "the SFT run; ift is not in the default)")
    demo.add_argument("--full", action="store_true",
                      help="the longer schedules of configs/demo/full/ (about 20 minutes on a "
                           "2-core CPU; runs under runs/demo_full/)")
    demo.add_argument("--eval-n", type=int, default=512,
                      help="held-out problems each accuracy is measured on")
    demo.add_argument("--convert-only", action="store_true",
                      help="only run the HF conversion round trip (into --out)")
    demo.add_argument("--out", default="runs/demo_convert", help="--convert-only output directory")
    demo.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jalign", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_convert_parser, _train_parser, _model_parsers, _demo_parser):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from jalign.checkpoint import CheckpointError
    from jalign.config import ConfigError
    from jalign.convert.safetensors_io import ConversionError
    from jalign.data.formats import BadRecord, DataError

    try:
        return args.func(args)
    except (ConversionError, CheckpointError, FileExistsError, ConfigError, DataError,
            BadRecord) as e:
        print(f"jalign {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # out of device/host memory: say what to change, not where XLA was
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        from jalign.errors import first_line
        detail = first_line(str(e).split("RESOURCE_EXHAUSTED", 1)[1].lstrip(": "), 200)
        from jalign.models.families import default_config_class
        print(f"jalign {args.command}: error: out of memory ({detail}); lower "
              "DataConfig.batch_size or DataConfig.max_length, raise TrainConfig.accum_steps, "
              f"or set {default_config_class().__name__}.remat_policy='full'", file=sys.stderr)
        return EXIT_BAD_INPUT


# XLA:CPU allocates its large temporaries afresh every step; glibc hands them back to the
# OS and the next step page-faults them in again (~800k faults per step measured on the
# SFT benchmark). Keeping freed memory in the process removed the faults and cut the step
# time by ~20% (docs/benchmarks.md). It must be set before the process starts, so the
# command re-executes itself once with it. JALIGN_KEEP_MALLOC=1 opts out.
GLIBC_TUNING = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296:glibc.malloc.arena_max=1"


def entry() -> None:
    """Console-script entry point: tune the allocator (Linux/glibc), then run."""
    import os
    import platform

    if (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
            and "GLIBC_TUNABLES" not in os.environ and not os.environ.get("JALIGN_KEEP_MALLOC")):
        env = dict(os.environ, GLIBC_TUNABLES=GLIBC_TUNING)
        os.execve(sys.executable, [sys.executable, "-m", "jalign.cli", *sys.argv[1:]], env)
    sys.exit(main())


if __name__ == "__main__":
    entry()
