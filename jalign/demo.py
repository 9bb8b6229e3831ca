"""The bundled default job: SFT from scratch on 3-digit addition, measured before and after.

Trains the gin experiment ``configs/demo/sft_add.gin`` (CPU, minutes), prints exact-match
accuracy on held-out problems before and after, and exports the result as a Hugging Face
checkpoint. Running it again resumes (or, when finished, just re-evaluates) the same run;
``--fresh`` starts over.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from flax import nnx

DEMO_CONFIG = "configs/demo/sft_add.gin"


def run_demo(bindings=(), fresh: bool = False, eval_n: int = 512) -> int:
    from jalign.checkpoint import resolve_run_dir
    from jalign.convert.hf import save_hf
    from jalign.data.tokenize import ChatTokenizer, load_tokenizer
    from jalign.evaluate import task_accuracy
    from jalign.sharding import make_mesh
    from jalign.train.experiment import load_experiment, run
    from jalign.train.setup import load_initial_model

    t0 = time.time()
    exp = load_experiment([DEMO_CONFIG], bindings)
    run_dir = resolve_run_dir(exp.train.output_root, exp.train.run_name)
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    task = exp.data.path.split(":", 1)[1]
    chat = ChatTokenizer(load_tokenizer(exp.data.tokenizer), exp.data.chat_template)
    print(f"jalign demo: SFT of a {exp.model.num_params() / 1e6:.1f}M-parameter Llama from scratch "
          f"on bundled '{task}' ({exp.train.steps} steps, batch {exp.data.batch_size} x "
          f"{exp.data.max_length} tokens, packing={exp.data.packing}); run dir {run_dir}", flush=True)

    _, initial = load_initial_model(exp.model_init, exp.model, make_mesh(exp.mesh))
    before = task_accuracy(initial, chat, task, n=eval_n)
    del initial
    print(f"accuracy before training: {before['accuracy']:.1%} ({before['correct']}/{before['total']})",
          flush=True)

    t_train = time.time()
    summary = run(exp)
    t_train = time.time() - t_train
    model = nnx.merge(summary["graphdef"], summary["state"].params)
    after = task_accuracy(model, chat, task, n=eval_n, show=5)
    hf_dir = Path(summary["run_dir"]) / "hf"
    save_hf(summary["model_config"], model, hf_dir, overwrite=True)

    print("\nsample answers (held-out):")
    for prompt, answer, ok in after["samples"]:
        print(f"  {prompt!r:>28} -> {answer!r:<8} {'correct' if ok else 'WRONG'}")
    ev = summary["eval"] or {}
    print(f"\n| metric | value |\n|---|---|\n"
          f"| exact-match accuracy before | {before['accuracy']:.1%} |\n"
          f"| exact-match accuracy after | {after['accuracy']:.1%} ({after['correct']}/{after['total']}) |\n"
          f"| eval loss (nats/target token) | {ev.get('eval_loss', float('nan')):.4f} |\n"
          f"| training wall time | {t_train:.0f} s (steps {summary['start_step']}->{summary['final_step']}) |\n"
          f"| total wall time | {time.time() - t0:.0f} s |\n"
          f"| Hugging Face export | {hf_dir} |")
    return 0
