"""Adapters on the committed sample files, and bad records under both policies."""

import json
from pathlib import Path

import pytest

from jalign.data import formats
from jalign.data.formats import BadRecord, DataError
from jalign.data.pipeline import DataConfig, build_iterator, tokenize_records
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
    with pytest.raises(DataError, match=f"record 2: {message}"):
        tokenize_records(records, DataConfig(path="mem", on_bad_record="error"), chat)


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_skip_drops_and_counts(chat, case):
    bad, message = BAD_CASES[case]
    records = [GOOD, bad, GOOD, bad]
    examples, stats = tokenize_records(records, DataConfig(path="mem", on_bad_record="skip"), chat)
    assert len(examples) == 2 and stats["skipped_bad_record"] == 2
    assert [e["record_index"] for e in examples] == [0, 2]
    assert stats["skipped_examples"][0].startswith("record 1: ")


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


def test_broken_jsonl_line_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(DataError, match="broken.jsonl:2: invalid JSON"):
        formats.read_records(str(path))


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
