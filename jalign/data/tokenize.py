"""Chat templates, tokenization, loss masks and truncation. Pure functions of their inputs.

Loss masks come from character spans: the conversation is rendered once, each trained
assistant turn's span (its content through the end-of-turn token) is located by
rendering the conversation up to that turn, and a token is trainable when its character
offsets overlap a span. This works for any template that renders prefixes stably
(checked, with a clear error otherwise) and any fast tokenizer (byte-level BPE or
SentencePiece).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from jalign.data.formats import BadRecord, DataError

BUNDLED_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tokenizer"

# Templates for tokenizers that ship none, by name (written for jalign; formats follow
# the conventions their names refer to).
NAMED_TEMPLATES = {
    "jalign": (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}<|end|>{% endif %}\n"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"),
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
        "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
        "{% endif %}"),
    # Llama 2 / Mistral instruct style; a system message is folded into the first user turn.
    "llama2": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
        "{% set sys = messages[0]['content'] + '\n\n' %}{% set rest = messages[1:] %}"
        "{% else %}{% set sys = '' %}{% set rest = messages %}{% endif %}"
        "{% for m in rest %}{% if m['role'] == 'user' %}[INST] "
        "{% if loop.first %}{{ sys }}{% endif %}{{ m['content'] }} [/INST]"
        "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"),
}

TRAIN_ON = ("all_assistant", "last_assistant")


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    """How records become tokens.

    max_length: tokens per example (prompt + response). max_prompt_length: prompts longer
    than this lose tokens from the left (keeping BOS); without it a prompt that leaves no
    room for a response (prompt data: longer than max_length - 1) is a bad record
    (``PromptTooLong``). Responses are cut from the right to fit max_length.
    train_on: which assistant turns carry loss. chat_template: a name in NAMED_TEMPLATES,
    a Jinja string, or None for the tokenizer's own.
    """

    max_length: int = 512
    max_prompt_length: int | None = None
    train_on: str = "all_assistant"
    chat_template: str | None = None

    def __post_init__(self):
        if self.train_on not in TRAIN_ON:
            raise ValueError(f"train_on={self.train_on!r}; one of {TRAIN_ON}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.max_prompt_length is not None and not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(f"max_prompt_length={self.max_prompt_length} must be in "
                             f"(0, max_length={self.max_length})")


def load_tokenizer(name_or_path: str | None = None):
    """A fast tokenizer from a local directory, a hub name, ``gguf:FILE`` (built from the
    file's metadata) or the bundled one (``bundled`` or None). Never runs repository code.
    (Which tokenizer a run uses when none is named follows its model:
    ``jalign.sources.tokenizer_spec``.)"""
    if str(name_or_path).startswith("gguf:"):
        from jalign.convert.gguf import GGUFFile, tokenizer_from_gguf
        return tokenizer_from_gguf(GGUFFile(str(name_or_path)[len("gguf:"):]))
    if name_or_path in (None, "bundled"):
        # jalign's own tokenizer.json needs no model-specific class; loading it directly
        # skips AutoTokenizer's imports (transformers' configs, and torch where installed).
        from transformers import PreTrainedTokenizerFast
        return PreTrainedTokenizerFast.from_pretrained(str(BUNDLED_TOKENIZER))
    from transformers import AutoTokenizer

    path = str(name_or_path)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if not tok.is_fast:
        raise DataError(f"tokenizer {path} is not a fast tokenizer; jalign needs character "
                        "offsets to build loss masks")
    return tok


class PromptTooLong(BadRecord):
    """A prompt with no room left for a response (or past the row) and no
    ``max_prompt_length`` to truncate it to."""


def _too_long(n: int, limit: int, cfg) -> PromptTooLong:
    return PromptTooLong(f"prompt too long ({n} tokens, over the {limit} that max_length="
                         f"{cfg.max_length} allows; DataConfig.max_prompt_length truncates "
                         "prompts from the left)")


class TemplateRefused(BadRecord):
    """The chat template raised on this conversation (e.g. its own role-order check): a bad
    record, handled by DataConfig.on_bad_record like any other."""


def _check_template_syntax(template: str) -> None:
    """Compile the template as transformers will (its sandbox and extensions, such as the
    {% generation %} tag), so a syntax error is named here, not at the first record."""
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template
    try:
        _compile_jinja_template(template)
    except jinja2.TemplateSyntaxError as e:
        raise DataError(f"the chat template does not parse (line {e.lineno}: {e.message})") from None


class ChatTokenizer:
    """A tokenizer plus the chat template to render conversations with."""

    def __init__(self, tokenizer, chat_template: str | None = None):
        self.tokenizer = tokenizer
        # transformers warns once that a sequence is longer than the tokenizer's
        # model_max_length: jalign truncates to DataConfig.max_length itself (and counts
        # or refuses what does not fit), so the warning only misleads. Marked as given.
        warned = getattr(tokenizer, "deprecation_warnings", None)
        if isinstance(warned, dict):
            warned["sequence-length-is-longer-than-the-specified-maximum"] = True
        template = NAMED_TEMPLATES.get(chat_template, chat_template)
        if template is None:
            template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise DataError(
                "the tokenizer has no chat_template and none is configured: set "
                f"chat_template to one of {sorted(NAMED_TEMPLATES)} or a Jinja template")
        _check_template_syntax(template)
        self.template = template
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        import jinja2
        try:
            return self.tokenizer.apply_chat_template(
                list(messages), chat_template=self.template, tokenize=False,
                add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as e:
            raise TemplateRefused(f"the chat template raised on this conversation: {e}") from None

    def _encode(self, text: str):
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return np.asarray(enc["input_ids"], np.int32), enc["offset_mapping"]

    def _dedupe_bos(self, ids: np.ndarray, *rest: np.ndarray):
        """BOS once: a template that writes BOS plus a tokenizer that adds one gives two."""
        if self.bos_id is not None and len(ids) > 1 and ids[0] == ids[1] == self.bos_id:
            return (ids[1:], *(r[1:] for r in rest))
        return (ids, *rest)

    def assistant_spans(self, messages: Sequence[dict], train_on: str) -> tuple[str, list]:
        text = self.render(messages)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if train_on == "last_assistant":
            turns = turns[-1:]
        spans = []
        for i in turns:
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1])
            if not (text.startswith(before) and text.startswith(through)
                    and through.startswith(before)):
                raise DataError("the chat template does not render conversation prefixes "
                                "as prefixes of the whole; cannot locate assistant turns")
            end = len(through)
            while end > len(before) and through[end - 1].isspace():  # not the trailing newline
                end -= 1
            spans.append((len(before), end))
        return text, spans

    def encode_conversation(self, messages: Sequence[dict], train_on: str = "all_assistant"):
        """(ids [T] int32, loss_mask [T] int32): 1 on trained assistant tokens incl. EOS."""
        text, spans = self.assistant_spans(messages, train_on)
        ids, offsets = self._encode(text)
        mask = np.zeros(len(ids), np.int32)
        for t, (a, b) in enumerate(offsets):
            if any(a < end and b > start for start, end in spans):
                mask[t] = 1
        ids, mask = self._dedupe_bos(ids, mask)
        mask[:1] = 0  # the first token is never a target: nothing precedes it
        return ids, mask

    # The reply a generation prompt is split from (see encode_prompt): a plain word, so
    # that the first reply token starts where an ordinary answer's would.
    PROBE_REPLY = "It"

    def encode_prompt(self, messages: Sequence[dict]) -> np.ndarray:
        """The prompt tokens generation starts from: the prompt part of prompt + a reply
        encoded once (encode_reply), i.e. what SFT and the pairs have before a reply. It
        equals the rendered prompt encoded alone unless the template's prompt ends in text
        the tokenizer merges into the reply's first token (e.g. 'Assistant: ' before a
        SentencePiece '▁It'); that text is then left for the model to produce, as in
        training. Where the split depends on the reply (a digit after that space may be
        its own token), this is the split of a reply that starts with a word."""
        try:
            prompt_ids, reply_ids = self.encode_reply(
                messages, [{"role": "assistant", "content": self.PROBE_REPLY}])
        except DataError:  # a template whose generation prompt is not how it renders a
            reply_ids = ()  # past reply (e.g. one that opens a thinking block): encode alone
        if not len(reply_ids):
            ids, _ = self._encode(self.render(messages, add_generation_prompt=True))
            return self._dedupe_bos(ids)[0]
        return prompt_ids

    def encode_reply(self, prompt: Sequence[dict], response: Sequence[dict]):
        """(prompt_ids, response_ids) of prompt + response encoded once, as SFT encodes
        them, split at the end of the rendered prompt.

        The response tokens are those overlapping the reply's characters (its content
        through the end-of-turn token, trailing whitespace excluded): exactly the tokens
        SFT trains on. A token that straddles the prompt's end belongs to the response
        (it is a target in SFT too); the prompt is every token before the first response
        token. Encoding the response alone would differ wherever the tokenizer treats the
        start of a text specially (SentencePiece's '▁' prefix: '▁It' instead of 'It')."""
        before = self.render(prompt, add_generation_prompt=True)
        full = self.render(list(prompt) + list(response))
        if not full.startswith(before):
            raise DataError("the chat template does not render the prompt as a prefix of the "
                            "prompt + response")
        start, end = len(before), len(full.rstrip())
        ids, offsets = self._encode(full)
        in_reply = np.asarray([a < end and b > start for a, b in offsets], bool)
        ids, in_reply = self._dedupe_bos(ids, in_reply)
        where = np.flatnonzero(in_reply)
        if not len(where):
            return ids[:0], ids[:0]
        first, last = where[0], where[-1]
        return ids[:first], ids[first:last + 1]


def _truncate_prompt(prompt_ids: np.ndarray, limit: int | None, bos_id) -> np.ndarray:
    if limit is None or len(prompt_ids) <= limit:
        return prompt_ids
    keep_bos = bos_id is not None and len(prompt_ids) and prompt_ids[0] == bos_id
    if keep_bos:
        return np.concatenate([prompt_ids[:1], prompt_ids[len(prompt_ids) - limit + 1:]])
    return prompt_ids[len(prompt_ids) - limit:]


def truncate_example(ids: np.ndarray, mask: np.ndarray, cfg: TokenizeConfig, bos_id):
    """Apply the truncation policy to one SFT example; raise BadRecord if no target is left.

    The prompt is everything before the first trained token; it loses tokens from the left
    (beyond max_prompt_length), then the rest is cut from the right at max_length.
    """
    trained = np.flatnonzero(mask)
    if not len(trained):
        raise BadRecord("no assistant tokens to train on")
    start = trained[0]
    if cfg.max_prompt_length is None and start >= cfg.max_length:
        raise _too_long(start, cfg.max_length - 1, cfg)
    prompt = _truncate_prompt(ids[:start], cfg.max_prompt_length, bos_id)
    ids = np.concatenate([prompt, ids[start:]])[: cfg.max_length]
    mask = np.concatenate([np.zeros(len(prompt), np.int32), mask[start:]])[: cfg.max_length]
    if not mask.any():
        raise BadRecord(f"response is empty after truncation to max_length={cfg.max_length} "
                        f"(prompt has {len(prompt)} tokens)")
    return ids, mask


def tokenize_conversation(chat: ChatTokenizer, record: dict, cfg: TokenizeConfig) -> dict:
    ids, mask = chat.encode_conversation(record["messages"], cfg.train_on)
    ids, mask = truncate_example(ids, mask, cfg, chat.bos_id)
    return {"input_ids": ids, "loss_mask": mask}


def tokenize_preference(chat: ChatTokenizer, record: dict, cfg: TokenizeConfig) -> dict:
    """Prompt and both responses, each side exactly the tokens and targets of prompt +
    response encoded once (ChatTokenizer.encode_reply), so DPO and RM score what SFT
    trains and generation produces.

    The sides share ``prompt_ids``. Where the tokenizer splits the prompt's end differently
    for the two replies (a template ending in a space: ' 7' vs ' Seventy'), the shared
    prompt is their common prefix; each side's remaining prompt tokens start its
    ``{side}_ids`` and are counted in ``{side}_context``: they are part of the sequence but
    not scored, as in SFT."""
    sides = {side: chat.encode_reply(record["prompt"], record[side])
             for side in ("chosen", "rejected")}
    (p_c, _), (p_r, _) = sides["chosen"], sides["rejected"]
    shared = 0
    while shared < min(len(p_c), len(p_r)) and p_c[shared] == p_r[shared]:
        shared += 1
    if cfg.max_prompt_length is None and shared >= cfg.max_length:
        raise _too_long(shared, cfg.max_length - 1, cfg)
    prompt_ids = _truncate_prompt(p_c[:shared], cfg.max_prompt_length, chat.bos_id)
    room = cfg.max_length - len(prompt_ids)
    out = {"prompt_ids": prompt_ids}
    for side, (prompt, reply) in sides.items():
        context = prompt[shared:]
        response = np.concatenate([context, reply])[: max(room, 0)].astype(np.int32)
        if len(response) <= len(context):
            raise BadRecord(f"{side} response is empty after truncation to max_length="
                            f"{cfg.max_length} (prompt has {len(prompt_ids)} tokens)")
        out[f"{side}_ids"] = response
        if len(context):
            out[f"{side}_context"] = np.int32(len(context))
    return out


def tokenize_prompt(chat: ChatTokenizer, record: dict, cfg: TokenizeConfig) -> dict:
    limit = cfg.max_prompt_length or cfg.max_length - 1
    prompt_ids = chat.encode_prompt(record["prompt"])
    if cfg.max_prompt_length is None and len(prompt_ids) > limit:
        raise _too_long(len(prompt_ids), limit, cfg)
    prompt_ids = _truncate_prompt(prompt_ids, limit, chat.bos_id)
    return {"prompt_ids": prompt_ids}


TOKENIZERS = {"conversation": tokenize_conversation, "preference": tokenize_preference,
              "prompt": tokenize_prompt}
