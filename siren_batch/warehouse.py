"""Reading and writing warehouse tables by name: the edges of every job.

Tables are Parquet folders under `<warehouse>/<dataset>/<table>`, readable by
Spark, polars (`pl.scan_parquet(".../*.parquet")`) and DuckDB
(`read_parquet('.../**/*.parquet', hive_partitioning=true)`).

Writes are atomic: Spark writes into a hidden staging folder beside the table,
which is renamed into place only after the write succeeded, so a reader never
sees a half-written table or partition. The resolved config of the run that
wrote a table lies beside its data as `_config.yaml` (the leading underscore
keeps Parquet readers from treating it as data).

Fault injection, for tests only: with `SIREN_KILL_BEFORE_RENAME=<n>` in its
environment, a process sends itself SIGKILL just before its n-th `move_path`
(every commit step: a table, partition or score chunk moved into place, or an
old copy moved aside), so a test can kill the driver at a chosen point in the
middle of a stage's writes (tests/test_driver_kill.py).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field

import yaml
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from siren_batch import schemas
from siren_batch.config import Config, local_path

logger = logging.getLogger(__name__)


# ---- Hadoop FileSystem helpers (work for file://, hdfs://, s3a:// alike) --------

def _fs_path(spark: SparkSession, path: str):
    jvm = spark.sparkContext._jvm
    hpath = jvm.org.apache.hadoop.fs.Path(path)
    fs = hpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    return fs, hpath


def on_local_disk(spark: SparkSession, path: str) -> bool:
    """Whether Hadoop puts `path` on this machine's disk: a path without a scheme goes to
    fs.defaultFS, which on YARN is HDFS."""
    if local_path(path) is None:
        return False
    fs, _ = _fs_path(spark, path)
    return str(fs.getUri().getScheme()) == "file"


def parquet_rows(spark: SparkSession, path: str) -> int:
    """Rows in the Parquet files under `path` (any depth), summed from their footers in
    the driver: no Spark job, which on a small table costs more than the reading."""
    fs, hpath = _fs_path(spark, path)
    jvm = spark.sparkContext._jvm
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    files, rows = fs.listFiles(hpath, True), 0
    while files.hasNext():
        status = files.next()
        name = status.getPath().getName()
        if name.startswith(("_", ".")) or not name.endswith(".parquet"):
            continue
        reader = jvm.org.apache.parquet.hadoop.ParquetFileReader.open(
            jvm.org.apache.parquet.hadoop.util.HadoopInputFile.fromStatus(status, conf))
        try:
            rows += reader.getRecordCount()
        finally:
            reader.close()
    return int(rows)


def path_exists(spark: SparkSession, path: str) -> bool:
    fs, hpath = _fs_path(spark, path)
    return bool(fs.exists(hpath))


def delete_path(spark: SparkSession, path: str) -> None:
    fs, hpath = _fs_path(spark, path)
    if fs.exists(hpath):
        fs.delete(hpath, True)


def list_dir(spark: SparkSession, path: str) -> list[str]:
    """Names of the entries directly under `path` ([] when it does not exist)."""
    fs, hpath = _fs_path(spark, path)
    if not fs.exists(hpath):
        return []
    return sorted(status.getPath().getName() for status in fs.listStatus(hpath))


_renames = 0   # move_path calls so far in this process (SIREN_KILL_BEFORE_RENAME counts them)


def move_path(spark: SparkSession, src: str, dst: str) -> None:
    """Rename src to dst (creating dst's parent); atomic on HDFS and local disks."""
    global _renames
    _renames += 1
    if os.environ.get("SIREN_KILL_BEFORE_RENAME") == str(_renames):   # the fault hook (module docstring)
        logger.warning("SIREN_KILL_BEFORE_RENAME=%d: killing this driver before moving %s", _renames, src)
        os.kill(os.getpid(), signal.SIGKILL)
    fs, hsrc = _fs_path(spark, src)
    _, hdst = _fs_path(spark, dst)
    parent = hdst.getParent()
    if parent is not None and not fs.exists(parent):
        fs.mkdirs(parent)
    if not fs.rename(hsrc, hdst):
        raise OSError(f"could not move {src} to {dst}")


def write_text(spark: SparkSession, path: str, text: str) -> None:
    """Write a small text file whole (see write_bytes)."""
    write_bytes(spark, path, text.encode("utf-8"))


def write_bytes(spark: SparkSession, path: str, data: bytes) -> None:
    """Write a small file whole: into a hidden file beside it, then renamed over it,
    so a driver killed mid-write never leaves a file that exists but is cut short."""
    fs, hpath = _fs_path(spark, path)
    tmp = hpath.getParent().suffix(f"/.{hpath.getName()}.{uuid.uuid4().hex[:8]}.tmp")
    stream = fs.create(tmp, True)
    try:
        stream.write(bytearray(data))
    finally:
        stream.close()
    if fs.exists(hpath):
        fs.delete(hpath, False)
    if not fs.rename(tmp, hpath):
        raise OSError(f"could not rename {tmp} to {path}")


def read_bytes(spark: SparkSession, path: str) -> bytes:
    """Read a small file whole through the FileSystem API (write_bytes' counterpart). Py4J
    hands a Java byte[] back by value, so the stream is copied into one on the JVM side.
    A missing file raises FileNotFoundError, as open() does, on every filesystem."""
    from py4j.protocol import Py4JJavaError

    fs, hpath = _fs_path(spark, path)
    jvm = spark.sparkContext._jvm
    try:
        stream = fs.open(hpath)
    except Py4JJavaError as err:
        if err.java_exception.getClass().getName() == "java.io.FileNotFoundException":
            raise FileNotFoundError(f"no such file: {path}") from None
        raise
    out = jvm.java.io.ByteArrayOutputStream()
    jvm.org.apache.hadoop.io.IOUtils.copyBytes(stream, out, 1 << 16, True)   # True: closes both
    return bytes(out.toByteArray())


def read_text(spark: SparkSession, path: str) -> str:
    """Read a small UTF-8 text file whole through the FileSystem API (Hadoop input
    formats skip names starting with '_', like our markers); write_text's counterpart."""
    return read_bytes(spark, path).decode("utf-8")


# ---- tables ------------------------------------------------------------------------

def conform(df: DataFrame, schema: T.StructType) -> DataFrame:
    """Select exactly the schema's columns, cast to its types (the write contract)."""
    missing = [f.name for f in schema.fields if f.name not in df.columns]
    if missing:
        raise ValueError(f"frame lacks columns {missing} required by its table schema")
    current = {f.name: f.dataType for f in df.schema.fields}
    # Cast only where the type differs; types equal up to nullability (e.g.
    # array<double> with or without null elements) are kept as they are.
    return df.select(*[df[f.name] if current[f.name].simpleString() == f.dataType.simpleString()
                       else df[f.name].cast(f.dataType).alias(f.name) for f in schema.fields])


CONFIG_FILE = "_config.yaml"   # beside a table's data: the resolved config of the run that wrote it


def table_config(spark: SparkSession, cfg: Config, table: str) -> dict | None:
    """The resolved config `table` was written with (write_table), None when there is no such table."""
    path = f"{cfg.table_path(table)}/{CONFIG_FILE}"
    return (yaml.safe_load(read_text(spark, path)) or {}) if path_exists(spark, path) else None


def write_table(df: DataFrame, cfg: Config, table: str, schema: T.StructType, *,
                partition_by: list[str] | None = None) -> int:
    """Replace `table` atomically with `df`; with `partition_by`, replace only the
    partitions present in `df` and keep the others. Returns the rows written."""
    spark = df.sparkSession
    final = cfg.table_path(table)
    stage = f"{cfg.warehouse.rstrip('/')}/{cfg.dataset}/_staging/{table}-{uuid.uuid4().hex[:8]}"
    out = conform(df, schema)
    writer = out.write.mode("overwrite")
    if partition_by:
        writer = writer.partitionBy(*partition_by)
    writer.parquet(stage)
    write_text(spark, f"{stage}/{CONFIG_FILE}", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    rows = parquet_rows(spark, stage)

    if not partition_by or not path_exists(spark, final):
        _swap(spark, stage, final)
    else:
        for part in [p for p in list_dir(spark, stage) if "=" in p]:
            _swap(spark, f"{stage}/{part}", f"{final}/{part}")
        _swap(spark, f"{stage}/{CONFIG_FILE}", f"{final}/{CONFIG_FILE}")
        delete_path(spark, stage)
    logger.info("wrote %s: %d rows -> %s", table, rows, final)
    return rows


def append_table(df: DataFrame, cfg: Config, table: str, schema: T.StructType) -> int:
    """Add df's rows to an unpartitioned `table` as ONE new Parquet file, written in a
    staging folder and renamed in (one atomic rename: readers see all of it or none).
    For small additions to a big table (a night's arrivals); returns the rows added."""
    spark = df.sparkSession
    final = cfg.table_path(table)
    stage = f"{cfg.warehouse.rstrip('/')}/{cfg.dataset}/_staging/{table}-append-{uuid.uuid4().hex[:8]}"
    conform(df, schema).coalesce(1).write.mode("overwrite").parquet(stage)
    rows = parquet_rows(spark, stage)
    for part in [p for p in list_dir(spark, stage) if not p.startswith(("_", "."))]:
        move_path(spark, f"{stage}/{part}", f"{final}/{part}")
    delete_path(spark, stage)
    logger.info("appended to %s: %d rows -> %s", table, rows, final)
    return rows


SWAP_NOTE = ".swap"   # beside an old copy moved aside: the path it came from


def _swap(spark: SparkSession, src: str, dst: str) -> None:
    """Move src to dst, replacing dst; the old copy is moved aside first and
    deleted last, so dst is never half-written. Aside means into the staging area
    beside src: a driver killed in between must not leave it beside dst, where
    `ratings/run_date=D.old-x` would read as one more partition of the table. A note
    written first names dst, so that a driver killed while dst is absent leaves what the
    next run needs to put the old copy back (restore_swaps)."""
    trash = None
    if path_exists(spark, dst):
        trash = f"{src}.old-{uuid.uuid4().hex[:8]}"
        write_text(spark, f"{trash}{SWAP_NOTE}", dst)
        move_path(spark, dst, trash)
    move_path(spark, src, dst)
    if trash:
        delete_path(spark, trash)
        delete_path(spark, f"{trash}{SWAP_NOTE}")


def restore_swaps(spark: SparkSession, cfg: Config) -> list[str]:
    """Finish the replaces a killed driver left half done, before anything reads the
    warehouse (run under its lock: no other writer is mid-swap). An old copy whose table
    or partition is absent goes back where it was: the rerun then finds the table as it
    was before the killed run, which matters for the stages that read a table and write
    it back (a night's embeddings, evaluations), where absent would read as empty. An
    old copy whose replacement is in place is deleted. Returns the paths put back."""
    fs, root = _fs_path(spark, f"{cfg.warehouse.rstrip('/')}/{cfg.dataset}/_staging")
    if not fs.exists(root):
        return []
    notes = []
    for status in fs.listStatus(root):   # a table's note, or inside a partitioned write's folder
        inner = fs.listStatus(status.getPath()) if status.isDirectory() else [status]
        notes += [str(s.getPath()) for s in inner if s.getPath().getName().endswith(SWAP_NOTE)]
    restored = []
    for note in notes:
        trash, dst = note.removesuffix(SWAP_NOTE), read_text(spark, note).strip()
        if path_exists(spark, trash):
            if path_exists(spark, dst):
                delete_path(spark, trash)
            else:
                move_path(spark, trash, dst)
                restored.append(dst)
        delete_path(spark, note)
    if restored:
        logger.warning("a killed run had moved %d table(s) or partition(s) aside mid-replace; put back: %s",
                       len(restored), ", ".join(restored))
    return restored


def read_table(spark: SparkSession, cfg: Config, table: str,
               schema: T.StructType | None = None) -> DataFrame:
    path = cfg.table_path(table)
    if not path_exists(spark, path):
        raise FileNotFoundError(f"table {table} not found at {path}: run the stage that writes it first")
    reader = spark.read
    if schema is not None:
        reader = reader.schema(schema)
    return reader.parquet(path)


def table_exists(spark: SparkSession, cfg: Config, table: str) -> bool:
    return path_exists(spark, cfg.table_path(table))


STAGING_MAX_AGE_S = 24 * 3600
RESUMABLE_MAX_AGE_S = 7 * 24 * 3600


def sweep_staging(spark: SparkSession, cfg: Config, max_age_s: float = STAGING_MAX_AGE_S,
                  resumable_max_age_s: float = RESUMABLE_MAX_AGE_S) -> list[str]:
    """Delete what killed drivers left under `<warehouse>/<dataset>/_staging` (a table's
    or an append's staging folder, an old copy moved aside) once older than max_age_s,
    so a live write of another process is never touched. The score stage's
    `ratings-<run_date>` folders, from which a rerun of that date resumes, stay for
    resumable_max_age_s (a week): a score nobody resumed by then is abandoned.
    Returns the names deleted."""
    fs, root = _fs_path(spark, f"{cfg.warehouse.rstrip('/')}/{cfg.dataset}/_staging")
    if not fs.exists(root):
        return []
    now_ms = time.time() * 1000
    gone = []
    for status in fs.listStatus(root):
        name = status.getPath().getName()
        limit_s = resumable_max_age_s if name.startswith("ratings-") else max_age_s
        if _last_written_ms(fs, status) < now_ms - limit_s * 1000:
            fs.delete(status.getPath(), True)
            gone.append(name)
    if gone:
        logger.info("removed %d staging leftovers of killed runs (older than %.0f h; score chunks %.0f h): %s",
                    len(gone), max_age_s / 3600, resumable_max_age_s / 3600, ", ".join(sorted(gone)))
    return sorted(gone)


def _last_written_ms(fs, status) -> int:
    """When a staging entry was last written: a folder's newest file, not the folder's own
    time, which object stores do not keep (S3A reports 0: every folder would look ancient)."""
    if not status.isDirectory():
        return status.getModificationTime()
    newest, files = status.getModificationTime(), fs.listFiles(status.getPath(), True)
    while files.hasNext():
        newest = max(newest, files.next().getModificationTime())
    return newest


# ---- run records ---------------------------------------------------------------------

@dataclass
class RunRecord:
    """Counts one job run reports; appended to the `runs` table when it ends."""
    stage: str
    run_id: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc)
                        .strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6])
    started_at: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat())
    input_rows: int = 0
    output_rows: int = 0
    rejected_rows: int = 0
    status: str = "ok"
    duration_s: float = 0.0
    reads: list[str] = field(default_factory=list)    # table names (or paths) the stage read
    writes: list[str] = field(default_factory=list)   # table names it wrote


@contextmanager
def run_record(spark: SparkSession, cfg: Config, stage: str, run_id: str | None = None):
    """Time a stage and append its record to `runs`, also when it fails."""
    record = RunRecord(stage=stage) if run_id is None else RunRecord(stage=stage, run_id=run_id)
    start = time.perf_counter()
    try:
        yield record
    except BaseException:
        record.status = "failed"
        raise
    finally:
        record.duration_s = round(time.perf_counter() - start, 3)
        append_run(spark, cfg, record)


def append_run(spark: SparkSession, cfg: Config, record: RunRecord) -> None:
    """Add the record to `runs` as one small Parquet file, built in the driver and
    renamed into the table (write_bytes): no Spark job, which for one row costs
    more than the stage it records when a night has little to do."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyspark.sql.pandas.types import to_arrow_schema

    row = (record.run_id, record.stage, cfg.dataset, cfg.hash(), record.started_at,
           float(record.duration_s), int(record.input_rows), int(record.output_rows),
           int(record.rejected_rows), record.status, ",".join(record.reads) or None,
           ",".join(record.writes) or None)
    schema = to_arrow_schema(schemas.RUNS)
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist([dict(zip(schema.names, row))], schema=schema), buffer)
    write_bytes(spark, f"{cfg.table_path('runs')}/part-{record.run_id}-{uuid.uuid4().hex[:8]}.parquet",
                buffer.getvalue().to_pybytes())
    logger.info("run %s %s: %s in %.1fs (in=%d out=%d rejected=%d)", record.stage, record.run_id,
                record.status, record.duration_s, record.input_rows, record.output_rows,
                record.rejected_rows)
