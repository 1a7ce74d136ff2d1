"""Hugging Face transformers backend for siren_batch.scoring (CPU or one GPU).

Answer-only scoring never calls generate(): one forward pass per batch, logits
kept only at the last position (`logits_to_keep=1`), restricted to the rating
tokens. Three paths give the same numbers (tests/test_scoring.py checks it):
- one prompt at a time (batch_size=1);
- plain batches: prompts sorted by length, LEFT padded, explicit position ids
  (HF forward() does not derive them from the mask, generate() does);
- shared prefix across users (backends/plan.py cuts the passes): the prefix common
  to ALL prompts (system prompt, template head) runs once; then the prefixes of
  many users (their sketches) run in ONE right-padded pass on top of it, and the
  candidates of all those users run in suffix passes whose rows each attend to
  their own user's row of that KV cache (gathered per batch, pads masked). Passes
  are sized by a token budget (`score.batch_tokens`), so a GPU gets a few large
  passes instead of one small pass per user. With a ~490-token prefix and 10
  candidates per user this processes ~5x fewer tokens than plain batches.

A failing pass is split in halves until the rows that fail stand alone (out of GPU
memory, the failed pass's memory is freed first). A CUDA error that breaks the context
(a device-side assert, an illegal address) is raised instead: the task fails, PySpark's
worker exits on a task's error, and Spark's retry runs in a fresh process. The backend
also leaves the model cache, for callers outside Spark that catch the error.
"""

from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple

import numpy as np

from siren_batch import model_cache
from siren_batch.assets import llm_id, resolve_llm
from siren_batch.config import ScoreConfig
from siren_batch.backends.base import SCALE, ScoreResult, parse_answer, rating_token_ids, readout
from siren_batch.backends.device import empty_cuda_cache, is_cuda, max_positions, pick_device, pick_dtype
from siren_batch.backends.plan import Prefix, chunk_by_tokens, prefix_groups, shared_prefix_len

logger = logging.getLogger(__name__)


class Context(NamedTuple):
    """A KV cache that later passes continue from: the common root (batch of one) or a
    bucket of users' prefixes (one row per user, right padded)."""

    kv: list        # per decoder layer (keys, values), each (rows, kv heads, width, head dim)
    mask: Any       # (rows, width) long: 1 = a real key, 0 = padding
    lengths: Any    # (rows,) long: real tokens per row = the next position id
    width: int

    def take(self, owners: list[int]) -> "Context":
        """The rows of `owners`, in order (a slice when they are all the same row)."""
        if len(set(owners)) == 1:
            u = owners[0]
            return Context([(k[u:u + 1], v[u:u + 1]) for k, v in self.kv], self.mask[u:u + 1],
                           self.lengths[u:u + 1], self.width)
        index = self.mask.new_tensor(owners)
        return Context([(k.index_select(0, index), v.index_select(0, index)) for k, v in self.kv],
                       self.mask.index_select(0, index), self.lengths.index_select(0, index), self.width)


# CUDA errors after which the process's context is unusable ("sticky" errors): every later call fails too
_STICKY = ("device-side assert", "illegal memory access", "illegal address", "misaligned address",
           "unspecified launch failure", "illegal instruction", "hardware stack error")


def _fatal(err: BaseException) -> bool:
    """A CUDA error that leaves the context broken. Out of memory, or a launch the device
    refuses (too large a grid), is not one: a smaller pass may run."""
    import torch

    broken = getattr(torch, "AcceleratorError", None)
    return (broken is not None and isinstance(err, broken) and not isinstance(err, torch.OutOfMemoryError)
            and any(s in str(err).lower() for s in _STICKY))


def _generated_length(new: list[int], eos: set[int], pad: int) -> int:
    """Tokens really generated: up to and including the first EOS, else up to padding.

    >>> _generated_length([5, 6, 2, 0, 0], eos={2}, pad=0), _generated_length([5, 6, 0, 0], eos={2}, pad=0)
    (3, 2)
    """
    for k, tok in enumerate(new):
        if tok in eos:
            return k + 1
        if tok == pad:
            return k
    return len(new)


def _cache(kv: list, rows: int):
    """A DynamicCache over (keys, values) per layer, expanded to `rows` (a batch-of-one
    root serves every row) without a copy: the forward's own concatenation is the
    only one (DynamicCache's constructor would concatenate onto an empty tensor)."""
    from transformers import DynamicCache

    cache = DynamicCache([(k[:, :, :0], v[:, :, :0]) for k, v in kv])   # empty layers of the right kind
    for layer, (keys, values) in zip(cache.layers, kv):
        layer.keys, layer.values = keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1)
    return cache


class TransformersBackend:
    """AutoModelForCausalLM (+ optional merged LoRA adapter) in eval mode."""

    def __init__(self, cfg: ScoreConfig, model=None, tokenizer=None):
        """Load cfg.model (+ cfg.adapter); or serve an already built `model` and
        `tokenizer` (benchmarks with random-initialised weights, tests)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self._use_threads()
        if model is None:
            path = resolve_llm(cfg.model)
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(cfg.dtype, self.device))
            if cfg.adapter:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, cfg.adapter).merge_and_unload()
            self.model_id = llm_id(cfg.model)
        else:
            self.model_id = cfg.model
        self.tokenizer = tokenizer
        self.model = model.to(self.device).eval()
        self.adapter_id = cfg.adapter
        self.rating_ids = rating_token_ids(self.tokenizer, SCALE)
        self.max_positions = max_positions(model.config, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        # Work done so far (benchmarks, tests, stage timers): forward passes, prefix passes, real and
        # padded tokens, seconds spent tokenizing.
        self.stats = {"forward_passes": 0, "prefix_passes": 0, "tokens": 0, "padded_tokens": 0, "encode_s": 0.0}
        logger.info("scoring model %s (adapter %s) on %s/%s, max %s positions, rating ids %s",
                    self.model_id, self.adapter_id, self.device, model.dtype, self.max_positions,
                    self.rating_ids)

    # ---- shared helpers ----------------------------------------------------------

    def _encode(self, prompts: list[str], reserve: int = 0) -> tuple[list[list[int]], dict[int, ScoreResult]]:
        """Token ids per prompt, and error results for rows that cannot run."""
        start = time.perf_counter()
        ids = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if prompts else []
        self.stats["encode_s"] += time.perf_counter() - start
        errors: dict[int, ScoreResult] = {}
        for i, (text, row) in enumerate(zip(prompts, ids)):
            if not text.strip() or not row:
                errors[i] = ScoreResult.failed("empty_prompt", len(row))
            elif self.max_positions and len(row) + reserve > self.max_positions:
                extra = f" + {reserve} new" if reserve else ""
                errors[i] = ScoreResult.failed(
                    f"prompt_too_long: {len(row)} tokens{extra} > {self.max_positions}", len(row))
        return ids, errors

    def _use_threads(self) -> None:
        """On CPU, cfg.torch_threads (when > 0), set at load and again by every public call:
        a reused worker process may have run another stage's model (the encoder) since."""
        import torch

        if self.cfg.torch_threads and self.device == "cpu" and torch.get_num_threads() != self.cfg.torch_threads:
            torch.set_num_threads(self.cfg.torch_threads)

    def _to_device(self, tensor):
        """Host tensor -> device; on CUDA pinned and asynchronous, so the copy overlaps the
        pass still running while Python builds the next batch."""
        if is_cuda(self.device):
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def _pad(self, rows: list[list[int]], left: bool = True, count: bool = True):
        """(input ids, mask) of token rows padded to the longest: LEFT for a readout at the
        last position, RIGHT for a prefix whose continuations follow its real tokens.
        count: one forward pass of these rows, in stats (counted here, on the host: a
        count of the device's mask would wait for the GPU)."""
        import torch

        width = max(len(r) for r in rows)
        if count:
            self.stats["forward_passes"] += 1
            self.stats["tokens"] += sum(len(r) for r in rows)
            self.stats["padded_tokens"] += len(rows) * width
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, row in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            input_ids[j, span] = torch.tensor(row, dtype=torch.long)
            mask[j, span] = 1
        return self._to_device(input_ids), self._to_device(mask)

    def _rating_logits(self, rows: list[list[int]], prefix: "Context | None" = None):
        """Logits (float32, on the device) of the rating tokens after each row, each row
        continuing its own row of `prefix` (a batch-of-one prefix serves every row)."""
        import torch

        input_ids, mask = self._pad(rows)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        extra = {"use_cache": False}
        if prefix is not None:
            b = len(rows)
            positions = positions + prefix.lengths[:, None]
            mask = torch.cat([prefix.mask.expand(b, -1), mask], dim=1)
            extra = {"use_cache": True, "past_key_values": _cache(prefix.kv, b)}
        with torch.inference_mode():
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                             logits_to_keep=1, **extra)
        return out.logits[:, -1, self.rating_ids].float()

    def _extend(self, rows: list[list[int]], root: "Context | None" = None) -> "Context":
        """Run token rows (right padded) on top of `root` (batch of one, shared) and keep
        their KV cache: the context their continuations attend to."""
        import torch
        from transformers.cache_utils import DynamicLayer

        start = root.width if root else 0
        input_ids, mask = self._pad(rows, left=False)
        b, width = input_ids.shape
        positions = torch.arange(start, start + width, device=self.device).expand(b, -1)
        cache = _cache(root.kv, b) if root else None
        with torch.inference_mode():
            # no mask needed: with right padding, causal attention keeps every real token
            # off the pads that follow it (pads see real tokens, so nothing is all-masked)
            cache = self.model(input_ids=input_ids, position_ids=positions, past_key_values=cache,
                               use_cache=True, logits_to_keep=1).past_key_values
        self.stats["prefix_passes"] += 1
        if not all(type(layer) is DynamicLayer for layer in cache.layers):  # sliding window etc.
            raise ValueError("shared prefix needs a plain full-attention KV cache")
        key_mask = mask if root is None else torch.cat([root.mask.expand(b, -1), mask], dim=1)
        return Context([(layer.keys, layer.values) for layer in cache.layers], key_mask,
                       mask.sum(-1) + start, start + width)

    def _run_guarded(self, rows: list[int], ids: list[list[int]], results: list, fn, top: bool = True) -> None:
        """fn(rows) fills results. A failing batch is split in halves until the rows that
        fail stand alone, so a bad row costs only itself and ~2 log2(batch) extra passes."""
        failure = self._attempt(fn, rows)
        if failure is None:
            return
        if len(rows) > 1:
            if top:
                logger.warning("batch of %d failed (%s); retrying in halves", len(rows), failure)
            half = len(rows) // 2
            self._run_guarded(rows[:half], ids, results, fn, top=False)
            self._run_guarded(rows[half:], ids, results, fn, top=False)
        else:
            results[rows[0]] = ScoreResult.failed(f"forward_failed: {failure}", len(ids[rows[0]]))

    def _attempt(self, fn, *args) -> str | None:
        """fn(*args); None, or why it failed. The retry runs after the except block has
        let go of the failed pass (its traceback holds the pass's tensors), with the
        CUDA allocator's cache emptied. A broken CUDA context is raised (module doc)."""
        try:
            fn(*args)
            return None
        except (RuntimeError, ValueError) as err:
            if _fatal(err):
                model_cache.discard(self)
                raise
            failure = f"{type(err).__name__}: {err}"
        empty_cuda_cache()
        return failure

    def _fill(self, rows: list[int], ids: list[list[int]], logits, results: list) -> None:
        logits = logits.cpu().numpy()
        probs, expected, best = readout(logits, SCALE)
        finite = np.isfinite(logits).all(axis=1)
        for j, row in enumerate(rows):
            if not finite[j]:
                results[row] = ScoreResult.failed("nonfinite_logits", len(ids[row]))
            else:
                results[row] = ScoreResult(probs[j].tolist(), float(expected[j]), float(best[j]),
                                           len(ids[row]), 1, None)

    def _batches(self, rows: list[int], ids: list[list[int]], start: int = 0) -> list[list[int]]:
        """Rows by length (little padding), within the row cap and the token budget; each
        row's tokens after `start` run on a context of `start` tokens."""
        return chunk_by_tokens(rows, lambda i: len(ids[i]) - start, self.cfg.batch_size,
                               self.cfg.batch_tokens, context=start)

    # ---- answer-only ---------------------------------------------------------------

    def score(self, prompts: list[str], groups: list[str]) -> list[ScoreResult]:
        if len(groups) != len(prompts):
            raise ValueError(f"score: {len(prompts)} prompts but {len(groups)} groups")
        self._use_threads()
        ids, errors = self._encode(prompts)
        results: list[ScoreResult | None] = [errors.get(i) for i in range(len(prompts))]
        todo = [i for i in range(len(prompts)) if i not in errors]
        plain, root = todo, None
        if self.cfg.shared_prefix and todo:
            root = self._root(todo, ids)
            start = root.width if root else 0
            users, plain = prefix_groups(todo, groups, ids, start, self.cfg.shared_prefix_min_tokens)
            for bucket in chunk_by_tokens(users, lambda p: p.length - start, self.cfg.batch_size,
                                          self.cfg.batch_tokens, context=start):
                self._score_bucket(bucket, ids, root, results)
        for batch in self._batches(plain, ids, root.width if root else 0):
            self._run_guarded(batch, ids, results, lambda r: self._score_plain(r, ids, root, results))
        return results

    def _root(self, rows: list[int], ids: list[list[int]]) -> "Context | None":
        """Context of the prefix common to ALL prompts (system prompt, template head),
        computed once per call; None when too short to pay."""
        length = shared_prefix_len([ids[i] for i in rows]) if len(rows) >= 2 else 0
        if length < self.cfg.shared_prefix_min_tokens:
            return None
        try:
            return self._extend([ids[rows[0]][:length]])
        except (RuntimeError, ValueError) as err:
            logger.warning("common prefix pass failed (%s); scoring without it", err)
            return None

    def _score_plain(self, rows: list[int], ids: list[list[int]], root, results: list) -> None:
        start = root.width if root else 0
        self._fill(rows, ids, self._rating_logits([ids[i][start:] for i in rows], prefix=root), results)

    def _score_bucket(self, bucket: list[Prefix], ids: list[list[int]], root, results: list) -> None:
        """The prefixes of many users in one pass, then all their candidates in suffix
        passes on that context, each row attending to its own user's prefix. A failing
        prefix pass is retried user by user, and a user whose prefix cannot run scores
        its rows alone, so an error stays with the rows that cause it."""
        start = root.width if root else 0
        made: list = []
        failure = self._attempt(lambda: made.append(self._extend([ids[p.rows[0]][start:p.length] for p in bucket],
                                                                  root)))
        if failure is not None:
            logger.warning("prefix pass of %d users failed (%s); retrying smaller", len(bucket), failure)
            if len(bucket) > 1:
                half = len(bucket) // 2
                self._score_bucket(bucket[:half], ids, root, results)
                self._score_bucket(bucket[half:], ids, root, results)
            else:   # the user's rows as plain rows, within the usual limits
                for batch in self._batches(list(bucket[0].rows), ids, start):
                    self._run_guarded(batch, ids, results, lambda r: self._score_plain(r, ids, root, results))
            return
        context = made[0]
        owner = {row: u for u, user in enumerate(bucket) for row in user.rows}
        cut = {row: user.length for user in bucket for row in user.rows}
        done: list = []  # (rows, logits on the device): read back once, after the last pass

        def suffixes(rows: list[int]) -> None:
            picked = context.take([owner[r] for r in rows])
            done.append((rows, self._rating_logits([ids[r][cut[r]:] for r in rows], prefix=picked)))

        for batch in chunk_by_tokens(list(owner), lambda r: len(ids[r]) - cut[r], self.cfg.batch_size,
                                     self.cfg.batch_tokens, context=context.width):
            self._run_guarded(batch, ids, results, suffixes)
        for rows, logits in done:   # the read-back is where a pass's asynchronous CUDA error shows
            failure = self._attempt(self._fill, rows, ids, logits, results)
            if failure:
                for row in rows:
                    results[row] = ScoreResult.failed(f"forward_failed: {failure}", len(ids[row]))

    # ---- hidden states (the probe's features) --------------------------------------

    def answer_states(self, prompts: list[str], layers: list[int]) -> tuple[np.ndarray, list[str | None]]:
        """Hidden states at the answer position (the last prompt token) of the given
        decoder layers (negative = from the top), concatenated: (n, hidden * len(layers))
        float32, and per prompt None or its error (its row is then zeros)."""
        import torch

        self._use_threads()
        ids, errors = self._encode(prompts)
        width = self.model.config.hidden_size * len(layers)
        out = np.zeros((len(prompts), width), dtype=np.float32)
        results: list[ScoreResult | None] = [errors.get(i) for i in range(len(prompts))]
        todo = [i for i in range(len(prompts)) if i not in errors]

        def states(batch: list[int]) -> None:
            input_ids, mask = self._pad([ids[i] for i in batch])
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                hidden = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                    output_hidden_states=True, logits_to_keep=1).hidden_states
            out[batch] = torch.cat([hidden[layer][:, -1, :] for layer in layers], dim=-1).float().cpu().numpy()

        for batch in self._batches(todo, ids):   # a failing pass splits in halves, as scoring's do
            self._run_guarded(batch, ids, results, states)
        return out, [r.error if r is not None else None for r in results]

    # ---- chain of thought ----------------------------------------------------------

    def generate_cot(self, prompts: list[str]) -> list[ScoreResult]:
        self._use_threads()
        ids, errors = self._encode(prompts, reserve=self.cfg.max_new_tokens)
        results: list[ScoreResult | None] = [errors.get(i) for i in range(len(prompts))]
        todo = [i for i in range(len(prompts)) if i not in errors]
        # sized for what the pass holds at its end: the prompt and every new token
        for batch in chunk_by_tokens(todo, lambda i: len(ids[i]), self.cfg.batch_size, self.cfg.batch_tokens,
                                     context=self.cfg.max_new_tokens):
            self._run_guarded(batch, ids, results, lambda r: self._generate(r, ids, results))
        return results

    def _generate(self, rows: list[int], ids: list[list[int]], results: list) -> None:
        import torch

        input_ids, mask = self._pad([ids[i] for i in rows], count=False)
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                      max_new_tokens=self.cfg.max_new_tokens, pad_token_id=self.pad_id,
                                      stop_strings=["</answer>"], tokenizer=self.tokenizer)   # nothing after is read
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        for j, row in enumerate(rows):
            new = out[j, input_ids.shape[1]:].tolist()
            stop = _generated_length(new, eos, self.pad_id)
            value = parse_answer(self.tokenizer.decode(new[:stop]))
            results[row] = ScoreResult(None, value, value, len(ids[row]), stop,
                                       None if value is not None else "unparseable_answer")
