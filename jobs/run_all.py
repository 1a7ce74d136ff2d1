"""The whole chain in one application: ingest -> embed -> topics -> sketches -> prompts -> score-calibrate
-> score -> evaluate (score-calibrate: the valid split's scores and the calibrator fit on them;
calibrate.in_chain=false leaves it out).

Run locally:   python jobs/run_all.py --conf conf/demo.yaml [key=value ...]
On a cluster:  spark-submit --py-files dist/siren_batch.zip jobs/run_all.py --conf conf/cluster.yaml
(the same as `siren-batch all ...`; one Spark application for every stage, so executors
keep their loaded models between stages)
"""

import sys

from siren_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["all", *sys.argv[1:]]))
