"""Rating prompts in the reference code's format, rendered with the model's chat template.

User message, user-specific part FIRST so all prompts of one user share a long
prefix (KV-cache reuse when scoring many candidates of one user):

    The user shows preference for the following topics (ratings ≥ 4):
    - <topic name>
                                                     (blank line between sections)
    The user shows dislike for the following topics (ratings < 4):
    - <topic name>

    Below are the user's recent ratings in the format: Title, Genres, Rating
    Title, cat1|cat2, 4.0

    The user has rated 57 items before, 3.62 on average.          (prompts.priors only)

    Based on the above information, what rating will the user give the candidate below?
    The candidate is described as: Title, cat1|cat2
    Earlier ratings of this item: 112, 4.05 on average.            (prompts.priors only)

The fixed question comes BEFORE the candidate, so with a shared per-user prefix a
pair costs only its candidate line, the chat template's tail and the answer cue.
The priors are as of strictly before the target (example sketches) or the end of
history (serving), never including the rating being predicted. An empty section is left
out. Variants: sketch (topics + recent), recent (recent only), raw (the user's whole
earlier history, no topics; the token ablation).
Modes: cot ends at the chat template's generation prompt; answer_only appends
ANSWER_ONLY_SUFFIX so the next token is the rating.

Unknown candidates: a pair whose item_id is not in the items table fails the
job with an error naming the pairs (there is no text to describe the candidate,
and the prompts table has no error column); the caller must pass known items.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any, Callable, Iterator

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F, types as T

from siren_batch import assets, model_cache, schemas
from siren_batch.config import Config, PromptsConfig
from siren_batch.timers import StageTimers

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You are a recommender assistant. From the user's past behaviour, predict the rating from 1.0 "
    "to 5.0 that the user will give to the candidate item. Reason first: put your reasoning inside "
    "<think> </think> and the rating inside <answer> </answer>. The rating must be a number between "
    "1.0 and 5.0.")
LIKED_HEADER = "The user shows preference for the following topics (ratings ≥ {theta}):"
DISLIKED_HEADER = "The user shows dislike for the following topics (ratings < {theta}):"
RECENT_HEADER = "Below are the user's recent ratings in the format: Title, Genres, Rating"
RAW_HEADER = "Below are the user's past ratings in the format: Title, Genres, Rating"
CANDIDATE_LINE = "The candidate is described as: {item}"
QUESTION = "Based on the above information, what rating will the user give the candidate below?"
USER_PRIOR = "The user has rated {count} items before, {mean:.2f} on average."
USER_PRIOR_NONE = "The user has no earlier ratings."
ITEM_PRIOR = "Earlier ratings of this item: {count}, {mean:.2f} on average."
ITEM_PRIOR_NONE = "Earlier ratings of this item: none."
SECTION_SEP = "\n\n"
ANSWER_ONLY_SUFFIX = "\n<think>\n</think>\n<answer>"
# prompts.think_prefill: cot prompts end with the opening tag, so generation starts inside
# the reasoning (a small model otherwise often skips the tag, and the format reward with it).
THINK_PREFILL = "<think>\n"

VARIANTS = ("sketch", "recent", "raw")
MODES = ("answer_only", "cot")


def prompt_settings(cfg: Config) -> dict[str, Any]:
    """The settings a score run's prompts follow, beside the template strings: what it
    takes to reproduce them from the stored sketches (only those that apply to its variant
    and mode, so that an unused one does not set two runs apart)."""
    settings = {"variant": cfg.score.variant, "mode": cfg.score.mode, "priors": cfg.prompts.priors}
    if cfg.score.variant == "raw":
        settings["raw_history_max"] = cfg.prompts.raw_history_max
    if cfg.score.mode == "cot":
        settings["think_prefill"] = cfg.prompts.think_prefill
    return settings


def prompt_template_hash(cfg: Config) -> str:
    """Short hash of every template string and of the run's prompt_settings; stored with
    each rating so outputs say which prompts produced them, and checked before a
    calibrator is fit on, or applied to, a run's scores (siren_batch.calibration)."""
    parts = [SYSTEM_PROMPT, LIKED_HEADER, DISLIKED_HEADER, RECENT_HEADER, RAW_HEADER,
             CANDIDATE_LINE, QUESTION, SECTION_SEP, ANSWER_ONLY_SUFFIX, USER_PRIOR, USER_PRIOR_NONE,
             ITEM_PRIOR, ITEM_PRIOR_NONE, THINK_PREFILL, json.dumps(prompt_settings(cfg), sort_keys=True)]
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:12]


def item_text(item: dict[str, Any]) -> str:
    """`Title, cat1|cat2`, or the title alone when genres is null."""
    genres = item.get("genres")
    return f"{item['title']}, {genres}" if genres else str(item["title"])


def _rating_lines(entries) -> list[str]:
    return [f"{item_text(e)}, {float(e['rating']):.1f}" for e in entries]


def _prior(count: Any, mean: Any, line: str, none: str) -> str:
    known = count is not None and count == count and int(count) > 0 and mean is not None and mean == mean
    return line.format(count=int(count), mean=float(mean)) if known else none


def render_user_message(sketch: dict[str, Any], candidate: dict[str, Any], variant: str,
                        theta: float, priors: bool = False) -> str:
    """The user turn. sketch: a SKETCHES/EXAMPLE_SKETCHES row as a dict (liked and
    disliked: entries with "name"; recent: entries with title, genres, rating;
    n_history and user_mean for the priors); the raw variant reads sketch["history"]
    instead (same entry shape, oldest first). candidate: title and genres
    (item_count and item_mean for the priors)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown prompt variant {variant!r}; use one of {', '.join(VARIANTS)}")
    sections = []
    if variant == "sketch":
        for header, key in ((LIKED_HEADER, "liked"), (DISLIKED_HEADER, "disliked")):
            topics = sketch.get(key)
            if topics is not None and len(topics):
                lines = [header.format(theta=f"{theta:g}")] + [f"- {t['name']}" for t in topics]
                sections.append("\n".join(lines))
    entries = sketch.get("history" if variant == "raw" else "recent")
    if entries is not None and len(entries):
        sections.append("\n".join([RAW_HEADER if variant == "raw" else RECENT_HEADER,
                                   *_rating_lines(entries)]))
    candidate_lines = [QUESTION, CANDIDATE_LINE.format(item=item_text(candidate))]
    if priors:
        sections.append(_prior(sketch.get("n_history"), sketch.get("user_mean"), USER_PRIOR, USER_PRIOR_NONE))
        candidate_lines.append(_prior(candidate.get("item_count"), candidate.get("item_mean"),
                                      ITEM_PRIOR, ITEM_PRIOR_NONE))
    sections.append("\n".join(candidate_lines))
    return SECTION_SEP.join(sections)


def render_prompt(tokenizer, sketch: dict[str, Any], candidate: dict[str, Any], variant: str,
                  mode: str, theta: float, priors: bool = False, think_prefill: bool = False) -> str:
    """The full prompt text: chat template with the generation prompt, plus the
    answer-only suffix in answer_only mode, or THINK_PREFILL in cot mode with think_prefill."""
    if mode not in MODES:
        raise ValueError(f"unknown prompt mode {mode!r}; use one of {', '.join(MODES)}")
    messages = [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": render_user_message(sketch, candidate, variant, theta, priors)}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return with_mode(text, mode, think_prefill)


def with_mode(generation_prompt: str, mode: str, think_prefill: bool = False) -> str:
    """The chat template's text (ending at the generation prompt) as a prompt of `mode`.

    >>> with_mode("A:", "answer_only", True), with_mode("A:", "cot", True), with_mode("A:", "cot")
    ('A:\\n<think>\\n</think>\\n<answer>', 'A:<think>\\n', 'A:')
    """
    if mode == "answer_only":
        return generation_prompt + ANSWER_ONLY_SUFFIX
    return generation_prompt + THINK_PREFILL if think_prefill else generation_prompt


def answer_only_of(cot_prompt: str) -> str:
    """The answer-only prompt of a cot prompt (with or without THINK_PREFILL).

    >>> answer_only_of("A:<think>\\n") == answer_only_of("A:") == "A:" + ANSWER_ONLY_SUFFIX
    True
    """
    return cot_prompt.removesuffix(THINK_PREFILL) + ANSWER_ONLY_SUFFIX


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# ---- Spark -------------------------------------------------------------------------

_ENTRY = T.StructType([T.StructField("ts", T.LongType()), T.StructField("item_id", T.StringType()),
                       T.StructField("title", T.StringType()), T.StructField("genres", T.StringType()),
                       T.StructField("rating", T.DoubleType())])


def _history_entry() -> Column:
    # ts and item_id lead so that sort_array orders entries oldest first.
    return F.struct("ts", "item_id", F.coalesce("title", "item_id").alias("title"), "genres", "rating")


def _with_history(frame: DataFrame, history: DataFrame, items: DataFrame, keep_last: int) -> DataFrame:
    """Attach `_history`: the user's interactions with ts < the pair's ts (all of
    them when pairs carry no ts), oldest first, the last `keep_last` when > 0."""
    per_user = (history.select("user_id", "item_id", "rating", "ts")
                .join(items.select("item_id", "title", "genres"), on="item_id", how="left")
                .groupBy("user_id")
                .agg(F.sort_array(F.collect_list(_history_entry())).alias("_all")))
    frame = frame.join(per_user, on="user_id", how="left")
    every = F.coalesce(F.col("_all"), F.array().cast(T.ArrayType(_ENTRY)))
    before = F.filter(every, lambda h: h["ts"] < F.col("ts")) if "ts" in frame.columns else every
    if keep_last > 0:
        start = F.greatest(F.size(before) - F.lit(keep_last - 1), F.lit(1))
        before = F.slice(before, start, F.lit(keep_last))
    return frame.withColumn("_history", before).drop("_all")


def _make_render_fn(tokenizer_path: str, variants: list[str], modes: list[str], theta: float, priors: bool,
                    timers: StageTimers | None = None, count_tokens: bool = True, think_prefill: bool = False
                    ) -> Callable[[Iterator], Iterator]:
    timers = timers or StageTimers()
    columns = _prompt_schema(count_tokens).names

    def render_batch(tokenizer, pdf):
        import pandas as pd

        start = time.perf_counter()
        unknown = pdf[pdf["_cand_title"].isna()]
        if len(unknown):
            pairs = ", ".join(f"({u}, {i})" for u, i in zip(unknown["user_id"][:5], unknown["item_id"][:5]))
            raise ValueError(f"{len(unknown)} pair(s) name a candidate item missing from the items "
                             f"table, e.g. (user_id, item_id) {pairs}: drop or fix them before build_prompts")
        out = {name: [] for name in columns}
        for rec in pdf.to_dict("records"):
            sketch = {"liked": rec["liked"], "disliked": rec["disliked"], "recent": rec["recent"],
                      "history": rec["_history"], "n_history": rec["n_history"],
                      "user_mean": rec["user_mean"]}
            candidate = {"title": rec["_cand_title"], "genres": rec["_cand_genres"],
                         "item_count": rec["item_count"], "item_mean": rec["item_mean"]}
            label = None if pd.isna(rec["label"]) else float(rec["label"])
            for variant in variants:
                cot = render_prompt(tokenizer, sketch, candidate, variant, "cot", theta, priors)
                for mode in modes:
                    out["prompt"].append(with_mode(cot, mode, think_prefill))
                    for key, value in (("user_id", rec["user_id"]), ("item_id", rec["item_id"]),
                                       ("split", rec["split"]), ("label", label),
                                       ("variant", variant), ("mode", mode)):
                        out[key].append(value)
        rendered = time.perf_counter()
        timers.add("render", rendered - start)
        if not count_tokens:
            return pd.DataFrame(out, columns=columns)
        ids = tokenizer(out["prompt"], add_special_tokens=False)["input_ids"] if out["prompt"] else []
        out["prompt_tokens"] = [len(x) for x in ids]
        timers.add("render_tokenize", time.perf_counter() - rendered)
        return pd.DataFrame(out, columns=columns).astype({"prompt_tokens": "int32"})

    def render(batches):
        tokenizer = model_cache.get_or_load(f"tokenizer:{tokenizer_path}",
                                            lambda: load_tokenizer(tokenizer_path))
        yield from timers.map_batches(batches, lambda pdf: render_batch(tokenizer, pdf),
                                      read="render_input", write="render_output")
    return render


def build_prompts(pairs: DataFrame, items: DataFrame, cfg: PromptsConfig, theta: float,
                  history: DataFrame | None = None, timers: StageTimers | None = None,
                  count_tokens: bool = True) -> DataFrame:
    """One prompt per pair x cfg.variants x cfg.modes (schemas.PROMPTS), one
    user's rows adjacent. pairs: user_id, item_id, split, label (may be absent =
    null), liked, disliked, recent, and ts for example pairs (it bounds the raw
    history); history (interactions) is needed for the raw variant only. Filtering
    pairs to cfg.splits is the caller's job. Unknown candidate items fail the job.
    `timers` (siren_batch.timers) collects the rendering's seconds by phase.
    count_tokens=False leaves out prompt_tokens, and with it a second tokenizing of every
    prompt, for a caller whose model tokenizes (and counts) them anyway (the score stage)."""
    if "raw" in cfg.variants and history is None:
        raise ValueError("prompts.variants includes raw: pass the interactions frame as `history`")
    frame = pairs if "label" in pairs.columns else pairs.withColumn("label", F.lit(None).cast("double"))
    candidates = items.select("item_id", F.col("title").alias("_cand_title"),
                              F.col("genres").alias("_cand_genres"))
    frame = frame.join(candidates, on="item_id", how="left")
    if "raw" in cfg.variants:
        frame = _with_history(frame, history, items, cfg.raw_history_max)
    else:
        frame = frame.withColumn("_history", F.lit(None).cast(T.ArrayType(_ENTRY)))
    for name, kind in (("n_history", "long"), ("user_mean", "double"), ("item_count", "long"),
                       ("item_mean", "double")):
        if name not in frame.columns:  # priors are optional inputs: absent = unknown
            frame = frame.withColumn(name, F.lit(None).cast(kind))
    frame = (frame.select("user_id", "item_id", "split", F.col("label").cast("double").alias("label"),
                          "liked", "disliked", "recent", "_history", "_cand_title", "_cand_genres",
                          "n_history", "user_mean", "item_count", "item_mean")
             .repartition("user_id").sortWithinPartitions("user_id", "item_id"))
    # Resolved on the driver so a missing model folder fails before any task starts.
    render = _make_render_fn(assets.resolve_llm(cfg.tokenizer), list(cfg.variants), list(cfg.modes), theta,
                             cfg.priors, timers, count_tokens, cfg.think_prefill)
    return frame.mapInPandas(render, _prompt_schema(count_tokens))


def _prompt_schema(count_tokens: bool) -> T.StructType:
    return schemas.PROMPTS if count_tokens else T.StructType([f for f in schemas.PROMPTS if f.name != "prompt_tokens"])
