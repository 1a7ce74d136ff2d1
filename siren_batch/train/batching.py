"""Training rows -> packed units -> padded tensors (pure Python + torch inside functions).

A *unit* is one row of a training batch: a token prefix followed by one or more
suffixes, each suffix ending at an example's answer position. Without packing a
unit holds one example (empty prefix, the whole prompt as its suffix). With
packing, the examples of one user whose prompts share a long token prefix (the
same sketch: ratings given at the same moment, or any identical prompt head)
share one unit: the prefix is processed once and every suffix sees the prefix
and itself only (a 4D attention mask), its position ids continuing from the
prefix, so each suffix's logits equal those of its unpacked prompt.

Batches are RIGHT padded and each example's logits are gathered at its own last
real position: left-padded training batches gave NaN gradients on a GPU (padded
query positions saw no key; shared/REFERENCE.md, "On one H100 GPU").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from siren_batch.backends.plan import shared_prefix_len

# Pack an example behind another's prefix only when the shared part is at least this
# fraction of its prompt: a dense 4D mask costs attention over the whole row, so short
# shared heads (the system prompt every user shares) do not pay.
MIN_SHARED_FRACTION = 0.5


@dataclass
class Unit:
    """One batch row: `prefix` then `suffixes`; `rows` are the examples' indices, one per suffix."""
    prefix: list[int]
    suffixes: list[list[int]]
    rows: list[int]

    @property
    def length(self) -> int:
        return len(self.prefix) + sum(len(s) for s in self.suffixes)


@dataclass
class Batch:
    """Tensors for one forward pass; `rows` = example index of each gathered position."""
    input_ids: object                   # LongTensor [B, T]
    position_ids: object                # LongTensor [B, T]
    attention_mask: object              # [B, T] 0/1 (no packed unit) or bool [B, 1, T, T] (True = attend)
    gather_row: object                  # LongTensor [n]: batch row of each example's answer position
    gather_col: object                  # LongTensor [n]: its column
    rows: list[int] = field(default_factory=list)
    tokens: int = 0                     # real (non-pad) tokens


def single_units(ids: list[list[int]]) -> list[Unit]:
    """One unit per example (no packing)."""
    return [Unit([], [row], [i]) for i, row in enumerate(ids)]


def pack_units(ids: list[list[int]], groups: list[str], max_suffixes: int, max_row_tokens: int) -> list[Unit]:
    """Group each user's examples behind shared token prefixes (greedy, deterministic).

    Within a group, prompts are sorted by tokens so long common prefixes sit side by
    side; an example joins the open unit while the unit's common prefix stays at least
    MIN_SHARED_FRACTION of every member's length, the unit has < max_suffixes examples
    and the packed row stays within max_row_tokens.

    >>> [u.rows for u in pack_units([[1, 2, 3, 4], [1, 2, 3, 5], [9, 9]], ["a", "a", "a"], 8, 64)]
    [[0, 1], [2]]
    """
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    units: list[Unit] = []
    for g in sorted(by_group):
        members: list[int] = []
        for i in sorted(by_group[g], key=lambda k: (ids[k], k)):
            if members and _fits(ids, members + [i], max_suffixes, max_row_tokens):
                members.append(i)
                continue
            if members:
                units.append(_unit(ids, members))
            members = [i]
        if members:
            units.append(_unit(ids, members))
    return units


def _fits(ids: list[list[int]], members: list[int], max_suffixes: int, max_row_tokens: int) -> bool:
    rows = [ids[i] for i in members]
    shared = shared_prefix_len(rows)
    row_tokens = shared + sum(len(r) - shared for r in rows)
    return (len(members) <= max_suffixes and row_tokens <= max_row_tokens
            and all(shared >= MIN_SHARED_FRACTION * len(r) for r in rows))


def _unit(ids: list[list[int]], members: list[int]) -> Unit:
    if len(members) == 1:
        return Unit([], [ids[members[0]]], list(members))
    shared = shared_prefix_len([ids[i] for i in members])
    return Unit(ids[members[0]][:shared], [ids[i][shared:] for i in members], list(members))


def micro_batches(order: list[int], units: list[Unit], batch_size: int) -> list[list[int]]:
    """Consecutive units of `order` with at most `batch_size` examples each (a unit
    larger than that stands alone)."""
    out, current, n = [], [], 0
    for u in order:
        size = len(units[u].rows)
        if current and n + size > batch_size:
            out.append(current)
            current, n = [], 0
        current.append(u)
        n += size
    if current:
        out.append(current)
    return out


def collate(units: list[Unit], pad_id: int, device: str = "cpu", mask_kind: str = "bool") -> Batch:
    """Right-padded tensors for `units`. A batch without packed units gets the usual
    2D padding mask; otherwise a 4D mask: a suffix token sees the prefix and the
    earlier tokens of its own suffix; a pad token sees only itself (no empty softmax
    row). mask_kind "additive" gives 0 / dtype-min floats for eager attention."""
    import torch

    width = max(u.length for u in units)
    b = len(units)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    positions = torch.zeros((b, width), dtype=torch.long)
    segment = torch.full((b, width), -1, dtype=torch.long)   # -1 pad, 0 prefix, j+1 suffix j
    rows, cols, order = [], [], []
    for r, unit in enumerate(units):
        p = len(unit.prefix)
        input_ids[r, :p] = torch.tensor(unit.prefix, dtype=torch.long)
        positions[r, :p] = torch.arange(p)
        segment[r, :p] = 0
        start = p
        for j, (suffix, example) in enumerate(zip(unit.suffixes, unit.rows)):
            end = start + len(suffix)
            input_ids[r, start:end] = torch.tensor(suffix, dtype=torch.long)
            positions[r, start:end] = torch.arange(p, p + len(suffix))
            segment[r, start:end] = j + 1
            rows.append(r)
            cols.append(end - 1)
            order.append(example)
            start = end
    real = segment >= 0
    if all(len(u.suffixes) == 1 for u in units):
        mask = real.long().to(device)
    else:   # built where it is used: a [B, 1, T, T] mask is large to build on a host and copy
        mask = _block_mask(segment.to(device))
        if mask_kind == "additive":
            mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    return Batch(input_ids.to(device), positions.to(device), mask,
                 torch.tensor(rows, device=device), torch.tensor(cols, device=device), order, int(real.sum()))


def _block_mask(segment):
    """bool [B, 1, T, T]: query q may attend key k (see collate)."""
    import torch

    width, device = segment.shape[1], segment.device
    causal = torch.ones((width, width), dtype=torch.bool, device=device).tril()
    q, k = segment[:, :, None], segment[:, None, :]
    allowed = causal & (k >= 0) & ((k == 0) | (k == q))
    allowed |= torch.eye(width, dtype=torch.bool, device=device) & (q < 0)     # pads see themselves
    return allowed[:, None]
