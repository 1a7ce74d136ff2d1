"""Fit the calibrator on the valid split's scores and store it in the warehouse.

Run locally:   python jobs/calibrate.py calibrate.run_date=2026-11-01 [key=value ...]   (= make calibrate)
On a cluster:  spark-submit --py-files dist/siren_batch.zip jobs/calibrate.py --conf conf/cluster.yaml ...
The score stage applies it from then on; calibrate.apply_run_date=... fills an already scored partition.
"""

import sys

from siren_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["calibrate", *sys.argv[1:]]))
