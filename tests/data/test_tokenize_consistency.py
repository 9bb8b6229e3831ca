"""Pairs, prompts and SFT see the same tokens: a pair's prompt + response is exactly the
SFT encoding of that conversation, and the prompt generation starts from is the pair's
prompt. Checked on the bundled byte-level BPE and on SentencePiece (Mistral), with every
named template and a custom one whose prompt ends in a space, and on a real model's vocabulary
(SmolLM2's 49,152-token byte-level BPE, from its GGUF file) with its own chat template."""

import numpy as np
import pytest

from jalign.data.packing import pad_pair
from jalign.data.tokenize import (NAMED_TEMPLATES, ChatTokenizer, TokenizeConfig,
                                  load_tokenizer, tokenize_conversation, tokenize_preference)
from tests.data.tokenizers import sentencepiece_tokenizer
from tests.smollm import smollm_gguf

# A reply that follows "Assistant: ": SentencePiece merges that space into '▁It'.
CUSTOM = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}User: "
          "{{ m['content'] }}\n{% elif m['role'] == 'system' %}{{ m['content'] }}\n"
          "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}Assistant: {% endif %}")
TEMPLATES = sorted(NAMED_TEMPLATES) + [CUSTOM]

RECORDS = [
    {"prompt": [{"role": "user", "content": "Explain the sky."}],
     "chosen": [{"role": "assistant", "content": "It is blue because of Rayleigh scattering."}],
     "rejected": [{"role": "assistant", "content": "It is green."}]},
    {"prompt": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 3 + 4?"},
                {"role": "assistant", "content": "7"},
                {"role": "user", "content": "And 30 + 40?"}],
     "chosen": [{"role": "assistant", "content": "70"}],
     "rejected": [{"role": "assistant", "content": "Seventy-one"}]},
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return {"bundled_bpe": load_tokenizer(),
            "sentencepiece": sentencepiece_tokenizer(tmp_path_factory.mktemp("spm")),
            "smollm_gguf": load_tokenizer(f"gguf:{smollm_gguf()}")}


@pytest.mark.parametrize("template", TEMPLATES,
                         ids=[t if t in NAMED_TEMPLATES else "custom" for t in TEMPLATES])
@pytest.mark.parametrize("which", ["bundled_bpe", "sentencepiece", "smollm_gguf"])
def test_pair_tokens_are_the_sft_tokens(tokenizers, which, template):
    # A template ends its prompt on a token boundary only with the vocabulary it was written
    # for: on SmolLM2's vocabulary llama3's '<|end_header_id|>\n\n' is plain text, and
    # '\n\n70' merges the newlines into one token ('\n', '\n' when the prompt ends there).
    own = template in NAMED_TEMPLATES and (which != "smollm_gguf" or template == "chatml")
    _check_one_encoding(ChatTokenizer(tokenizers[which], template), own)


def test_pair_tokens_are_the_sft_tokens_with_smollms_own_template(tokenizers):
    """The template a GGUF file carries (chatml with a default system turn)."""
    chat = ChatTokenizer(tokenizers["smollm_gguf"])
    assert "<|im_start|>" in chat.template and len(chat.tokenizer) == 49152
    _check_one_encoding(chat, True)  # ends its prompt where chatml does


def _check_one_encoding(chat, ends_on_a_boundary: bool):
    cfg = TokenizeConfig(max_length=512)
    for record in RECORDS:
        pair = tokenize_preference(chat, record, cfg)
        for side in ("chosen", "rejected"):
            sft = tokenize_conversation(
                chat, {"messages": record["prompt"] + record[side]},
                TokenizeConfig(max_length=512, train_on="last_assistant"))
            trained = np.flatnonzero(sft["loss_mask"])
            n = trained[-1] + 1  # SFT's tokens up to its last target (what follows is not scored)
            got = np.concatenate([pair["prompt_ids"], pair[f"{side}_ids"]])
            np.testing.assert_array_equal(got, sft["input_ids"][:n], err_msg=side)
            # The pair's targets (as its row is built) are exactly SFT's.
            row = pad_pair(pair, 512, chat.pad_id)
            np.testing.assert_array_equal(row[f"{side}_loss_mask"][:n], sft["loss_mask"][:n],
                                          err_msg=side)
            assert not row[f"{side}_loss_mask"][n:].any()
        # Generation starts from the prompt tokens the pair (and SFT) have before a reply.
        # A named template on its own kind of vocabulary ends its prompt where no token
        # crosses into the reply; the custom one ends in a space, and the split then depends
        # on the reply's first character: generation uses a reply that starts with a word.
        gen = chat.encode_prompt(record["prompt"])
        for side in ("chosen", "rejected"):
            if ends_on_a_boundary or record[side][0]["content"][0].isalpha():
                side_prompt = np.concatenate([pair["prompt_ids"], pair[f"{side}_ids"][
                    :int(pair.get(f"{side}_context", 0))]])
                np.testing.assert_array_equal(gen, side_prompt, err_msg=side)


def test_sentencepiece_reply_does_not_start_with_a_word_boundary(tokenizers):
    """The evidence: chatml on SentencePiece, the response encoded alone starts '▁It'; in
    the conversation it is 'It' (no space precedes it)."""
    chat = ChatTokenizer(tokenizers["sentencepiece"], "chatml")
    pair = tokenize_preference(chat, RECORDS[0], TokenizeConfig(max_length=512))
    first = chat.tokenizer.convert_ids_to_tokens(int(pair["chosen_ids"][0]))
    alone = chat.tokenizer("It is blue", add_special_tokens=False)["input_ids"][0]
    assert first == "It" and chat.tokenizer.convert_ids_to_tokens(alone) == "▁It"


def test_custom_template_space_goes_to_the_reply(tokenizers):
    """'Assistant: ' + 'It': the space and 'It' are one SentencePiece token, so it belongs to
    the response (SFT trains it) and generation starts before the space."""
    chat = ChatTokenizer(tokenizers["sentencepiece"], CUSTOM)
    pair = tokenize_preference(chat, RECORDS[0], TokenizeConfig(max_length=512))
    tok = chat.tokenizer
    assert tok.convert_ids_to_tokens(int(pair["chosen_ids"][0])) == "▁It"
    assert not tok.decode(pair["prompt_ids"]).endswith(" ")
