"""Text files read line by line: one non-blank line is one input row, always.

Spark's own CSV and JSON readers are not used on files, because they let a bad line
pass or vanish (checked on Spark 4): PERMISSIVE CSV drops the fields past the
header's count and keeps the row, and flags a short row only when every column is
selected; a quote left open in the last field is read as if it were closed;
multiLine mode swallows the lines after an open quote; JSON keeps the first object
of `{…} {…}` or `{…} junk` and turns a top-level array into several rows (or none).

So each reader here reads the lines as text, splits or parses each line by itself
(no line can swallow the next), and says what is wrong with a line in the `DEFECT`
column, e.g. "malformed_line: 5 fields, header has 4"; the line itself goes to
`CORRUPT`, the raw record of its reject. Validation rejects such rows first, so they
never pass as valid rows nor take part in de-duplication. Blank lines and lines
equal to the header (each part file of a folder starts with one) are no rows.
"""

from __future__ import annotations

import csv
import re
from typing import Callable

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F, types as T

from siren_batch.config import ConfigError
from siren_batch.readers.raw import CORRUPT, DEFECT


def _header(spark: SparkSession, path: str, sep: str, quoted: bool) -> tuple[str, list[str]]:
    """The first line and its column names (RecBole type suffixes such as
    `rating:float` dropped; a UTF-8 byte order mark is no part of the first name)."""
    first = spark.read.text(path).limit(1).collect()
    if not first:
        raise ConfigError(f"{path} is empty")
    line = first[0][0]
    names = next(csv.reader([line.lstrip("\ufeff")], delimiter=sep,
                            quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE))
    return line, [n.strip().split(":")[0] for n in names]


def _quoted_fields(line: Column, sep: str, n: int) -> tuple[list[Column], Column, Column]:
    """RFC 4180 fields ("" is a quote inside a quoted field): (values, field count,
    well-quoted). A quote opens a field only at its start; one that is not closed
    before the next separator or the line's end makes the line badly quoted."""
    s = re.escape(sep)
    field = f'(?:"(?:[^"]|"")*+"|[^"{s}][^{s}]*+|)'
    well_quoted = line.rlike(f"^{field}(?:{s}{field})*+$")
    unquoted = F.regexp_replace(line, f'(^|{s})"(?:[^"]|"")*+"', "$1")  # separators outside quotes remain
    count = F.size(F.split(unquoted, s, -1))
    parsed = F.from_csv(line, ", ".join(f"_c{i} STRING" for i in range(n)),
                        {"sep": sep, "quote": '"', "escape": '"', "mode": "PERMISSIVE"})
    return [parsed[f"_c{i}"] for i in range(n)], count, well_quoted


def read_delimited(spark: SparkSession, path: str, sep: str, quoted: bool = True) -> DataFrame:
    """A headed CSV/TSV as one string column per header name (trimmed; empty -> null),
    plus DEFECT and CORRUPT for a line with another field count than the header or,
    when `quoted`, an unbalanced quote. Without `quoted` a quote is a plain character."""
    header, names = _header(spark, path, sep, quoted)
    line = F.col("value")
    if quoted:
        values, count, well_quoted = _quoted_fields(line, sep, len(names))
    else:
        parts = F.split(line, re.escape(sep), -1)
        values, count, well_quoted = [F.get(parts, i) for i in range(len(names))], F.size(parts), F.lit(True)
    defect = (F.when(~well_quoted, F.lit("malformed_line: unbalanced quote"))
              .when(count != len(names), F.format_string(
                  "malformed_line: %d fields, header has %d", count, F.lit(len(names)))))
    return (spark.read.text(path)
            .where((line != header) & (F.trim(line) != ""))
            .select(*[F.nullif(F.trim(v), F.lit("")).alias(n) for v, n in zip(values, names)],
                    defect.alias(DEFECT), F.when(defect.isNotNull(), line).alias(CORRUPT)))


def _is_container(value: Column) -> Column:
    """True for the text of a JSON array or object: what Spark puts in a string
    field whose JSON value is not a scalar (compact, so it starts with [ or {)."""
    maybe = value.startswith("[") | value.startswith("{")  # cheap; parse only these
    return maybe & (F.json_array_length(value).isNotNull() | F.json_object_keys(value).isNotNull())


def read_jsonl(spark: SparkSession, path: str, schema: T.StructType, ids: tuple[str, ...] = (),
               check: Callable[[Column], Column] | None = None) -> DataFrame:
    """JSON Lines (plain or .gz) with the declared `schema`, plus DEFECT and CORRUPT for
    a line that is not exactly one JSON object, one whose fields do not have the
    declared types, one whose id field (`ids`, declared strings) is an array or an
    object, and one for which `check(parsed struct)` gives a reason. Numbers in
    string fields come as their text."""
    line = F.col("value")
    parsed = F.from_json(line, T.StructType([*schema.fields, T.StructField(CORRUPT, T.StringType())]),
                         {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": CORRUPT})
    # "[" + line + "]" holds one element only when nothing follows the object (Spark
    # parses `{…} junk` and `{…} {…}` as the first object and ignores the rest).
    one_object = (line.rlike(r"^\s*\{")
                  & F.coalesce(F.json_array_length(F.concat(F.lit("["), line, F.lit("]"))) == 1, F.lit(False)))
    defect = (F.when(~one_object, F.lit("malformed_json: not one JSON object"))
              .when(F.col(f"_p.{CORRUPT}").isNotNull(),
                    F.lit("malformed_json: a field does not have its declared type")))
    for name in ids:
        defect = defect.when(_is_container(F.col(f"_p.{name}")),
                             F.lit(f"malformed_json: {name} is an array or object, not a value"))
    if check is not None:
        defect = F.coalesce(defect, check(F.col("_p")))
    return (spark.read.text(path)
            .where(F.trim(line) != "")
            .select(line, parsed.alias("_p"))
            .select(*[F.col(f"_p.`{f.name}`").alias(f.name) for f in schema.fields],
                    defect.alias(DEFECT), F.when(defect.isNotNull(), line).alias(CORRUPT)))
