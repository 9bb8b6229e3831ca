"""Loss masks, BOS handling and truncation, with the bundled tokenizer and a real
SentencePiece tokenizer."""


import numpy as np
import pytest

from jalign.data.tokenize import (ChatTokenizer, PromptTooLong, TokenizeConfig, load_tokenizer,
                                  tokenize_conversation, tokenize_preference, tokenize_prompt)
from tests.data.tokenizers import sentencepiece_tokenizer

TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And times 3?"},
    {"role": "assistant", "content": "It is 12."},
]


@pytest.fixture(scope="module")
def bundled():
    return ChatTokenizer(load_tokenizer())


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
    """Mistral's SentencePiece model (32k vocab) from the mistral-common package."""
    return ChatTokenizer(sentencepiece_tokenizer(tmp_path_factory.mktemp("spm")),
                         chat_template="llama2")


def _decode_masked(chat, ids, mask):
    """Decode each maximal run of trainable tokens separately."""
    runs, current = [], []
    for t, m in zip(ids, mask):
        if m:
            current.append(int(t))
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [chat.tokenizer.decode(r) for r in runs]


def test_masks_are_assistant_replies_plus_eos_bundled(bundled):
    ids, mask = bundled.encode_conversation(TWO_TURNS)
    assert _decode_masked(bundled, ids, mask) == ["4</s>", "It is 12.</s>"]
    ids, mask = bundled.encode_conversation(TWO_TURNS, "last_assistant")
    assert _decode_masked(bundled, ids, mask) == ["It is 12.</s>"]
    assert (ids == bundled.bos_id).sum() == 1 and ids[0] == bundled.bos_id


def test_masks_are_assistant_replies_plus_eos_sentencepiece(sentencepiece):
    ids, mask = sentencepiece.encode_conversation(TWO_TURNS)
    runs = _decode_masked(sentencepiece, ids, mask)
    assert [r.strip() for r in runs] == ["4</s>", "It is 12.</s>"]
    # Each run ends with the EOS token itself, not text that looks like it.
    ends = [i for i in range(len(ids) - 1) if mask[i] and not mask[i + 1]] + (
        [len(ids) - 1] if mask[-1] else [])
    assert all(ids[i] == sentencepiece.eos_id for i in ends)
    # The tokenizer adds BOS and the template writes one: BOS still appears once.
    assert ids[0] == sentencepiece.bos_id and (ids == sentencepiece.bos_id).sum() == 1


def test_first_token_is_never_a_target(bundled):
    ids, mask = bundled.encode_conversation(TWO_TURNS)
    assert mask[0] == 0


def test_truncation_cuts_prompt_left_and_response_right(bundled):
    long_user = {"role": "user", "content": "Please repeat: " + "abc " * 40}
    reply = {"role": "assistant", "content": "one two three four five six seven"}
    record = {"messages": [long_user, reply]}
    full = tokenize_conversation(bundled, record, TokenizeConfig(max_length=1000))
    n_prompt = int(np.flatnonzero(full["loss_mask"])[0])
    cfg = TokenizeConfig(max_length=30, max_prompt_length=20)
    out = tokenize_conversation(bundled, record, cfg)
    assert len(out["input_ids"]) == 30
    # Prompt: BOS kept, then the *last* 19 prompt tokens (token ids: integers, exact).
    assert out["input_ids"][0] == bundled.bos_id
    np.testing.assert_array_equal(out["input_ids"][1:20], full["input_ids"][n_prompt - 19:n_prompt])
    # Response: its *first* 10 tokens.
    np.testing.assert_array_equal(out["input_ids"][20:], full["input_ids"][n_prompt:n_prompt + 10])
    assert out["loss_mask"][:20].sum() == 0 and out["loss_mask"][20:].all()


def test_a_prompt_without_room_for_a_response_is_too_long_unless_truncated(bundled):
    record = {"messages": [{"role": "user", "content": "word " * 100},
                           {"role": "assistant", "content": "ok"}]}
    with pytest.raises(PromptTooLong, match=r"prompt too long \(\d+ tokens, over the 31 that "
                                            "max_length=32 allows"):
        tokenize_conversation(bundled, record, TokenizeConfig(max_length=32))
    # asked for: the prompt loses tokens from the left and the response is trained on
    out = tokenize_conversation(bundled, record, TokenizeConfig(max_length=32,
                                                                max_prompt_length=16))
    assert len(out["input_ids"]) <= 32 and out["loss_mask"].sum() > 0
    prompt = {"prompt": [{"role": "user", "content": "word " * 100}]}
    with pytest.raises(PromptTooLong):
        tokenize_prompt(bundled, prompt, TokenizeConfig(max_length=32))
    assert len(tokenize_prompt(bundled, prompt, TokenizeConfig(
        max_length=32, max_prompt_length=16))["prompt_ids"]) == 16


def test_preference_pair_shares_prompt_tokens(bundled):
    record = {"prompt": [{"role": "user", "content": "What is 3 + 4?"}],
              "chosen": [{"role": "assistant", "content": "7"}],
              "rejected": [{"role": "assistant", "content": "8"}]}
    out = tokenize_preference(bundled, record, TokenizeConfig(max_length=64))
    tok = bundled.tokenizer
    assert tok.decode(out["prompt_ids"]) == "<s><|user|>\nWhat is 3 + 4?<|end|>\n<|assistant|>\n"
    assert tok.decode(out["chosen_ids"]) == "7</s>"
    assert tok.decode(out["rejected_ids"]) == "8</s>"
    # Concatenated prompt + response tokens equal tokenizing the whole conversation (ids).
    ids, _ = bundled.encode_conversation(record["prompt"] + record["chosen"])
    np.testing.assert_array_equal(np.concatenate([out["prompt_ids"], out["chosen_ids"]]),
                                  ids[: len(out["prompt_ids"]) + len(out["chosen_ids"])])


def test_no_misleading_sequence_length_warning():
    """transformers warns when text is longer than the tokenizer's model_max_length; jalign
    truncates (or refuses) by DataConfig.max_length itself, so it must not appear."""
    import logging

    from transformers.utils import logging as hf_logging
    said = []
    catch = logging.Handler()
    catch.emit = lambda record: said.append(record.getMessage())
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # whatever an earlier test set
    logging.getLogger("transformers").addHandler(catch)
    try:
        tok = load_tokenizer()
        tok.model_max_length = 16
        ChatTokenizer(tok).encode_prompt([{"role": "user", "content": "word " * 100}])
        assert not any("Token indices sequence length" in m for m in said), said
        plain = load_tokenizer()
        plain.model_max_length = 16
        plain("word " * 100)  # without ChatTokenizer it does warn: the test can fail
        assert any("Token indices sequence length" in m for m in said), said
    finally:
        logging.getLogger("transformers").removeHandler(catch)
        hf_logging.set_verbosity(verbosity)
