"""Merge a training run's best adapter into a plain HF folder with tokenizer and model card.

Run locally:   python jobs/export_model.py [train.name=sft ...]   (= siren-batch export, make export)
Writes <train.out_dir>/<dataset>/<train.name>/export/; score it with score.model=<that folder>.
"""

import sys

from siren_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
