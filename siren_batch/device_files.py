"""Files across the device tool's limits (/work/.library/device/README.md, Limits):
what one call carries, and what comes back from its $OUT.

A call carries at most CARRY_LIMIT_MIB; from $OUT come back only a few files, none more
than two folders down or over 16 MiB (RETURN_LIMITS). So a large file travels as parts
(split_file / join_parts, sha256 per part and whole), and a trained run comes back as
one tar cut into flat `<dataset>.tar.partN` files (send_run_back / returned_runs).
`return_problems` says what of a folder would not come back.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
import tempfile
from pathlib import Path

CARRY_LIMIT_MIB = 64   # what one call of the device tool carries
RETURN_LIMITS = {"files": 8, "file_mib": 16, "total_mib": 64, "folders_down": 2}   # what comes back from $OUT
RETURN_NAME = re.compile(r"[A-Za-z0-9._-]+")
PART_MIB = 15           # a returned run's parts, under file_mib


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split_file(src: Path, dests: list[Path]) -> list[dict]:
    """src cut into len(dests) consecutive parts of near-equal size."""
    data_len, parts = src.stat().st_size, []
    size = -(-data_len // len(dests))
    with src.open("rb") as f:
        for dest in dests:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(f.read(size))
            parts.append({"name": dest.name, "bytes": dest.stat().st_size, "sha256": sha256(dest)})
    return parts


def join_parts(stash: Path, manifest: dict, dest: Path) -> Path:
    """The parts in stash joined into dest, each part and the whole checked by sha256."""
    missing = [p["name"] for p in manifest["parts"] if not (stash / p["name"]).exists()]
    if missing:
        raise SystemExit(f"gpu-kit: {', '.join(missing)} not in {stash}: run call 1 first, on the same warm "
                         "machine (a fresh machine starts with an empty stash)")
    with dest.open("wb") as out:
        for part in manifest["parts"]:
            path = stash / part["name"]
            if sha256(path) != part["sha256"]:
                raise SystemExit(f"gpu-kit: {path} is damaged (sha256 differs from the manifest): repack")
            out.write(path.read_bytes())
    if sha256(dest) != manifest["gguf_sha256"]:
        raise SystemExit(f"gpu-kit: the joined {dest.name} differs from the packed file: repack")
    return dest


def return_problems(out: Path) -> list[str]:
    """What under `out` the device tool would not bring back (RETURN_LIMITS); [] = all of it."""
    files = sorted(p for p in out.rglob("*") if p.is_file())
    mib = {f: f.stat().st_size / 2**20 for f in files}
    problems = []
    if len(files) > RETURN_LIMITS["files"]:
        problems.append(f"{len(files)} files, over the {RETURN_LIMITS['files']} that come back")
    if sum(mib.values()) > RETURN_LIMITS["total_mib"]:
        problems.append(f"{sum(mib.values()):.1f} MiB in all, over {RETURN_LIMITS['total_mib']} MiB")
    for f in files:
        rel = f.relative_to(out)
        if len(rel.parts) - 1 > RETURN_LIMITS["folders_down"]:
            problems.append(f"{rel}: more than {RETURN_LIMITS['folders_down']} folders down")
        if mib[f] > RETURN_LIMITS["file_mib"]:
            problems.append(f"{rel}: {mib[f]:.1f} MiB, over {RETURN_LIMITS['file_mib']} MiB")
        if not all(RETURN_NAME.fullmatch(part) for part in rel.parts):
            problems.append(f"{rel}: a name outside letters, digits, '.', '_' and '-'")
    return problems


def send_run_back(run_dir: Path, config: Path, out: Path, dataset: str, report: str) -> dict:
    """run_dir (less its checkpoint, which holds optimizer state and device paths) and the
    packed config.yaml as one tar, cut into <dataset>.tar.partN under out: few flat files.
    {"parts": [...]} when sent; {"not_sent": why} for a run that wrote no metadata yet, or
    parts that would not come back beside what out holds and room for the `report` file."""
    if not (run_dir / "training_meta.json").is_file():
        return {"not_sent": "the run wrote no curve or metadata yet (it stopped before its first checkpoint)"}
    for old in out.glob(f"{dataset}.tar.part*"):
        old.unlink()
    with tempfile.TemporaryDirectory(dir=run_dir.parent) as tmp:
        whole = Path(tmp) / f"{dataset}.tar"
        with tarfile.open(whole, "w") as tar:
            for path in sorted(run_dir.rglob("*")):
                rel = path.relative_to(run_dir)
                if path.is_file() and not rel.parts[0].startswith("checkpoint"):
                    tar.add(path, arcname=f"{run_dir.name}/{rel}")
            tar.add(config, arcname=f"{run_dir.name}/config.yaml")
        size = whole.stat().st_size
        n = max(1, -(-size // (PART_MIB * 2**20)))
        held = [f for f in out.rglob("*") if f.is_file() and f.name != report]
        files, mib = len(held) + n + 1, (sum(f.stat().st_size for f in held) + size) / 2**20 + 1
        if files > RETURN_LIMITS["files"] or mib > RETURN_LIMITS["total_mib"]:
            return {"not_sent": f"{n} parts of {size / 2**20:.1f} MiB would make {files} files and {mib:.0f} MiB "
                                f"with the report, over what comes back ({RETURN_LIMITS})"}
        parts, whole_sha256 = split_file(whole, [out / f"{dataset}.tar.part{k + 1}" for k in range(n)]), sha256(whole)
        return {"parts": [{**p, "whole_sha256": whole_sha256} for p in parts]}


def returned_runs(results: Path, tmp: Path, problems: list[str] | None = None) -> list[Path]:
    """The run folders a call sent back as <dataset>.tar.partN, joined (sha256 checked
    against the call's report when it lists them) and unpacked under tmp. With `problems`,
    a dataset whose parts do not join or unpack is listed there and the others still come."""
    tmp.mkdir(parents=True, exist_ok=True)
    reports = [json.loads(p.read_text()) for p in results.glob("gpu_kit-*.json")]
    sums = {part["name"]: part for report in reports for step in report.get("steps", {}).values()
            if isinstance(step, dict) for part in step.get("parts", [])}
    by_dataset: dict[str, list[Path]] = {}
    for part in results.glob("*.tar.part*"):
        by_dataset.setdefault(part.name.split(".tar.part")[0], []).append(part)
    runs = []
    for dataset, parts in sorted(by_dataset.items()):
        try:
            runs += _joined_run(dataset, parts, sums, tmp)
        except (SystemExit, tarfile.TarError, OSError, EOFError) as err:
            if problems is None:
                raise
            problems.append(f"{dataset}: {err}")
    return runs


def _joined_run(dataset: str, parts: list[Path], sums: dict, tmp: Path) -> list[Path]:
    parts.sort(key=lambda p: int(p.name.rsplit("part", 1)[1]))
    whole = tmp / f"{dataset}.tar"
    with whole.open("wb") as joined:
        for part in parts:
            joined.write(part.read_bytes())
    want = sums.get(parts[0].name, {}).get("whole_sha256")
    if want and sha256(whole) != want:
        raise SystemExit(f"gpu-kit: {dataset}'s returned parts do not join into what was sent "
                         f"(sha256 differs; {len(parts)} parts here): fetch the call's files again")
    with tarfile.open(whole) as tar:
        tar.extractall(tmp / dataset, filter="data")
    return sorted(p for p in (tmp / dataset).iterdir() if p.is_dir())
