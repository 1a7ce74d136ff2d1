"""The figures of bench_overhead: where the score stage's time went, its overhead per
pair against the backend alone, a linear fit across sizes, and the Markdown report."""

from __future__ import annotations

TARGET_MS = 2.0   # overhead per pair, ms

# Task phases (siren_batch.ratings.TASK_PHASES) grouped as the breakdown shows them.
TASK_GROUPS = {"arrow_and_jvm_input": ("render_input", "render_output", "score_input", "score_output"),
               "prompt_rendering": ("render",),
               "backend_tokenize": ("backend_tokenize",), "backend_model": ("backend_forward",),
               "output_frame": ("score_results",)}
LABELS = {"candidate_join": "candidate join (pairs + sketches + items + priors, cached)",
          "arrow_and_jvm_input": "Arrow transfer JVM <-> Python (incl. waiting for shuffle read + sort)",
          "prompt_rendering": "prompt rendering (chat template)",
          "backend_tokenize": "backend: tokenisation", "backend_model": "backend: model and readout",
          "output_frame": "output frame (results -> pandas)",
          "spark_in_chunk_jobs": "rest of the chunk jobs (JVM joins, shuffles, Parquet write, scheduling, idle slots)",
          "chunk_commits": "chunk commits (rename + count)", "finish": "finish (ratings partition swapped in)",
          "driver_other": "rest of the driver (plans, staging checks, run record)"}


def breakdown(timings: dict, stage_s: float) -> dict:
    """Where the stage's wall time went, summing to stage_s: driver phases as measured,
    task phases as task-seconds / task slots, and the two rests."""
    slots, driver, task = timings["task_slots"], timings["driver_s"], timings["task_s"]
    inside = {group: sum(task.get(p, 0.0) for p in phases) / slots for group, phases in TASK_GROUPS.items()}
    parts = {"candidate_join": driver.get("candidate_join", 0.0), **inside,
             "spark_in_chunk_jobs": driver.get("chunk_jobs", 0.0) - sum(inside.values()),
             "chunk_commits": driver.get("chunk_commits", 0.0), "finish": driver.get("finish", 0.0)}
    parts["driver_other"] = stage_s - sum(parts.values())
    return {k: round(v, 3) for k, v in parts.items()}


def figures(pairs: int, stage: dict, alone: dict, timed_part: dict | None = None) -> dict:
    """The stage against the backend alone. Overhead per pair, three ways: the stage's
    wall time minus the backend's (the issue's definition; it credits the stage with its
    task slots); against the backend spread perfectly over the slots, in core-ms (wall x
    slots: the strictest); and the framework's own work, i.e. the stage's core time less
    the backend's own time inside the stage (which includes its slowdown there).
    timed_part {seconds, pairs}: the stage's timers cover only that part of the run (a
    killed and restarted run: the restart); the breakdown is of that part, and the
    framework's own work is scaled from it to every pair."""
    timings = stage["summary"]["timings"]
    slots, stage_s = timings["task_slots"], stage["seconds"]
    backend_s = alone["seconds"] * pairs / alone["pairs"]   # per pair, scaled to every candidate
    part = timed_part or {"seconds": stage_s, "pairs": pairs}
    parts = breakdown(timings, part["seconds"])
    in_stage = (parts["backend_tokenize"] + parts["backend_model"]) * pairs / part["pairs"]   # wall-equivalent s
    ms = lambda seconds: round(1000 * seconds / pairs, 3)   # noqa: E731
    return {"pairs": pairs, "stage_s": round(stage_s, 1), "stage_pairs_per_s": round(pairs / stage_s, 1),
            "task_slots": slots, "backend_alone_s": round(backend_s, 1),
            "backend_alone_pairs_per_s": round(pairs / backend_s, 1),
            "backend_alone_pairs_per_s_on_all_slots": round(slots * pairs / backend_s, 1),
            "overhead_ms_per_pair": ms(stage_s - backend_s),
            "overhead_core_ms_per_pair": ms(stage_s * slots - backend_s),
            "framework_core_ms_per_pair": ms((stage_s - in_stage) * slots),
            "in_stage_backend_over_alone": round(in_stage * slots / backend_s, 2),
            "target_ms_per_pair": TARGET_MS, "breakdown_s": parts,
            "breakdown_of": {"seconds": round(part["seconds"], 1), "pairs": part["pairs"]},
            "breakdown_ms_per_pair": {k: round(1000 * v / part["pairs"], 4) for k, v in parts.items()}}


def _verdict(value: float) -> str:
    return f"{value} ({'under' if value < TARGET_MS else 'OVER'} {TARGET_MS})"


def markdown(p: dict) -> str:
    f, kill = p["figures"], p.get("kill_restart")
    lines = [f"{f['pairs']:,} pairs ({p['users']:,} users x {p['per_user']} unrated items) of {p['dataset']}; "
             f"model: SmolLM2's architecture and tokenizer, {p['model']['layers']} layers, hidden "
             f"{p['model']['hidden']}, random weights, {p['dtype']}; {f['task_slots']} task slots, torch threads "
             f"per task {p['backend_alone']['torch_threads']}, Arrow batch {p['arrow_batch_size']}, chunk_rows "
             f"{p['chunk_rows']}.", "", "| | seconds | pairs/s |", "|---|---:|---:|",
             f"| score stage (whole) | {f['stage_s']} | {f['stage_pairs_per_s']} |",
             f"| backend alone, one process | {f['backend_alone_s']} | {f['backend_alone_pairs_per_s']} |",
             f"| backend alone x {f['task_slots']} slots (perfect scaling) | | "
             f"{f['backend_alone_pairs_per_s_on_all_slots']} |", "",
             f"Overhead per pair (ms), target under {TARGET_MS}:", "",
             f"- stage wall - backend alone wall, per pair (the issue's definition): "
             f"**{_verdict(f['overhead_ms_per_pair'])}**",
             f"- (stage wall x {f['task_slots']} slots - backend alone) / pairs, in core-ms (the strictest): "
             f"**{_verdict(f['overhead_core_ms_per_pair'])}**",
             f"- the framework's own work, core-ms (stage core time less the backend's time inside the stage, "
             f"which is {f['in_stage_backend_over_alone']}x its time alone): "
             f"**{_verdict(f['framework_core_ms_per_pair'])}**", "",
             "Where the stage's wall time goes (task phases as task-seconds / task slots)"
             + (f", in the restart ({f['breakdown_of']['pairs']:,} pairs, {f['breakdown_of']['seconds']} s):"
                if f.get("breakdown_of", {}).get("pairs", f["pairs"]) != f["pairs"] else ":"), "",
             "| part | seconds | wall ms per pair | share |", "|---|---:|---:|---:|"]
    part_s = f.get("breakdown_of", {}).get("seconds", f["stage_s"])
    lines += [f"| {LABELS[k]} | {v} | {f['breakdown_ms_per_pair'][k]} | {100 * v / part_s:.1f}% |"
              for k, v in f["breakdown_s"].items()]
    if "fit" in p:
        lines += ["", *_fit_lines(p)]
    if kill:
        r = kill["ratings"]
        lines += ["", f"Kill and restart ({kill['kill']}), at {r['rows']:,} pairs: SIGKILL (driver, JVM, Python "
                  f"workers) after {kill['killed_after_s']} s with {kill['committed_at_kill']} of {kill['chunks']} "
                  f"chunks committed; the restart took {kill['restart_s']} s. Partition: {r['rows']:,} rows, "
                  f"{r['distinct_pairs']:,} distinct pairs, {r['missing']} missing, {r['extra']} extra, "
                  f"{r['errors']} errors"
                  + (f"; max |rating difference| vs the uninterrupted run {r['max_rating_diff_vs_reference']} "
                     f"over {r['same_pairs_as_reference']:,} pairs." if "same_pairs_as_reference" in r else
                     ". This killed and restarted run is the measured one above: its stage seconds are the "
                     "time to the kill plus the restart.")]
    return "\n".join(lines + ["", f"Machine load (1-min average, before/after): {p['load_average_1min']}."])


def _fit_lines(p: dict) -> list[str]:
    fit, st, be = p["fit"], p["fit"]["stage_s"], p["fit"]["backend_alone_s"]
    lines = ["Every size, measured in this run:", "",
             "| pairs | stage s | stage pairs/s | backend alone s | overhead ms | core-ms | framework core-ms |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {int(n):,} | {s['stage_s']} | {s['stage_pairs_per_s']} | {s['backend_alone_s']} | "
              f"{s['overhead_ms_per_pair']} | {s['overhead_core_ms_per_pair']} | {s['framework_core_ms_per_pair']} |"
              for n, s in p["sizes"].items()]
    return lines + ["", f"**EXTRAPOLATED to {fit['at_pairs']:,} pairs** (least-squares lines through the sizes "
                    f"above; not measured): stage {st['fixed_s']} s + {st['ms_per_pair']} ms x pairs = "
                    f"{st['extrapolated_s']} s ({fit['extrapolated_stage_pairs_per_s']} pairs/s); backend alone "
                    f"{be['fixed_s']} s + {be['ms_per_pair']} ms x pairs = {be['extrapolated_s']} s; overhead "
                    f"{fit['extrapolated_overhead_ms_per_pair']} ms per pair (issue's definition), "
                    f"{fit['extrapolated_overhead_core_ms_per_pair']} core-ms."]


def linear_fit(sizes: dict, at: int) -> dict:
    """Least-squares lines seconds = fixed + per_pair x pairs for the stage and the backend
    alone across the measured sizes, and what they give at `at` pairs (EXTRAPOLATED)."""
    import numpy as np

    n = np.array(list(sizes), dtype=float)
    slots = next(iter(sizes.values()))["task_slots"]
    out = {"sizes": list(sizes), "at_pairs": at}
    for key in ("stage_s", "backend_alone_s"):
        per_pair, fixed = np.polyfit(n, [f[key] for f in sizes.values()], 1)
        out[key] = {"fixed_s": round(float(fixed), 2), "ms_per_pair": round(1000 * float(per_pair), 4),
                    "extrapolated_s": round(float(fixed + per_pair * at), 1)}
    stage, backend = out["stage_s"]["extrapolated_s"], out["backend_alone_s"]["extrapolated_s"]
    out["extrapolated_stage_pairs_per_s"] = round(at / stage, 1)
    out["extrapolated_overhead_ms_per_pair"] = round(1000 * (stage - backend) / at, 3)
    out["extrapolated_overhead_core_ms_per_pair"] = round(1000 * (stage * slots - backend) / at, 3)
    return out
