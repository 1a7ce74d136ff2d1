"""Hugging Face transformers backend for siren_batch.scoring (CPU or one GPU).

Answer-only scoring never calls generate(): one forward pass per batch, logits
kept only at the last position (`logits_to_keep=1`), restricted to the rating
tokens. Three paths give the same numbers (tests/test_scoring.py checks it):
- one prompt at a time (batch_size=1);
- plain batches: prompts sorted by length, LEFT padded, explicit position ids
  (HF forward() does not derive them from the mask, generate() does);
- shared prefix, a two-level tree: the prefix common to ALL prompts of the call
  (system prompt, template head: ~90 tokens here) runs once; then per user the
  longest common token prefix (the sketch) runs once on top of it with a KV
  cache, and that user's suffixes (the candidate part, ~50 tokens) run as one
  batch on copies of the cache. Users with one candidate run as plain batches on
  the common root. With a ~490-token prefix and 10 candidates per user this
  processes ~5x fewer tokens than plain batches.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from siren_batch.assets import resolve_llm
from siren_batch.config import ScoreConfig
from siren_batch.backends.base import SCALE, ScoreResult, parse_answer, rating_token_ids, readout

logger = logging.getLogger(__name__)


def shared_prefix_len(rows: list[list[int]]) -> int:
    """Longest common prefix of token lists, leaving each row >= 1 token of its own.

    >>> shared_prefix_len([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]])
    2
    """
    first, common = rows[0], min(len(r) for r in rows) - 1
    for row in rows[1:]:
        k = 0
        while k < common and row[k] == first[k]:
            k += 1
        common = k
    return max(common, 0)


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


def _pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, dtype)


def _max_positions(config, tokenizer) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**7 else None


class TransformersBackend:
    """AutoModelForCausalLM (+ optional merged LoRA adapter) in eval mode."""

    def __init__(self, cfg: ScoreConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_llm(cfg.model)
        self.cfg = cfg
        self.device = _pick_device(cfg.device)
        if cfg.torch_threads and self.device == "cpu":
            torch.set_num_threads(cfg.torch_threads)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_pick_dtype(cfg.dtype, self.device))
        if cfg.adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, cfg.adapter).merge_and_unload()
        self.model = model.to(self.device).eval()
        self.model_id = Path(path).name if Path(path).is_dir() else cfg.model
        self.adapter_id = cfg.adapter
        self.rating_ids = rating_token_ids(self.tokenizer, SCALE)
        self.max_positions = _max_positions(model.config, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        # Work done so far (benchmarks, tests): forward passes, prefix passes, real and padded tokens.
        self.stats = {"forward_passes": 0, "prefix_passes": 0, "tokens": 0, "padded_tokens": 0}
        logger.info("scoring model %s (adapter %s) on %s/%s, max %s positions, rating ids %s",
                    self.model_id, self.adapter_id, self.device, model.dtype, self.max_positions,
                    self.rating_ids)

    # ---- shared helpers ----------------------------------------------------------

    def _encode(self, prompts: list[str], reserve: int = 0) -> tuple[list[list[int]], dict[int, ScoreResult]]:
        """Token ids per prompt, and error results for rows that cannot run."""
        ids = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if prompts else []
        errors: dict[int, ScoreResult] = {}
        for i, (text, row) in enumerate(zip(prompts, ids)):
            if not text.strip() or not row:
                errors[i] = ScoreResult.failed("empty_prompt", len(row))
            elif self.max_positions and len(row) + reserve > self.max_positions:
                extra = f" + {reserve} new" if reserve else ""
                errors[i] = ScoreResult.failed(
                    f"prompt_too_long: {len(row)} tokens{extra} > {self.max_positions}", len(row))
        return ids, errors

    def _left_pad(self, rows: list[list[int]]):
        import torch

        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, row in enumerate(rows):
            input_ids[j, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[j, width - len(row):] = 1
        return input_ids.to(self.device), mask.to(self.device)

    def _rating_logits(self, rows: list[list[int]], prefix=None) -> np.ndarray:
        """Logits of the rating tokens after each row; `prefix` = (per-layer (k, v), length)."""
        import torch
        from transformers import DynamicCache

        input_ids, mask = self._left_pad(rows)
        self._count(mask)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        extra = {"use_cache": False}
        if prefix is not None:
            kv, length = prefix
            b = len(rows)
            positions = positions + length
            mask = torch.cat([mask.new_ones((b, length)), mask], dim=1)
            cache = DynamicCache([(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in kv])
            extra = {"use_cache": True, "past_key_values": cache}
        with torch.inference_mode():
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                             logits_to_keep=1, **extra)
        return out.logits[:, -1, self.rating_ids].float().cpu().numpy()

    def _count(self, mask) -> None:
        self.stats["forward_passes"] += 1
        self.stats["tokens"] += int(mask.sum())
        self.stats["padded_tokens"] += int(mask.numel())

    def _run_guarded(self, rows: list[int], ids: list[list[int]], results: list, fn) -> None:
        """fn(rows) fills results; a failing batch is retried row by row so one bad row
        costs only itself."""
        try:
            fn(rows)
        except (RuntimeError, ValueError) as err:
            if len(rows) > 1:
                logger.warning("batch of %d failed (%s); retrying one by one", len(rows), err)
                for row in rows:
                    self._run_guarded([row], ids, results, fn)
            else:
                results[rows[0]] = ScoreResult.failed(f"forward_failed: {type(err).__name__}: {err}",
                                                      len(ids[rows[0]]))

    def _fill(self, rows: list[int], ids: list[list[int]], logits: np.ndarray, results: list) -> None:
        probs, expected, best = readout(logits, SCALE)
        finite = np.isfinite(logits).all(axis=1)
        for j, row in enumerate(rows):
            if not finite[j]:
                results[row] = ScoreResult.failed("nonfinite_logits", len(ids[row]))
            else:
                results[row] = ScoreResult(probs[j].tolist(), float(expected[j]), float(best[j]),
                                           len(ids[row]), 1, None)

    def _batches(self, rows: list[int], ids: list[list[int]]):
        ordered = sorted(rows, key=lambda i: len(ids[i]))  # similar lengths pad less
        size = self.cfg.batch_size
        return [ordered[s:s + size] for s in range(0, len(ordered), size)]

    # ---- answer-only ---------------------------------------------------------------

    def score(self, prompts: list[str], groups: list[str]) -> list[ScoreResult]:
        if len(groups) != len(prompts):
            raise ValueError(f"score: {len(prompts)} prompts but {len(groups)} groups")
        ids, errors = self._encode(prompts)
        results: list[ScoreResult | None] = [errors.get(i) for i in range(len(prompts))]
        todo = [i for i in range(len(prompts)) if i not in errors]
        plain, root = todo, None
        if self.cfg.shared_prefix:
            plain, root = [], self._root(todo, ids)
            start = root[1] if root else 0
            by_group: dict[str, list[int]] = {}
            for i in todo:
                by_group.setdefault(groups[i], []).append(i)
            for rows in by_group.values():
                length = shared_prefix_len([ids[i] for i in rows]) if len(rows) >= 2 else 0
                if length - start >= self.cfg.shared_prefix_min_tokens:
                    self._run_guarded(rows, ids, results,
                                      lambda r, n=length: self._score_shared(r, ids, n, root, results))
                else:
                    plain.extend(rows)
        for batch in self._batches(plain, ids):
            self._run_guarded(batch, ids, results, lambda r: self._score_plain(r, ids, root, results))
        return results

    def _root(self, rows: list[int], ids: list[list[int]]):
        """(KV, length) of the prefix common to ALL prompts (system prompt, template head),
        computed once per call; None when too short to pay."""
        length = shared_prefix_len([ids[i] for i in rows]) if len(rows) >= 2 else 0
        if length < self.cfg.shared_prefix_min_tokens:
            return None
        try:
            return self._prefix_kv(ids[rows[0]][:length]), length
        except (RuntimeError, ValueError) as err:
            logger.warning("common prefix pass failed (%s); scoring without it", err)
            return None

    def _prefix_kv(self, tokens: list[int], root=None) -> list:
        """Per-layer (keys, values) of `tokens` for a batch of one, continuing from `root`."""
        import torch
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        start = root[1] if root else 0
        input_ids = torch.tensor([tokens[start:]], dtype=torch.long, device=self.device)
        positions = torch.arange(start, len(tokens), device=self.device)[None]
        cache = DynamicCache(list(root[0])) if root else None
        with torch.inference_mode():
            cache = self.model(input_ids=input_ids, position_ids=positions, past_key_values=cache,
                               use_cache=True, logits_to_keep=1).past_key_values
        self.stats["prefix_passes"] += 1
        self._count(torch.ones_like(input_ids))
        if not all(type(layer) is DynamicLayer for layer in cache.layers):  # sliding window etc.
            raise ValueError("shared prefix needs a plain full-attention KV cache")
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _score_plain(self, rows: list[int], ids: list[list[int]], root, results: list) -> None:
        start = root[1] if root else 0
        self._fill(rows, ids, self._rating_logits([ids[i][start:] for i in rows], prefix=root), results)

    def _score_shared(self, rows: list[int], ids: list[list[int]], length: int, root, results: list) -> None:
        """One prefix pass (from the common root) with a KV cache, then the suffixes in
        batches on copies of it."""
        kv = self._prefix_kv(ids[rows[0]][:length], root)
        for batch in self._batches(rows, ids):
            suffixes = [ids[i][length:] for i in batch]
            self._fill(batch, ids, self._rating_logits(suffixes, prefix=(kv, length)), results)

    # ---- hidden states (the probe's features) --------------------------------------

    def answer_states(self, prompts: list[str], layers: list[int]) -> tuple[np.ndarray, list[str | None]]:
        """Hidden states at the answer position (the last prompt token) of the given
        decoder layers (negative = from the top), concatenated: (n, hidden * len(layers))
        float32, and per prompt None or its error (its row is then zeros)."""
        import torch

        ids, errors = self._encode(prompts)
        width = self.model.config.hidden_size * len(layers)
        out = np.zeros((len(prompts), width), dtype=np.float32)
        todo = [i for i in range(len(prompts)) if i not in errors]
        for batch in self._batches(todo, ids):
            input_ids, mask = self._left_pad([ids[i] for i in batch])
            self._count(mask)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                states = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                    output_hidden_states=True, logits_to_keep=1).hidden_states
            picked = torch.cat([states[layer][:, -1, :] for layer in layers], dim=-1)
            out[batch] = picked.float().cpu().numpy()
        return out, [errors[i].error if i in errors else None for i in range(len(prompts))]

    # ---- chain of thought ----------------------------------------------------------

    def generate_cot(self, prompts: list[str]) -> list[ScoreResult]:
        ids, errors = self._encode(prompts, reserve=self.cfg.max_new_tokens)
        results: list[ScoreResult | None] = [errors.get(i) for i in range(len(prompts))]
        todo = [i for i in range(len(prompts)) if i not in errors]
        for batch in self._batches(todo, ids):
            self._run_guarded(batch, ids, results, lambda r: self._generate(r, ids, results))
        return results

    def _generate(self, rows: list[int], ids: list[list[int]], results: list) -> None:
        import torch

        input_ids, mask = self._left_pad([ids[i] for i in rows])
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                      max_new_tokens=self.cfg.max_new_tokens, pad_token_id=self.pad_id)
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        for j, row in enumerate(rows):
            new = out[j, input_ids.shape[1]:].tolist()
            stop = _generated_length(new, eos, self.pad_id)
            value = parse_answer(self.tokenizer.decode(new[:stop]))
            results[row] = ScoreResult(None, value, value, len(ids[row]), stop,
                                       None if value is not None else "unparseable_answer")
