"""Answer-only fine-tuning: what trains, that it learns, resume, packing, padding, export.

Runs on the tiny random Llama of conftest.tiny_model (2 layers, hidden 32) on CPU in
fp32, so each test takes a second or two.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pandas as pd
import pytest

from siren_batch.config import ScoreConfig, TrainConfig
from siren_batch.train import batching, objective
from siren_batch.train import model as M
from siren_batch.train.sft import encode, train

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread")

SUFFIX = "\n<think>\n</think>\n<answer>"
GENRES = {"Drama": 5.0, "Horror": 1.0, "Comedy": 4.0, "Western": 2.0}   # the learnable rule


def _prompt(tok, user: int, item: str, pad: str = "") -> str:
    content = f"User {user} likes drama{pad}. Recent: Heat, {user % 5 + 1}\nCandidate: {item}\nRating?"
    messages = [{"role": "system", "content": "Rate 1-5."}, {"role": "user", "content": content}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + SUFFIX


def _rows(tok, users: int = 4, per_user: int = 4) -> pd.DataFrame:
    rows = []
    for u in range(users):
        for k in range(per_user):
            genre = list(GENRES)[(u + k) % len(GENRES)]
            rows.append({"user_id": f"u{u}", "item_id": f"i{k}", "prompt": _prompt(tok, u, f"Film {k}, {genre}"),
                         "label": GENRES[genre], "base": 2.5 + 0.5 * (k % 3)})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def _cfg(tiny_model, **kw) -> TrainConfig:
    base = dict(base_model=str(tiny_model), device="cpu", dtype="float32", batch_size=4, lr=1e-2,
                warmup_steps=0, epochs=1.0, eval_every=1000, checkpoint_every=1000, eval_at_start=False,
                max_seq_len=128, progress_every_s=0.0)
    return TrainConfig(**{**base, **kw})


def _snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _run(tiny_model, tok, tmp_path, **kw):
    """An SFTRun that trained on 16 rows; returns (run, parameters before training)."""
    from siren_batch.train.loop import SFTRun

    rows = _rows(tok)
    run = SFTRun(rows, rows.iloc[:4], _cfg(tiny_model, **kw), tmp_path, {}, [])
    before = _snapshot(run.model)
    run.run()
    return run, before


# ---- what trains ------------------------------------------------------------------

def test_lora_trains_only_lora_weights_of_the_target_modules(tiny_model, tok, tmp_path):
    run, before = _run(tiny_model, tok, tmp_path, method="lora", lora_targets=["k_proj", "v_proj"], epochs=2.0)
    after = _snapshot(run.model)
    changed = {n for n in before if not np.array_equal(before[n].numpy(), after[n].numpy())}
    trainable = set(M.trainable_params(run.model))
    assert trainable == {n for n in before if "lora_" in n}
    assert all(("k_proj" in n or "v_proj" in n) for n in trainable)
    assert len(trainable) == 2 * 2 * 2                # lora_A, lora_B x k_proj, v_proj x 2 layers
    assert changed == trainable                       # every LoRA matrix moved (B first, then A), nothing else


def test_full_finetuning_trains_every_weight(tiny_model, tok, tmp_path):
    run, before = _run(tiny_model, tok, tmp_path, method="full", lr=1e-3, epochs=2.0)
    after = _snapshot(run.model)
    assert set(M.trainable_params(run.model)) == set(before)
    assert all(not np.array_equal(before[n].numpy(), after[n].numpy()) for n in before)


def test_loss_falls_on_a_learnable_task(tiny_model, tok, tmp_path):
    rows = _rows(tok, users=6)
    summary = train(rows, rows.iloc[:8], _cfg(tiny_model, epochs=4.0, lr=2e-2, loss="ce", eval_every=8, patience=100),
                    tmp_path, meta={"dataset": "tiny"})
    losses = [loss for _, loss in summary["train_loss_by_step"]]
    assert len(losses) == 24 and np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])
    curve = summary["curve"]
    assert curve[-1]["valid_rmse"] < 0.5 * curve[0]["valid_rmse"] and curve[-1]["examples_seen"] == 96
    assert (tmp_path / "best" / "adapter_config.json").exists()
    assert json.loads((tmp_path / "best" / "siren_training.json").read_text())["target"] == "rating"
    meta = json.loads((tmp_path / "training_meta.json").read_text())
    assert meta["target"] == "rating" and meta["dataset"] == "tiny" and meta["status"] == "done"


@pytest.mark.parametrize("loss", ["ce", "mse", "both"])
@pytest.mark.parametrize("target", ["rating", "residual"])
def test_every_loss_and_target_runs(tiny_model, tok, tmp_path, loss, target):
    rows = _rows(tok, users=2)
    summary = train(rows, rows, _cfg(tiny_model, loss=loss, target=target, eval_at_start=True), tmp_path)
    assert summary["status"] == "done" and len(summary["train_loss_by_step"]) == 2
    assert all(np.isfinite(loss_) for _, loss_ in summary["train_loss_by_step"])
    assert json.loads((tmp_path / "best" / "siren_training.json").read_text())["target"] == target
    assert summary["best"]["valid_rmse"] >= 0 and summary["curve"][0]["step"] == 0


def test_scoring_refuses_prompts_other_than_the_trained_ones():
    from siren_batch.config import load_config
    from siren_batch.ratings import check_prompts_match_training

    cfg = load_config()
    check_prompts_match_training(cfg, {})                                      # a model not trained here
    check_prompts_match_training(cfg, {"variant": "sketch", "priors": None})   # a run from before priors were kept
    check_prompts_match_training(cfg, {"variant": "sketch", "priors": False})
    with pytest.raises(ValueError, match=r"trained on other prompts: set prompts.priors=True \(now False\)"):
        check_prompts_match_training(cfg, {"variant": "sketch", "priors": True})
    with pytest.raises(ValueError, match=r"set score.variant=recent \(now sketch\), prompts.priors=True"):
        check_prompts_match_training(cfg, {"variant": "recent", "priors": True})


def test_residual_metrics_add_the_base_back():
    logits = np.log([[0.0001, 0.0001, 0.9996, 0.0001, 0.0001]])   # E[r] ~ 3: "no change from base"
    m = objective.valid_metrics(logits, [4.0], [3.75], "residual")
    assert m["mae"] == pytest.approx(0.25, abs=1e-3)
    _, pred = objective.predictions(np.log([[0.01, 0.01, 0.01, 0.01, 0.96]]), [4.5], "residual")
    assert pred[0] == 5.0                                           # 4.5 + ~1.9 clipped to the scale
    assert objective.two_hot(objective.model_targets([1.0], [4.5], "residual"))[0].tolist() == [1, 0, 0, 0, 0]


# ---- resume -------------------------------------------------------------------------

class Killed(RuntimeError):
    pass


def test_killed_run_resumes_to_the_same_state(tiny_model, tok, tmp_path):
    from siren_batch.train.loop import SFTRun

    rows = _rows(tok)
    cfg = _cfg(tiny_model, epochs=2.0, checkpoint_every=3, eval_every=2, lora_dropout=0.1)  # dropout: RNG matters

    def final(run_dir, callbacks=()):
        run = SFTRun(rows, rows.iloc[:4], cfg, run_dir, {}, list(callbacks))
        out = run.run()
        return {n: p.detach().clone() for n, p in M.trainable_params(run.model).items()}, out

    straight, straight_out = final(tmp_path / "a")

    def kill(step, state):
        if step == 5:   # after the checkpoint at step 3: steps 4-5 are redone on resume
            raise Killed("simulated crash")
    with pytest.raises(Killed):
        final(tmp_path / "b", [kill])
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 3
    resumed, resumed_out = final(tmp_path / "b")
    assert all(np.array_equal(straight[n].numpy(), resumed[n].numpy()) for n in straight)
    assert resumed_out["train_loss_by_step"] == straight_out["train_loss_by_step"]
    assert [c["valid_rmse"] for c in resumed_out["curve"]] == [c["valid_rmse"] for c in straight_out["curve"]]
    again, _ = final(tmp_path / "b")                      # a finished run is left as it is
    assert all(np.array_equal(again[n].numpy(), resumed[n].numpy()) for n in again)
    with pytest.raises(ValueError, match="other options or data"):
        SFTRun(rows, rows.iloc[:4], _cfg(tiny_model, epochs=2.0, checkpoint_every=3, lr=1e-3),
               tmp_path / "b", {}, []).run()


def test_a_time_budget_stops_an_invocation_and_the_next_one_continues_the_run(tiny_model, tok, tmp_path):
    from siren_batch.train.loop import SFTRun

    rows = _rows(tok)
    cfg = _cfg(tiny_model, epochs=2.0, eval_every=1000, lora_dropout=0.1)

    def final(run_dir, **kw):
        run = SFTRun(rows, rows.iloc[:4], dataclasses.replace(cfg, **kw), run_dir, {}, [])
        out = run.run()
        return {n: p.detach().clone() for n, p in M.trainable_params(run.model).items()}, out

    straight, straight_out = final(tmp_path / "a")
    _, cut = final(tmp_path / "b", max_minutes=1e-9)          # spent after the first step
    assert (cut["status"], cut["steps_done"]) == ("time_budget", 1)
    assert cut["curve"][-1]["step"] == 1 and (tmp_path / "b" / "best").is_dir()   # evaluated and kept
    continued, out = final(tmp_path / "b")                   # no budget: on to the end
    assert out["status"] == "done" and out["steps_done"] == straight_out["steps_done"]
    assert all(np.array_equal(straight[n].numpy(), continued[n].numpy()) for n in straight)


def test_decay_to_budget_ends_the_lr_decay_where_the_time_budget_does(tiny_model, tok, tmp_path, monkeypatch):
    """On a fake clock (one second per reading, ~5 a step), a 2-minute budget reaches ~20 of
    48 steps: with train.decay_to_budget the lr is near 0 when the budget stops the run;
    without, it stops at over half the peak, its decay planned for steps it never reached."""
    from siren_batch.train import loop

    cfg = _cfg(tiny_model, pack=False, batch_size=1, epochs=3.0, schedule="linear", max_minutes=2.0)
    last_lr = {}
    for planned in (False, True):
        ticks = iter(range(10**6))
        monkeypatch.setattr(loop, "_now", lambda: float(next(ticks)))
        run = loop.SFTRun(_rows(tok), _rows(tok).iloc[:4], dataclasses.replace(cfg, decay_to_budget=planned),
                          tmp_path / str(planned), {}, [])
        out = run.run()
        assert out["status"] == "time_budget" and 12 <= out["steps_done"] < 40, out["steps_done"]
        last_lr[planned] = out["curve"][-1]["lr"] / cfg.lr
    assert last_lr[True] < 0.15 < 0.4 < last_lr[False], last_lr


# ---- packing and padding -----------------------------------------------------------

def _model(tiny_model, attn: str = "sdpa"):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=attn)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_the_unpacked_logits_and_loss(tiny_model, tok, attn):
    from siren_batch.backends import rating_token_ids

    model = _model(tiny_model, attn)
    cfg = _cfg(tiny_model, max_seq_len=128)
    enc = encode(_rows(tok, users=3), tok, cfg)
    packed = batching.pack_units(enc.ids, enc.groups, max_suffixes=4, max_row_tokens=256)
    single = batching.single_units(enc.ids)
    assert len(packed) == 3 and all(len(u.rows) == 4 and len(u.prefix) > 20 for u in packed)
    ids = rating_token_ids(tok)
    kind = M.mask_kind(model)
    out = {}
    for name, units in (("packed", packed), ("single", single)):
        batch = batching.collate(units, tok.pad_token_id, mask_kind=kind)
        logits = M.rating_logits(model, batch, ids)
        loss = objective.losses(logits, enc.targets[batch.rows], "both")
        out[name] = (logits.detach().numpy()[np.argsort(batch.rows)], loss.detach().numpy()[np.argsort(batch.rows)],
                     batch.tokens)
    np.testing.assert_allclose(out["packed"][0], out["single"][0], atol=1e-4)
    np.testing.assert_allclose(out["packed"][1], out["single"][1], atol=1e-4)
    assert out["packed"][2] < 0.6 * out["single"][2]          # the shared prefix runs once per user


def test_right_padding_of_very_different_lengths_keeps_gradients_finite(tiny_model, tok):
    import torch
    from siren_batch.backends import rating_token_ids

    model = _model(tiny_model).train()
    short = tok("<|assistant|>\n" + SUFFIX, add_special_tokens=False)["input_ids"]
    long_ = tok(_prompt(tok, 1, "Film 1, Drama", pad=", drama" * 20), add_special_tokens=False)["input_ids"]
    assert len(short) < 16 and len(long_) > 100
    ids = rating_token_ids(tok)
    batch = batching.collate(batching.single_units([short, long_, short]), tok.pad_token_id)
    assert batch.attention_mask.shape == (3, len(long_)) and int(batch.attention_mask[0].sum()) == len(short)
    logits = M.rating_logits(model, batch, ids)
    objective.losses(logits, np.array([5.0, 1.0, 3.0]), "both").sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    alone = M.rating_logits(model, batching.collate(batching.single_units([short]), tok.pad_token_id), ids)
    np.testing.assert_allclose(logits[0].detach().numpy(), alone[0].detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_recomputes_each_layer_and_gives_the_same_gradients(tiny_model, tok, method):
    """train.gradient_checkpointing: each decoder layer runs again in backward (it kept
    only its input), and the trained weights' gradients do not change, on packed rows."""
    from siren_batch.backends import rating_token_ids

    enc = encode(_rows(tok, users=2), tok, _cfg(tiny_model))
    ids = rating_token_ids(tok)
    grads, calls = {}, {}
    for checkpointed in (False, True):
        model = M.build_model(_cfg(tiny_model, method=method, lora_dropout=0.0,
                                   gradient_checkpointing=checkpointed), str(tiny_model), "cpu")
        batch = batching.collate(batching.pack_units(enc.ids, enc.groups, 4, 256), tok.pad_token_id,
                                 mask_kind=M.mask_kind(model))
        layer = M.core_model(model).get_decoder().layers[0]
        calls[checkpointed] = 0
        # a pre-hook: the recomputation stops early once backward has what it needs, before forward hooks
        layer.register_forward_pre_hook(lambda *_, c=checkpointed: calls.__setitem__(c, calls[c] + 1))
        objective.losses(M.rating_logits(model, batch, ids), enc.targets[batch.rows], "both").mean().backward()
        grads[checkpointed] = {n: p.grad.numpy().copy() for n, p in M.trainable_params(model).items()}
    assert calls == {False: 1, True: 2}
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 0
    for name, grad in grads[False].items():
        np.testing.assert_allclose(grads[True][name], grad, atol=1e-6, err_msg=name)
    assert any(np.abs(g).max() > 0 for g in grads[True].values())


def test_pack_units_respects_the_limits():
    ids = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7], [1, 2, 3, 4, 5, 8], [1, 2, 9, 9, 9, 9], [1, 2, 3, 4, 5, 6]]
    units = batching.pack_units(ids, ["u", "u", "u", "u", "v"], max_suffixes=2, max_row_tokens=64)
    assert sorted(sorted(u.rows) for u in units) == [[0, 1], [2], [3], [4]]
    whole = [u for u in units if len(u.rows) == 2][0]
    assert whole.prefix == [1, 2, 3, 4, 5] and whole.suffixes == [[6], [7]]
    assert batching.micro_batches([0, 1, 2, 3], units, 2) == [[0], [1, 2], [3]]
    assert len(batching.pack_units(ids[:3], ["u"] * 3, max_suffixes=8, max_row_tokens=7)) == 2   # 5 + 1 + 1 tokens
    assert len(batching.pack_units(ids[:3], ["u"] * 3, max_suffixes=8, max_row_tokens=6)) == 3


# ---- export ------------------------------------------------------------------------

def test_export_gives_the_logits_of_base_plus_adapter(tiny_model, tok, tmp_path):
    from siren_batch.backends.transformers_backend import TransformersBackend
    from siren_batch.train.export import export_model

    rows = _rows(tok)
    train(rows, rows.iloc[:4], _cfg(tiny_model, epochs=2.0, eval_every=2), tmp_path, meta={"dataset": "tiny"})
    (tmp_path / "test_metrics.json").write_text(json.dumps({"mae": 0.81, "rmse": 1.02, "n": 16}))
    folder = export_model(tmp_path)
    score = dict(device="cpu", dtype="float32", shared_prefix=False)
    merged = TransformersBackend(ScoreConfig(model=str(folder), **score))
    adapted = TransformersBackend(ScoreConfig(model=str(tiny_model), adapter=str(tmp_path / "best"), **score))
    plain = TransformersBackend(ScoreConfig(model=str(tiny_model), **score))
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in rows["prompt"][:6]]
    np.testing.assert_allclose(merged._rating_logits(ids), adapted._rating_logits(ids), atol=1e-5)
    assert np.abs(merged._rating_logits(ids) - plain._rating_logits(ids)).max() > 1e-3   # training did something
    card = (folder / "README.md").read_text()
    assert "ce / rating" in card and "RMSE 1.0200" in card and "tiny" in card and "valid" in card.lower()
    assert (folder / "tokenizer.json").exists() and (tmp_path / "best" / "adapter_config.json").exists()


def test_export_without_a_run_says_what_to_do(tmp_path):
    from siren_batch.train.export import export_model

    with pytest.raises(FileNotFoundError, match="train-sft"):
        export_model(tmp_path / "nothing")


# ---- the Spark edge ---------------------------------------------------------------

def _example(user: str, item: str, ts: int, label: float, split: str) -> dict:
    """An EXAMPLE_SKETCHES row; fields this test does not care about get empty values."""
    from siren_batch import schemas

    row = {"user_id": user, "item_id": item, "ts": ts, "label": label, "split": split,
           "recent": [{"item_id": "i9", "title": "Heat", "genres": "Crime", "rating": 4.0, "ts": 1}]}
    for f in schemas.EXAMPLE_SKETCHES.fields:
        if f.name not in row:
            kind = f.dataType.simpleString()
            row[f.name] = [] if kind.startswith("array") else (None if f.nullable else 0)
    return row


def test_training_rows_sample_groups_render_prompts_and_join_the_base(spark, cfg, tiny_model):
    import dataclasses

    from siren_batch import schemas
    from siren_batch.train.data import ROW_COLUMNS, training_frame, training_rows
    from siren_batch.warehouse import write_table

    inter = [("u1", "i1", 5.0, 100, "train"), ("u1", "i2", 3.0, 100, "train"), ("u1", "i3", 4.0, 200, "train"),
             ("u2", "i1", 4.0, 100, "train"), ("u2", "i2", 1.0, 150, "train"), ("u1", "i4", 2.0, 300, "valid"),
             ("u2", "i3", 5.0, 300, "valid"), ("u1", "i5", 1.0, 400, "test")]
    write_table(spark.createDataFrame(inter, schemas.INTERACTIONS), cfg, "interactions", schemas.INTERACTIONS)
    items = [(f"i{k}", f"Film {k}", "Drama" if k % 2 else None, f"Film {k}.") for k in range(1, 10)]
    write_table(spark.createDataFrame(items, schemas.ITEMS), cfg, "items", schemas.ITEMS)
    examples = [_example(u, i, ts, r, s) for u, i, r, ts, s in inter]
    write_table(spark.createDataFrame(examples, schemas.EXAMPLE_SKETCHES), cfg, "example_sketches",
                schemas.EXAMPLE_SKETCHES)
    cfg.train = dataclasses.replace(cfg.train, base_model=str(tiny_model), max_examples=3, valid_examples=None)
    cfg.evaluate = dataclasses.replace(cfg.evaluate, bias_reg=0.0, bias_iters=1)

    train_rows = training_rows(spark, cfg, "train")
    assert list(train_rows.columns) == ROW_COLUMNS and 1 <= len(train_rows) <= 3
    groups = {(u, i): ts for u, i, _, ts, _ in inter}
    picked = {(u, groups[(u, i)]) for u, i in zip(train_rows["user_id"], train_rows["item_id"])}
    whole = {(u, i) for u, i, _, ts, s in inter if s == "train" and (u, ts) in picked}
    assert set(zip(train_rows["user_id"], train_rows["item_id"])) == whole     # (user, ts) groups stay whole
    assert all(p.endswith("\n<think>\n</think>\n<answer>") for p in train_rows["prompt"])

    valid = training_rows(spark, cfg, "valid")
    assert sorted(valid["item_id"]) == ["i3", "i4"] and valid["label"].tolist() == [2.0, 5.0]
    # bias fit on train only (reg 0, one pass): mu = 3.4, b_i1 = 1.1, b_i2 = -1.4, b_i3 = 0.6,
    # b_u2 = mean(4 - 3.4 - 1.1, 1 - 3.4 + 1.4) = -0.75
    assert valid.set_index("user_id").loc["u2", "base"] == pytest.approx(3.4 + 0.6 - 0.75)
    with pytest.raises(ValueError, match="test stays unseen"):
        training_frame(None, None, None, cfg, "test")


def test_export_stage_takes_test_metrics_of_the_named_system(spark, cfg):
    import dataclasses

    from siren_batch import schemas
    from siren_batch.train.stages import test_metrics
    from siren_batch.warehouse import write_table

    rows = [(eval_id, split, system, "all", metric, value, n) for eval_id, split, system, metric, value, n in [
        ("2026-01-01-a", "test", "sft:x", "mae", 0.9, 10), ("2026-01-01-a", "test", "sft:x", "rmse", 1.1, 10),
        ("2026-01-02-b", "test", "sft:x", "mae", 0.8, 12), ("2026-01-02-b", "test", "sft:x", "rmse", 1.0, 12),
        ("2026-01-03-c", "valid", "sft:x", "mae", 0.1, 5), ("2026-01-03-c", "test", "llm:y", "mae", 0.2, 5)]]
    write_table(spark.createDataFrame(rows, schemas.METRICS), cfg, "metrics", schemas.METRICS)
    assert test_metrics(spark, cfg) is None                      # evaluate.system unset
    cfg.evaluate = dataclasses.replace(cfg.evaluate, system="sft:x")
    assert test_metrics(spark, cfg) == {"mae": 0.8, "rmse": 1.0, "n": 12, "split": "test", "eval_id": "2026-01-02-b",
                                        "system": "sft:x"}


def test_score_stage_adds_the_base_back_for_a_residual_model(spark, cfg, tmp_path):
    import dataclasses

    from siren_batch import schemas
    from siren_batch.assets import training_meta
    from siren_batch.ratings import add_base_back
    from siren_batch.warehouse import write_table

    inter = [("u1", "i1", 5.0, 100, "train"), ("u1", "i2", 3.0, 100, "train"), ("u1", "i3", 4.0, 200, "train"),
             ("u2", "i1", 4.0, 100, "train"), ("u2", "i2", 1.0, 150, "train"), ("u2", "i3", 5.0, 300, "valid")]
    write_table(spark.createDataFrame(inter, schemas.INTERACTIONS), cfg, "interactions", schemas.INTERACTIONS)
    cfg.evaluate = dataclasses.replace(cfg.evaluate, bias_reg=0.0, bias_iters=1)
    folder = tmp_path / "adapter"
    folder.mkdir()
    cfg.score = dataclasses.replace(cfg.score, adapter=str(folder), candidates="split:valid")
    assert training_meta(cfg) == {}                                     # untrained: nothing to add back
    (folder / "siren_training.json").write_text(json.dumps({"target": "residual", "scale": list("12345")}))
    assert training_meta(cfg)["target"] == "residual"

    cols = ("user_id string, item_id string, rating double, rating_median double, rating_argmax double, "
            "probs array<double>, error string")
    out = spark.createDataFrame([("u2", "i3", 3.0, 3.5, 4.0, [0.1, 0.2, 0.4, 0.3, 0.0], None),
                                 ("u2", "i3", 4.9, 5.0, 5.0, [0.0, 0.0, 0.0, 0.1, 0.9], None),
                                 ("u9", "i3", None, None, None, None, "unknown_user")], cols)
    got = add_base_back(spark, cfg, out, training_meta(cfg)).collect()
    assert len(got) == 3                                                # repeated pairs and errors all kept
    base = 3.4 + 0.6 - 0.75                                             # the bias fit on train (see above)
    by_rating = sorted(got, key=lambda r: (r.rating is None, r.rating))
    assert by_rating[0].rating == pytest.approx(base)                   # E[r] = 3: the baseline itself
    assert by_rating[0].rating_median == pytest.approx(base + 0.5)
    assert by_rating[0].rating_argmax == 4.0                            # nearest scale point to 4.25
    assert by_rating[1].rating == 5.0 and by_rating[1].rating_argmax == 5.0   # clipped to the scale
    assert by_rating[2].rating is None and by_rating[2].error == "unknown_user" and by_rating[2].probs is None
    # probs moved onto the rating scale by base - 3 = +0.25: each point's mass split between
    # its two nearest points, so the mean moves by the shift; mass at 5 stays there (clipped)
    assert by_rating[0].probs == pytest.approx([0.075, 0.175, 0.35, 0.325, 0.075])
    assert np.dot(by_rating[0].probs, [1, 2, 3, 4, 5]) == pytest.approx(2.9 + base - 3)
    assert by_rating[1].probs == pytest.approx([0.0, 0.0, 0.0, 0.075, 0.925])
