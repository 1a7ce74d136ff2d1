"""Text-file readers for delimited files (CSV/TSV)."""

from __future__ import annotations

import csv

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from siren_batch.config import ConfigError
from siren_batch.readers.raw import strings


def read_delimited(spark: SparkSession, path: str, sep: str, quoted: bool = True) -> DataFrame:
    """Read a headed CSV/TSV with every column as a string (names from the header,
    RecBole type suffixes like `rating:float` dropped)."""
    header = spark.read.text(path).limit(1).collect()
    if not header:
        raise ConfigError(f"{path} is empty")
    raw_names = [n.strip() for n in next(csv.reader([header[0][0].rstrip("\r")], delimiter=sep))]
    return (spark.read.schema(strings(raw_names))
            .option("header", True).option("sep", sep).option("quote", '"' if quoted else "")
            .option("mode", "PERMISSIVE").csv(path)
            .select(*[F.trim(F.col(f"`{n}`")).alias(n.split(":")[0]) for n in raw_names]))
