"""Every `jalign ...` command the README shows runs, so the README cannot rot.

Commands are read from the README itself (code blocks, continuation lines joined, and
inline `jalign ...` commands in the prose), in order, in one working directory, so a
command may use what an earlier one made (runs/demo/... from `jalign demo`). Local
commands must succeed, with tiny overrides appended (fewer steps, smaller data); a command
that needs the network (a hub model or dataset) runs offline and must stop where it would
download, with a one-line error naming what it could not fetch. A command the README adds
is covered without editing this file.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

from jalign.cli import main
from tests.cli import run_jalign

README = Path(__file__).resolve().parents[2] / "README.md"
SUBCOMMANDS = ("train", "convert", "generate", "eval", "pairs", "demo", "plan")
# First path components that are local (the repository's folders, what commands write).
LOCAL_ROOTS = {"configs", "runs", "out", "ckpt", "tests", "launch", "jalign", "benchmarks"}

# Bindings that make any `jalign train` / `jalign demo` run take seconds (later bindings win).
TINY_TRAIN = ["TrainConfig.steps=2", "TrainConfig.save_every=2", "TrainConfig.eval_every=0",
              "TrainConfig.eval_batches=1", "TrainConfig.progress=False",
              "DataConfig.bundled_size=64", "eval/DataConfig.bundled_size=32",
              "DataConfig.batch_size=8", "eval/DataConfig.batch_size=8",
              "DataConfig.max_length=48", "DataConfig.max_prompt_length=32",
              "MeshConfig.fsdp=-1", "ModelInit.step=None"]  # a tiny run has no step 500
TINY_MODEL = ["LlamaConfig.hidden_size=64", "LlamaConfig.intermediate_size=128",
              "LlamaConfig.num_layers=1", "LlamaConfig.num_heads=4", "LlamaConfig.num_kv_heads=2"]
# A demo stage and the `jalign train` command of the same config (the README shows both
# for IFT, PPO and GRPO) then run the same shapes: the same compiled programs.
TINY_DEMO = TINY_TRAIN + TINY_MODEL
# Commands run as a user runs them, `jalign` in a subprocess on one device: the real
# 135M model's stage takes ~60 s there and ~85 s in this process's 8 simulated devices
# (tests/conftest.py), which split each of its steps 8 ways over 2 cores.
IN_SUBPROCESS = {"jalign demo --stages smollm2"}
TINY_ARGS = {"eval": ["--n", "16", "--max-batches", "1", "--batch-size", "8"],
             "pairs": ["--n", "16"], "generate": ["--max-new-tokens", "4"],
             "demo": ["--eval-n", "16"]}


SHELL_BLOCKS = ("", "bash", "sh", "shell", "console")


def _strip_comment(line: str) -> str:
    """Drop a trailing shell comment (a '#' outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands(text: str) -> list[str]:
    """The `jalign ...` commands of the README, in order of appearance."""
    commands = []
    # Every fenced block, with its info string, so that one in another language (a
    # ```python example) is skipped whole instead of pairing its closing fence with the
    # next block's opening one.
    fenced = re.findall(r"^```([\w+-]*)[ \t]*\n(.*?)^```", text, re.S | re.M)
    blocks = [body for lang, body in fenced if lang in SHELL_BLOCKS]
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            for part in _strip_comment(line).split("&&"):
                part = part.strip()
                m = re.match(r"(?:\S*/)?jalign\s+(\S+)", part)
                if m and m.group(1) in SUBCOMMANDS:
                    commands.append(re.sub(r"^\S*/jalign", "jalign", part))
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    for inline in re.findall(r"`(jalign [^`]+)`", prose):
        words = inline.split()
        if len(words) > 1 and words[1] in SUBCOMMANDS and "..." not in inline \
                and (len(words) > 2 or words[1] == "demo") \
                and " / " not in inline and "|" not in inline \
                and not re.search(r"[A-Z]{2,}", inline):  # not a list or a placeholder (RUN)
            commands.append(inline)
    return commands


def _hub_names(argv: list[str]) -> list[str]:
    """Hub ids (owner/name) a command would download."""
    names = []
    for arg in argv:
        value = arg.split("=", 1)[1].strip("'\"") if "=" in arg else arg
        value = value[3:] if value.startswith("hf:") else value
        m = re.fullmatch(r"([A-Za-z0-9][\w.-]*)/([A-Za-z0-9][\w.-]*)", value)
        if m and m.group(1) not in LOCAL_ROOTS and not m.group(2).endswith((".gin", ".jsonl", ".gguf")):
            names.append(value)
    return names


def _with_tiny_overrides(argv: list[str]) -> list[str]:
    sub = argv[0]
    extra = list(TINY_ARGS.get(sub, []))
    if sub == "train":
        bindings = TINY_TRAIN + (TINY_MODEL if not any("ModelInit.source" in a for a in argv)
                                 else [])
        extra += sum((["--gin", b] for b in bindings), [])
    if sub == "demo":
        # (the real-model stage: its 135M model on shorter rows, and its own batch of 4
        # rows, not TINY_DEMO's 8: half the 135M model's work)
        real = (["DataConfig.max_length=64", "DataConfig.max_prompt_length=None",
                 "DataConfig.batch_size=4", "eval/DataConfig.batch_size=4"]
                if "smollm2" in " ".join(argv) else [])
        extra += sum((["--gin", b] for b in TINY_DEMO + real), [])
    return argv + extra


COMMANDS = readme_commands(README.read_text())


def test_commands_after_a_block_in_another_language_are_found():
    text = ("Intro `jalign eval runs/x --task add`.\n\n```python\ndef f():\n    pass\n```\n\n"
            "Prose with `code`.\n\n```bash\njalign demo --stages sft,grpo\n"
            "jalign train a.gin \\\n  --gin 'X.y=1'  # a comment\n```\n")
    assert readme_commands(text) == ["jalign demo --stages sft,grpo",
                                      "jalign train a.gin  --gin 'X.y=1'",
                                      "jalign eval runs/x --task add"]


def test_readme_shows_the_commands_this_test_runs():
    """The parser finds the README's commands (a change that hid them would pass vacuously)."""
    assert COMMANDS[0] == "jalign demo"
    assert {shlex.split(c)[1] for c in COMMANDS} == set(SUBCOMMANDS)
    assert any(_hub_names(shlex.split(c)) for c in COMMANDS)  # the network ones are here too


def _demo_table(stdout: str) -> dict[str, dict]:
    """The rows of the table `jalign demo` prints at the end, by stage."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def _percent(text: str) -> float:
    return float(text.rstrip("%")) / 100


def check_demo_table(stdout: str, workdir: Path, eval_n: int) -> None:
    """The demo's table says what the runs hold: each number is recomputed from the saved
    checkpoints and metrics (the same greedy programs on the same parameters: equal)."""
    from jalign.sources import load_checkpoint as load_model
    from jalign.data.tokenize import ChatTokenizer, load_tokenizer
    from jalign.evaluate import task_accuracy

    rows = _demo_table(stdout)
    assert set(rows) == {"SFT", "RM", "DPO"}, rows
    chat = ChatTokenizer(load_tokenizer())
    runs = workdir / "runs" / "demo"

    def accuracy(run):
        return task_accuracy(load_model(runs / run)[1], chat, "add", n=eval_n)["accuracy"]

    assert _percent(rows["SFT"]["before"]) == 0.0  # a random model adds nothing up
    assert abs(_percent(rows["SFT"]["after"]) - accuracy("sft_add")) < 5e-4  # 0.1% printed
    # The DPO stage starts from the SFT model: its "before" is the SFT row's "after".
    assert rows["DPO"]["before"] == rows["SFT"]["after"]
    assert abs(_percent(rows["DPO"]["after"]) - accuracy("dpo_add")) < 5e-4
    records = [json.loads(line) for line in
               (runs / "rm_add" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_accuracy" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == max(r["step"] for r in records)
    assert abs(_percent(rows["RM"]["before"]) - evals[0]["eval_accuracy"]) < 5e-4
    assert abs(_percent(rows["RM"]["after"]) - evals[-1]["eval_accuracy"]) < 5e-4
    for row in rows.values():
        hf, *others = (Path(x.strip()) for x in row["exports"].split(","))
        assert (hf / "config.json").exists() and all(x.is_file() for x in others), row
    rm_config = json.loads((runs / "rm_add" / "hf" / "config.json").read_text())
    assert rm_config["architectures"] == ["LlamaForSequenceClassification"]


def check_real_model_run(run: Path) -> None:
    """The README's real-model stage (`jalign demo --stages smollm2`: LoRA SFT of SmolLM2
    from its GGUF) kept the model's own tokenizer and chat template, and its merged Hugging
    Face export (tokenizer included) gives transformers the logits jalign computes for the
    run. (tests/integration/test_smollm_lora.py checks the PEFT adapter of such a run.)"""
    import numpy as np
    import torch
    import transformers

    from jalign.data.tokenize import ChatTokenizer, load_tokenizer
    from jalign.models.build import forward
    from jalign.sources import load_checkpoint
    from tests.numerics import assert_f32_close, llama_logits_bound

    kept = load_tokenizer(str(run / "tokenizer"))
    assert len(kept) == 49152 and "<|im_start|>" in kept.chat_template
    chat = ChatTokenizer(kept)
    prompts = [[{"role": "user", "content": "What is 123 + 456?"}],
               [{"role": "user", "content": "What is the capital of France?"}]]
    exported = transformers.AutoTokenizer.from_pretrained(run / "hf")
    assert list(exported.apply_chat_template(prompts[0], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)) == \
        list(chat.encode_prompt(prompts[0]))
    rows = [chat.encode_prompt(p) for p in prompts]
    width = max(len(r) for r in rows)
    ids = np.stack([np.pad(r, (0, width - len(r)), constant_values=r[-1]) for r in rows])
    _, merged = load_checkpoint(run)
    hf = transformers.AutoModelForCausalLM.from_pretrained(run / "hf", dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    assert_f32_close(np.asarray(forward(merged, ids)), theirs,
                     **llama_logits_bound(merged, ids.shape[1]))


def _run(command: str, argv: list[str], capsys):
    """(exit code, captured output with .out and .err) of one command."""
    if command in IN_SUBPROCESS:
        r = run_jalign(*argv, cwd=Path.cwd())
        return r.returncode, SimpleNamespace(out=r.stdout, err=r.stderr)
    code = main(argv)
    return code, capsys.readouterr()


def test_every_readme_command_runs(tmp_path, monkeypatch, capsys):
    """One test, so the commands run in order in one directory (each may need what an
    earlier one made); every failure is collected and reported with its command."""
    monkeypatch.chdir(tmp_path)
    failures = []
    for i, command in enumerate(COMMANDS):
        argv = shlex.split(command)[1:]
        hub = _hub_names(argv)
        code, out = _run(command, _with_tiny_overrides(argv), capsys)
        if i == 0 and code == 0:  # the README's first command: the demo, from scratch
            check_demo_table(out.out, tmp_path, int(TINY_ARGS["demo"][1]))
        errors = [line for line in out.err.splitlines() if ": error: " in line]
        if hub:  # offline (HF_HUB_OFFLINE=1, conftest.py): stops at the download, says what
            if code != 2 or len(errors) != 1 or not any(name in errors[0] for name in hub):
                failures.append(f"{command}\n  expected one error naming {hub}, got exit "
                                f"{code}: {out.err[-1500:]}")
        elif code != 0:
            failures.append(f"{command}\n  exit {code}: {out.err[-1500:]}")
        if command == "jalign demo --stages smollm2" and code == 0:
            check_real_model_run(tmp_path / "runs" / "demo" / "smollm2_add")
    assert not failures, "\n\n".join(failures)
