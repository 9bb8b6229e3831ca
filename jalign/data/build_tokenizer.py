"""Build the bundled tokenizer in jalign/assets/tokenizer/ (run: python -m jalign.data.build_tokenizer).

A 512-token byte-level BPE, so the `small` model preset trains with no network. Design:
- byte-level: every byte is a token, so any unicode text encodes and decodes back exactly;
- digits are split one per token, so arithmetic answers are written digit by digit;
- no post-processor: plain `encode` adds no BOS/EOS; the chat template writes them;
- training data is fixed and ordered (task records with a fixed seed, the sample files in
  sorted order, a short English text), so rebuilding gives a byte-identical tokenizer.json.
If the tasks, the samples or this file change, rebuild and commit the new files (a test
compares a fresh build with the committed one).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from jalign.data import tasks

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_OUT = ASSETS / "tokenizer"
VOCAB_SIZE = 512  # == model preset "small"

# Order fixes the ids: <pad>=0, <s>=1, </s>=2, <unk>=3, then the chat role markers.
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# HF apply_chat_template semantics. Each turn is "<|role|>\n" + content + terminator + "\n";
# an assistant turn ends in EOS (what generation stops on), others in <|end|>. Nothing
# depends on what comes later, so a prefix of the chat renders as a prefix of the text.
# {% generation %} marks the assistant content + EOS for return_assistant_tokens_mask.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] + '<|end|>' }}"
    "{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Everyday English written for this file, so common words get merges, not only task words.
_ENGLISH = """\
The quick answer is often the right one, but it is worth checking the question again.
Please write a short reply that explains the idea in plain words.
She opened the window because the room was warm and the air outside was cool.
We will meet at the station in the morning and take the first train to the city.
A good summary keeps the main point and leaves out the small details.
He asked whether the shop was open on Sunday, and they said it was not.
Thank you for your help with this problem; I could not have solved it without you.
Water boils at a lower temperature on top of a high mountain than at sea level.
They planted trees along the river so that the bank would not wash away.
If you are not sure about an answer, say so instead of guessing.
The children were reading books in the garden while their parents cooked dinner.
This function returns the sum of two numbers and prints nothing.
Can you tell me how many days there are in a week, a month and a year?
Our team has been working on a new model that learns from human feedback.
The weather today is sunny with a light wind from the west.
Remember to save your work before you close the program.
What would you like to know about the history of this town?
I think the second option is better, because it is simpler and faster.
An assistant should be helpful, honest and kind to the people it talks with.
There are many ways to solve a problem, and some of them are easier than others.
"""


def corpus() -> list[str]:
    """The training text, in a fixed order."""
    texts = []
    for name in sorted(tasks.TASKS):  # task text with a fixed seed: same records every build
        for rec in tasks.sft_records(name, 300, seed=0):
            texts.extend(m["content"] for m in rec["messages"])
    for path in sorted((ASSETS / "samples").glob("*.json*")):
        raw = path.read_text(encoding="utf-8")
        docs = [json.loads(line) for line in raw.splitlines() if line.strip()] \
            if path.suffix == ".jsonl" else json.loads(raw)
        for doc in docs:
            texts.extend(_strings(doc))
    texts.extend(_ENGLISH.splitlines() * 4)  # repeated so its words outweigh random task strings
    return texts


def _strings(obj) -> list[str]:
    """All string leaves of a JSON value, in document order."""
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def train() -> Tokenizer:
    tok = Tokenizer(models.BPE())  # no unk needed: all 256 bytes are in the vocab
    # Digits first, one per piece, then byte-level (its regex never rejoins digits).
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    # No normalizer (NFC etc. would break exact round trips) and no post-processor.
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"trained vocab has {tok.get_vocab_size()} tokens, want {VOCAB_SIZE}; "
                           "the corpus is too small for that many merges")
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def tokenizer_config() -> dict:
    """tokenizer_config.json: what AutoTokenizer needs to load tokenizer.json offline."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": "<pad>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "extra_special_tokens": SPECIAL_TOKENS[4:],
        "add_bos_token": False,  # the chat template adds BOS; plain encode must not
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # would alter text, breaking round trips
        "model_max_length": 1024,  # == max_position_embeddings of the "small" preset
        "padding_side": "right",
        "chat_template": CHAT_TEMPLATE,
    }


def build(out_dir: str | Path = DEFAULT_OUT) -> Path:
    """Train and write tokenizer.json + tokenizer_config.json into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train().save(str(out / "tokenizer.json"), pretty=True)
    with open(out / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(), f, indent=2, ensure_ascii=False)
        f.write("\n")
    return out


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_OUT))
