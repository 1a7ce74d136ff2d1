"""How a call's prompts are cut into forward passes: pure functions on token ids, no torch.

The transformers backend scores a call in three kinds of pass:
- the ROOT: the token prefix common to every prompt of the call (system prompt,
  template head), one batch-of-one pass whose KV cache every other pass starts from;
- PREFIX passes: the prompt prefixes each user's candidates share (the sketch),
  for many users at once, right-padded to the longest in the bucket;
- SUFFIX passes: the candidates of many users at once, each row attending to its
  own user's prefix in the bucket's KV cache.
Prompts whose user has one candidate, or whose shared part is too short to pay,
run as plain rows on top of the root.

Every pass is sized by a token budget (rows x (context + width) <= max_tokens, the
KV cache and activations it holds) and a row cap, never by users: a night's users
differ in sketch length by 10x, and a row count alone either starves a GPU or
overflows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence


def shared_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    """Longest common prefix of token lists, leaving each row >= 1 token of its own.

    >>> shared_prefix_len([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]])
    2
    """
    lo, hi = min(rows), max(rows)   # lexicographic order: their common prefix is every row's
    common, k = min(len(r) for r in rows) - 1, 0
    while k < common and lo[k] == hi[k]:
        k += 1
    return max(k, 0)


@dataclass(frozen=True)
class Prefix:
    """One user's shared prompt prefix: tokens [0, length) of every row in `rows`."""

    length: int
    rows: tuple[int, ...]


def prefix_groups(todo: Sequence[int], groups: Sequence[str], ids: Sequence[Sequence[int]], start: int,
                  min_tokens: int) -> tuple[list[Prefix], list[int]]:
    """Users whose rows share >= `min_tokens` beyond the root (`start` tokens), and the
    rows left to run plain (a user's only candidate, or a prefix too short to pay).

    >>> ids = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [1, 2, 9], [1, 7, 8]]
    >>> prefix_groups([0, 1, 2, 3], ["a", "a", "b", "c"], ids, start=1, min_tokens=2)
    ([Prefix(length=4, rows=(0, 1))], [2, 3])
    """
    by_group: dict[str, list[int]] = {}
    for i in todo:
        by_group.setdefault(groups[i], []).append(i)
    users, plain = [], []
    for rows in by_group.values():
        length = shared_prefix_len([ids[i] for i in rows]) if len(rows) >= 2 else 0
        if length - start >= min_tokens:
            users.append(Prefix(length, tuple(rows)))
        else:
            plain.extend(rows)
    return users, plain


def chunk_by_tokens(items: Sequence, width: Callable[[object], int], max_rows: int, max_tokens: int,
                    context: int = 0) -> list[list]:
    """Items sorted by width (little padding), cut into chunks of at most `max_rows`
    items whose padded size, rows x (context + widest), stays within `max_tokens`.
    An item wider than the budget still gets a chunk of its own.

    >>> chunk_by_tokens(["aaaa", "b", "cc", "ddd"], len, max_rows=8, max_tokens=6)
    [['b', 'cc'], ['ddd'], ['aaaa']]
    >>> chunk_by_tokens(["b", "cc", "ddd"], len, max_rows=2, max_tokens=100, context=10)
    [['b', 'cc'], ['ddd']]
    """
    chunks: list[list] = []
    current: list = []
    for item in sorted(items, key=width):
        wide = context + width(item)         # sorted: the newest item is the widest so far
        if current and (len(current) >= max_rows or (len(current) + 1) * wide > max_tokens):
            chunks.append(current)
            current = []
        current.append(item)
    if current:
        chunks.append(current)
    return chunks
