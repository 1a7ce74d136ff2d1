"""The GPU-session kit (siren_batch.gpu_kit): packed here, run there, unpacked here.

The run is rehearsed on this CPU with the tiny model; the weights' path (the real
SmolLM2 GGUF cut in two, joined and dequantised there) is checked against the
default model folder here, since an adapter trained there must fit the base here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tarfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from siren_batch import device_files, gpu_kit
from siren_batch.config import load_config, save_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(tok, n: int = 8) -> pd.DataFrame:
    rows = []
    for k in range(n):
        content = f"User u{k % 3} likes drama.\nCandidate: Film {k}\nRating?"
        prompt = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True) + "<think>\n</think>\n<answer>"
        rows.append({"user_id": f"u{k % 3}", "item_id": f"i{k}", "prompt": prompt, "label": float(1 + k % 5),
                     "base": 3.0 + 0.1 * k})
    return pd.DataFrame(rows)


def test_parts_join_back_to_the_file_and_damage_or_absence_is_refused(tmp_path):
    src = tmp_path / "weights.gguf"
    src.write_bytes(os.urandom(100_003))
    stash = tmp_path / "stash"
    parts = device_files.split_file(src, [stash / "weights.part1", stash / "weights.part2"])
    assert [p["bytes"] for p in parts] == [50_002, 50_001]
    manifest = {"gguf_name": src.name, "gguf_sha256": device_files.sha256(src), "parts": parts}
    joined = device_files.join_parts(stash, manifest, tmp_path / "joined.gguf")
    assert joined.read_bytes() == src.read_bytes()
    damaged = bytearray((stash / "weights.part2").read_bytes())
    damaged[7] ^= 1
    (stash / "weights.part2").write_bytes(bytes(damaged))
    with pytest.raises(SystemExit, match="weights.part2 is damaged"):
        device_files.join_parts(stash, manifest, tmp_path / "joined.gguf")
    (stash / "weights.part1").unlink()
    with pytest.raises(SystemExit, match="weights.part1 not in .*run call 1 first"):
        device_files.join_parts(stash, manifest, tmp_path / "joined.gguf")


def _kit(tmp_path, cfg, tiny_model, tok):
    """A call-2 kit by hand: one dataset's rows and config, the tiny model already in
    the stash (as call 2 leaves it), and a manifest with its tensor checks."""
    kit, stash = tmp_path / "kit" / "call2", tmp_path / "stash"
    folder = kit / "runs" / "ml-100k"
    folder.mkdir(parents=True)
    rows = _rows(tok)
    rows.to_parquet(folder / "train.parquet")
    rows.iloc[:4].to_parquet(folder / "valid.parquet")
    cfg = dataclasses.replace(cfg, dataset="ml-100k", train=dataclasses.replace(
        cfg.train, base_model="default", out_dir=str(tmp_path / "models"), batch_size=4, max_seq_len=128,
        eval_every=1000, eval_at_start=False, dtype="float32", lr=1e-2))
    save_config(cfg, folder / "config.yaml")
    shutil.copytree(tiny_model, stash / "model")
    (kit / gpu_kit.MANIFEST).write_text(json.dumps({"tensor_checks": gpu_kit.tensor_checks(tiny_model)}))
    return kit, stash, cfg


def test_run_trains_each_packed_dataset_and_unpack_places_it_here(cfg, tiny_model, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    kit, stash, cfg = _kit(tmp_path, cfg, tiny_model, AutoTokenizer.from_pretrained(tiny_model))
    broken = kit / "runs" / "amazon2023"            # trains first (sorted) and fails: no rows
    broken.mkdir()
    shutil.copy(kit / "runs" / "ml-100k" / "config.yaml", broken / "config.yaml")
    out = tmp_path / "out"
    report = gpu_kit.run(kit, out, minutes=5, stash=stash)
    assert report["steps"]["amazon2023"]["failed"].startswith("FileNotFoundError")   # recorded, and the
    step = report["steps"]["ml-100k"]                                                # next one still ran
    assert step["status"] == "done" and step["examples_seen"] == 8 and step["best"]["valid_n"] == 4
    assert report["tensor_checks"] == "equal to the packing machine's"
    # what comes back: the report and the run as flat parts, within the device tool's limits
    assert device_files.return_problems(out) == [] and report["return_problems"].startswith("none")
    assert sorted(p.name for p in out.iterdir()) == ["gpu_kit-call2.json", "ml-100k.tar.part1"]
    assert [part["name"] for part in step["parts"]] == ["ml-100k.tar.part1"]
    with tarfile.open(out / "ml-100k.tar.part1") as tar:
        names = tar.getnames()
    assert f"{cfg.train.name}/best/adapter_model.safetensors" in names and f"{cfg.train.name}/config.yaml" in names
    assert not [n for n in names if "/checkpoint" in n]   # optimizer state and device paths stay there
    assert json.loads((out / "gpu_kit-call2.json").read_text())["steps"]["ml-100k"]["status"] == "done"

    here = str(tmp_path / "local-default")
    monkeypatch.setattr("siren_batch.assets.resolve_llm", lambda name: here)
    placed = gpu_kit.unpack(out)
    dest = tmp_path / "models" / "ml-100k" / cfg.train.name
    assert placed == [dest]
    adapter = json.loads((dest / "best" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == here
    assert adapter["trained_base_model_name_or_path"] == str(stash / "model")
    for meta in ("training_meta.json", "best/siren_training.json"):
        assert json.loads((dest / meta).read_text())["base_model"] == here
        assert json.loads((dest / meta).read_text())["priors"] is cfg.prompts.priors   # checked when scored
    assert json.loads((dest / "training_meta.json").read_text())["base_model_option"] == "default"
    resolved = yaml.safe_load((dest / "train_config.yaml").read_text())["train"]
    assert (resolved["base_model"], resolved["out_dir"]) == ("default", str(tmp_path / "models"))
    left = [line for f in dest.rglob("*") if f.suffix in (".json", ".yaml")
            for line in f.read_text().splitlines() if str(stash) in line]
    assert left and all('"trained_' in line for line in left)   # device paths stay only as trained_* records
    assert load_config([str(dest / "config.yaml")]).hash() == cfg.hash()
    with pytest.raises(SystemExit, match="exists: pass --force"):
        gpu_kit.unpack(out)

    # Other weights in the stash than the packing machine's: refused before training, and said so.
    for checks in ({gpu_kit.CHECKED_TENSORS[0]: 1.0}, {"model.no_such.weight": 1.0}):
        (kit / gpu_kit.MANIFEST).write_text(json.dumps({"tensor_checks": checks}))
        with pytest.raises(SystemExit, match="differs from the packing machine's weights"):
            gpu_kit.run(kit, tmp_path / "out2", minutes=5, stash=stash)
        failed = json.loads((tmp_path / "out2" / "gpu_kit-call2.json").read_text())["steps"]["model"]["failed"]
        assert "differs from the packing machine's weights" in failed


def test_a_run_out_of_gpu_memory_goes_on_with_gradient_checkpointing(cfg, tiny_model, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from siren_batch.train import sft

    kit, stash, cfg = _kit(tmp_path, cfg, tiny_model, AutoTokenizer.from_pretrained(tiny_model))
    real, calls = sft.train, []

    class OutOfMemoryError(RuntimeError):   # torch.cuda.OutOfMemoryError, by name
        pass

    def train(*args, **kwargs):
        calls.append(args[2].gradient_checkpointing)
        if len(calls) == 1:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(sft, "train", train)
    step = gpu_kit.run(kit, tmp_path / "out", minutes=5, stash=stash)["steps"]["ml-100k"]
    assert calls == [False, True] and step["status"] == "done" and step["examples_seen"] == 8
    assert step["out_of_memory"].startswith("CUDA out of memory") and step["parts"]
    assert gpu_kit._out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not gpu_kit._out_of_memory(ValueError("checkpoint was written with other options"))


def test_return_problems_names_what_the_device_tool_would_not_bring_back(tmp_path):
    out = tmp_path / "out"
    (out / "a" / "b" / "c").mkdir(parents=True)
    (out / "a" / "b" / "ok.json").write_text("{}")                  # two folders down: comes back
    (out / "a" / "b" / "c" / "deep.json").write_text("{}")
    (out / "big.bin").write_bytes(b"\0" * (17 * 2**20))
    (out / "odd name.txt").write_text("x")
    assert device_files.return_problems(out) == ["a/b/c/deep.json: more than 2 folders down",
                                            "big.bin: 17.0 MiB, over 16 MiB",
                                            "odd name.txt: a name outside letters, digits, '.', '_' and '-'"]
    for k in range(6):
        (out / f"f{k}").write_text("x")
    assert device_files.return_problems(out)[0] == "10 files, over the 8 that come back"


def test_returned_parts_join_and_a_damaged_one_is_refused(tmp_path):
    run_dir, out = tmp_path / "stash" / "trained" / "ml-100k" / "sft-gpu", tmp_path / "out"
    (run_dir / "best").mkdir(parents=True)
    (run_dir / "checkpoint").mkdir()
    (run_dir / "best" / "adapter_model.safetensors").write_bytes(os.urandom(int(2.5 * device_files.PART_MIB * 2**20)))
    (run_dir / "checkpoint" / "optim.pt").write_bytes(b"state")
    (tmp_path / "config.yaml").write_text("dataset: ml-100k\n")
    out.mkdir()
    assert "stopped before its first checkpoint" in device_files.send_run_back(
        run_dir, tmp_path / "config.yaml", out, "ml-100k", "report.json")["not_sent"]
    (run_dir / "training_meta.json").write_text("{}")
    parts = device_files.send_run_back(run_dir, tmp_path / "config.yaml", out, "ml-100k", "report.json")["parts"]
    assert [p["name"] for p in parts] == ["ml-100k.tar.part1", "ml-100k.tar.part2", "ml-100k.tar.part3"]
    assert device_files.return_problems(out) == []
    (out / "gpu_kit-call2.json").write_text(json.dumps({"steps": {"ml-100k": {"parts": parts}}}))
    runs = device_files.returned_runs(out, tmp_path / "tmp1")
    assert [r.name for r in runs] == ["sft-gpu"] and not (runs[0] / "checkpoint").exists()
    with pytest.raises(SystemExit, match="lacks train_config.yaml: not placed"):   # nothing copied
        gpu_kit._place(runs[0], "/here/model", force=False)
    assert (runs[0] / "best" / "adapter_model.safetensors").read_bytes() == \
        (run_dir / "best" / "adapter_model.safetensors").read_bytes()
    damaged = bytearray((out / "ml-100k.tar.part2").read_bytes())
    damaged[100] ^= 1
    (out / "ml-100k.tar.part2").write_bytes(bytes(damaged))
    with pytest.raises(SystemExit, match="do not join into what was sent"):
        device_files.returned_runs(out, tmp_path / "tmp2")
    # a second run whose parts would pass what comes back (64 MiB) is not sent, and says why
    refused = device_files.send_run_back(run_dir, tmp_path / "config.yaml", out, "siren-movies", "report.json")
    assert "would make 8 files and 76 MiB" in refused["not_sent"] and not list(out.glob("siren-movies.tar.part*"))
    for k in range(5):                                                  # and too many files, however small
        (out / f"f{k}.txt").write_text("x")
    (run_dir / "best" / "adapter_model.safetensors").write_bytes(b"small")
    refused = device_files.send_run_back(run_dir, tmp_path / "config.yaml", out, "siren-movies", "report.json")
    assert "would make 11 files" in refused["not_sent"]


def test_pack_fits_each_call_and_its_halves_give_there_the_weights_of_here(cfg, tiny_model, tmp_path, monkeypatch):
    """The real GGUF: packed in two calls under the carry limit, joined and dequantised
    as a GPU machine does, the tensors equal the default model folder's."""
    from transformers import AutoTokenizer

    from siren_batch.assets import AssetError, resolve_llm

    try:
        local = resolve_llm("default")
    except AssetError as absent:
        pytest.skip(f"default LLM not prepared: {absent}")
    rows = _rows(AutoTokenizer.from_pretrained(tiny_model))
    monkeypatch.setattr("siren_batch.train.data.training_rows",
                        lambda spark, c, split: rows if split == "train" else rows.iloc[:3])
    cfg = dataclasses.replace(cfg, dataset="ml-100k")
    info = gpu_kit.pack(None, [cfg], tmp_path / "kit", bench_pairs=40)
    call1, call2 = tmp_path / "kit" / "call1", tmp_path / "kit" / "call2"
    assert 0.5 < info["working_tree_mib"] < 16    # the checkout travels too, and counts against the limit
    assert all(mib + info["working_tree_mib"] <= device_files.CARRY_LIMIT_MIB for mib in info["mib"].values())
    assert info["runs"] == [{"dataset": "ml-100k", "name": cfg.train.name, "rows": {"train": 8, "valid": 3},
                             "config_hash": cfg.hash()}]
    assert len(pd.read_parquet(call2 / "runs" / "ml-100k" / "train.parquet")) == 8
    assert (call2 / "pylib" / "gguf" / "__init__.py").exists() and list((call2 / "pylib").glob("gguf-*.dist-info"))
    assert info["bench"].startswith("40 prompts") == (call1 / "bench" / "prompts.jsonl").exists()

    stash = tmp_path / "stash"
    for call, part in ((call1, "weights.part1"), (call2, "weights.part2")):
        stash.mkdir(exist_ok=True)
        shutil.copy(call / part, stash / part)
    report = {}
    model = gpu_kit._model(call2, stash, info, report)
    assert report["tensor_checks"] == "equal to the packing machine's"
    assert (model / "tokenizer.json").read_bytes() == (Path(local) / "tokenizer.json").read_bytes()


def test_the_kit_layer_gives_each_dataset_the_documented_options():
    from siren_batch.config import CONF_DIR

    for dataset in ("ml-100k", "siren-movies"):
        cfg = load_config([str(CONF_DIR / gpu_kit.KIT_CONF)], [f"dataset={dataset}", "train.lr=1e-4"])
        assert cfg.dataset == dataset and cfg.train.name == "sft-gpu" and cfg.prompts.priors
        assert (cfg.train.target, cfg.train.loss, cfg.train.lr) == ("residual", "both", 1e-4)
        assert cfg.train.decay_to_budget and cfg.train.schedule == "linear"
        assert cfg.train.batch_size * cfg.train.grad_accum == 64 and cfg.train.batch_size <= 32
        assert set(cfg.train.lora_targets) >= {"q_proj", "v_proj", "gate_proj", "down_proj"}
