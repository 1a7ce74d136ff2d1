"""Score the valid split, then fit the calibrator on those scores (`siren-batch all`'s step before score).

Run locally:   python jobs/score_calibrate.py [key=value ...]   (= siren-batch score-calibrate)
On a cluster:  spark-submit --py-files dist/siren_batch.zip jobs/score_calibrate.py --conf conf/cluster.yaml ...
The valid scores go to ratings/run_date=<calibrate.run_date, default 1970-01-01>, calibrate.chain_rows
pairs at most; the score stage applies the calibrator from then on.
"""

import sys

from siren_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["score-calibrate", *sys.argv[1:]]))
