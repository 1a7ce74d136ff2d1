"""One reader per data.source, each returning (raw_items, raw_interactions, ts_unit).

    raw_items, raw_inter, ts_unit = READERS[cfg.data.source](spark, cfg)

The frames follow validate.RAW_ITEMS / validate.RAW_INTERACTIONS (all strings; see
readers.raw). `ts_unit` says how validation turns the `ts` text into epoch milliseconds.
One module per source (movielens, siren_movies, amazon2023, table); `lines` reads
delimited text files.
"""

from siren_batch.readers.amazon2023 import read_amazon2023
from siren_batch.readers.movielens import read_movielens1m, read_movielens100k
from siren_batch.readers.siren_movies import read_siren_movies
from siren_batch.readers.table import read_table

READERS = {"movielens100k": read_movielens100k, "movielens1m": read_movielens1m,
           "siren_movies": read_siren_movies, "amazon2023": read_amazon2023, "table": read_table}

__all__ = ["READERS"]
