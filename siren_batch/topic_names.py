"""Names for topics, from the M items nearest each centroid (driver side, K*M rows).

Two namers, both pure on small python inputs so they unit-test without Spark:
- tfidf: class-based TF-IDF (a class = a topic; BERTopic's c-TF-IDF) over the
  titles and genres of a topic's items; the top 3 keywords joined " / ".
- llm: an instruct LLM asked for the theme in one short phrase (SIREN's naming
  prompt, seeds/000), greedy; falls back to the tfidf name when the reply is empty.
Names are unique within one topic set in both cases.
"""

from __future__ import annotations

import logging
import math
import re
import string
from collections import Counter
from typing import Callable

import pandas as pd

from siren_batch import assets, model_cache
from siren_batch.config import TopicsConfig

logger = logging.getLogger(__name__)

NAME_WORDS = 3            # tfidf keywords per name
NAME_MAX_NEW_TOKENS = 24  # llm naming: a phrase of <= 10 words fits easily
# Articles of the non-English titles MovieLens carries ("Cité des enfants perdus, La"),
# roman numerals of sequels, and words every item text repeats.
EXTRA_STOP_WORDS = frozenset("""
    la le les des une der die das und el los las del il una ein eine iii
    title category feature
""".split())
_TOKEN = re.compile(r"[^\W\d_]+(?:['’\-][^\W\d_]+)*")  # letters only: drops years and other numbers
# "Theme:", "The theme of this group is", "**Answer** -": lead-ins small models add.
_PREFIX = re.compile(r"^(?:the\s+)?(?:theme|topic|answer|summary|phrase|name)\b(?:\s+of\s+(?:this|the)\s+group)?"
                     r"(?:\s*[:\-–]|\s+is\b)\s*", re.I)
_QUOTED = re.compile(r"[\"“«]([^\"”»]{3,})[\"”»]")


def _stop_words() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS  # a sentence-transformers dependency

    return frozenset(ENGLISH_STOP_WORDS) | EXTRA_STOP_WORDS


def tokenize(text: str, stop_words: frozenset[str] = frozenset()) -> list[str]:
    """Lower-case word tokens of >= 3 letters, no numbers, no stop words.

    >>> tokenize("Children's Sci-Fi (1995) of Doom", frozenset({"of"}))
    ['children', 'sci-fi', 'doom']
    """
    words = (re.sub(r"['’]s$", "", w) for w in _TOKEN.findall(text.lower()))
    return [w for w in words if len(w) >= 3 and w not in stop_words]


def ctfidf_keywords(docs: dict[int, list[str]], top_n: int = 10) -> dict[int, list[str]]:
    """Keywords per topic by class-based TF-IDF, best first.

    score(t, c) = tf(t, c) * log(1 + A / f(t)), where tf is t's share of the words
    of topic c, f(t) is t's count over all topics and A the mean words per topic
    (counts are of items: a word counts once per item text).
    """
    stop = _stop_words()
    # A word counts once per item, so one title that repeats a word does not make it a keyword.
    counts = {tid: Counter(w for text in texts for w in set(tokenize(text, stop))) for tid, texts in docs.items()}
    overall: Counter[str] = Counter()
    for counter in counts.values():
        overall.update(counter)
    avg_words = max(1.0, sum(overall.values()) / max(1, len(counts)))
    keywords = {}
    for tid, counter in counts.items():
        total = sum(counter.values())
        score = {w: k / total * math.log(1 + avg_words / overall[w]) for w, k in counter.items()}
        keywords[tid] = sorted(score, key=lambda w: (-score[w], w))[:top_n]
    return keywords


def tfidf_names(docs: dict[int, list[str]], n_words: int = NAME_WORDS) -> dict[int, str]:
    """"kw1 / kw2 / kw3" per topic; a name already taken (by a lower topic id) gets
    the topic's next keyword appended until it is unique."""
    keywords = ctfidf_keywords(docs)
    names: dict[int, str] = {}
    taken: set[str] = set()
    for tid in sorted(docs):
        words, n = keywords[tid], min(n_words, len(keywords[tid]))
        name = " / ".join(words[:n])
        while name.casefold() in taken and n < len(words):
            n += 1
            name = " / ".join(words[:n])
        if not name:
            name = f"topic {tid}"
        if name.casefold() in taken:
            name = f"{name} #{tid}"
        taken.add(name.casefold())
        names[tid] = name
    return names


def clean_name(text: str, max_words: int) -> str:
    """First non-empty line of an LLM reply, cut to max_words words: the quoted
    phrase when it quotes one, else the line without markup, a "Theme:"-style
    lead-in and edge punctuation.

    >>> clean_name('**Theme:** Classic Hollywood romances.\\nThese films...', 10)
    'Classic Hollywood romances'
    >>> clean_name('The theme of this group is "The American Dream" in film.', 10)
    'The American Dream'
    >>> clean_name(' \\n ... \\n', 10)
    ''
    """
    line = next((ln for ln in text.splitlines() if ln.strip(string.whitespace + string.punctuation)), "")
    quoted = _QUOTED.search(line)
    line = quoted.group(1) if quoted else line
    line = _PREFIX.sub("", re.sub(r"[*#_`\"“”«»]", " ", line).strip())
    words = [w.strip(string.punctuation + "‘’") for w in line.split()]
    return " ".join([w for w in words if w][:max_words])


def naming_prompt(titles: list[str], max_words: int) -> str:
    listing = "\n".join(f"- {t}" for t in titles)
    return (f"Here are the titles of {len(titles)} items that belong to one group:\n{listing}\n\n"
            f"Summarise the theme of this group in one short phrase (at most {max_words} words). "
            "Reply with the phrase only.")


def load_naming_llm(model: str):
    """(tokenizer, model) of an instruct LLM from a local folder, fp32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.resolve_llm(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    llm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return tokenizer, llm


def make_generate_fn(model: str, max_new_tokens: int = NAME_MAX_NEW_TOKENS) -> Callable[[str], str]:
    """Return `generate(prompt) -> reply` (chat template, greedy); loads the model once."""
    model = assets.resolve_llm(model)   # on the driver: executors may not see the repository
    key = f"naming-llm:{model}"

    def generate(prompt: str) -> str:
        import torch

        tokenizer, llm = model_cache.get_or_load(key, lambda: load_naming_llm(model))
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
        inputs = tokenizer(text, return_tensors="pt")
        with torch.inference_mode():
            out = llm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    return generate


def llm_names(titles: dict[int, list[str]], cfg: TopicsConfig, fallback: dict[int, str],
              generate: Callable[[str], str] | None = None) -> dict[int, str]:
    """One LLM call per topic; empty replies take the fallback (tfidf) name, and a
    name already taken gets its fallback appended in parentheses."""
    generate = generate or make_generate_fn(cfg.llm_model)
    names: dict[int, str] = {}
    taken: set[str] = set()
    for tid in sorted(fallback):
        reply = generate(naming_prompt(titles[tid], cfg.max_name_words)) if titles.get(tid) else ""
        name = clean_name(reply, cfg.max_name_words) or fallback[tid]
        if name.casefold() in taken:
            name = f"{name} ({fallback[tid]})"
        if name.casefold() in taken:
            name = f"{name} #{tid}"
        logger.info("topic %d: %r -> %r", tid, reply[:80], name)
        taken.add(name.casefold())
        names[tid] = name
    return names


def name_topics(top: pd.DataFrame, topic_ids: list[int], cfg: TopicsConfig) -> dict[int, str]:
    """A unique, non-empty name for every id in topic_ids, from `top` (topic_id,
    rank, title, genres: the nearest items, see topics.nearest_items)."""
    top = top.sort_values(["topic_id", "rank"])
    genres = top["genres"].fillna("").str.replace("|", " ", regex=False)
    texts = (top["title"].fillna("") + " " + genres).groupby(top["topic_id"]).agg(list).to_dict()
    docs = {tid: texts.get(tid, []) for tid in topic_ids}
    fallback = tfidf_names(docs)
    if cfg.naming == "tfidf":
        return fallback
    nearest = top[top["rank"] <= cfg.llm_titles]
    titles = nearest.groupby("topic_id")["title"].agg(list).to_dict()
    return llm_names({tid: titles.get(tid, []) for tid in topic_ids}, cfg, fallback)
