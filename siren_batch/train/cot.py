"""Chain-of-thought text for the two SIREN stages (pure Python + torch inside functions).

    rationale(evidence, label)          a template rationale citing the sketch, ending in the label
    generate(model, tok, prompts, ...)  greedy (or sampled) completions, batched, left padded
    until_answer(completion)            the completion cut just after its first "<answer>"

Stage 1's format warm-up trains on `rationale` (or on a configured teacher's
generations that answered right); stage 2's teacher reads `prompt + until_answer(cot)`
and its state at the last position is the one the answer-only student aligns to.
"""

from __future__ import annotations

import json
from typing import Any

ANSWER_OPEN = "<answer>"


def fmt_rating(value: float) -> str:
    """`4` for whole ratings, `3.5` otherwise (the rating tokens the scorer reads).

    >>> fmt_rating(4.0), fmt_rating(3.5)
    ('4', '3.5')
    """
    return f"{float(value):g}"


def rationale(evidence: dict[str, Any] | str, label: float) -> str:
    """`<think>…</think>\\n<answer>label</answer>`: the sketch's evidence in plain sentences
    (the candidate's topic and whether the user likes it, the recent ratings, the
    priors when known), then the label. evidence: candidate (text), candidate_topic
    (name or None), liked / disliked ({name, mean} entries), recent (ratings), and
    optionally user_mean, item_mean, item_count; or its JSON text.

    >>> print(rationale({"candidate": "Heat, Crime", "candidate_topic": "crime thrillers",
    ...                  "liked": [{"name": "crime thrillers", "mean": 4.6}], "disliked": [],
    ...                  "recent": [4, 5, 3]}, 4.0))
    <think>
    The candidate is Heat, Crime, in the topic "crime thrillers".
    The user likes that topic (mean rating 4.6).
    The user's 3 most recent ratings average 4.0.
    Weighing this evidence, the user would rate it 4.
    </think>
    <answer>4</answer>
    """
    ev = json.loads(evidence) if isinstance(evidence, str) else evidence
    topic = ev.get("candidate_topic")
    lines = [f"The candidate is {ev['candidate']}" + (f', in the topic "{topic}".' if topic else ".")]
    liked = {t["name"]: t["mean"] for t in ev.get("liked") or []}
    disliked = {t["name"]: t["mean"] for t in ev.get("disliked") or []}
    if topic in liked:
        lines.append(f"The user likes that topic (mean rating {liked[topic]:.1f}).")
    elif topic in disliked:
        lines.append(f"The user dislikes that topic (mean rating {disliked[topic]:.1f}).")
    elif liked or disliked:
        lines.append(f"That topic is not among the user's {len(liked)} liked and {len(disliked)} disliked topics.")
    recent = [float(r) for r in ev.get("recent") or []]
    if recent:
        lines.append(f"The user's {len(recent)} most recent ratings average {sum(recent) / len(recent):.1f}.")
    if ev.get("user_mean") is not None:
        lines.append(f"All the user's ratings average {float(ev['user_mean']):.1f}.")
    if ev.get("item_count"):
        lines.append(f"Other users rated this item {float(ev['item_mean']):.1f} on average "
                     f"({int(ev['item_count'])} ratings).")
    lines.append(f"Weighing this evidence, the user would rate it {fmt_rating(label)}.")
    return "<think>\n" + "\n".join(lines) + f"\n</think>\n{ANSWER_OPEN}{fmt_rating(label)}</answer>"


def until_answer(completion: str) -> str | None:
    """The completion up to and including its first `<answer>`; None without one.

    >>> until_answer("<think>x</think>\\n<answer>4</answer>")
    '<think>x</think>\\n<answer>'
    """
    at = completion.find(ANSWER_OPEN)
    return None if at < 0 else completion[:at + len(ANSWER_OPEN)]


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8,
             temperature: float = 0.0, device: str = "cpu") -> list[str]:
    """Completions of `prompts` (greedy at temperature 0), batched with left padding,
    decoded without special tokens, in prompt order."""
    import torch

    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    own_pad = tokenizer.pad_token
    if own_pad is None:             # Llama-3-style tokenizers have none: pad with EOS (masked anyway)
        tokenizer.pad_token = tokenizer.eos_token
    pad = tokenizer.pad_token_id
    out: list[str] = []
    try:
        model.eval()
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            sample = temperature > 0
            with torch.no_grad():
                ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=sample,
                                     temperature=temperature if sample else None, top_p=None, top_k=None,
                                     pad_token_id=pad)
            out.extend(tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        if own_pad is None:
            tokenizer.pad_token = None
    return out
