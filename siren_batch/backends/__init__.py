"""Scoring backends: one forward step per prompt -> a distribution over the rating scale.

The layer sits on config and assets only (no Spark, no `scoring`, no benchmark), so a
backend runs wherever torch runs: a Spark executor, a notebook, a GPU box without Spark.

    from siren_batch.backends import load_backend
    backend = load_backend(cfg.score)           # transformers or vllm, heavy imports inside
    results = backend.score(prompts, user_ids)  # [ScoreResult(probs, rating, ...), ...]
"""

from siren_batch.backends.base import (ANSWER_OPEN, SCALE, Backend, ScoreResult, ScoringError, load_backend,
                                       parse_answer, rating_token_ids, readout, readout_median)

__all__ = ["ANSWER_OPEN", "SCALE", "Backend", "ScoreResult", "ScoringError", "load_backend", "parse_answer",
           "rating_token_ids", "readout", "readout_median"]
