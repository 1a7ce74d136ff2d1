"""A night's identity, state folder and the run_date-partitioned tables it keeps
(arrived_interactions, arrived_items, night_rejects): shared by the steps."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from siren_batch import schemas
from siren_batch.config import Config, ConfigError
from siren_batch.warehouse import delete_path, parquet_rows, path_exists, read_table, write_table

DAY_MS = 86_400_000

ARRIVED_INTERACTIONS = schemas.with_run_date(schemas.INTERACTIONS)
ARRIVED_ITEMS = schemas.with_run_date(schemas.ITEMS)
NIGHT_REJECTS = schemas.with_run_date(schemas.REJECTS)

@dataclasses.dataclass
class Night:
    run_date: str
    bootstrap: bool            # the first night: its arrivals are the whole history
    folder: str                # where its arrivals are

    @property
    def end_ms(self) -> int:
        """Epoch ms of the end of run_date (UTC): what has arrived by then is known."""
        return day_end_ms(self.run_date)


def day_end_ms(run_date: str) -> int:
    """Epoch milliseconds of the end of a UTC day.

    >>> day_end_ms("1970-01-01")
    86400000
    """
    day = dt.datetime.strptime(run_date, "%Y-%m-%d").replace(tzinfo=dt.timezone.utc)
    return int((day + dt.timedelta(days=1)).timestamp() * 1000)


def state_dir(cfg: Config, run_date: str | None = None) -> str:
    root = f"{cfg.warehouse.rstrip('/')}/{cfg.dataset}/_nightly"
    return f"{root}/{run_date}" if run_date else root


def check_run_date(run_date: str) -> str:
    """The date, or a ConfigError saying what a night's date looks like.

    >>> check_run_date("2026-01-05")
    '2026-01-05'
    """
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", run_date or ""):
        raise ConfigError(f"--run-date must be YYYY-MM-DD, got {run_date!r}")
    dt.date.fromisoformat(run_date)
    return run_date


def _partition(spark: SparkSession, cfg: Config, table: str, schema, run_date: str) -> DataFrame:
    """The run_date partition of a nightly table (empty when that night had none)."""
    if not path_exists(spark, f"{cfg.table_path(table)}/run_date={run_date}"):
        return spark.createDataFrame([], T.StructType(schema.fields[:-1]))
    return read_table(spark, cfg, table, schema).where(F.col("run_date") == run_date).drop("run_date")


def _write_partition(df: DataFrame, rows: int, cfg: Config, table: str, schema, run_date: str) -> None:
    """Replace the run_date partition of `table` with df; an empty df only removes it
    (no Spark job for nothing, and a redo never keeps an older night's rows)."""
    if rows:
        write_table(df.withColumn("run_date", F.lit(run_date)), cfg, table, schema, partition_by=["run_date"])
    else:
        delete_path(df.sparkSession, f"{cfg.table_path(table)}/run_date={run_date}")


def _partition_rows(spark: SparkSession, cfg: Config, table: str, run_date: str) -> int:
    """Rows in a run_date partition, 0 when absent (Parquet footers only)."""
    path = f"{cfg.table_path(table)}/run_date={run_date}"
    return parquet_rows(spark, path) if path_exists(spark, path) else 0


BROADCAST_MAX_ROWS = 1_000_000


def _keys(df: DataFrame, keys: list[str], rows: int) -> DataFrame:
    """df's key columns for a semi or anti join, broadcast when df has at most
    BROADCAST_MAX_ROWS rows (a night's arrivals): the big side is then read once
    instead of shuffled, fewer Spark jobs for a small night."""
    out = df.select(*keys)
    return F.broadcast(out) if rows <= BROADCAST_MAX_ROWS else out


def _merge(stored: DataFrame, fresh: DataFrame, keys: list[str], fresh_rows: int) -> DataFrame:
    """stored rows whose keys are not in fresh, plus fresh (fresh wins)."""
    return stored.join(_keys(fresh, keys, fresh_rows), on=keys, how="left_anti").unionByName(fresh)


