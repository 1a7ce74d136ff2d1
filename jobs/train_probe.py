"""The probe: frozen hidden states at the answer position + baselines -> a scikit-learn scorer.

Run locally:   python jobs/train_probe.py [key=value ...]          (= make train-probe)
On a cluster:  spark-submit --py-files dist/siren_batch.zip jobs/train_probe.py --conf conf/cluster.yaml
Fits on valid, scores probe.split into ratings/run_date=<probe.run_date>; the forward passes run
in the driver (evaluation splits, not a nightly million).
"""

import sys

from siren_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-probe", *sys.argv[1:]]))
