"""Example reward functions for jalign's GRPO family (and PPO), named in a config as
``RewardConfig.functions = ('my_rewards:exact_answer',)``: this file sits next to the
config (configs/examples/grpo_my_reward.gin), where jalign looks first.

A reward function gets the prompts, the completions and, as keyword arguments, the prompt
records' other columns (here the bundled addition problems' ``answer``) and
``completion_lengths``; it returns one float per completion.
"""

import re


def exact_answer(prompts, completions, answer, **fields):
    """1 when the completion's first number is the record's answer, else 0."""
    scores = []
    for completion, expected in zip(completions, answer):
        number = re.search(r"-?\d+", completion)
        scores.append(float(number is not None and number.group() == str(expected)))
    return scores


def brevity(prompts, completions, completion_lengths, **fields):
    """-0.01 per token beyond 6 (an answer and the end-of-turn token fit in 6)."""
    return [-0.01 * max(0, int(n) - 6) for n in completion_lengths]
