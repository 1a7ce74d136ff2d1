"""Answer-only scoring: readout maths, the three transformers paths, errors, Spark edge.

A tiny random Llama (2 layers, hidden 32) with its own byte-level BPE tokenizer is
built in-test, so these run in seconds on CPU and never touch a hub.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest

from siren_batch import model_cache
from siren_batch.config import ScoreConfig
from siren_batch.backends import SCALE, ScoringError, parse_answer, rating_token_ids, readout, readout_median
from siren_batch.backends.plan import shared_prefix_len
from siren_batch.backends.transformers_backend import TransformersBackend
from siren_batch.scoring import SCORED_COLUMNS, make_predict_fn, score_frame

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SUFFIX = "\n<think>\n</think>\n<answer>"


def _cfg(folder, **kw) -> ScoreConfig:
    base = dict(model=str(folder), device="cpu", dtype="float32", shared_prefix_min_tokens=8, max_new_tokens=8)
    return ScoreConfig(**{**base, **kw})


def _prompt(tok, user: int, item: str) -> str:
    sketch = f"User {user} likes drama, thriller. Recent: Heat, Crime|Drama, {user % 5 + 1}"
    messages = [{"role": "system", "content": "Predict a rating from 1 to 5."},
                {"role": "user", "content": f"{sketch}\nThe candidate is described as: {item}\nRating?"}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + SUFFIX


@pytest.fixture(scope="module")
def backend(tiny_model):
    return TransformersBackend(_cfg(tiny_model))


@pytest.fixture(scope="module")
def prompts(backend):
    items = ["Alien, Horror", "Up, Animation|Family", "Heat 2, Crime"]
    rows = [(f"u{u}", _prompt(backend.tokenizer, u, item)) for u in (1, 2) for item in items]
    return [p for _, p in rows], [g for g, _ in rows]


# ---- pure pieces --------------------------------------------------------------------

def test_readout_matches_hand_computed_values():
    probs, expected, best = readout(np.log([[1, 2, 3, 1, 4], [4, 1, 1, 1, 1]]))
    np.testing.assert_allclose(probs[0], np.array([1, 2, 3, 1, 4]) / 11)
    np.testing.assert_allclose(expected, [(1 + 4 + 9 + 4 + 20) / 11, (4 + 2 + 3 + 4 + 5) / 8])
    assert best.tolist() == [5.0, 1.0]
    _, expected_tie, best_tie = readout(np.array([2.0, 0.0, 0.0, 0.0, 2.0]))  # one row; ties go low
    assert best_tie == 1.0 and math.isclose(expected_tie, 3.0)
    with pytest.raises(ValueError, match="3 logits for a 5-point scale"):
        readout(np.zeros(3))


def test_readout_median_is_the_mae_optimal_point():
    probs = np.array([[0.3, 0.1, 0.05, 0.15, 0.4], [0.0, 0.0, 0.5, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0, 1.0]])
    assert readout_median(probs).tolist() == [4.0, 3.0, 5.0]
    values = np.arange(1.0, 6.0)
    for row, median in zip(probs, readout_median(probs)):   # no point has a lower expected |error|
        loss = [(row * np.abs(values - v)).sum() for v in values]
        assert math.isclose((row * np.abs(values - median)).sum(), min(loss))


def test_parse_answer_takes_last_answer_and_clips():
    assert parse_answer("<think>a</think><answer>4</answer>") == 4.0
    assert parse_answer("<answer>2</answer> <answer> 3.5 stars</answer>") == 3.5
    assert parse_answer("<answer>7</answer>") == 5.0 and parse_answer("<answer>-2</answer>") == 1.0
    assert parse_answer("<answer>10</answer>", lo=0, hi=10) == 10.0
    for bad in ("", "4", "<answer>five</answer>", "<answer>4", "<think>4</think>"):
        assert parse_answer(bad) is None, bad


def test_shared_prefix_len_leaves_every_row_a_token():
    assert shared_prefix_len([[1, 2, 3, 4], [1, 2, 3, 5]]) == 3
    assert shared_prefix_len([[1, 2, 3], [1, 2, 3]]) == 2      # identical prompts
    assert shared_prefix_len([[7, 2], [1, 2]]) == 0


def test_rating_token_ids_single_tokens_and_clear_error(backend):
    tok = backend.tokenizer
    ids = rating_token_ids(tok)
    assert ids == tok.convert_tokens_to_ids(list(SCALE)) and len(set(ids)) == 5
    with pytest.raises(ScoringError, match=r"single tokens.*'4\.5'"):
        rating_token_ids(tok, ("1", "2", "4.5"))


# ---- the transformers backend -----------------------------------------------------------

def _probs(results):
    assert all(r.error is None for r in results), [r.error for r in results]
    return np.array([r.probs for r in results])


def test_one_at_a_time_batched_and_shared_prefix_agree(backend, prompts):
    texts, groups = prompts
    runs = {}
    for name, kw in {"single": dict(batch_size=1, shared_prefix=False),
                     "batched": dict(batch_size=4, shared_prefix=False),
                     "shared": dict(batch_size=2, shared_prefix=True)}.items():
        backend.cfg = dataclasses.replace(backend.cfg, **kw)
        before = backend.stats["prefix_passes"]
        runs[name] = backend.score(texts, groups)
        # shared: one pass for the prefix common to all prompts, then ONE for both users' prefixes
        assert (backend.stats["prefix_passes"] - before) == (2 if name == "shared" else 0)
    single = _probs(runs["single"])
    np.testing.assert_allclose(_probs(runs["batched"]), single, atol=1e-5)
    np.testing.assert_allclose(_probs(runs["shared"]), single, atol=1e-5)
    assert np.abs(single - single[0]).max() > 1e-3             # the model does tell prompts apart
    np.testing.assert_allclose(single.sum(axis=1), 1.0, atol=1e-9)
    for r in runs["shared"]:
        assert 1.0 <= r.rating <= 5.0 and r.output_tokens == 1
        assert r.rating_argmax == float(SCALE[int(np.argmax(r.probs))])
    lengths = [len(backend.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert [r.prompt_tokens for r in runs["single"]] == lengths


def test_common_prefix_serves_users_with_one_candidate(backend, prompts):
    texts, groups = prompts
    one_each = [texts[0], texts[3], texts[4]]
    backend.cfg = dataclasses.replace(backend.cfg, batch_size=2, shared_prefix=True)
    before = dict(backend.stats)
    shared = backend.score(one_each, ["a", "b", "c"])
    assert backend.stats["prefix_passes"] - before["prefix_passes"] == 1   # the common root only
    full = sum(len(backend.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in one_each)
    assert backend.stats["tokens"] - before["tokens"] < full               # the root ran once, not 3 times
    backend.cfg = dataclasses.replace(backend.cfg, batch_size=1, shared_prefix=False)
    np.testing.assert_allclose(_probs(shared), _probs(backend.score(one_each, ["a", "b", "c"])), atol=1e-5)


def test_bad_rows_get_errors_and_the_rest_still_scores(backend, prompts):
    texts, groups = prompts
    backend.cfg = dataclasses.replace(backend.cfg, batch_size=8, shared_prefix=True)
    too_long = texts[0].replace("Rating?", "Rating? " + "drama " * 200)
    results = backend.score([texts[0], too_long, "  ", texts[1]], ["u1", "u1", "u1", "u1"])
    assert results[1].error.startswith("prompt_too_long: ") and results[1].error.endswith("> 128")
    assert results[1].prompt_tokens > 128 and results[1].probs is None
    assert results[2].error == "empty_prompt"
    alone = backend.score([texts[0], texts[1]], ["a", "b"])
    np.testing.assert_allclose(_probs([results[0], results[3]]), _probs(alone), atol=1e-5)
    with pytest.raises(ValueError, match="2 prompts but 1 groups"):
        backend.score(texts[:2], ["u1"])


def _mixed_prompts(tok) -> tuple[list[str], list[str]]:
    """Users with 3, 1, 2 and 4 candidates, sketches from 3 to ~60 tokens, and one
    candidate that fills the model's whole window (128 positions)."""
    def prompt(sketch: str, item: str) -> str:
        messages = [{"role": "system", "content": "Rate 1-5."},
                    {"role": "user", "content": f"{sketch}\nCandidate: {item}\nRating?"}]
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + SUFFIX

    long = "The user likes drama and thriller topics, rated 4 and 5. Recent ratings: Heat, Crime|Drama, 5"
    users = {"long": (long + " Alien, Horror|Sci-Fi, 2", ["Up", "Heat 2, Crime", "Alien 3"]),
             "one": ("Likes thriller.", ["Heat, Crime|Drama"]),
             "short": ("Drama.", ["Up, Animation", "Alien"]),
             "full": ("Likes drama.", ["Up", "Alien, Horror", "Heat", "Up" + " drama" * 75])}
    rows = [(user, prompt(sketch, item)) for user, (sketch, items) in users.items() for item in items]
    return [p for _, p in rows], [g for g, _ in rows]


def test_cross_user_batching_matches_one_at_a_time(backend):
    """Every path, however the passes are cut, gives the one-at-a-time probabilities."""
    texts, groups = _mixed_prompts(backend.tokenizer)
    lengths = [len(backend.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert max(lengths) == backend.max_positions == 128 and min(lengths) < 60
    runs, passes = {}, {}
    for name, kw in {"single": dict(batch_size=1, shared_prefix=False),
                     "plain": dict(batch_size=8, batch_tokens=300, shared_prefix=False),
                     "one_bucket": dict(batch_size=64, batch_tokens=10**6, shared_prefix=True),
                     "two_users_a_pass": dict(batch_size=2, batch_tokens=10**6, shared_prefix=True),
                     "tight_budget": dict(batch_size=64, batch_tokens=200, shared_prefix=True)}.items():
        backend.cfg = dataclasses.replace(backend.cfg, **kw)
        before = dict(backend.stats)
        runs[name] = _probs(backend.score(texts, groups))
        passes[name] = {k: backend.stats[k] - before[k] for k in ("forward_passes", "prefix_passes")}
        np.testing.assert_allclose(runs[name], runs["single"], atol=1e-4, err_msg=name)
    # three users share prefixes ("one" has one candidate): root + ONE prefix pass for all three,
    # then their 9 candidates in one suffix pass and "one" as a plain row
    assert passes["one_bucket"] == {"forward_passes": 4, "prefix_passes": 2}
    assert passes["two_users_a_pass"]["prefix_passes"] == 3
    assert passes["tight_budget"]["forward_passes"] > passes["one_bucket"]["forward_passes"]
    assert passes["plain"]["forward_passes"] > 2            # the token budget cut the plain batches


def test_a_failing_row_fails_alone_with_its_reason(backend, monkeypatch):
    texts, groups = _mixed_prompts(backend.tokenizer)
    bad = texts.index(next(t for t in texts if "Alien 3" in t))
    encode = lambda t: set(backend.tokenizer(t, add_special_tokens=False)["input_ids"])
    poison = next(iter(encode(texts[bad]) - set().union(*(encode(t) for i, t in enumerate(texts) if i != bad))))
    module = backend.model.get_decoder()   # what every pass calls
    forward = module.forward

    def failing_forward(*args, **kw):
        if (kw["input_ids"] == poison).any():
            raise RuntimeError("poisoned row")
        return forward(*args, **kw)

    backend.cfg = dataclasses.replace(backend.cfg, batch_size=1, shared_prefix=False)
    expected = _probs(backend.score(texts[:bad] + texts[bad + 1:], groups[:bad] + groups[bad + 1:]))
    monkeypatch.setattr(module, "forward", failing_forward)
    backend.cfg = dataclasses.replace(backend.cfg, batch_size=64, batch_tokens=10**6, shared_prefix=True)
    results = backend.score(texts, groups)
    assert results[bad].error == "forward_failed: RuntimeError: poisoned row" and results[bad].probs is None
    assert results[bad].prompt_tokens == len(backend.tokenizer(texts[bad], add_special_tokens=False)["input_ids"])
    np.testing.assert_allclose(_probs(results[:bad] + results[bad + 1:]), expected, atol=1e-4)


def test_a_batch_too_big_for_memory_scores_in_halves(backend, prompts, monkeypatch):
    """Out of memory, a batch splits in halves until its passes fit: 6 rows that fit 2 at a
    time score in 4 passes (1+2, 1+2), not 6, with the same numbers."""
    import torch

    texts, groups = prompts
    backend.cfg = dataclasses.replace(backend.cfg, batch_size=64, batch_tokens=10**6, shared_prefix=False)
    expected = _probs(backend.score(texts, groups))
    module = backend.model.get_decoder()
    forward, fitted = module.forward, []

    def small_memory(*args, **kw):
        if kw["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        fitted.append(kw["input_ids"].shape[0])
        return forward(*args, **kw)

    monkeypatch.setattr(module, "forward", small_memory)
    np.testing.assert_allclose(_probs(backend.score(texts, groups)), expected, atol=1e-5)
    assert sorted(fitted) == [1, 1, 2, 2]


def test_a_broken_device_is_raised_and_the_backend_leaves_the_cache(backend, prompts, monkeypatch):
    """A CUDA error that breaks the context fails the task (Spark retries it) instead of
    turning every later row into forward_failed, and the broken backend is not reused."""
    import torch

    texts, groups = prompts
    assert model_cache.get_or_load("test:broken", lambda: backend) is backend
    module = backend.model.get_decoder()
    forward = module.forward

    def refused(*args, **kw):   # a launch the device refuses is not sticky: smaller passes run
        if kw["input_ids"].shape[0] > 2:
            raise torch.AcceleratorError("CUDA error: invalid configuration argument")
        return forward(*args, **kw)

    monkeypatch.setattr(module, "forward", refused)
    assert all(r.error is None for r in backend.score(texts, groups))

    def broken(*args, **kw):
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(module, "forward", broken)
    with pytest.raises(torch.AcceleratorError, match="illegal memory access"):
        backend.score(texts, groups)
    assert model_cache.get_or_load("test:broken", lambda: "reloaded") == "reloaded"
    model_cache.discard("reloaded")


def test_model_cache_slots_hold_one_model_each():
    """A worker whose score settings change between jobs swaps its model, not piles them up."""
    loads = []
    first = model_cache.get_or_load("test:a", lambda: loads.append("a") or "model a", slot="test:cuda:0")
    assert model_cache.get_or_load("test:a", lambda: loads.append("again") or "x", slot="test:cuda:0") == first
    model_cache.get_or_load("test:other-gpu", lambda: loads.append("c") or "model c", slot="test:cuda:1")
    model_cache.get_or_load("test:b", lambda: loads.append("b") or "model b", slot="test:cuda:0")
    assert model_cache.get_or_load("test:a", lambda: loads.append("a2") or "model a") == "model a"
    assert loads == ["a", "c", "b", "a2"]
    assert model_cache.get_or_load("test:other-gpu", lambda: pytest.fail("cuda:1 lost its model")) == "model c"
    for name in ("model a", "model b", "model c"):
        model_cache.discard(name)

    class Engine:   # a model with processes of its own (vLLM): dropped means closed
        closed = False

        def close(self):
            self.closed = True

    engine = model_cache.get_or_load("test:vllm", Engine, slot="test:cuda:0")
    model_cache.get_or_load("test:vllm-other-settings", lambda: "model d", slot="test:cuda:0")
    assert engine.closed
    model_cache.discard("model d")


def test_every_call_sets_the_configured_torch_threads(backend, prompts):
    """A reused worker may have run the encoder with another thread count since the backend
    loaded: each scoring call sets cfg.torch_threads again (0 leaves the count alone)."""
    import torch

    before, cfg = torch.get_num_threads(), backend.cfg
    try:
        backend.cfg = dataclasses.replace(cfg, torch_threads=1)
        for call in (lambda: backend.score(*prompts), lambda: backend.answer_states(prompts[0][:1], [-1])):
            torch.set_num_threads(2)
            call()
            assert torch.get_num_threads() == 1
        backend.cfg = dataclasses.replace(cfg, torch_threads=0)
        torch.set_num_threads(2)
        backend.score(*prompts)
        assert torch.get_num_threads() == 2
    finally:
        backend.cfg = cfg
        torch.set_num_threads(before)


def test_lora_adapter_changes_the_readout(tiny_model, tmp_path, backend, prompts):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "v_proj"],
                                     init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    adapted = TransformersBackend(_cfg(tiny_model, adapter=str(tmp_path / "adapter")))
    assert adapted.adapter_id == str(tmp_path / "adapter")
    base = _probs(backend.score(*prompts))
    assert np.abs(_probs(adapted.score(*prompts)) - base).max() > 1e-4


def test_generate_cot_parses_answers_and_flags_unparseable(tiny_model, prompts, monkeypatch):
    import torch

    cot = TransformersBackend(_cfg(tiny_model, mode="cot", batch_size=4))
    too_long = prompts[0][0].replace("Rating?", "Rating? " + "drama " * 200)
    random_out, long_out = cot.generate_cot([prompts[0][0], too_long])
    assert random_out.error == "unparseable_answer" and random_out.rating is None  # random model: no <answer>
    assert 1 <= random_out.output_tokens <= 8
    assert long_out.error.startswith("prompt_too_long: ") and long_out.error.endswith("+ 8 new > 128")

    tok = cot.tokenizer
    replies = ["<think>\n</think>\n<answer>4</answer><eos>", "<answer>9</answer>"]
    new = [tok(r, add_special_tokens=False)["input_ids"] for r in replies]

    def fake_generate(input_ids, **_):
        width = max(len(n) for n in new)
        tails = [n + [tok.pad_token_id] * (width - len(n)) for n in new]
        return torch.cat([input_ids, torch.tensor(tails)], dim=1)

    monkeypatch.setattr(cot.model, "generate", fake_generate)
    same_length = [prompts[0][0], prompts[0][0]]               # keeps the row order known
    first, second = cot.generate_cot(same_length)
    assert (first.rating, first.rating_argmax, first.probs, first.error) == (4.0, 4.0, None, None)
    assert first.output_tokens == len(new[0])                  # up to and including <eos>
    assert second.rating == 5.0 and second.output_tokens == len(new[1])


# ---- pandas / Spark edge --------------------------------------------------------------------

def test_make_predict_fn_maps_a_pandas_batch(tiny_model, prompts, backend):
    import pandas as pd

    model_cache.clear()
    texts, groups = prompts
    batch = pd.DataFrame({"user_id": groups[:3] + ["u9"], "item_id": ["a", "b", "c", "d"],
                          "prompt": texts[:3] + [None]})
    out = make_predict_fn(_cfg(tiny_model))(batch)
    assert list(out.columns) == list(SCORED_COLUMNS) and len(out) == 4
    assert out["item_id"].tolist() == ["a", "b", "c", "d"]
    assert out["error"].tolist() == [None, None, None, "empty_prompt"]
    assert pd.isna(out["rating"].iloc[3]) and out["probs"].iloc[3] is None
    assert (out["model_id"] == tiny_model.name).all() and out["adapter_id"].isna().all()
    assert out["output_tokens"].iloc[:3].tolist() == [1, 1, 1]
    assert out["rating_median"].iloc[:3].tolist() == readout_median(np.array(out["probs"].iloc[:3].tolist())).tolist()
    np.testing.assert_allclose(np.array(out["probs"].iloc[:3].tolist()),
                               _probs(backend.score(texts[:3], groups[:3])), atol=1e-5)
    model_cache.clear()


def test_score_frame_on_spark(spark, tiny_model, prompts):
    from siren_batch.schemas import PROMPTS

    texts, groups = prompts
    rows = [(g, f"i{k}", "test", None, "sketch", "answer_only", t, 0)
            for k, (g, t) in enumerate(zip(groups, texts))][:4]
    rows.append(("u3", "i9", "test", None, "sketch", "answer_only", "", 0))
    scored = score_frame(spark.createDataFrame(rows, PROMPTS), _cfg(tiny_model, batch_size=2))
    got = {r.item_id: r for r in scored.collect()}
    assert scored.columns == list(SCORED_COLUMNS) and len(got) == 5
    assert got["i9"].error == "empty_prompt" and got["i9"].rating is None and got["i9"].probs is None
    for k in range(4):
        row = got[f"i{k}"]
        assert row.error is None and math.isclose(sum(row.probs), 1.0, abs_tol=1e-9)
        assert row.user_id == groups[k] and 1.0 <= row.rating <= 5.0
    # an explicit task count survives adaptive execution (which coalesces a small shuffle into one)
    spread = score_frame(spark.createDataFrame(rows, PROMPTS), _cfg(tiny_model, partitions=3))
    assert spread.rdd.getNumPartitions() == 3 and spread.count() == 5


def test_errors_are_counted_by_reason_whatever_their_detail(spark):
    from siren_batch.ratings import errors_by_reason

    errors = ["prompt_too_long: 9000 tokens > 8192", "prompt_too_long: 9100 tokens > 8192", "empty_prompt",
              "forward_failed: RuntimeError: boom", "forward_failed: ValueError: nan", None, None]
    frame = spark.createDataFrame([(f"i{k}", e) for k, e in enumerate(errors)], "item_id string, error string")
    assert errors_by_reason(frame) == {"prompt_too_long": 2, "empty_prompt": 1, "forward_failed": 2}


# ---- the bundled SmolLM2 on real prompts ------------------------------------------------------

def test_smollm2_paths_agree_on_real_prompts(shared_movies):
    """Real siren-movies prompts of mixed users: 3 and 1 candidates with ~500-token
    prefixes, and 2 candidates with a prefix a few hundred tokens shorter, in one bucket."""
    from siren_batch.assets import AssetError
    from siren_batch.bench_score import real_prompts

    try:
        smol = TransformersBackend(ScoreConfig(device="cpu", dtype="float32", shared_prefix_min_tokens=16))
    except AssetError as err:
        pytest.skip(str(err))
    texts, groups = real_prompts(smol.tokenizer, shared_movies, users=2, candidates=3)
    texts, groups = texts[:4], groups[:4]                       # the second user keeps one candidate
    short, _ = real_prompts(smol.tokenizer, shared_movies, users=1, candidates=2, recent=1)
    texts, groups = texts + short, groups + ["short", "short"]
    shared = smol.score(texts, groups)
    assert smol.stats["prefix_passes"] == 2                     # the root, then both users at once
    smol.cfg = dataclasses.replace(smol.cfg, batch_size=1, shared_prefix=False)
    single = smol.score(texts, groups)
    np.testing.assert_allclose(_probs(shared), _probs(single), atol=1e-4)
    lengths = [r.prompt_tokens for r in single]
    assert all(300 <= n <= 900 for n in lengths[:4]) and max(lengths) - min(lengths) > 100


def test_bench_prompt_orders_pick_the_same_users_and_question_first_leaves_less_per_pair(shared_movies):
    """bench-score --orders measures the reference's candidate-first order against this
    project's question-first one on the same users and candidates."""
    from transformers import AutoTokenizer

    from siren_batch.assets import default_llm_dir
    from siren_batch.backends.plan import shared_prefix_len
    from siren_batch.bench_score import real_prompts

    if not (default_llm_dir() / "config.json").exists():
        pytest.skip("the default model is not converted here (make model)")
    tok = AutoTokenizer.from_pretrained(default_llm_dir())
    orders = {o: real_prompts(tok, shared_movies, users=3, candidates=4, order=o)
              for o in ("candidate-first", "question-first")}
    (before, users), (after, same_users) = orders.values()
    assert users == same_users and len(before) == len(after) == 12 and before != after
    own = {}
    for order, (texts, groups) in orders.items():
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        prefix = [shared_prefix_len(ids[k:k + 4]) for k in range(0, 12, 4)]
        own[order] = [len(row) - prefix[k // 4] for k, row in enumerate(ids)]
    assert all(a < b for a, b in zip(own["question-first"], own["candidate-first"]))
    with pytest.raises(ValueError, match="unknown prompt order"):
        real_prompts(tok, shared_movies, users=1, candidates=1, order="sideways")


# ---- the GPU benchmark's code path, run on the CPU ------------------------------------------

def test_bench_score_gpu_without_a_gpu_says_so(capsys):
    import torch

    from siren_batch import bench_gpu

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the no-GPU message does not apply")
    assert bench_gpu.main([]) == 0
    assert "no CUDA GPU on this machine" in capsys.readouterr().out


def test_bench_score_gpu_paths_on_cpu(backend, tmp_path, monkeypatch):
    """The benchmark end to end (one layer of the default shape, bf16, CPU) from a
    --save-inputs folder: every path scores every pair and agrees with plain batches."""
    import json

    from siren_batch import bench_gpu, profiling

    texts, groups = _mixed_prompts(backend.tokenizer)
    bench_gpu.save_inputs(tmp_path / "inputs", backend.tokenizer, texts, groups)
    monkeypatch.setattr(profiling, "RESULTS_DIR", tmp_path / "results")
    argv = ["--inputs", str(tmp_path / "inputs"), "--device", "cpu", "--layers", "1", "--shapes", "smollm2-135m",
            "--cot-prompts", "2", "--max-new-tokens", "4", "--name", "gpu"]
    assert bench_gpu.main(argv) == 0
    result = json.loads((tmp_path / "results" / "gpu.json").read_text())
    paths = result["shapes"]["smollm2-135m"]["paths"]
    assert set(paths) == {"plain_b64", "plain_b256", "cross_user", "raw_forward_256"}
    for name in ("plain_b64", "plain_b256", "cross_user"):
        assert paths[name]["errors"] == 0 and paths[name]["max_abs_prob_diff_vs_plain_b64"] < 0.03
    assert paths["cross_user"]["tokens"] < paths["plain_b64"]["tokens"]
    assert result["shapes"]["smollm2-135m"]["cot"]["pairs"] == 2
    assert "| smollm2-135m | cross_user |" in (tmp_path / "results" / "gpu.md").read_text()


def test_the_matmul_peak_stops_at_its_time_budget(monkeypatch):
    """Each product 'takes' 1 s on a fake clock: a 2.5 s budget allows the warm-up and two
    timed runs, not the 11 a fast device gets; with no budget, warm-up and one."""
    from siren_batch import profiling

    for budget, runs in ((2.5, 3), (0.0, 2), (100.0, 11)):
        ticks = iter(range(1000))
        monkeypatch.setattr(profiling.time, "perf_counter", lambda: float(next(ticks)))
        flops = profiling.matmul_peak_flops("bfloat16", n=8, repeats=10, budget_s=budget)
        assert flops == pytest.approx(2 * 8**3)
        assert next(ticks) == 2 * runs   # two clock reads per run


def test_backends_and_the_gpu_benchmark_import_without_pyspark():
    """A GPU box with torch but no Spark (nor polars, TRL, vLLM, DuckDB) runs the backend,
    bench-score-gpu and the GPU kit's training."""
    import subprocess
    import sys

    code = ("import sys\nfor name in ('pyspark', 'polars', 'trl', 'vllm', 'duckdb'): sys.modules[name] = None\n"
            "import siren_batch.backends.transformers_backend, siren_batch.backends.plan, siren_batch.bench_gpu\n"
            "from siren_batch.backends import load_backend\n"
            "import siren_batch.gpu_kit, siren_batch.train.sft, siren_batch.train.loop  # the GPU kit's run")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
