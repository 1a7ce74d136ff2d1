"""Answer-only fine-tuning of the scoring LLM on the train split's example sketches.

Run locally:   python jobs/train_sft.py [key=value ...]        (= siren-batch train-sft, make train-sft)
    e.g.       python jobs/train_sft.py train.max_examples=2000 train.loss=mse train.target=residual
On a cluster:  spark-submit --py-files dist/siren_batch.zip jobs/train_sft.py --conf conf/cluster.yaml
Spark builds the prompts and the bias baseline; the training itself runs in the driver
(CUDA when present). Outputs: <train.out_dir>/<dataset>/<train.name>/ (best/, metrics.json, ...);
the same name again resumes from its checkpoint.
"""

import sys

from siren_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-sft", *sys.argv[1:]]))
