"""The cluster engine's table: :class:`~retinagrade.report.ResultRecord` as Parquet columns, plus the key.

Every door reports from ``ResultRecord``; this module only lays a record out as one flat, typed Parquet row
(probabilities as ``p0``..``p4``, metadata as one column per DICOM keyword, as in the CSV) and back, so
the CSV written from the merged table is the local engine's own CSV writer's output for the same records.
The one column added is ``key``, what makes a run resumable. :class:`ParquetWriter` is the report registry's
``parquet`` format (``grade -o results.parquet``), registered as this module is imported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import IO, Any, Final, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from retinagrade.constants import METADATA_KEYS, NUM_GRADES
from retinagrade.report import ResultRecord, register_writer

#: A read failure says nothing about the image (a network blip, a file not yet copied): a resumed run
#: retries it. Every other outcome is a property of the bytes and is kept.
RETRYABLE_ERROR_CODES: Final[frozenset[str]] = frozenset({"unreadable_file", "file_not_found"})

PROBABILITY_COLUMNS: Final[tuple[str, ...]] = tuple(f"p{k}" for k in range(NUM_GRADES))


def _arrow_type(name: str, hint: Any) -> pa.DataType:
    """The Parquet type of one ResultRecord field, from its annotation (a new kind of field fails loudly)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint
    if base is str or typing.get_origin(base) is Literal:
        return pa.string()
    if base is bool:
        return pa.bool_()
    if base is int:
        return pa.int32()
    if base is float:
        return pa.float64()
    if typing.get_origin(base) is tuple and typing.get_args(base)[0] is str:
        return pa.list_(pa.string())
    raise TypeError(f"ResultRecord.{name}: no Parquet column type for {hint!r}")


def _schema() -> pa.Schema:
    hints = typing.get_type_hints(ResultRecord)
    fields: list[pa.Field] = []
    for f in dataclasses.fields(ResultRecord):
        if f.name == "probabilities":
            fields.extend(pa.field(name, pa.float64()) for name in PROBABILITY_COLUMNS)
        elif f.name == "metadata":
            fields.extend(pa.field(name, pa.string()) for name in METADATA_KEYS)
        else:
            fields.append(pa.field(f.name, _arrow_type(f.name, hints[f.name])))
    fields.append(pa.field("key", pa.string(), nullable=False))
    return pa.schema(fields)


#: The Parquet schema of every shard and of the merged table.
RECORD_SCHEMA: Final[pa.Schema] = _schema()


def item_key(image: str, sha256: str | None) -> str:
    """The key of one result: the content hash and the path together.

    The same photo at two paths is two results (two rows, as the local engine gives); a file rewritten at
    the same path gets a new key and is graded again. An unreadable file has no content hash; its key is
    the path alone, and it is retried on resume.
    """
    return hashlib.sha256(f"{sha256 or ''}\0{image}".encode()).hexdigest()


def to_row(record: ResultRecord, key: str) -> dict[str, Any]:
    """One Parquet row for a record."""
    flat = record.to_dict()
    metadata = flat.pop("metadata")
    flat.update({name: metadata.get(name) for name in METADATA_KEYS})
    flat["key"] = key
    return flat


def from_row(row: Mapping[str, Any]) -> ResultRecord:
    """The record a Parquet row was made from (what the CSV and JSON writers take)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(ResultRecord):
        if f.name == "probabilities":
            probabilities = [row[name] for name in PROBABILITY_COLUMNS]
            values[f.name] = () if probabilities[0] is None else tuple(probabilities)
        elif f.name == "metadata":
            values[f.name] = types.MappingProxyType({k: row[k] for k in METADATA_KEYS if row.get(k) is not None})
        elif f.name in ("reasons", "fellow_images"):
            values[f.name] = tuple(row[f.name] or ())
        else:
            values[f.name] = row[f.name]
    return ResultRecord(**values)


def rows_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=RECORD_SCHEMA)


@register_writer("parquet", (".parquet",), binary=True)
class ParquetWriter:
    """The writer registry's ``parquet`` format: these columns, one row group per ``row_group`` records.

    Unlike a CSV row, a Parquet file is readable only once closed (its footer comes last): a run stopped
    with Ctrl-C closes it and keeps every row, a killed one leaves an unreadable file. The cluster engine's
    shards are the form that survives a kill. ``key`` is the content hash and path where the image was
    read (the path alone for an error row, which carries no hash).
    """

    def __init__(self, stream: IO[bytes], row_group: int = 1000) -> None:
        self._stream = stream
        self._writer = pq.ParquetWriter(stream, RECORD_SCHEMA)
        self._row_group = row_group
        self._rows: list[dict[str, Any]] = []

    def write(self, record: ResultRecord) -> None:
        self._rows.append(to_row(record, item_key(record.image, record.sha256 or None)))
        if len(self._rows) >= self._row_group:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_table(rows_table(self._rows))
            self._rows = []

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._stream.flush()
