"""The ``jalign`` command line: ``jalign train|convert|generate|eval|demo``."""

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
    from jalign import checkpoint
    from jalign.convert import hf

    t0 = time.time()
    if args.direction == "hf-to-jalign":
        config, model = hf.load_hf(args.src, mesh=_mesh_arg(args.mesh), dtype=args.dtype)
        print(f"loaded {args.src}: {config.num_params() / 1e6:.1f}M parameters, "
              f"{config.num_layers} layers, param dtype {config.param_dtype}")
        checkpoint.save_model(args.dst, config, model, step=args.step or 0,
                              extra_metadata={"source": str(args.src)})
    else:
        config, model = checkpoint.load_model(args.src, step=args.step, mesh=_mesh_arg(args.mesh))
        hf.save_hf(config, model, args.dst, dtype=args.dtype,
                   max_shard_bytes=_parse_size(args.max_shard_size), overwrite=args.overwrite)
    print(f"wrote {args.dst} in {time.time() - t0:.1f}s")
    return 0


def cmd_train(args) -> int:
    from jalign.train import loop
    from jalign.train.experiment import load_experiment, run

    exp = load_experiment(args.configs, args.gin)
    print("operative config:\n" + exp.operative, flush=True)

    def log(record):
        keys = ("loss", "eval_loss", "grad_norm", "learning_rate", "mfu")
        text = " ".join(f"{k}={record[k]:.4g}" for k in keys if k in record)
        print(f"step {record['step']}: {text}", flush=True)

    try:
        summary = run(exp, on_log=log if not exp.train.progress else None)
    except (loop.Preempted, loop.NonFiniteError) as e:
        print(f"jalign train: {e}", file=sys.stderr, flush=True)
        return loop.exit_code_for(e)
    print(f"done: {summary['run_dir']} (final step {summary['final_step']}"
          + (f", eval loss {summary['eval']['eval_loss']:.4f}" if summary["eval"] else "") + ")")
    return 0


def cmd_demo(args) -> int:
    from jalign.demo_convert import run_round_trip

    return run_round_trip(Path(args.out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jalign", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser("convert", help="convert between Hugging Face and jalign checkpoints")
    conv.add_argument("direction", choices=["hf-to-jalign", "jalign-to-hf"])
    conv.add_argument("src", help="source directory (or a hub id for hf-to-jalign)")
    conv.add_argument("dst", help="destination directory")
    conv.add_argument("--dtype", default=None,
                      help="parameter dtype to write (default: keep the source's)")
    conv.add_argument("--step", type=int, default=None,
                      help="checkpoint step (jalign-to-hf: default latest; hf-to-jalign: 0)")
    conv.add_argument("--mesh", default=None, help="DATA,FSDP,TENSOR mesh to load onto")
    conv.add_argument("--max-shard-size", default="2GiB", help="safetensors shard size")
    conv.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    conv.set_defaults(func=cmd_convert)

    tr = sub.add_parser("train", help="train from gin configs (resumes a run automatically)")
    tr.add_argument("configs", nargs="+", help="gin files, applied in order")
    tr.add_argument("--gin", action="append", default=[], metavar="BINDING",
                    help="extra gin binding, e.g. --gin 'TrainConfig.steps=100' (repeatable)")
    tr.set_defaults(func=cmd_train)

    demo = sub.add_parser("demo", help="the bundled end-to-end job (see README)")
    demo.add_argument("--out", default="runs/demo", help="output directory")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from jalign.checkpoint import CheckpointError
    from jalign.config import ConfigError
    from jalign.convert.safetensors_io import ConversionError
    from jalign.data.formats import DataError

    try:
        return args.func(args)
    except (ConversionError, CheckpointError, FileExistsError, ConfigError, DataError) as e:
        print(f"jalign {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
