"""Results rendered once: one flat record per image, and a registry of streaming writers by output format.

Every door reports from :class:`ResultRecord`: the CLI writes records with a writer from the registry, the
service builds its response and its audit row from a record, and evaluation reads the typed results. A new
output format is one class registered with :func:`register_writer`, not an edit of four files.

A format whose writer needs an optional extra lives with that extra's code and registers itself there: Parquet
in :mod:`retinagrade.cluster.records` (``[cluster]``), the FHIR Bundle in :mod:`retinagrade.interop.fhir`
(``[dicom]``). This module knows such a format only by name, suffixes and module (:data:`PLUGGED_FORMATS`) and
imports the module when the format is first asked for, so pyarrow and fhir.resources load only for their output,
and the writers import this module, never the other way round.

Writers stream: each record is written and flushed as it arrives, so an interrupted run keeps every row
that finished. Text cells that a spreadsheet would run as a formula are neutralised in CSV.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any, Final, Protocol

from retinagrade.constants import METADATA_KEYS, NUM_GRADES, ReferralReason, Status
from retinagrade.errors import RetinagradeError
from retinagrade.eyes import PairedAnswer
from retinagrade.pipeline import GradeResult
from retinagrade.referral import Action, Urgency, recommend

#: Digits the CSV prints for probabilities, confidence and quality (enough for a person, exact enough to compare).
CSV_DECIMALS: Final[int] = 4
#: Leading characters that make a spreadsheet treat a cell as a formula (OWASP "CSV injection").
_FORMULA_LEADS: Final[tuple[str, ...]] = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
class ResultRecord:
    """One image's outcome as every report shows it.

    Attributes:
        image: the image's name (a path for the CLI, the upload's file name or index for the service), made
            printable: bytes of a file name that are not UTF-8 appear as ``\\xNN``.
        status: ``graded``, ``ungradable``, ``not_fundus`` or ``error``.
        grade, grade_name, referable, confidence, p_referable, probabilities: the decision; None (empty
            probabilities) unless graded. ``confidence`` is the calibrated probability of the reported grade.
        referral_reason: why the eye was referred (``grade``; ``risk``: grade 0-1 with P(referable) at or over
            the operating point; ``dme``: macular oedema alone; or ``none``); None unless graded.
        p_dme, dme: calibrated probability of diabetic macular oedema and the oedema decision at its own
            threshold; None unless graded by a model with a DME output.
        operating_point, referable_threshold: the named operating point the referral was decided at and its
            risk threshold; empty/None unless graded.
        urgency, action: what to do next (:mod:`retinagrade.referral`), for every status.
        quality, is_fundus, gradable, reasons: the quality gate's verdict; None (no reasons) for an error.
        quality_warning: graded although the gate found the photo's quality too low (a confident referable
            answer outranked the refusal); ``reasons`` then say what is wrong with the photo. None for an error.
        fundus_score: the gate's P(colour fundus photograph); None for an error or a gate without a detector.
        error_code, error_message: why an image was not read; empty unless ``status == "error"``.
        sha256, width, height: the image's bytes and full size; empty/None for an error.
        site: the site profile the result was made under (empty when none).
        paired_grade, paired_referable, paired_p_referable: the fellow-eye answer (the model's fellow-eye
            rule applied with the other eye's graded images, :func:`retinagrade.eyes.paired_answers`); None
            unless eyes were paired and the other eye was graded. The single-image fields never change.
        fellow_images: the other eye's images that answer used.
        metadata: what the file said about patient and eye, keyed by DICOM keyword.
    """

    image: str
    status: Status
    urgency: Urgency
    action: Action
    grade: int | None = None
    grade_name: str | None = None
    referable: bool | None = None
    referral_reason: ReferralReason | None = None
    confidence: float | None = None
    probabilities: tuple[float, ...] = ()
    p_referable: float | None = None
    p_dme: float | None = None
    dme: bool | None = None
    quality: float | None = None
    is_fundus: bool | None = None
    fundus_score: float | None = None
    gradable: bool | None = None
    reasons: tuple[str, ...] = ()
    quality_warning: bool | None = None
    error_code: str = ""
    error_message: str = ""
    sha256: str = ""
    width: int | None = None
    height: int | None = None
    site: str = ""
    operating_point: str = ""
    referable_threshold: float | None = None
    paired_grade: int | None = None
    paired_referable: bool | None = None
    paired_p_referable: float | None = None
    fellow_images: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def to_dict(self) -> dict[str, Any]:
        """A flat, JSON-ready mapping: ``probabilities`` become ``p0``..``p4``; ``metadata`` stays a mapping."""
        flat: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "probabilities":
                flat.update({f"p{k}": value[k] if value else None for k in range(NUM_GRADES)})
            elif f.name in ("reasons", "fellow_images"):
                flat[f.name] = list(value)
            elif f.name == "metadata":
                flat["metadata"] = dict(value)
            else:
                flat[f.name] = value
        return flat

    def without_identifiers(self) -> dict[str, Any]:
        """:meth:`to_dict` without the image's name and metadata, for the audit trail (no patient identifiers)."""
        flat = self.to_dict()
        del flat["image"], flat["metadata"], flat["fellow_images"]
        return flat


def printable_name(name: str | os.PathLike[str]) -> str:
    """A file name that any UTF-8 writer can write: undecodable bytes (``surrogateescape``) become ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def to_record(name: str | os.PathLike[str], outcome: GradeResult | RetinagradeError, *, site: str = "") -> ResultRecord:
    """The record of one image's result or error (single-image answer; :func:`with_pairing` adds the fellow eye)."""
    image = printable_name(name)
    if isinstance(outcome, RetinagradeError):
        advice = recommend("error", None)
        return ResultRecord(
            image=image,
            status="error",
            urgency=advice.urgency,
            action=advice.action,
            error_code=outcome.code,
            error_message=outcome.message,
            site=site,
            metadata=MappingProxyType(dict(outcome.metadata)),
        )
    advice = outcome.recommendation
    quality = outcome.quality
    decision = outcome.decision
    return ResultRecord(
        image=image,
        status=outcome.status,
        urgency=advice.urgency,
        action=advice.action,
        grade=decision.grade if decision else None,
        grade_name=decision.grade_name if decision else None,
        referable=decision.referable if decision else None,
        referral_reason=decision.referral_reason if decision else None,
        confidence=decision.confidence if decision else None,
        probabilities=decision.probabilities if decision else (),
        p_referable=decision.p_referable if decision else None,
        p_dme=decision.p_dme if decision else None,
        dme=decision.dme if decision else None,
        quality=quality.score,
        is_fundus=quality.is_fundus,
        fundus_score=quality.fundus_score,
        gradable=quality.gradable,
        reasons=tuple(quality.reasons),
        quality_warning=quality.warning,
        sha256=outcome.sha256,
        width=outcome.original_size[0],
        height=outcome.original_size[1],
        site=site,
        operating_point=decision.operating_point if decision else "",
        referable_threshold=decision.referable_threshold if decision else None,
        metadata=MappingProxyType(dict(outcome.metadata)),
    )


def with_pairing(record: ResultRecord, paired: PairedAnswer | None, fellow_names: Sequence[str]) -> ResultRecord:
    """The record with its fellow-eye answer (unchanged without one)."""
    if paired is None:
        return record
    decision = paired.decision
    return dataclasses.replace(
        record,
        paired_grade=decision.grade,
        paired_referable=decision.referable,
        paired_p_referable=decision.p_referable,
        fellow_images=tuple(printable_name(n) for n in fellow_names),
    )


# -- writers ---------------------------------------------------------------------------------------------


class ResultWriter(Protocol):
    """Writes records as they come; ``close`` finishes the output (a JSON array's closing bracket)."""

    def write(self, record: ResultRecord) -> None: ...

    def close(self) -> None: ...


WriterFactory = Callable[..., ResultWriter]
"""``factory(stream)``, or ``factory(stream, context)`` for a format registered with ``context=True``."""


@dataclass(frozen=True)
class WriterEntry:
    """A registered output format; ``context``: the writer also needs :class:`RunContext`."""

    name: str
    suffixes: tuple[str, ...]
    factory: WriterFactory
    binary: bool = False
    context: bool = False


@dataclass(frozen=True)
class RunContext:
    """What a report about a whole run may state besides the records: the model that made them."""

    model_name: str = ""
    model_version: str = ""
    model_sha256: str = ""
    intended_use: str = ""
    site: str = ""


@dataclass(frozen=True)
class PluggedFormat:
    """A format whose writer is registered by the module of its optional extra, as that module is imported.

    Attributes:
        title: the format's name in messages.
        suffixes: the file suffixes it is chosen by (known before its module is imported).
        module: the module that registers its writer.
        needs: the packages of the extra the writer uses (checked before an output file is created).
        extra: the extra that installs them.
    """

    title: str
    suffixes: tuple[str, ...]
    module: str
    needs: tuple[str, ...]
    extra: str


WRITERS: dict[str, WriterEntry] = {}
#: Formats whose writers live with their optional extra's code, imported when the format is first asked for.
PLUGGED_FORMATS: Final[Mapping[str, PluggedFormat]] = MappingProxyType(
    {
        "parquet": PluggedFormat("Parquet", (".parquet",), "retinagrade.cluster.records", ("pyarrow",), "cluster"),
        "fhir": PluggedFormat("FHIR", (".fhir.json",), "retinagrade.interop.fhir", ("fhir.resources",), "dicom"),
    }
)


def register_writer(
    name: str, suffixes: tuple[str, ...], *, binary: bool = False, context: bool = False
) -> Callable[[type[Any]], type[Any]]:
    """Class decorator: make a writer class the one for format ``name`` and these file suffixes."""

    def register(cls: type[Any]) -> type[Any]:
        WRITERS[name] = WriterEntry(name, suffixes, cls, binary, context)
        return cls

    return register


def _suffixes() -> set[tuple[str, str]]:
    """(suffix, format) of every format, registered or plugged."""
    named: list[tuple[str, tuple[str, ...]]] = [(name, entry.suffixes) for name, entry in WRITERS.items()]
    named.extend((name, plugged.suffixes) for name, plugged in PLUGGED_FORMATS.items())
    return {(suffix, name) for name, suffixes in named for suffix in suffixes}


def format_for(path: Path) -> str:
    """The format whose suffix the file name ends with (longest suffix first, ``.fhir.json``)."""
    lowered = path.name.lower()
    matches = [(len(suffix), name) for suffix, name in _suffixes() if lowered.endswith(suffix)]
    if not matches:
        known = ", ".join(sorted(suffix for suffix, _ in _suffixes()))
        raise ValueError(f"no output format for {path.name!r}; use one of {known}")
    return max(matches)[1]


def writer_entry(fmt: str) -> WriterEntry:
    """The registered format ``fmt``; a plugged format's module is imported first (it registers the writer).

    Raises:
        ValueError: an unknown format, or a plugged one whose extra is not installed.
    """
    plugged = PLUGGED_FORMATS.get(fmt)
    if plugged is not None:
        try:
            for name in (*plugged.needs, plugged.module):
                importlib.import_module(name)  # a no-op once imported
        except ImportError as exc:
            if (exc.name or "").split(".")[0] not in {need.split(".")[0] for need in plugged.needs}:
                raise
            install = f"pip install 'retinagrade[{plugged.extra}]'"
            raise ValueError(f"{plugged.title} output needs the [{plugged.extra}] extra: {install}") from None
    if fmt not in WRITERS:
        known = sorted({*WRITERS, *PLUGGED_FORMATS})
        raise ValueError(f"unknown output format {fmt!r}; known: {', '.join(known)}")
    return WRITERS[fmt]


def open_writer(
    target: Path | IO[Any],
    fmt: str | None = None,
    *,
    overwrite: bool = False,
    context: RunContext | None = None,
) -> ResultWriter:
    """A writer for a file (created now, so an unwritable path fails before any work) or an open stream.

    Args:
        target: a path, or an open text (binary for a binary format) stream that the caller closes.
        fmt: a registered format name; by default the path's suffix decides (a stream needs ``fmt``).
        overwrite: replace an existing file; without it an existing file raises ``FileExistsError``.
        context: the model behind the records, for formats that state it (FHIR names it as a Device).

    Raises:
        ValueError: an unknown format, or one whose optional extra is not installed.
        OSError: the file cannot be created (``FileExistsError`` when it exists and ``overwrite`` is off).
    """
    if fmt is None:
        if not isinstance(target, Path):
            raise ValueError("give the format of a stream")
        fmt = format_for(target)
    entry = writer_entry(fmt)  # a writer that cannot work here refuses before its file is created
    args: tuple[Any, ...] = (context or RunContext(),) if entry.context else ()
    if not isinstance(target, Path):
        return entry.factory(target, *args)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        # Something on the way is a file: not "the output exists", which --overwrite would answer.
        raise NotADirectoryError(f"{target.parent} is not a folder") from None
    mode = ("w" if overwrite else "x") + ("b" if entry.binary else "")
    if entry.binary:
        binary = target.open(mode)
        return _Closing(entry.factory(binary, *args), binary)
    # newline="" lets the csv module write its own line ends; backslashreplace keeps any odd text writable.
    stream = target.open(mode, encoding="utf-8", errors="backslashreplace", newline="")
    return _Closing(entry.factory(stream, *args), stream)


class _Closing:
    """A writer that owns its file: closing it closes the file."""

    def __init__(self, writer: ResultWriter, stream: IO[Any] | None) -> None:
        self._writer = writer
        self._stream = stream

    def write(self, record: ResultRecord) -> None:
        self._writer.write(record)

    def close(self) -> None:
        try:
            self._writer.close()
        finally:
            if self._stream is not None:
                self._stream.close()


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return str(round(value, CSV_DECIMALS))
    if isinstance(value, list | tuple):
        value = ";".join(str(v) for v in value)
    text = str(value)
    # Text only (numbers are formatted above): a leading quote makes a spreadsheet show it, not run it.
    return "'" + text if text.startswith(_FORMULA_LEADS) else text


@register_writer("csv", (".csv",))
class CsvWriter:
    """One row per image; the columns are :data:`CSV_COLUMNS`."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._csv = csv.writer(stream)
        self._csv.writerow(CSV_COLUMNS)
        stream.flush()

    def write(self, record: ResultRecord) -> None:
        flat = record.to_dict()
        # A refused or unreadable image is not referred by the model (the action column says what to do);
        # "false" is what this column has always said for it.
        if flat["referable"] is None:
            flat["referable"] = False
        metadata = flat.pop("metadata")
        self._csv.writerow([_csv_value(metadata.get(c, "") if c in METADATA_KEYS else flat[c]) for c in CSV_COLUMNS])
        self._stream.flush()

    def close(self) -> None:
        self._stream.flush()


@register_writer("json", (".json",))
class JsonWriter:
    """A JSON array of :meth:`ResultRecord.to_dict` objects, written element by element."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._count = 0
        stream.write("[")
        stream.flush()

    def write(self, record: ResultRecord) -> None:
        self._stream.write(("," if self._count else "") + "\n  " + json.dumps(record.to_dict()))
        self._stream.flush()
        self._count += 1

    def close(self) -> None:
        self._stream.write("\n]\n" if self._count else "]\n")
        self._stream.flush()


@register_writer("jsonl", (".jsonl", ".ndjson"))
class JsonLinesWriter:
    """One JSON object per line: every line written is complete, whatever stops the run."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, record: ResultRecord) -> None:
        self._stream.write(json.dumps(record.to_dict()) + "\n")
        self._stream.flush()

    def close(self) -> None:
        self._stream.flush()


#: CSV columns: the first twelve in the order the CLI has always written them, then the newer fields.
CSV_COLUMNS: Final[tuple[str, ...]] = (
    "image",
    "status",
    "grade",
    "grade_name",
    "referable",
    "confidence",
    *(f"p{k}" for k in range(NUM_GRADES)),
    "quality",
    "p_referable",
    "urgency",
    "action",
    "is_fundus",
    "fundus_score",
    "gradable",
    "reasons",
    "quality_warning",
    "error_code",
    "error_message",
    "sha256",
    "width",
    "height",
    "site",
    "referral_reason",
    "operating_point",
    "referable_threshold",
    "p_dme",
    "dme",
    "paired_grade",
    "paired_referable",
    "paired_p_referable",
    "fellow_images",
    *METADATA_KEYS,
)
