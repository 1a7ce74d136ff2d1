"""Declared schemas for every warehouse table.

One place to look up a table's columns: every job selects exactly these
columns before writing, and readers never infer a schema.
"""

from pyspark.sql import types as T

# ---- canonical inputs (siren_batch.data) -------------------------------------
INTERACTIONS = T.StructType([
    T.StructField("user_id", T.StringType(), False),
    T.StructField("item_id", T.StringType(), False),
    T.StructField("rating", T.DoubleType(), False),
    T.StructField("ts", T.LongType(), False),         # epoch milliseconds
    T.StructField("split", T.StringType(), False),    # train | valid | test
])

ITEMS = T.StructType([
    T.StructField("item_id", T.StringType(), False),
    T.StructField("title", T.StringType(), False),
    T.StructField("genres", T.StringType(), True),    # "cat1|cat2", may be null
    T.StructField("text", T.StringType(), False),     # text for the encoder
])

REJECTS = T.StructType([
    T.StructField("source", T.StringType(), False),   # interactions | items
    T.StructField("reason", T.StringType(), False),   # a code of data.REJECT_REASONS [": detail"]
    T.StructField("record", T.StringType(), True),    # the raw row as JSON
])

# ---- embed_items / build_topics ----------------------------------------------
ITEM_EMBEDDINGS = T.StructType([
    T.StructField("item_id", T.StringType(), False),
    T.StructField("embedding", T.ArrayType(T.FloatType(), False), False),
])

TOPICS = T.StructType([
    T.StructField("topic_id", T.IntegerType(), False),
    T.StructField("name", T.StringType(), False),
    T.StructField("size", T.LongType(), False),
    T.StructField("centroid", T.ArrayType(T.DoubleType(), False), False),
])

ITEM_TOPICS = T.StructType([
    T.StructField("item_id", T.StringType(), False),
    T.StructField("topic_id", T.IntegerType(), False),
    T.StructField("distance", T.DoubleType(), False),
])

# ---- build_sketches ------------------------------------------------------------
TOPIC_STAT = T.StructType([
    T.StructField("topic_id", T.IntegerType(), False),
    T.StructField("name", T.StringType(), False),
    T.StructField("count", T.LongType(), False),
    T.StructField("mean", T.DoubleType(), False),
])

RECENT = T.StructType([
    T.StructField("item_id", T.StringType(), False),
    T.StructField("title", T.StringType(), False),
    T.StructField("genres", T.StringType(), True),
    T.StructField("rating", T.DoubleType(), False),
    T.StructField("ts", T.LongType(), False),
])

_SKETCH_BODY = [
    T.StructField("n_history", T.LongType(), False),
    T.StructField("topic_stats", T.ArrayType(TOPIC_STAT, False), False),
    T.StructField("liked", T.ArrayType(TOPIC_STAT, False), False),
    T.StructField("disliked", T.ArrayType(TOPIC_STAT, False), False),
    T.StructField("recent", T.ArrayType(RECENT, False), False),  # oldest first
    T.StructField("user_mean", T.DoubleType(), True),   # mean of the same history's ratings; null when empty
]

# Serving sketches: one per user, as of the end of the history.
SKETCHES = T.StructType([
    T.StructField("user_id", T.StringType(), False),
    T.StructField("as_of_ts", T.LongType(), False),
    *_SKETCH_BODY,
])

# Example sketches: one per target interaction, built from the interactions
# strictly before it, so no sketch contains the rating it is asked to predict.
EXAMPLE_SKETCHES = T.StructType([
    T.StructField("user_id", T.StringType(), False),
    T.StructField("item_id", T.StringType(), False),
    T.StructField("ts", T.LongType(), False),
    T.StructField("label", T.DoubleType(), False),
    T.StructField("split", T.StringType(), False),
    *_SKETCH_BODY,
    # As-of item prior: the target item's ratings (any user) with a strictly earlier ts.
    T.StructField("item_count", T.LongType(), False),
    T.StructField("item_mean", T.DoubleType(), True),   # null when item_count = 0
])

# As-of item priors for nightly candidates: every item's ratings up to the end of history.
ITEM_PRIORS = T.StructType([
    T.StructField("item_id", T.StringType(), False),
    T.StructField("item_count", T.LongType(), False),
    T.StructField("item_mean", T.DoubleType(), True),
])

# ---- build_prompts -------------------------------------------------------------
PROMPTS = T.StructType([
    T.StructField("user_id", T.StringType(), False),
    T.StructField("item_id", T.StringType(), False),
    T.StructField("split", T.StringType(), False),
    T.StructField("label", T.DoubleType(), True),      # null for unlabelled pairs
    T.StructField("variant", T.StringType(), False),   # sketch | recent | raw
    T.StructField("mode", T.StringType(), False),      # answer_only | cot
    T.StructField("prompt", T.StringType(), False),
    T.StructField("prompt_tokens", T.IntegerType(), False),
])

# ---- score_pairs ---------------------------------------------------------------
RATINGS = T.StructType([
    T.StructField("user_id", T.StringType(), False),
    T.StructField("item_id", T.StringType(), False),
    T.StructField("rating", T.DoubleType(), True),          # expected rating over probs (RMSE-optimal); null on error
    T.StructField("rating_median", T.DoubleType(), True),   # median of probs (MAE-optimal); cot: the parsed answer
    T.StructField("rating_argmax", T.DoubleType(), True),   # most probable scale point (cot: the parsed answer)
    T.StructField("probs", T.ArrayType(T.DoubleType(), False), True),  # one per scale point, sums to 1
    T.StructField("prompt_tokens", T.IntegerType(), True),
    T.StructField("output_tokens", T.IntegerType(), True),  # 1 for answer-only (the rating step)
    T.StructField("model_id", T.StringType(), False),
    T.StructField("adapter_id", T.StringType(), True),
    T.StructField("prompt_template_hash", T.StringType(), False),
    T.StructField("run_id", T.StringType(), False),
    T.StructField("error", T.StringType(), True),           # null when scored; else a one-line reason
    # Filled when a calibrator is stored for the model (siren_batch.calibration); else null.
    T.StructField("calibrated_rating", T.DoubleType(), True),   # point estimate (ridge; RMSE-optimal)
    T.StructField("calibrated_median", T.DoubleType(), True),   # median of calibrated_probs (MAE-optimal)
    T.StructField("calibrated_probs", T.ArrayType(T.DoubleType(), False), True),
    T.StructField("run_date", T.StringType(), False),       # partition column, YYYY-MM-DD
])

# ---- features (siren_batch.features): inputs of the trained scorers -------------------
PAIR_FEATURES = T.StructType([
    T.StructField("user_id", T.StringType(), False),
    T.StructField("item_id", T.StringType(), False),
    T.StructField("n_history", T.LongType(), False),   # the user's earlier ratings
    T.StructField("user_mean", T.DoubleType(), True),  # their mean; null when none
    T.StructField("item_count", T.LongType(), False),  # the item's earlier ratings (any user)
    T.StructField("item_mean", T.DoubleType(), True),  # their mean; null when none
    T.StructField("bias", T.DoubleType(), True),       # user+item bias baseline
    T.StructField("als", T.DoubleType(), True),        # ALS on the bias residuals
])

# ---- evaluate --------------------------------------------------------------------
# Long format: one row per (system, segment, metric), easy to pivot in a notebook.
METRICS = T.StructType([
    T.StructField("eval_id", T.StringType(), False),
    T.StructField("split", T.StringType(), False),
    T.StructField("system", T.StringType(), False),    # e.g. llm:smollm2-135m-instruct, baseline:user_mean
    T.StructField("segment", T.StringType(), False),   # all | history:<5 | history:5-9 | ... | item:unseen
    T.StructField("metric", T.StringType(), False),    # mae | rmse | user_mae | user_rmse | coverage
    T.StructField("value", T.DoubleType(), True),
    T.StructField("n", T.LongType(), False),           # pairs (or users) the value is over
])

# ---- bookkeeping ---------------------------------------------------------------
RUNS = T.StructType([
    T.StructField("run_id", T.StringType(), False),
    T.StructField("stage", T.StringType(), False),
    T.StructField("dataset", T.StringType(), False),
    T.StructField("config_hash", T.StringType(), False),
    T.StructField("started_at", T.StringType(), False),  # ISO-8601 UTC
    T.StructField("duration_s", T.DoubleType(), False),
    T.StructField("input_rows", T.LongType(), False),
    T.StructField("output_rows", T.LongType(), False),
    T.StructField("rejected_rows", T.LongType(), False),
    T.StructField("status", T.StringType(), False),      # ok | failed
    T.StructField("reads", T.StringType(), True),        # tables read, comma-separated (nightly steps)
    T.StructField("writes", T.StringType(), True),       # tables written, comma-separated
])

SPLITS = ("train", "valid", "test")


def with_run_date(schema: T.StructType) -> T.StructType:
    """`schema` plus the run_date partition column (the nightly arrivals and rejects)."""
    return T.StructType([*schema.fields, T.StructField("run_date", T.StringType(), False)])
