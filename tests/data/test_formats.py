"""Adapters on the committed sample files, and bad records under both policies."""

import json
from pathlib import Path

import pytest

from jalign.data import formats
from jalign.data.formats import BadRecord, DataError
from jalign.data.pipeline import DataConfig, build_iterator, skipped_summary, tokenize_records
from jalign.data.tokenize import ChatTokenizer, load_tokenizer

SAMPLES = Path(__file__).resolve().parents[2] / "jalign" / "assets" / "samples"


def _adapt(fmt, path, columns=None):
    _, fn = formats.adapter(fmt)
    return [fn(r, columns or {}) for r in formats.read_records(str(SAMPLES / path))]


def test_messages_adapter_keeps_system_and_turns():
    recs = _adapt("messages", "messages.jsonl")
    assert recs[0]["messages"][0] == {"role": "system",
                                      "content": "You are a terse assistant. Answer in one sentence."}
    assert [m["role"] for m in recs[1]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert recs[1]["messages"][3]["content"] == "Then try Sir Reginald Fluffington."


def test_alpaca_adapter_joins_instruction_and_input():
    raw = json.loads((SAMPLES / "alpaca.json").read_text())
    recs = _adapt("alpaca", "alpaca.json")
    for r, out in zip(raw, recs):
        user, assistant = out["messages"]
        expected = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
        assert user == {"role": "user", "content": expected}
        assert assistant == {"role": "assistant", "content": r["output"]}
    assert any(not r["input"] for r in raw) and any(r["input"] for r in raw)


def test_hh_rlhf_adapter_splits_shared_prompt_and_final_responses():
    recs = _adapt("hh_rlhf", "hh_rlhf.jsonl")
    assert recs[0]["prompt"] == [{"role": "user",
                                  "content": "How long should I boil an egg for a runny yolk?"}]
    assert recs[0]["chosen"] == [{"role": "assistant", "content":
                                  "About six minutes in already boiling water, then cool it "
                                  "under cold water."}]
    assert recs[0]["rejected"] == [{"role": "assistant",
                                    "content": "Eggs are a good source of protein."}]
    two_turn = recs[1]
    assert [m["role"] for m in two_turn["prompt"]] == ["user", "assistant", "user"]
    assert two_turn["prompt"][1]["content"] == "Canberra."
    assert two_turn["chosen"][0]["content"].startswith("No, Sydney")
    assert two_turn["rejected"][0]["content"] == "Yes, it is the largest city in Australia."


def test_preference_adapter_handles_strings_and_full_conversations():
    recs = _adapt("preference", "preference.jsonl")
    # UltraFeedback style: chosen/rejected repeat the user turn; it is stripped.
    assert recs[0] == {"prompt": [{"role": "user", "content": "What is 15% of 80?"}],
                       "chosen": [{"role": "assistant", "content": "15% of 80 is 12."}],
                       "rejected": [{"role": "assistant", "content": "15% of 80 is 15."}]}
    assert recs[2] == {"prompt": [{"role": "user", "content": "Name a mammal that can fly."}],
                       "chosen": [{"role": "assistant", "content": "A bat."}],
                       "rejected": [{"role": "assistant", "content": "A penguin."}]}


def test_prompt_adapter_and_column_mapping():
    recs = _adapt("prompt", "prompts.jsonl")
    assert all(r["prompt"][-1]["role"] == "user" for r in recs)
    mapped = formats.ADAPTERS["alpaca"][1](
        {"question": "Add 2 and 3.", "answer_text": "5"},
        {"instruction": "question", "output": "answer_text"})
    assert mapped["messages"][1]["content"] == "5"


# ------------------------------------------------------------------ bad records

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
BAD_CASES = {
    "missing field": ({"conversation": GOOD["messages"]}, "missing field 'messages'"),
    "empty conversation": ({"messages": []}, "messages is an empty conversation"),
    "wrong role order": ({"messages": [{"role": "assistant", "content": "x"},
                                       {"role": "user", "content": "y"}]},
                         "wrong role order: messages\\[0\\] is 'assistant'"),
    "non-string content": ({"messages": [{"role": "user", "content": ["a", "b"]},
                                         {"role": "assistant", "content": "y"}]},
                           "messages\\[0\\].content is a list, not a string"),
}


@pytest.fixture(scope="module")
def chat():
    return ChatTokenizer(load_tokenizer())


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_error_names_index_and_problem(chat, case):
    bad, message = BAD_CASES[case]
    records = [GOOD, GOOD, bad, GOOD]
    with pytest.raises(DataError, match=f"^mem: record 3: {message}"):  # 1-based
        tokenize_records(records, DataConfig(path="mem", on_bad_record="error"), chat)


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_skip_drops_and_counts(chat, case):
    bad, message = BAD_CASES[case]
    records = [GOOD, bad, GOOD, bad]
    examples, stats = tokenize_records(records, DataConfig(path="mem", on_bad_record="skip"), chat)
    assert len(examples) == 2 and stats["skipped_bad_record"] == 2
    assert [e["record_index"] for e in examples] == [0, 2]
    assert stats["skipped_examples"][0].startswith("mem: record 2: ")
    assert sum(stats["skipped_reasons"].values()) == 2


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_missing_chat_template_is_a_clear_error(policy):
    tok = load_tokenizer()
    tok.chat_template = None
    # A template is needed for every record, so skipping cannot help: both policies stop.
    with pytest.raises(DataError, match="no chat_template and none is configured"):
        build_iterator(DataConfig(path=str(SAMPLES / "messages.jsonl"), on_bad_record=policy),
                       chat=ChatTokenizer(tok))


def test_all_records_bad_is_an_error(chat):
    with pytest.raises(DataError, match="no usable examples out of 2 records"):
        tokenize_records([{"x": 1}, {"y": 2}], DataConfig(path="mem", on_bad_record="skip"), chat)


def _bad_file(tmp_path):
    """A jsonl with a good record, a broken line, a non-UTF-8 line, a record the adapter
    refuses (an unknown role), a prompt too long for the row and a blank line."""
    path = tmp_path / "bad.jsonl"
    long = {"messages": [{"role": "user", "content": "word " * 600},
                         {"role": "assistant", "content": "ok"}]}
    bot = {"messages": [{"role": "bot", "content": "hi"}]}
    path.write_bytes((json.dumps(GOOD) + "\n{not json\n").encode() + b'{"x": "\xff"}\n'
                     + (json.dumps(bot) + "\n" + json.dumps(long) + "\n\n"
                        + json.dumps(GOOD) + "\n").encode())
    return path


@pytest.mark.parametrize("bad,reason", [
    (b"{not json", "invalid JSON"), (b'{"x": "\xff"}', "not UTF-8 (byte 0xff at column 8)"),
    (json.dumps({"messages": [{"role": "bot", "content": "hi"}]}).encode(), "role"),
    (json.dumps({"messages": [{"role": "user", "content": "word " * 600},
                              {"role": "assistant", "content": "ok"}]}).encode(),
     "prompt too long")])
def test_error_names_the_bad_line_of_a_jsonl_1_based(tmp_path, bad, reason):
    """Under 'error' a bad line stops at start, named file:line, whatever kind of bad."""
    path = tmp_path / "one_bad.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\n" + bad + b"\n")
    with pytest.raises(DataError) as e:
        build_iterator(DataConfig(path=str(path), max_length=64, batch_size=1))
    assert str(e.value).startswith(f"{path}:3: ") and reason in str(e.value), str(e.value)


def test_skip_drops_every_bad_line_and_counts_it_by_reason(tmp_path):
    it = build_iterator(DataConfig(path=str(_bad_file(tmp_path)), max_length=64, batch_size=1,
                                   on_bad_record="skip"))
    stats = it.stats
    assert stats["examples"] == 2 and stats["records"] == 6
    assert stats["skipped_reasons"] == {"invalid JSON": 1, "not UTF-8": 1,
                                        "prompt too long": 1,
                                        **{k: 1 for k in stats["skipped_reasons"]
                                           if "role" in k}}
    assert len(stats["skipped_reasons"]) == 4
    line = skipped_summary(stats)
    assert line.startswith("skipped 4 of 6 records: ") and ":2: invalid JSON" in line


def test_a_prompt_too_long_stops_under_error_too(tmp_path):
    path = tmp_path / "long.jsonl"
    long = {"messages": [{"role": "user", "content": "word " * 600},
                         {"role": "assistant", "content": "ok"}]}
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(long) + "\n")
    with pytest.raises(DataError, match=f"^{path}:2: prompt too long"):
        build_iterator(DataConfig(path=str(path), max_length=64, batch_size=1))
    it = build_iterator(DataConfig(path=str(path), max_length=64, batch_size=1,
                                   max_prompt_length=32))  # truncation asked for: kept
    assert it.stats["examples"] == 2


def test_local_parquet_and_save_to_disk(tmp_path):
    import datasets
    ds = datasets.Dataset.from_list([{"instruction": "Say hi.", "input": "", "output": "hi"}] * 3)
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "a.parquet", tmp_path / "saved"):
        records = list(formats.read_records(str(path)))
        assert len(records) == 3
        assert formats.ADAPTERS["alpaca"][1](records[0], {})["messages"][1]["content"] == "hi"


def test_hh_rlhf_mismatched_prefix_is_bad():
    with pytest.raises(BadRecord, match="differ before their final"):
        formats.hh_rlhf_adapter({"chosen": "\n\nHuman: a\n\nAssistant: b",
                                 "rejected": "\n\nHuman: c\n\nAssistant: d"}, {})


def test_a_file_without_splits_is_read_whole_for_any_split(tmp_path):
    """A held-out file given as the eval data is the eval data: its split ('test' in the
    algo configs, 'eval' in `jalign eval`) does not matter; a file with splits gives the
    one named, and a split it lacks is an error naming it."""
    whole = list(formats.read_records(str(SAMPLES / "messages.jsonl")))
    for split in ("train", "test", "eval"):
        assert list(formats.read_records(str(SAMPLES / "messages.jsonl"), split=split)) == whole
    (tmp_path / "list.json").write_text(json.dumps(whole))
    assert formats.read_records(str(tmp_path / "list.json"), split="test") == whole
    (tmp_path / "splits.json").write_text(json.dumps({"train": whole[:1], "test": whole[1:]}))
    assert formats.read_records(str(tmp_path / "splits.json"), split="test") == whole[1:]
    with pytest.raises(formats.FieldError, match="split='eval'.*has no such key"):
        formats.read_records(str(tmp_path / "splits.json"), split="eval")
    assert formats.is_unsplit_file(str(SAMPLES / "messages.jsonl"))
    assert formats.is_unsplit_file(str(tmp_path / "list.json"))
    assert not formats.is_unsplit_file(str(tmp_path / "splits.json"))


def test_a_run_says_what_it_skipped_at_start(tmp_path):
    """open_run's report: one line per split, by reason (every process's counts), and the
    counts for the checkpoints' metadata."""
    from jalign.train.run import report_skipped
    it = build_iterator(DataConfig(path=str(_bad_file(tmp_path)), max_length=64, batch_size=1,
                                   on_bad_record="skip"))
    said = []
    recorded = report_skipped(it, None, said.append)
    assert len(said) == 1 and said[0].startswith("DataConfig: skipped 4 of 6 records: ")
    assert sum(recorded["DataConfig"].values()) == 4
    clean = build_iterator(DataConfig(path="bundled:add", bundled_size=8, batch_size=1))
    assert report_skipped(clean, None, said.append) == {} and len(said) == 1
