"""The bundled defaults: the committed tokenizer, the synthetic tasks and the sample files."""

import json
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import jalign
from jalign.data import build_tokenizer, tasks

ASSETS = Path(jalign.__file__).resolve().parent / "assets"
TOK_DIR = ASSETS / "tokenizer"
SAMPLES = ASSETS / "samples"

SPECIAL_IDS = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3,
               "<|system|>": 4, "<|user|>": 5, "<|assistant|>": 6, "<|end|>": 7}
TWO_TURNS = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
             {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(TOK_DIR), local_files_only=True)


# ------------------------------------------------------------------ tokenizer

def test_tokenizer_loads_offline_with_vocab_512(tok):
    from jalign.models.config import preset
    small = preset("small")
    assert len(tok) == 512 == small.vocab_size
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (
        small.pad_token_id, small.bos_token_id, small.eos_token_id)
    assert max(tok.get_vocab().values()) == 511


def test_special_token_ids(tok):
    assert {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_IDS} == SPECIAL_IDS
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    # Role markers are matched as one token even inside text.
    assert tok.encode("x<|user|>y<|end|>", add_special_tokens=False)[1::2] == [5, 7]


def test_digits_one_per_token(tok):
    for text in ["9876543210", "What is 482 + 39?", "x100y", " 2024 "]:
        pieces = tok.convert_ids_to_tokens(tok.encode(text))
        digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
        assert all(len(p) == 1 for p in digit_pieces), pieces
        assert "".join(digit_pieces) == re.sub(r"\D", "", text)


@pytest.mark.parametrize("text", [
    "plain ascii", "héllo wörld", "日本語のテキスト", "emoji 🙂👍🏽 mix", "e\u0301 (not NFC)",
    "  leading and trailing  ", "tabs\tand\nnewlines\r\n", "\x00\x07 control", "ﬁ ligature ²³ ١٢٣",
    "Ελληνικά и русский", "</s> looks special", "",
])
def test_byte_level_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_plain_encode_adds_no_bos_eos(tok):
    for ids in (tok.encode("hello world"), tok("hello world")["input_ids"],
                tok("hello world", add_special_tokens=True)["input_ids"]):
        assert ids and ids[0] != tok.bos_token_id and ids[-1] != tok.eos_token_id
        assert tok.decode(ids) == "hello world"


def test_chat_template_exact_two_turns(tok):
    text = tok.apply_chat_template(TWO_TURNS, tokenize=False)
    assert text == ("<s><|user|>\nQ1<|end|>\n<|assistant|>\nA1</s>\n"
                    "<|user|>\nQ2<|end|>\n<|assistant|>\nA2</s>\n")
    system = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert tok.apply_chat_template(system, tokenize=False, add_generation_prompt=True) == \
        "<s><|system|>\nS<|end|>\n<|user|>\nQ<|end|>\n<|assistant|>\n"
    ids = tok.apply_chat_template(TWO_TURNS, tokenize=True, return_dict=False)
    assert ids[:3] == [1, 5, tok.encode("\n")[0]] and ids.count(1) == 1 and ids.count(2) == 2


def _conversations():
    convs = [TWO_TURNS]
    for line in (SAMPLES / "messages.jsonl").read_text(encoding="utf-8").splitlines():
        convs.append(json.loads(line)["messages"])
    return convs


def test_chat_template_prefix_property(tok):
    for msgs in _conversations():
        full = tok.apply_chat_template(msgs, tokenize=False)
        for i in range(len(msgs)):
            upto = tok.apply_chat_template(msgs[:i + 1], tokenize=False)
            assert full.startswith(upto)
            if msgs[i]["role"] == "assistant":
                prompt = tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
                assert prompt.endswith("<|assistant|>\n") and upto.startswith(prompt)
                # And the token ids of the prompt are a prefix of the ids of the longer chat.
                assert tok.encode(upto)[:len(tok.encode(prompt))] == tok.encode(prompt)


def test_rebuild_is_identical(tmp_path):
    build_tokenizer.build(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (TOK_DIR / name).read_bytes(), \
            f"{name} differs: rerun python -m jalign.data.build_tokenizer and commit"


# ------------------------------------------------------------------ tasks

def _oracle(task, prompt):
    """An independent answer for the default tasks, from the prompt text."""
    if task == "reverse":
        return re.search(r'"(.*)"', prompt).group(1)[::-1]
    a, b = map(int, re.findall(r"\d+", prompt))
    return str(a + b if task == "add" else a * b)


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_shapes_and_answers(task):
    sft = tasks.sft_records(task, 20, seed=3)
    pref = tasks.preference_records(task, 20, seed=3)
    prm = tasks.prompt_records(task, 20, seed=3)
    for recs in (sft, pref, prm):
        assert len(recs) == 20 and json.loads(json.dumps(recs)) == recs
    for s, p, q in zip(sft, pref, prm):
        assert list(s) == ["messages"] and [m["role"] for m in s["messages"]] == ["user", "assistant"]
        assert set(p) == {"prompt", "chosen", "rejected"} and set(q) == {"prompt", "answer"}
        user = s["messages"][0]
        assert p["prompt"] == q["prompt"] == [user]  # same seed -> same problems
        assert [m["role"] for m in p["chosen"] + p["rejected"]] == ["assistant", "assistant"]
        right = _oracle(task, user["content"])
        assert s["messages"][1]["content"] == p["chosen"][0]["content"] == q["answer"] == right
        assert all(set(m) == {"role", "content"} and isinstance(m["content"], str)
                   for m in s["messages"] + p["chosen"] + p["rejected"])


def test_default_problem_sizes():
    for r in tasks.prompt_records("add", 200, seed=0):
        assert all(1 <= len(x) <= 3 for x in re.findall(r"\d+", r["prompt"][0]["content"]))
    for r in tasks.prompt_records("mul", 200, seed=0):
        a, b = re.findall(r"\d+", r["prompt"][0]["content"])
        assert len(a) == 2 and len(b) == 1
    wide = tasks.prompt_records(tasks.AddTask(max_digits=6), 200, seed=0)
    assert max(len(x) for r in wide for x in re.findall(r"\d+", r["prompt"][0]["content"])) > 3
    assert all(tasks.check(tasks.AddTask(max_digits=6), r, r["answer"]) for r in wide)


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_deterministic_by_seed(task):
    for fn in (tasks.sft_records, tasks.preference_records, tasks.prompt_records):
        assert fn(task, 30, seed=7) == fn(task, 30, seed=7)
        assert fn(task, 30, seed=7) != fn(task, 30, seed=8)
        assert fn(task, 30, seed=7, split="eval") == fn(task, 30, seed=7, split="eval")
        assert fn(task, 10, seed=7) == fn(task, 30, seed=7)[:10]


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_check_accepts_right_and_rejects_wrong(task):
    for rec in tasks.preference_records(task, 100, seed=1):
        right, wrong = rec["chosen"][0]["content"], rec["rejected"][0]["content"]
        assert wrong != right and wrong and not any(c.isspace() for c in wrong)
        if task != "reverse":
            assert wrong.isdigit() and (wrong == "0" or wrong[0] != "0")  # still looks like a number
        for ok in (right, f"  {right} ", f"{right}</s>", f"{right}\nmore text", f"\n{right}</s>\n"):
            assert tasks.check(task, rec, ok), ok
        for bad in (wrong, f"{wrong}</s>", "", right + "1", "x" + right):
            assert not tasks.check(task, rec, bad), bad
        # Any form of the prompt works: record, message list, plain text.
        assert tasks.check(task, rec["prompt"], right) and tasks.check(task, rec["prompt"][0]["content"], right)


def test_check_recomputes_from_prompt_not_stored_answer():
    rec = tasks.prompt_records("add", 1, seed=0)[0]
    right = rec["answer"]
    forged = dict(rec, answer="12345")
    assert tasks.check("add", forged, right) and not tasks.check("add", forged, "12345")
    assert tasks.check("add", "What is 482 + 39?", "521") and not tasks.check("add", "What is 482 + 39?", "511")
    assert tasks.check("mul", "What is 47 times 6?", "282</s>")
    assert tasks.check("reverse", 'Reverse the string "ab1c".', "c1ba")
    sft = tasks.sft_records("reverse", 1, seed=0)[0]
    assert tasks.check("reverse", sft, sft["messages"][1]["content"])
    with pytest.raises(ValueError):
        tasks.check("add", "no numbers here", "1")


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_train_and_eval_never_share_a_problem(task):
    t = tasks.get_task(task)

    def keys(split, seeds):
        return {t.key(t.parse(r["prompt"][0]["content"]))
                for s in seeds for r in tasks.prompt_records(task, 300, seed=s, split=split)}

    train, evals = keys("train", range(3)), keys("eval", range(100, 103))
    assert train and evals and not train & evals
    assert {tasks.split_of(k) for k in train} == {"train"} and {tasks.split_of(k) for k in evals} == {"eval"}


def test_commuted_problem_stays_in_its_split():
    t = tasks.TASKS["add"]
    assert t.key((482, 39)) == t.key((39, 482))
    assert tasks.TASKS["mul"].key((47, 6)) == tasks.TASKS["mul"].key((6, 47))


def test_bad_arguments():
    with pytest.raises(ValueError):
        tasks.sft_records("add", 1, seed=0, split="test")
    with pytest.raises(ValueError):
        tasks.prompt_records("nope", 1, seed=0)
    assert tasks.sft_records("add", 0, seed=0) == []


# ------------------------------------------------------------------ sample files

def _jsonl(name):
    return [json.loads(l) for l in (SAMPLES / name).read_text(encoding="utf-8").splitlines() if l.strip()]


def test_sample_files():
    assert (SAMPLES / "README.md").is_file()
    msgs = _jsonl("messages.jsonl")
    assert any(m[0]["role"] == "system" for m in (r["messages"] for r in msgs))
    assert any([m["role"] for m in r["messages"]].count("assistant") == 2 for r in msgs)
    alpaca = json.loads((SAMPLES / "alpaca.json").read_text(encoding="utf-8"))
    assert all(set(r) == {"instruction", "input", "output"} for r in alpaca)
    assert any(r["input"] == "" for r in alpaca)
    hh = _jsonl("hh_rlhf.jsonl")
    assert any(r["chosen"].count("\n\nHuman:") == 2 for r in hh)
    for r in hh:  # same transcript up to the final assistant reply
        cut = r["chosen"].rindex("\n\nAssistant:") + len("\n\nAssistant:")
        assert r["rejected"][:cut] == r["chosen"][:cut] and r["rejected"] != r["chosen"]
    pref = _jsonl("preference.jsonl")
    assert {type(r["chosen"]) for r in pref} == {list, str}
    for r in pref:
        if isinstance(r["chosen"], list):
            for side in (r["chosen"], r["rejected"]):
                assert side[0] == {"role": "user", "content": r["prompt"]} and side[-1]["role"] == "assistant"
    assert all(set(r) == {"prompt"} and isinstance(r["prompt"], str) for r in _jsonl("prompts.jsonl"))
    for n in (len(msgs), len(alpaca), len(hh), len(pref), len(_jsonl("prompts.jsonl"))):
        assert 3 <= n <= 5
