"""Stage 1's rule-based reward (shared/REFERENCE.md): format plus rating.

    R = s_format + s_rating
    s_format = +1 for exactly one <think>...</think> followed by exactly one
               <answer>...</answer> (nothing but whitespace between and after), else -1
    s_rating = 2 - 4 |r_hat - r| / (b - a), r_hat = the answer clipped to [a, b];
               -2 when the answer does not parse

Plain functions on one completion, plus `trl_rewards(scale)`: the same rules as
TRL reward callables (`completions, label, **columns -> list[float]`), and a
third callable, `parseable`, that GRPO logs with weight 0 (the share of answers
that parse, per step).
"""

from __future__ import annotations

import re
from typing import Callable

from siren_batch.backends.base import parse_answer   # the scorer's own CoT parser: last <answer>, clipped

FORMAT = re.compile(r"\s*<think>.*</think>\s*<answer>.*</answer>\s*", re.DOTALL)
TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def format_reward(text: str) -> float:
    """+1 for exactly one <think>…</think> then one <answer>…</answer>, else -1.

    >>> format_reward("<think>a</think>\\n<answer>4</answer>"), format_reward("<answer>4</answer>")
    (1.0, -1.0)
    >>> format_reward("<think>a</think><answer>4</answer><answer>5</answer>")
    -1.0

    Each tag exactly once: an answer inside the reasoning, or a stray closing tag, fails.

    >>> [format_reward(t) for t in ("<think>a<answer>3</answer></think><answer>4</answer>",
    ...                             "<think>a</think>b</think><answer>4</answer>",
    ...                             "<think>a</think><answer>4</answer>x</answer>")]
    [-1.0, -1.0, -1.0]
    """
    ok = FORMAT.fullmatch(text) is not None and all(text.count(tag) == 1 for tag in TAGS)
    return 1.0 if ok else -1.0


def rating_reward(text: str, label: float, low: float = 1.0, high: float = 5.0) -> float:
    """2 - 4|r_hat - r|/(high - low) with r_hat clipped to the scale; -2 when unparseable.

    >>> rating_reward("<answer>4</answer>", 4.0), rating_reward("<answer>9</answer>", 1.0)
    (2.0, -2.0)
    >>> rating_reward("<answer>3</answer>", 4.0), rating_reward("no answer", 4.0)
    (1.0, -2.0)
    """
    answer = parse_answer(text, low, high)
    if answer is None:
        return -2.0
    return 2.0 - 4.0 * abs(answer - float(label)) / (high - low)


def reward(text: str, label: float, low: float = 1.0, high: float = 5.0) -> float:
    """The total: format + rating, in [-3, 3].

    >>> reward("<think>x</think><answer>5</answer>", 5.0), reward("junk", 3.0)
    (3.0, -3.0)
    """
    return format_reward(text) + rating_reward(text, label, low, high)


def _text(completion) -> str:
    """TRL passes strings for plain prompts, message lists for conversational ones."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion)


def trl_rewards(low: float = 1.0, high: float = 5.0, prefill: str = "") -> tuple[list[Callable], list[float]]:
    """(reward callables, weights) for trl.GRPOTrainer: format (1), rating (1) and
    parseable (0: logged, not rewarded). Each reads the dataset's `label` column.
    prefill: the text the prompts end with that belongs to the answer (prompts.THINK_PREFILL
    with prompts.think_prefill): the rules see prefill + completion.

    >>> funcs, weights = trl_rewards(prefill="<think>\\n")
    >>> funcs[0](["x</think><answer>4</answer>"]), funcs[1](["x</think><answer>4</answer>"], label=[4.0])
    ([1.0], [2.0])
    """
    def format_(completions, **_):
        return [format_reward(prefill + _text(c)) for c in completions]

    def rating(completions, label, **_):
        return [rating_reward(prefill + _text(c), r, low, high) for c, r in zip(completions, label)]

    def parseable(completions, **_):
        return [float(parse_answer(prefill + _text(c)) is not None) for c in completions]

    format_.__name__, rating.__name__, parseable.__name__ = "format", "rating", "parseable"
    return [format_, rating, parseable], [1.0, 1.0, 0.0]
