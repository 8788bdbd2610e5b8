"""RecordSet: the records a reader produced, stored in a Hugging Face `datasets.Dataset` (Arrow, memory-mapped).

Every reader in `unifier.data.readers` is a generator of records (or of `Skip`s for bad ones) run once
through `datasets.Dataset.from_generator`: the rows land in an Arrow file under the datasets cache,
keyed by a fingerprint of the reader, its arguments and the size / mtime of its input files, so a
second read of the same files is a memory map rather than a parse (and concurrent ranks share
datasets' file lock instead of racing). The `RecordSet` then gives back record dataclasses.

Row layout (one column per record field; `record_features(task)` gives the Features):
    ids (`image_id`, `question_id`, `ref_id`, `pair_id`, `uid`)  JSON text, so int and str ids survive exactly
    `image`                   split into `image_path` (str) and `image_bytes` (encoded file bytes)
    tuples of str / int / float, boxes   Arrow lists
    `skip_reason`             null for a good row; "reason: detail" for a record the reader skipped
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import numpy as np
import pyarrow.compute as pc
from datasets.exceptions import DatasetGenerationError
from datasets.fingerprint import Hasher

from unifier.data.records import RECORD_TYPES, Record
from unifier.images import MAX_IMAGE_PIXELS, ImageLoadError, load_image

logger = logging.getLogger(__name__)

# Bump when the row layout or a reader's output changes, so stale caches are not reused.
CACHE_VERSION = 2
ID_ANNOTATIONS = ("int | str", "int | str | None")
# Record field annotation -> Arrow feature (records.py writes annotations as strings).
FEATURE_BY_ANNOTATION: dict[str, Any] = {
    "int | str": datasets.Value("string"),  # JSON text
    "int | str | None": datasets.Value("string"),  # JSON text
    "str": datasets.Value("string"),
    "str | None": datasets.Value("string"),
    "int": datasets.Value("int64"),
    "Box": datasets.List(datasets.Value("float64")),
    "tuple[str, ...]": datasets.List(datasets.Value("string")),
    "tuple[int, ...] | None": datasets.List(datasets.Value("int64")),
    "tuple[float, ...] | None": datasets.List(datasets.Value("float64")),
}


class ReaderError(ValueError):
    """A malformed annotation file (not parseable, a required key or field missing): names the file and field."""


class Skip(NamedTuple):
    """A record a reader leaves out, and why: `reason` groups the summary, `detail` names the instance."""

    reason: str
    detail: str = ""


# ---- rows <-> records ---------------------------------------------------------------------------------------------
def record_features(task: str) -> datasets.Features:
    """The Arrow features of a task's rows: its record fields (image split in path / bytes) and skip_reason."""
    columns: dict[str, Any] = {}
    for f in fields(RECORD_TYPES[task]):
        if f.name == "task":
            continue
        if f.name == "image":
            columns["image_path"] = datasets.Value("string")
            columns["image_bytes"] = datasets.Value("binary")
            continue
        if f.type not in FEATURE_BY_ANNOTATION:
            raise TypeError(f"record_features: no Arrow type for {task}.{f.name}: {f.type!r}; add it here")
        columns[f.name] = FEATURE_BY_ANNOTATION[f.type]
    columns["skip_reason"] = datasets.Value("string")
    return datasets.Features(columns)


@functools.cache
def _id_fields(task: str) -> frozenset[str]:
    return frozenset(f.name for f in fields(RECORD_TYPES[task]) if f.type in ID_ANNOTATIONS)


def _png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    load_image(image).save(buffer, format="PNG")
    return buffer.getvalue()


def record_to_row(record: Record) -> dict[str, Any]:
    """A record as one row of `record_features(record.task)` (an in-memory image is stored as PNG bytes)."""
    ids = _id_fields(record.task)
    row: dict[str, Any] = {"skip_reason": None}
    for f in fields(record):
        value = getattr(record, f.name)
        if f.name == "task":
            continue
        if f.name == "image":
            is_path = isinstance(value, (str, Path))
            row["image_path"] = str(value) if is_path else None
            if value is None or is_path:
                row["image_bytes"] = None
            elif isinstance(value, (bytes, bytearray, memoryview)):
                row["image_bytes"] = bytes(value)
            else:
                row["image_bytes"] = _png_bytes(value)  # PIL image or array: lossless
        elif f.name in ids:
            row[f.name] = None if value is None else json.dumps(value)
        else:
            row[f.name] = list(value) if isinstance(value, tuple) else value
    return row


@functools.cache
def _column_names(task: str) -> tuple[str, ...]:
    return tuple(record_features(task))


def skip_row(task: str, skip: Skip) -> dict[str, Any]:
    row = dict.fromkeys(_column_names(task))
    row["skip_reason"] = f"{skip.reason}: {skip.detail}" if skip.detail else skip.reason
    return row


def row_to_record(task: str, row: dict[str, Any]) -> Record:
    """The record of one good row (the inverse of record_to_row, with file images kept as paths)."""
    ids = _id_fields(task)
    values: dict[str, Any] = {}
    for f in fields(RECORD_TYPES[task]):
        if f.name == "task":
            continue
        if f.name == "image":
            values["image"] = row["image_path"] if row["image_path"] is not None else row["image_bytes"]
            continue
        value = row[f.name]
        if f.name in ids:
            value = None if value is None else json.loads(value)
        elif isinstance(value, list):
            value = tuple(value)
        values[f.name] = value
    return RECORD_TYPES[task](**values)


# ---- the record set -------------------------------------------------------------------------------------------------
class RecordSet(Sequence):
    """Records of one task backed by an Arrow `datasets.Dataset` of good rows.

    `len()`, indexing and iteration give record dataclasses; `dataset` is the underlying Dataset
    (shuffle / shard / map it as any other); `skipped` counts the records the reader left out and
    `skip_reasons` says why ({reason: count}).
    """

    def __init__(
        self, dataset: datasets.Dataset, task: str, *, skip_reasons: dict[str, int] | None = None, source: str = ""
    ):
        if task not in RECORD_TYPES:
            raise ValueError(f"RecordSet: unknown task {task!r}; expected one of {tuple(RECORD_TYPES)}")
        self.dataset, self.task, self.source = dataset, task, source
        self.skip_reasons = dict(skip_reasons or {})

    @property
    def skipped(self) -> int:
        return sum(self.skip_reasons.values())

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Record:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"RecordSet indices must be integers, got {type(index).__name__}")
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"RecordSet index {index} out of range for {len(self)} records")
        return row_to_record(self.task, self.dataset[int(index)])

    def __iter__(self) -> Iterator[Record]:
        for batch in self.dataset.iter(batch_size=1000):
            names = list(batch)
            for values in zip(*batch.values(), strict=True):
                yield row_to_record(self.task, dict(zip(names, values, strict=True)))

    def __repr__(self) -> str:
        return f"RecordSet(task={self.task!r}, records={len(self)}, skipped={self.skipped}, source={self.source!r})"

    def check_images(self, *, max_pixels: int | None = MAX_IMAGE_PIXELS, num_proc: int | None = None) -> list:
        """Decode every image once; returns [(index, error message)] of the bad ones (also logged as a summary).

        num_proc: processes for datasets' map (decoding is the slow part of a real data set).
        """
        checked = self.dataset.map(
            _image_errors,
            batched=True,
            batch_size=64,
            input_columns=["image_path", "image_bytes"],
            remove_columns=self.dataset.column_names,
            fn_kwargs={"max_pixels": max_pixels},
            num_proc=num_proc,
            keep_in_memory=True,
            load_from_cache_file=False,
            desc="checking images",
        )
        errors = [(index, message) for index, message in enumerate(checked["image_error"]) if message is not None]
        if errors:
            logger.warning(
                "%s: %d of %d images cannot be loaded (first: record %d: %s)",
                self.source or self.task,
                len(errors),
                len(self),
                *errors[0],
            )
        return errors


def _image_errors(paths: list, blobs: list, max_pixels: int | None) -> dict[str, list]:
    messages: list[str | None] = []
    for path, blob in zip(paths, blobs, strict=True):
        source = path if path is not None else blob
        if source is None:  # text-to-image records given by codes only
            messages.append(None)
            continue
        try:
            load_image(source, max_pixels=max_pixels)
            messages.append(None)
        except ImageLoadError as err:
            messages.append(str(err))
    return {"image_error": messages}


# ---- building a record set from a reader ---------------------------------------------------------------------------
def _generate_rows(reader: Callable[..., Iterable[Record | Skip]], kwargs: dict, task: str) -> Iterator[dict]:
    """datasets' generator: runs the reader and turns its records / skips into rows."""
    for item in reader(**kwargs):
        yield skip_row(task, item) if isinstance(item, Skip) else record_to_row(item)


def source_signature(paths: Iterable[str | Path | None]) -> list[tuple]:
    """(path, size, mtime_ns) of each input: the part of the cache fingerprint that notices edited files.

    A directory's mtime changes when files are added or removed, so restored images are noticed too.
    """
    signature = []
    for path in paths:
        if path is None:
            continue
        stat = os.stat(path)
        signature.append((os.path.abspath(path), stat.st_size, stat.st_mtime_ns))
    return signature


def build_record_set(
    task: str,
    reader: Callable[..., Iterable[Record | Skip]],
    kwargs: dict[str, Any],
    *,
    sources: Iterable[str | Path | None],
    cache_dir: str | Path | None = None,
    name: str = "",
) -> RecordSet:
    """Run `reader(**kwargs)` into an Arrow dataset (or reuse the cached one) and wrap it in a RecordSet.

    sources: the files and folders the reader reads (their size / mtime key the cache);
    cache_dir: where the Arrow files go (None: datasets' cache, HF_DATASETS_CACHE).
    Raises the reader's ReaderError (unwrapped from datasets' DatasetGenerationError).
    """
    features = record_features(task)
    fingerprint = Hasher.hash((CACHE_VERSION, reader, kwargs, source_signature(sources), features.to_dict()))
    try:
        full = datasets.Dataset.from_generator(
            _generate_rows,
            features=features,
            cache_dir=None if cache_dir is None else str(cache_dir),
            gen_kwargs={"reader": reader, "kwargs": kwargs, "task": task},
            fingerprint=fingerprint,
        )
    except DatasetGenerationError as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, ReaderError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise
    except ValueError as err:
        # datasets cannot build a split from a generator that yielded nothing ("... corresponds to no data").
        if "no data" not in str(err):
            raise
        full = datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    return wrap_rows(full, task, name=name)


def wrap_rows(full: datasets.Dataset, task: str, *, name: str = "") -> RecordSet:
    """A RecordSet of the good rows of `full` (rows with skip_reason set are counted, summarized and left out)."""
    reasons = full.with_format("arrow")["skip_reason"]  # honours an indices mapping, unlike full.data
    good = pc.is_null(reasons).to_numpy(zero_copy_only=False)
    skip_reasons: dict[str, int] = {}
    if not good.all():
        bad = reasons.filter(pc.invert(pc.is_null(reasons))).to_pylist()
        categories = Counter(reason.split(": ", 1)[0] for reason in bad)
        skip_reasons = dict(categories)
        first = {}
        for reason in bad:
            first.setdefault(reason.split(": ", 1)[0], reason)
        summary = "; ".join(f"{category} x{count} (first: {first[category]})" for category, count in categories.items())
        logger.warning("%s: skipped %d of %d records: %s", name or task, len(bad), len(full), summary)
        full = full.select(np.flatnonzero(good))
    return RecordSet(full, task, skip_reasons=skip_reasons, source=name)


# ---- helpers the readers share --------------------------------------------------------------------------------------
def load_json(path: str | Path) -> Any:
    """Parse a JSON file; a ReaderError names the file and the position of a syntax error."""
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except json.JSONDecodeError as err:
        raise ReaderError(f"{path}: not valid JSON ({err})") from err
    except UnicodeDecodeError as err:
        raise ReaderError(f"{path}: not UTF-8 text ({err})") from err


def require(obj: Any, key: str, where: str, source: str | Path, kind: type | tuple[type, ...] | None = None) -> Any:
    """obj[key], or a ReaderError naming the file and the field (`where` locates obj, e.g. "annotations[3]")."""
    if not isinstance(obj, dict):
        raise ReaderError(f"{source}: {where} should be a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise ReaderError(f"{source}: {where} has no field '{key}'")
    value = obj[key]
    if kind is not None and not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ReaderError(f"{source}: {where}.{key} should be {names}, got {type(value).__name__}")
    return value


def text_id(value: str) -> int | str:
    """An id read from text (TSV columns, Flickr30K_ID): decimal digits become an int, as in the JSON layouts."""
    return int(value) if value.isascii() and value.isdigit() else value


class ImageFiles:
    """Which image files exist, listing each folder once: one stat per record is slow on network disks."""

    def __init__(self):
        self._names: dict[str, frozenset[str]] = {}

    def exists(self, path: str | Path) -> bool:
        folder, name = os.path.split(os.fspath(path))
        if folder not in self._names:
            try:
                self._names[folder] = frozenset(os.listdir(folder or "."))
            except OSError:
                self._names[folder] = frozenset()
        return name in self._names[folder]


# COCO boxes are floats and some overshoot the image by a rounding error; more than this is a bad box.
BOX_TOLERANCE = 1.0


def checked_box(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float] | Skip:
    """(x0, y0, x1, y1) clamped to the image, or a Skip when it is degenerate or lies outside the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(np.isfinite((x0, y0, x1, y1))) or x1 <= x0 or y1 <= y0:
        return Skip("degenerate box", f"{(x0, y0, x1, y1)}")
    if width <= 0 or height <= 0:
        return Skip("bad image size", f"{width}x{height}")
    tol = BOX_TOLERANCE
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        return Skip("box outside the image", f"{(x0, y0, x1, y1)} in {width}x{height}")
    clamped = (max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height)))
    if clamped[2] <= clamped[0] or clamped[3] <= clamped[1]:
        return Skip("box outside the image", f"{(x0, y0, x1, y1)} in {width}x{height}")
    return clamped
