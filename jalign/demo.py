"""The bundled default job: SFT, then a reward model and DPO, on 3-digit addition.

Stage ``sft`` trains ``configs/demo/sft_add.gin`` from scratch (CPU, minutes) and
measures held-out exact-match accuracy before and after; ``rm`` trains a reward model
from the SFT model (``configs/demo/rm_add.gin``, held-out pairwise accuracy); ``dpo``
runs DPO from the SFT model (``configs/demo/dpo_add.gin``, exact-match accuracy). Each
stage's result is exported as a Hugging Face checkpoint. Running it again resumes (or,
when finished, just re-evaluates) the same runs; ``--fresh`` starts over.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from flax import nnx

DEMO_CONFIGS = {"sft": "configs/demo/sft_add.gin", "rm": "configs/demo/rm_add.gin",
                "dpo": "configs/demo/dpo_add.gin"}
DEMO_CONFIG = DEMO_CONFIGS["sft"]
STAGES = tuple(DEMO_CONFIGS)


def _accuracy(model, exp, eval_n, show=0):
    from jalign.data.tokenize import ChatTokenizer, load_tokenizer
    from jalign.evaluate import task_accuracy

    chat = ChatTokenizer(load_tokenizer(exp.data.tokenizer), exp.data.chat_template)
    return task_accuracy(model, chat, exp.data.path.split(":", 1)[1], n=eval_n, show=show)


def _train_stage(stage, bindings, fresh):
    """(experiment, run summary, trained model, seconds) of one stage."""
    from jalign.checkpoint import resolve_run_dir
    from jalign.train.experiment import load_experiment, run

    exp = load_experiment([DEMO_CONFIGS[stage]], bindings)
    run_dir = resolve_run_dir(exp.train.output_root, exp.train.run_name)
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    print(f"\n== demo stage {stage}: {exp.algorithm.name}, {exp.train.steps} steps, batch "
          f"{exp.data.batch_size} x {exp.data.max_length} tokens, from {exp.model_init.source}; "
          f"run dir {run_dir}", flush=True)
    t = time.time()
    summary = run(exp)
    model = nnx.merge(summary["graphdef"], summary["state"].params)
    return exp, summary, model, time.time() - t


def _export(summary, model) -> Path:
    from jalign.convert.hf import save_hf
    hf_dir = Path(summary["run_dir"]) / "hf"
    save_hf(summary["model_config"], model, hf_dir, overwrite=True)
    return hf_dir


def run_demo(bindings=(), fresh: bool = False, eval_n: int = 512,
             stages=STAGES) -> int:
    """``bindings`` (gin) apply to every stage's config."""
    from jalign.sharding import make_mesh
    from jalign.train.experiment import load_experiment
    from jalign.train.setup import load_initial_model

    from jalign.checkpoint import resolve_run_dir

    unknown = set(stages) - set(STAGES)
    if unknown:
        raise SystemExit(f"jalign demo: unknown stages {sorted(unknown)}; known: {', '.join(STAGES)}")
    if any(b.replace(" ", "").startswith(("TrainConfig.run_name=", "ModelInit.source="))
           for b in bindings):
        raise SystemExit("jalign demo: each stage has its own run_name and model source; "
                         "bind them with `jalign train configs/demo/<stage>.gin` instead")
    t0 = time.time()
    sft_exp = load_experiment([DEMO_CONFIG], bindings)
    # The later stages start from the SFT run wherever bindings (output_root) put it.
    from_sft = (f"ModelInit.source='jalign:"
                f"{resolve_run_dir(sft_exp.train.output_root, sft_exp.train.run_name)}'",)
    rows = []
    if "sft" in stages:
        exp = load_experiment([DEMO_CONFIG], bindings)
        print(f"jalign demo: SFT of a {exp.model.num_params() / 1e6:.1f}M-parameter Llama from "
              f"scratch on bundled '{exp.data.path}' (packing={exp.data.packing})", flush=True)
        _, initial = load_initial_model(exp.model_init, exp.model, make_mesh(exp.mesh))
        before = _accuracy(initial, exp, eval_n)
        del initial
        print(f"accuracy before training: {before['accuracy']:.1%}", flush=True)
        exp, summary, model, secs = _train_stage("sft", bindings, fresh)
        after = _accuracy(model, exp, eval_n, show=5)
        print("\nsample answers (held-out):")
        for prompt, answer, ok in after["samples"]:
            print(f"  {prompt!r:>28} -> {answer!r:<8} {'correct' if ok else 'WRONG'}")
        ev = summary["eval"] or {}
        rows += [("SFT: exact-match accuracy before", f"{before['accuracy']:.1%}"),
                 ("SFT: exact-match accuracy after",
                  f"{after['accuracy']:.1%} ({after['correct']}/{after['total']})"),
                 ("SFT: eval loss (nats/target token)", f"{ev.get('eval_loss', float('nan')):.4f}"),
                 ("SFT: training wall time", f"{secs:.0f} s (steps {summary['start_step']}->"
                                             f"{summary['final_step']})"),
                 ("SFT: Hugging Face export", str(_export(summary, model)))]
        sft_accuracy = after["accuracy"]
    else:
        sft_accuracy = None
    if "rm" in stages:
        exp, summary, model, secs = _train_stage("rm", tuple(bindings) + from_sft, fresh)
        ev = summary["eval"] or {}
        rows += [("RM: held-out pairwise accuracy",
                  f"{ev.get('eval_accuracy', float('nan')):.1%} (chosen reward > rejected)"),
                 ("RM: training wall time", f"{secs:.0f} s"),
                 ("RM: Hugging Face export (LlamaForSequenceClassification)",
                  str(_export(summary, model)))]
    if "dpo" in stages:
        exp, summary, model, secs = _train_stage("dpo", tuple(bindings) + from_sft, fresh)
        after = _accuracy(model, exp, eval_n)
        start = f" (SFT {sft_accuracy:.1%})" if sft_accuracy is not None else ""
        ev = summary["eval"] or {}
        rows += [("DPO: exact-match accuracy after",
                  f"{after['accuracy']:.1%} ({after['correct']}/{after['total']}){start}"),
                 ("DPO: held-out reward accuracy",
                  f"{ev.get('eval_rewards/accuracy', float('nan')):.1%}"),
                 ("DPO: training wall time", f"{secs:.0f} s"),
                 ("DPO: Hugging Face export", str(_export(summary, model)))]
    rows.append(("total wall time", f"{time.time() - t0:.0f} s"))
    print("\n| metric | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0
