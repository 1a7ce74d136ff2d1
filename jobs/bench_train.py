"""Benchmark an answer-only training step on this machine with the default model (SmolLM2-135M).

    python jobs/bench_train.py [--steps 2] [--batch-size 8] [--users 2] [--threads 0]   (= make bench-train)

Writes notebooks/benchmarks/bench-train.{json,md}: seconds per step, examples/s,
achieved GFLOP/s against a matmul peak measured in the same run, peak memory, for
LoRA and full fine-tuning, bf16 vs fp32, packed vs unpacked, on siren-movies prompts.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from siren_batch.train.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
