"""SIREN's two training stages: the rule reward, GRPO (stage 1) and hidden-state
alignment (stage 2), on conftest.tiny_qwen3 (2 layers, hidden 32) on CPU in fp32.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from siren_batch.config import AlignConfig, GrpoConfig, TrainConfig
from siren_batch.train import align, cot, rewards
from siren_batch.train import model as M

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread")

GENRES = {"Drama": 5.0, "Horror": 1.0, "Comedy": 4.0, "Western": 2.0}


@pytest.fixture(scope="module")
def tok(tiny_qwen3):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen3)


def _cot_prompt(tok, user: int, item: str) -> str:
    content = f"User {user} likes drama. Recent: Heat, {user % 5 + 1}\nCandidate: {item}\nRating?"
    messages = [{"role": "system", "content": "Think, then rate 1-5."}, {"role": "user", "content": content}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _rows(tok, users: int = 3, per_user: int = 3) -> pd.DataFrame:
    """Chain-of-thought rows as train.data.cot_rows gives them."""
    rows = []
    for u in range(users):
        for k in range(per_user):
            genre = list(GENRES)[(u + k) % len(GENRES)]
            evidence = {"candidate": f"Film {k}, {genre}", "candidate_topic": genre.lower(),
                        "liked": [{"name": "drama", "mean": 4.5}], "disliked": [], "recent": [u % 5 + 1]}
            rows.append({"user_id": f"u{u}", "item_id": f"i{k}", "prompt": _cot_prompt(tok, u, f"Film {k}, {genre}"),
                         "label": GENRES[genre], "base": 3.0, "evidence": json.dumps(evidence)})
    return pd.DataFrame(rows)


def _student_cfg(path, **kw) -> TrainConfig:
    base = dict(base_model=str(path), device="cpu", dtype="float32", batch_size=4, lr=1e-2, warmup_steps=0,
                epochs=1.0, eval_every=1000, checkpoint_every=1000, eval_at_start=False, max_seq_len=256,
                progress_every_s=0.0, method="lora", lora_targets=["k_proj", "v_proj"], schedule="constant",
                max_examples=None)
    return TrainConfig(**{**base, **kw})


# ---- the reward ----------------------------------------------------------------------

@pytest.mark.parametrize("text, label, fmt, rating", [
    ("<think>likes drama</think>\n<answer>4</answer>", 4.0, 1.0, 2.0),
    ("<think>x</think><answer>3</answer>", 5.0, 1.0, 0.0),               # 2 - 4*2/4
    ("<think>x</think><answer>1</answer>", 5.0, 1.0, -2.0),              # the worst miss
    ("<think>x</think><answer>7.5</answer>", 5.0, 1.0, 2.0),             # clipped to 5
    ("<think>x</think><answer>4.5</answer>", 4.0, 1.0, 1.5),
    ("<answer>4</answer>", 4.0, -1.0, 2.0),                              # no think: format fails, rating counts
    ("<think>x</think><answer>4</answer> more", 4.0, -1.0, 2.0),        # text after the answer
    ("<think>a</think><think>b</think><answer>4</answer>", 4.0, -1.0, 2.0),
    ("<think>x</think><answer>4</answer><answer>2</answer>", 2.0, -1.0, 2.0),   # the last answer is read
    ("<think>a<answer>3</answer></think><answer>4</answer>", 4.0, -1.0, 2.0),   # an answer in the reasoning
    ("<think>a</think>b</think><answer>4</answer>", 4.0, -1.0, 2.0),     # a stray closing tag
    ("<think>x</think><answer>four</answer>", 4.0, 1.0, -2.0),           # unparseable
    ("I think 4", 4.0, -1.0, -2.0),
])
def test_reward_table(text, label, fmt, rating):
    assert rewards.format_reward(text) == fmt
    assert rewards.rating_reward(text, label) == pytest.approx(rating)
    assert rewards.reward(text, label) == pytest.approx(fmt + rating)


def test_grpo_prompts_lose_the_templates_bos_only_where_the_tokenizer_adds_its_own(tok):
    from siren_batch.train.grpo import without_template_bos

    class AddsBos:   # a Llama-3-style tokenizer: it puts <s> before every text it encodes
        bos_token, bos_token_id = "<s>", 1

        def __call__(self, text):
            return {"input_ids": [1, 42]}

    assert without_template_bos(["<s>system: rate", "no bos"], AddsBos()) == ["system: rate", "no bos"]
    prompts = [_cot_prompt(tok, 1, "Heat, Crime")]
    assert without_template_bos(prompts, tok) == prompts     # the test tokenizer adds nothing: unchanged


def test_trl_rewards_read_the_label_column_and_log_parseable_with_weight_zero():
    funcs, weights = rewards.trl_rewards()
    texts = ["<think>x</think><answer>5</answer>", "nothing"]
    got = {f.__name__: f(completions=texts, label=[5.0, 3.0], prompts=["p", "p"]) for f in funcs}
    assert got == {"format": [1.0, -1.0], "rating": [2.0, -2.0], "parseable": [1.0, 0.0]}
    assert dict(zip(got, weights)) == {"format": 1.0, "rating": 1.0, "parseable": 0.0}


def test_template_rationale_follows_the_format_and_earns_the_full_reward(tok):
    rows = _rows(tok)
    for evidence, label in zip(rows["evidence"], rows["label"]):
        text = cot.rationale(evidence, label)
        assert rewards.reward(text, label) == 3.0
        assert "Film" in text and cot.until_answer(text).endswith("<answer>")


# ---- stage 1: GRPO -----------------------------------------------------------------------

def test_grpo_warms_up_then_runs_two_steps_and_logs_rewards(tiny_qwen3, tok, tmp_path):
    from siren_batch.train import grpo

    from siren_batch.prompts import THINK_PREFILL

    rows = _rows(tok)
    rows["prompt"] = rows["prompt"] + THINK_PREFILL               # prompts.think_prefill
    g = GrpoConfig(warmup_examples=4, warmup_epochs=1.0, group_size=2, batch_size=4, examples=4,
                   max_completion_tokens=8, checkpoint_every=1, lr=1e-3)
    summary = grpo.train(rows.iloc[:4], rows.iloc[4:8], g, _student_cfg(tiny_qwen3, batch_size=2,
                         lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"]), tmp_path, prefill=THINK_PREFILL)
    assert summary["status"] == "done" and summary["warmup"] == {"teacher": 0, "template": 4}
    assert summary["think_prefill"] is True
    assert summary["steps_done"] == 2 and len(summary["curve"]) == 2          # 4 prompts x 2 / 4 per step
    for point in summary["curve"]:
        assert -3.0 <= point["reward_mean"] <= 3.0 and 0.0 <= point["parseable"] <= 1.0
        assert point["reward_std"] is not None
    assert (tmp_path / "warmup" / "model" / "config.json").exists()
    assert (tmp_path / "best" / "adapter_config.json").exists()
    meta = json.loads((tmp_path / "training_meta.json").read_text())
    assert meta["base_model"] == str(tmp_path / "warmup" / "model") and meta["loss"] == "grpo"

    # the warm-up moved the weights away from the base model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_qwen3).state_dict()
    warm = AutoModelForCausalLM.from_pretrained(tmp_path / "warmup" / "model").state_dict()
    assert any(not np.allclose(base[k].numpy(), warm[k].numpy()) for k in base if "proj" in k)

    # stage 1 exports like any trained scorer (the teacher of stage 2)
    from siren_batch.train.export import export_model

    exported = export_model(tmp_path)
    assert (exported / "model.safetensors").exists()
    assert json.loads((exported / "siren_training.json").read_text())["think_prefill"] is True   # CoT scoring checks it
    again = grpo.train(rows.iloc[:4], rows.iloc[4:8], g, _student_cfg(tiny_qwen3), tmp_path)   # finished: a no-op
    assert again["steps_done"] == 2


def test_warmup_keeps_a_teacher_answer_only_when_it_is_formatted_and_right(tok):
    from siren_batch.train.grpo import warmup_examples

    rows = _rows(tok).iloc[:3]          # labels 5, 1, 4
    teacher = ["<think>drama</think><answer>5</answer>", "<think>x</think><answer>4</answer>", "<answer>4</answer>"]
    pairs, counts = warmup_examples(rows, teacher)
    assert counts == {"teacher": 1, "template": 2}
    assert pairs[0]["completion"] == teacher[0] and pairs[1]["completion"].endswith("<answer>1</answer>")


# ---- stage 2: alignment ---------------------------------------------------------------------

def _teacher(path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_teacher_states_are_taken_at_the_answer_token(tiny_qwen3, tok, tmp_path):
    """By hand: one unpadded forward pass per text, every layer's output at the last
    token, which is the end of `<answer>`; batched right padding must not move it."""
    import torch

    from siren_batch.backends import rating_token_ids

    model = _teacher(tiny_qwen3)
    rows = _rows(tok).iloc[:3]
    texts = [p + c for p, c in zip(rows["prompt"], ["<think>a</think>\n<answer>", "<think>a much longer "
                                                    "reason here</think>\n<answer>", "<answer>"])]
    states, logits = align.teacher_states(model, tok, texts, rating_token_ids(tok), AlignConfig(generate_batch=3),
                                          tmp_path, "cpu", False)
    assert states.shape == (3, 2, 32) and logits.shape == (3, 5)
    answer_ids = tok("<answer>", add_special_tokens=False)["input_ids"]
    for i, text in enumerate(texts):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids[-len(answer_ids):] == answer_ids
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_hidden_states=True)
        want = torch.stack([h[0, -1] for h in out.hidden_states[1:]])
        assert torch.allclose(states[i].float(), want, atol=2e-2, rtol=1e-2)       # bf16 storage
        assert torch.allclose(logits[i], out.logits[0, -1, rating_token_ids(tok)], atol=1e-4)


def test_teacher_cache_resumes_after_a_kill(tiny_qwen3, tok, tmp_path, monkeypatch):
    rows = _rows(tok)                                   # 9 prompts, shards of 2 -> 5 shards
    cfg = AlignConfig(shard_rows=2, max_new_tokens=3, generate_batch=2)
    model = _teacher(tiny_qwen3)
    (tmp_path / "a").mkdir()
    whole = align.teacher_cot(model, tok, list(rows["prompt"]), cfg, tmp_path / "a", "cpu")

    calls = []
    real = cot.generate

    def dies_on_the_third_shard(*args, **kw):
        calls.append(len(args[2]))
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kw)

    folder = align.open_cache(tmp_path / "b", align.manifest(rows, "t", cfg))
    monkeypatch.setattr(cot, "generate", dies_on_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        align.teacher_cot(model, tok, list(rows["prompt"]), cfg, folder, "cpu")
    assert sorted(p.name for p in folder.glob("cot-*")) == ["cot-00000.json", "cot-00001.json"]
    calls.clear()
    monkeypatch.setattr(cot, "generate", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    resumed = align.teacher_cot(model, tok, list(rows["prompt"]), cfg, folder, "cpu")
    assert calls == [2, 2, 1]                           # only the three missing shards
    assert resumed == whole
    with pytest.raises(ValueError, match="other rows, rows_hash"):
        align.open_cache(folder, align.manifest(rows.iloc[:4], "t", cfg))


@pytest.mark.parametrize("variant", ["ce", "kd", "kd+ce", "ha+ce", "ha"])
def test_align_loss_variants(variant):
    import torch

    from siren_batch.train import objective

    torch.manual_seed(0)
    s, t = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    sl, tl = torch.randn(3, 5), torch.randn(3, 5)
    labels = np.array([5.0, 1.0, 3.0])
    got = align.align_losses(variant, s, sl, t, tl, labels, ce_weight=0.5)
    ha = (1 - torch.nn.functional.cosine_similarity(s, t, dim=-1)).mean(1)
    kd = torch.nn.functional.kl_div(torch.log_softmax(sl, -1), torch.log_softmax(tl, -1), log_target=True,
                                    reduction="none").sum(-1)
    ce = objective.losses(sl, labels, "ce")
    want = {"ha": ha, "kd": kd, "ce": ce, "ha+ce": ha + 0.5 * ce, "kd+ce": kd + 0.5 * ce}[variant]
    assert torch.allclose(got, want, atol=1e-5)
    same = align.align_losses(variant.replace("+ce", ""), t, tl, t, tl, labels)
    if variant in ("ha", "kd"):
        assert torch.allclose(same, torch.zeros(3), atol=1e-5)   # a student equal to its teacher: no loss


def _aligned_run(tiny_qwen3, tok, tmp_path, variant="ha", steps_epochs=3.0):
    """An AlignRun whose teacher states come from the chain-of-thought texts."""
    from siren_batch.backends import rating_token_ids

    rows = _rows(tok)
    texts = [p + f"<think>{g}</think>\n<answer>" for p, g in zip(rows["prompt"], rows["item_id"])]
    (tmp_path / "teacher").mkdir()
    states, logits = align.teacher_states(_teacher(tiny_qwen3), tok, texts, rating_token_ids(tok),
                                          AlignConfig(), tmp_path / "teacher", "cpu", False)
    student = align.student_rows(rows, list(range(len(rows))))
    run = align.AlignRun(student, student.iloc[:3], _student_cfg(tiny_qwen3, epochs=steps_epochs), tmp_path,
                         {}, [], AlignConfig(variant=variant), states, logits)
    return run


def test_only_the_kv_lora_weights_train_and_they_change(tiny_qwen3, tok, tmp_path):
    run = _aligned_run(tiny_qwen3, tok, tmp_path, steps_epochs=1.0)
    trainable = M.trainable_params(run.model)
    assert trainable and all(("k_proj" in n or "v_proj" in n) and "lora_" in n for n in trainable)
    assert {n.split(".lora_")[0].split(".")[-1] for n in trainable} == {"k_proj", "v_proj"}
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    run.run()
    after = dict(run.model.named_parameters())
    changed = {n for n in before if not np.allclose(before[n].numpy(), after[n].detach().numpy())}
    assert changed and changed <= set(trainable)
    assert any("lora_B" in n for n in changed)


def test_alignment_loss_falls(tiny_qwen3, tok, tmp_path):
    import torch

    run = _aligned_run(tiny_qwen3, tok, tmp_path, steps_epochs=8.0)

    def mean_loss():
        with torch.no_grad():
            batch = run._batch(run.units)
            return float(run._losses(batch).mean())

    start = mean_loss()
    run.run()
    assert mean_loss() < 0.7 * start
    assert all(p.endswith("\n<think>\n</think>\n<answer>") for p in align.student_rows(_rows(tok), [0])["prompt"])


def test_align_train_end_to_end_from_a_teacher_cache(tiny_qwen3, tok, tmp_path):
    """A run whose teacher chain of thought is already cached (as after a kill): it keeps
    the rows answered right in a well-formed chain of thought, caches their states, trains,
    writes an adapter that exports."""
    rows = _rows(tok)
    cfg = AlignConfig(shard_rows=4, epochs=2.0, warmup_steps=0)
    student = _student_cfg(tiny_qwen3)
    folder = align.open_cache(tmp_path / "teacher", align.manifest(rows, str(tiny_qwen3), cfg))
    answers = [f"<think>{g}</think>\n<answer>{fmt}</answer>" for g, fmt in
               zip(rows["item_id"], ["5", "1", "2", "1", "4", "9", "4", "2", "x"])]
    # the last row answers right, but without its reasoning: parsed, not kept
    answers[8] = f"<answer>{rows['label'][8]:g}</answer>"
    for shard, start in enumerate(range(0, len(rows), 4)):
        (folder / f"cot-{shard:05d}.json").write_text(json.dumps(answers[start:start + 4]))
    valid = align.student_rows(rows, [0, 1, 2])
    summary = align.train(rows, valid, cfg, student, tmp_path)
    counts = summary["teacher_counts"]
    right = sum(abs(min(float(a), 5.0) - r) == 0 for a, r in zip(["5", "1", "2", "1", "4", "9", "4", "2"],
                                                                   rows["label"]))
    assert counts["rows"] == 9 and counts["parsed"] == 9 and counts["well_formed"] == 8
    assert counts["kept"] == right and summary["train_rows"] == right and summary["status"] == "done"
    [states] = folder.glob("states-*")   # one folder per selection of rows: another keep_within gets its own
    assert sorted(p.name for p in states.glob("*.pt")) == [f"states-{k:05d}.pt" for k in range((right + 3) // 4)]
    assert (tmp_path / "best" / "adapter_config.json").exists()
    meta = json.loads((tmp_path / "training_meta.json").read_text())
    assert meta["align_variant"] == "ha" and meta["lora_targets"] == ["k_proj", "v_proj"]

    from siren_batch.train.export import export_model

    assert (export_model(tmp_path) / "model.safetensors").exists()


# ---- the Spark edge ---------------------------------------------------------------------

def _tables(spark, cfg):
    from siren_batch import schemas
    from siren_batch.warehouse import write_table

    inter = [(f"u{u}", f"i{k}", float(1 + (u + k) % 5), 100 * k, "train") for u in range(3) for k in range(1, 5)]
    inter += [("u0", "i5", 4.0, 900, "valid")]
    write_table(spark.createDataFrame(inter, schemas.INTERACTIONS), cfg, "interactions", schemas.INTERACTIONS)
    items = [(f"i{k}", f"Film {k}", "Drama" if k % 2 else None, f"Film {k}.") for k in range(1, 6)]
    write_table(spark.createDataFrame(items, schemas.ITEMS), cfg, "items", schemas.ITEMS)
    write_table(spark.createDataFrame([(0, "slow dramas", 3, [0.0]), (1, "loud action", 2, [1.0])], schemas.TOPICS),
                cfg, "topics", schemas.TOPICS)
    write_table(spark.createDataFrame([(f"i{k}", k % 2, 0.1) for k in range(1, 6)], schemas.ITEM_TOPICS),
                cfg, "item_topics", schemas.ITEM_TOPICS)
    liked = [{"topic_id": 1, "name": "loud action", "count": 2, "mean": 4.5}]
    examples = []
    for u, i, r, ts, split in inter:
        row = {"user_id": u, "item_id": i, "ts": ts, "label": r, "split": split, "n_history": 2, "topic_stats": liked,
               "liked": liked, "disliked": [], "user_mean": 3.5, "item_count": 0, "item_mean": None,
               "recent": [{"item_id": "i9", "title": "Heat", "genres": "Crime", "rating": 4.0, "ts": 1}]}
        examples.append(row)
    write_table(spark.createDataFrame(examples, schemas.EXAMPLE_SKETCHES), cfg, "example_sketches",
                schemas.EXAMPLE_SKETCHES)
    return inter


def test_cot_rows_carry_the_sketch_evidence_and_grpo_rows_do_not_overlap(spark, cfg, tiny_qwen3):
    import dataclasses

    from siren_batch.train.data import cot_rows
    from siren_batch.train.stages import grpo_rows

    inter = _tables(spark, cfg)
    cfg.train = dataclasses.replace(cfg.train, base_model=str(tiny_qwen3))
    rows = cot_rows(spark, cfg, "train", None)
    assert len(rows) == 12 and not rows["prompt"].str.endswith("<answer>").any()   # cot mode: no answer cue
    ev = json.loads(rows.set_index(["user_id", "item_id"]).loc[("u1", "i3"), "evidence"])
    assert ev["candidate"] == "Film 3, Drama" and ev["candidate_topic"] == "loud action"     # i3 -> topic 1
    assert ev["liked"] == [{"name": "loud action", "mean": 4.5}] and ev["recent"] == [4.0]
    text = cot.rationale(ev, 5.0)
    assert "The user likes that topic (mean rating 4.5)" in text and text.endswith("<answer>5</answer>")
    assert dict(zip(zip(rows["user_id"], rows["item_id"]), rows["label"])) == \
        {(u, i): r for u, i, r, _, s in inter if s == "train"}

    cfg.grpo = dataclasses.replace(cfg.grpo, warmup_examples=4, examples=6)
    warm, grpo = grpo_rows(spark, cfg)
    assert len(warm) == 4 and 1 <= len(grpo) <= 6
    assert not set(zip(warm["user_id"], warm["item_id"])) & set(zip(grpo["user_id"], grpo["item_id"]))

    # stage 2's teacher rows leave out the pairs whose answers the warm-up taught
    from siren_batch.train.stages import align_rows

    cfg.align = dataclasses.replace(cfg.align, examples=6)
    taught = warm[["user_id", "item_id"]].values.tolist()
    picked = align_rows(spark, cfg, cfg, taught)
    assert len(picked) == 6 and not {tuple(p) for p in taught} & set(zip(picked["user_id"], picked["item_id"]))
    assert len(align_rows(spark, cfg, cfg, [])) == 6

    # a configured teacher writes one completion per warm-up row, in the rows' order
    from siren_batch.train.stages import _teacher_rationales

    cfg.grpo = dataclasses.replace(cfg.grpo, warmup_teacher=str(tiny_qwen3), max_completion_tokens=3)
    texts = _teacher_rationales(spark, cfg, warm)
    assert len(texts) == len(warm) and all(isinstance(t, str) for t in texts)


def test_stage_two_student_config_and_a_missing_export_say_what_to_do(cfg, tmp_path):
    import dataclasses

    from siren_batch.train.stages import student_config

    cfg.train = dataclasses.replace(cfg.train, out_dir=str(tmp_path))
    run = tmp_path / cfg.dataset / "grpo"
    run.mkdir(parents=True)
    (run / "training_meta.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="siren-batch export train.name=grpo"):
        student_config(cfg)
    (run / "export").mkdir()
    # a teacher trained with another think_prefill would reason from prompts it never saw
    from siren_batch.train.stages import stage1_meta

    (run / "training_meta.json").write_text(json.dumps({"stage": "grpo", "think_prefill": False}))
    cfg.prompts = dataclasses.replace(cfg.prompts, think_prefill=True)
    with pytest.raises(ValueError, match="trained with prompts.think_prefill=false"):
        stage1_meta(cfg)
    cfg.prompts = dataclasses.replace(cfg.prompts, think_prefill=False)
    assert stage1_meta(cfg)["stage"] == "grpo"
    student = student_config(cfg).train
    assert student.base_model == str(run / "export") and student.lora_targets == ["k_proj", "v_proj"]
    assert (student.name, student.method, student.schedule, student.lr) == ("align", "lora", "constant", 1e-4)
