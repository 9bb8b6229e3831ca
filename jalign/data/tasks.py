"""Synthetic tasks whose answers a program can check: the bundled default data.

Each task makes short chat problems ("What is 482 + 39?" -> "521") and can recompute the
answer from the prompt text alone, so SFT, preference (DPO/RM) and RL prompt data, and an
exact-match reward, all come from one place with no network and no stored answer key.

Everything is deterministic by seed: problems are drawn from a `random.Random` seeded with a
sha256 digest (never Python's salted `hash`). A problem belongs to "train" or "eval" by a
digest of the problem itself, so the two splits can never share a problem, whatever the seeds.
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from dataclasses import dataclass

SPLITS = ("train", "eval")
EVAL_ONE_IN = 10  # one problem in ten belongs to the eval split
EOS = "</s>"  # the bundled tokenizer's EOS; a completion may still carry it as text


def _digest(*parts) -> int:
    """A stable 64-bit integer for `parts` (same on every machine and Python run)."""
    data = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


def split_of(key: str) -> str:
    """The split a problem belongs to, from its canonical key alone."""
    return "eval" if _digest("split", key) % EVAL_ONE_IN == 0 else "train"


# ---------------------------------------------------------------- wrong-answer helpers
# Plausible mistakes, so a preference pair teaches something (not "521" vs "banana").

def _digit_off(s: str, rng: random.Random) -> str:
    """Change one digit by +-1, keeping a multi-digit number free of a leading zero."""
    i = rng.randrange(len(s))
    d = int(s[i])
    options = [x for x in (d - 1, d + 1) if 0 <= x <= 9 and not (i == 0 and x == 0 and len(s) > 1)]
    if not options:
        return s
    return s[:i] + str(rng.choice(options)) + s[i + 1:]


def _swap_adjacent(s: str, rng: random.Random) -> str:
    """Swap two neighbouring, different characters (never moving a 0 to the front)."""
    spots = [i for i in range(len(s) - 1)
             if s[i] != s[i + 1] and not (i == 0 and s[1] == "0" and s.isdigit())]
    if not spots:
        return s
    i = rng.choice(spots)
    return s[:i] + s[i + 1] + s[i] + s[i + 2:]


def _off_by_one(s: str, rng: random.Random) -> str:
    n = int(s)
    return str(n + 1 if n == 0 or rng.random() < 0.5 else n - 1)


def _pick_wrong(correct: str, candidates, rng: random.Random, fallback: str) -> str:
    """Try the mistake makers in a random order; the first that differs from `correct` wins."""
    candidates = list(candidates)
    rng.shuffle(candidates)
    for make in candidates:
        cand = make()
        if cand and cand != correct:
            return cand
    assert fallback != correct
    return fallback


# ---------------------------------------------------------------- tasks

@dataclass(frozen=True)
class Task:
    """A family of problems. Subclasses define sampling, rendering, parsing and solving."""

    name = "task"
    templates: tuple[str, ...] = ()

    def sample(self, rng: random.Random):
        """Draw one problem (a small tuple or string)."""
        raise NotImplementedError

    def key(self, problem) -> str:
        """Canonical id of a problem: decides its split."""
        raise NotImplementedError

    def render(self, problem, template: str) -> str:
        raise NotImplementedError

    def parse(self, text: str):
        """The problem back from prompt text (for checking without a stored answer)."""
        raise NotImplementedError

    def solve(self, problem) -> str:
        raise NotImplementedError

    def mistakes(self, problem, rng: random.Random) -> list:
        """Zero-argument callables, each making one kind of plausible wrong answer."""
        raise NotImplementedError

    def wrong(self, problem, rng: random.Random) -> str:
        correct = self.solve(problem)
        return _pick_wrong(correct, self.mistakes(problem, rng), rng, self.fallback_wrong(correct))

    def fallback_wrong(self, correct: str) -> str:
        return str(int(correct) + 1)


def _number(rng: random.Random, digits: int, low_single: int = 0) -> int:
    """A number with exactly `digits` digits (single digits start at `low_single`)."""
    if digits == 1:
        return rng.randint(low_single, 9)
    return rng.randint(10 ** (digits - 1), 10 ** digits - 1)


@dataclass(frozen=True)
class AddTask(Task):
    """a + b; each operand has 1..max_digits digits (length drawn first, so short ones appear)."""

    name = "add"
    max_digits: int = 3
    templates: tuple[str, ...] = ("What is {a} + {b}?", "Compute {a} + {b}.", "{a} + {b} = ?")

    def sample(self, rng):
        return (_number(rng, rng.randint(1, self.max_digits)),
                _number(rng, rng.randint(1, self.max_digits)))

    def key(self, p):
        # Operands sorted: 39 + 482 is the same problem as 482 + 39, so it stays in one split.
        return "add:%d+%d" % tuple(sorted(p))

    def render(self, p, template):
        return template.format(a=p[0], b=p[1])

    def parse(self, text):
        m = re.search(r"(\d+) \+ (\d+)", text)
        if not m:
            raise ValueError(f"no addition problem in prompt {text!r}")
        return int(m.group(1)), int(m.group(2))

    def solve(self, p):
        return str(p[0] + p[1])

    def mistakes(self, p, rng):
        correct = self.solve(p)

        def dropped_carry():  # add column by column, forgetting every carry
            a, b = str(p[0]), str(p[1])
            width = max(len(a), len(b))
            cols = [(int(x) + int(y)) % 10 for x, y in zip(a.zfill(width), b.zfill(width))]
            return str(int("".join(map(str, cols))))

        return [dropped_carry, lambda: _digit_off(correct, rng),
                lambda: _off_by_one(correct, rng), lambda: _swap_adjacent(correct, rng)]


@dataclass(frozen=True)
class MulTask(Task):
    """a * b with an a_digits-digit a and a b_digits-digit b (single-digit b is 2..9)."""

    name = "mul"
    a_digits: int = 2
    b_digits: int = 1
    templates: tuple[str, ...] = ("What is {a} * {b}?", "Compute {a} * {b}.", "What is {a} times {b}?")

    def sample(self, rng):
        # x0 and x1 are too easy to teach anything, so a single-digit factor starts at 2.
        return _number(rng, self.a_digits, 2), _number(rng, self.b_digits, 2)

    def key(self, p):
        return "mul:%d*%d" % tuple(sorted(p))

    def render(self, p, template):
        return template.format(a=p[0], b=p[1])

    def parse(self, text):
        m = re.search(r"(\d+) (?:\*|times) (\d+)", text)
        if not m:
            raise ValueError(f"no multiplication problem in prompt {text!r}")
        return int(m.group(1)), int(m.group(2))

    def solve(self, p):
        return str(p[0] * p[1])

    def mistakes(self, p, rng):
        a, b = p
        correct = self.solve(p)

        def dropped_carry():  # long multiplication by the last digit of b, carries forgotten
            d = b % 10
            digits = str(a)
            return str(int(digits[0]) * d) + "".join(str(int(x) * d % 10) for x in digits[1:])

        def one_row_off():  # added one copy of a too many or too few
            return str(a * (b + rng.choice((-1, 1))))

        return [dropped_carry, one_row_off, lambda: _digit_off(correct, rng),
                lambda: _off_by_one(correct, rng), lambda: _swap_adjacent(correct, rng)]


_REVERSE_ALPHABET = string.ascii_lowercase + string.digits


@dataclass(frozen=True)
class ReverseTask(Task):
    """Reverse a min_len..max_len string of lowercase letters and digits."""

    name = "reverse"
    min_len: int = 3
    max_len: int = 8
    templates: tuple[str, ...] = ('Reverse the string "{s}".', 'Write "{s}" backwards.',
                                  'What is "{s}" reversed?')

    def sample(self, rng):
        n = rng.randint(self.min_len, self.max_len)
        return "".join(rng.choice(_REVERSE_ALPHABET) for _ in range(n))

    def key(self, p):
        return "reverse:" + p

    def render(self, p, template):
        return template.format(s=p)

    def parse(self, text):
        m = re.search(r'"([a-z0-9]+)"', text)
        if not m:
            raise ValueError(f"no string to reverse in prompt {text!r}")
        return m.group(1)

    def solve(self, p):
        return p[::-1]

    def mistakes(self, p, rng):
        correct = self.solve(p)

        def changed_char():
            i = rng.randrange(len(correct))
            c = rng.choice([x for x in _REVERSE_ALPHABET if x != correct[i]])
            return correct[:i] + c + correct[i + 1:]

        def dropped_char():
            if len(correct) < 2:
                return ""
            i = rng.randrange(len(correct))
            return correct[:i] + correct[i + 1:]

        return [lambda: p, lambda: _swap_adjacent(correct, rng), dropped_char, changed_char]

    def fallback_wrong(self, correct):
        return correct + ("a" if not correct.endswith("a") else "b")


TASKS: dict[str, Task] = {t.name: t for t in (AddTask(), MulTask(), ReverseTask())}


def get_task(task: str | Task) -> Task:
    """A registered task by name, or a configured Task instance (e.g. AddTask(max_digits=5))."""
    if isinstance(task, Task):
        return task
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}") from None


# ---------------------------------------------------------------- record builders

def _problems(task: Task, n: int, seed: int, split: str):
    """n (problem, prompt text) pairs from `split`, the same for the same (task, seed, split)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(_digest(task.name, split, seed))
    out = []
    for _ in range(n):
        # Rejection sampling: redraw until the problem falls in the wanted split.
        for _tries in range(100_000):
            problem = task.sample(rng)
            if split_of(task.key(problem)) == split:
                break
        else:
            raise RuntimeError(f"task {task.name} found no {split} problem; is its space empty?")
        out.append((problem, task.render(problem, rng.choice(task.templates))))
    return out


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def sft_records(task: str | Task, n: int, seed: int, split: str = "train") -> list[dict]:
    """[{"messages": [user, assistant answer]}, ...]"""
    t = get_task(task)
    return [{"messages": _user(q) + _assistant(t.solve(p))} for p, q in _problems(t, n, seed, split)]


def preference_records(task: str | Task, n: int, seed: int, split: str = "train") -> list[dict]:
    """[{"prompt": [user], "chosen": [assistant right], "rejected": [assistant wrong]}, ...]"""
    t = get_task(task)
    out = []
    for i, (p, q) in enumerate(_problems(t, n, seed, split)):
        # Own stream per record, so the problems match sft_records for the same seed.
        wrong = t.wrong(p, random.Random(_digest("wrong", t.name, split, seed, i)))
        out.append({"prompt": _user(q), "chosen": _assistant(t.solve(p)),
                    "rejected": _assistant(wrong)})
    return out


def prompt_records(task: str | Task, n: int, seed: int, split: str = "train") -> list[dict]:
    """[{"prompt": [user], "answer": correct}, ...] for RL rollouts and evaluation."""
    t = get_task(task)
    return [{"prompt": _user(q), "answer": t.solve(p)} for p, q in _problems(t, n, seed, split)]


# ---------------------------------------------------------------- checking

def _prompt_text(record_or_prompt) -> str:
    """The last user turn of a record, a message list, or a plain prompt string."""
    if isinstance(record_or_prompt, str):
        return record_or_prompt
    if isinstance(record_or_prompt, dict):
        if "prompt" in record_or_prompt:
            return _prompt_text(record_or_prompt["prompt"])
        if "messages" in record_or_prompt:
            return _prompt_text(record_or_prompt["messages"])
        raise ValueError(f"record has neither 'prompt' nor 'messages': {sorted(record_or_prompt)}")
    users = [m["content"] for m in record_or_prompt if m.get("role") == "user"]
    if not users:
        raise ValueError("prompt has no user message")
    return users[-1]


def answer(task: str | Task, record_or_prompt) -> str:
    """The correct answer, recomputed from the prompt text (never from a stored answer)."""
    t = get_task(task)
    return t.solve(t.parse(_prompt_text(record_or_prompt)))


def normalize_completion(completion: str) -> str:
    """What a completion says: before any EOS text or first newline, whitespace stripped."""
    text = completion.strip().split(EOS, 1)[0]
    return text.split("\n", 1)[0].strip()


def check(task: str | Task, record_or_prompt, completion: str) -> bool:
    """Exact match of the model's completion against the recomputed answer."""
    return normalize_completion(completion) == answer(task, record_or_prompt)
