"""Reader of any Hugging Face `datasets` data set, given which column holds which record field.

    read_hf_dataset(ds, "vqa", columns={"image": "img", "question": "q", "answers": "answers"})

Values are taken as they come in the usual hub layouts: an `Image` column (kept encoded, read as
bytes or path, never decoded here), a path string (joined to `images_dir` when relative), raw bytes
or a uint8 pixel array; captions / answers / phrases as a list or a single string (VQA answers may be
dicts with an "answer" key); a `ClassLabel` column as its names; codes as a list or space-separated
text. The conversion runs as a batched `Dataset.map` (num_proc processes when given).
"""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image

from unifier.data.records import ENTAILMENT_LABELS, RECORD_TYPES, SNLI_VE_LABEL_TO_ANSWER, Record
from unifier.data.recordset import (
    ReaderError,
    RecordSet,
    Skip,
    checked_box,
    record_features,
    record_to_row,
    skip_row,
    wrap_rows,
)

ID_FIELDS = ("image_id", "question_id", "ref_id", "pair_id", "uid")
# Fields a data set may leave out: ids default to the row index, the rest are derived from other fields.
DERIVABLE = {
    "vqa": ("answer", "answers"),
    "grounding": ("width", "height"),
    "region_caption": ("width", "height"),
}
TEXT_FIELDS = ("question", "expression", "hypothesis", "caption")


def read_hf_dataset(
    dataset_or_name: datasets.Dataset | datasets.DatasetDict | str | Path,
    task: str,
    columns: Mapping[str, str] | None = None,
    split: str | None = None,
    *,
    images_dir: str | Path | None = None,
    box_format: str = "xyxy",
    num_proc: int | None = None,
    cache_dir: str | Path | None = None,
) -> RecordSet:
    """Records of `task` from a Hugging Face data set: a Dataset, a DatasetDict (with split), a folder written
    by save_to_disk, or a name / path for datasets.load_dataset (with split).

    columns: {record field: column}; a field left out is read from the column of the same name when
    there is one; ids left out are the row index; VQA `answer` defaults to the most common of `answers`;
    grounding width / height to the image's size (read from its header).
    box_format: "xyxy" (x0, y0, x1, y1) or "xywh" (COCO's [x, y, w, h]), in pixels.
    """
    if task not in RECORD_TYPES:
        raise ValueError(f"read_hf_dataset: unknown task {task!r}; expected one of {tuple(RECORD_TYPES)}")
    if box_format not in ("xyxy", "xywh"):
        raise ValueError(f"read_hf_dataset: box_format must be 'xyxy' or 'xywh', got {box_format!r}")
    dataset, name = _resolve(dataset_or_name, split, cache_dir)
    mapping = _column_mapping(dataset, task, dict(columns or {}), name)
    image_column = mapping.get("image")
    if image_column is not None and isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))  # bytes / path, not pixels
    label_names = {
        column: feature.names
        for column, feature in dataset.features.items()
        if isinstance(feature, datasets.ClassLabel)
    }
    converted = dataset.map(
        _convert_batch,
        batched=True,
        with_indices=True,
        remove_columns=dataset.column_names,
        features=record_features(task),
        fn_kwargs={
            "task": task,
            "mapping": mapping,
            "label_names": label_names,
            "images_dir": None if images_dir is None else os.path.abspath(images_dir),
            "box_format": box_format,
        },
        num_proc=num_proc,
        desc=f"reading {task} records",
    )
    return wrap_rows(converted, task, name=name)


def _resolve(dataset_or_name, split: str | None, cache_dir) -> tuple[datasets.Dataset, str]:
    if isinstance(dataset_or_name, (str, Path)):
        source = str(dataset_or_name)
        saved = ("state.json", "dataset_dict.json")  # what save_to_disk writes (Dataset / DatasetDict)
        if os.path.isdir(source) and any(os.path.exists(os.path.join(source, marker)) for marker in saved):
            loaded = datasets.load_from_disk(source)
        else:
            cache = None if cache_dir is None else str(cache_dir)
            loaded = datasets.load_dataset(source, split=split, cache_dir=cache)
        return _resolve(loaded, split, cache_dir)[0], source
    if isinstance(dataset_or_name, datasets.DatasetDict):
        if split is None or split not in dataset_or_name:
            raise ValueError(
                f"read_hf_dataset: a DatasetDict needs split, one of {list(dataset_or_name)}; got {split!r}"
            )
        return dataset_or_name[split], f"hf dataset [{split}]"
    if isinstance(dataset_or_name, datasets.Dataset):
        return dataset_or_name, "hf dataset"
    raise TypeError(f"read_hf_dataset: expected a datasets.Dataset, DatasetDict or a name, got {type(dataset_or_name)}")


def _column_mapping(dataset: datasets.Dataset, task: str, columns: dict[str, str], name: str) -> dict[str, str]:
    record_fields = {f.name: f for f in fields(RECORD_TYPES[task]) if f.name != "task"}
    unknown = sorted(set(columns) - set(record_fields))
    if unknown:
        raise ValueError(f"read_hf_dataset: {unknown} are not fields of a {task} record; fields: {list(record_fields)}")
    for field_name, column in columns.items():
        if column not in dataset.column_names:
            raise ReaderError(
                f"{name}: no column '{column}' (mapped to field '{field_name}'); columns: {dataset.column_names}"
            )
    mapping = dict(columns)
    for field_name in record_fields:
        if field_name not in mapping and field_name in dataset.column_names:
            mapping[field_name] = field_name
    derivable = DERIVABLE.get(task, ())
    for field_name, f in record_fields.items():
        required = f.default is MISSING and f.default_factory is MISSING
        if required and field_name not in mapping and field_name not in ID_FIELDS and field_name not in derivable:
            raise ReaderError(f"{name}: no column for field '{field_name}' of {task} records; pass columns={{...}}")
    if task == "vqa" and "answer" not in mapping and "answers" not in mapping:
        raise ReaderError(f"{name}: no column for field 'answer' or 'answers' of vqa records; pass columns={{...}}")
    return mapping


def _convert_batch(batch: dict[str, list], indices: list[int], task, mapping, label_names, images_dir, box_format):
    rows = []
    for k, index in enumerate(indices):
        values = {}
        for field_name, column in mapping.items():
            value = batch[column][k]
            if column in label_names and isinstance(value, int) and value >= 0:
                value = label_names[column][value]
            values[field_name] = value
        item = _record(task, values, index, images_dir, box_format)
        rows.append(skip_row(task, item) if isinstance(item, Skip) else record_to_row(item))
    return {name: [row[name] for row in rows] for name in record_features(task)}


def _image(value: Any, images_dir: str | None, where: str) -> Any:
    """The record's image source (path, bytes or uint8 array) or a Skip."""
    if isinstance(value, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if value is None:
        return Skip("missing image", where)
    if isinstance(value, (str, Path)):
        path = str(value)
        if images_dir is not None and not os.path.isabs(path):
            path = os.path.join(images_dir, path)
        return path if os.path.exists(path) else Skip("missing image file", path)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    array = np.asarray(value)
    if array.dtype.kind not in "ui" or array.ndim not in (2, 3) or array.size == 0:
        return Skip("unsupported image value", f"{where}: {type(value).__name__} {array.dtype} {array.shape}")
    if array.min() < 0 or array.max() > 255:
        return Skip("unsupported image value", f"{where}: pixel values outside 0..255")
    return array.astype(np.uint8)


def _image_size(image: Any) -> tuple[int, int] | Skip:
    if isinstance(image, np.ndarray):
        return image.shape[1], image.shape[0]
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as header:
            return header.size
    except (OSError, SyntaxError, ValueError) as err:
        return Skip("unreadable image header", str(err))


def _texts(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else list(value or [])
    texts = [item.get("answer", "") if isinstance(item, dict) else item for item in items]
    return tuple(str(text).strip() for text in texts if str(text).strip())


def _record(task: str, values: dict[str, Any], index: int, images_dir, box_format) -> Record | Skip:
    where = f"row {index}"
    record_fields = {f.name for f in fields(RECORD_TYPES[task])}
    for id_field in ID_FIELDS:
        # A text-to-image record's image_id is optional; every other id defaults to the row index.
        if (
            id_field in record_fields
            and values.get(id_field) is None
            and (task, id_field) != ("text_to_image", "image_id")
        ):
            values[id_field] = index
    for text_field in TEXT_FIELDS:
        if text_field in values:
            values[text_field] = str(values[text_field] or "").strip()
            if not values[text_field]:
                return Skip(f"empty {text_field}", where)
    if task != "text_to_image" or values.get("image") is not None:  # text-to-image may come as codes only
        image = _image(values.get("image"), images_dir, where)
        if isinstance(image, Skip):
            return image
        values["image"] = image
    for list_field in ("captions", "phrases"):
        if list_field in values:
            values[list_field] = _texts(values[list_field])
            if not values[list_field]:
                return Skip(f"no {list_field}", where)
    if task == "vqa":
        answers = _texts(values.get("answers")) if "answers" in values else ()
        answer = str(values.get("answer") or "").strip()
        if not answer and answers:
            answer = Counter(answers).most_common(1)[0][0]  # ties: the first of the most common
        values["answers"] = answers or ((answer,) if answer else ())
        values["answer"] = answer
    if task == "entailment":
        label = str(values["label"]).strip()
        label = SNLI_VE_LABEL_TO_ANSWER.get(label, label)
        if label not in ENTAILMENT_LABELS:
            return Skip("unknown label", f"{where}: {values['label']!r}")
        values["label"] = label
    if task == "text_to_image" and values.get("codes") is not None:
        codes = values["codes"]
        try:
            values["codes"] = tuple(int(code) for code in (codes.split() if isinstance(codes, str) else codes))
        except (TypeError, ValueError):
            return Skip("malformed codes", where)
    if task in ("grounding", "region_caption"):
        skip = _box_fields(values, box_format, where)
        if skip is not None:
            return skip
    for tuple_field in ("answer_scores",):
        if values.get(tuple_field) is not None:
            values[tuple_field] = tuple(float(v) for v in values[tuple_field])
    return RECORD_TYPES[task](**values)


def _box_fields(values: dict[str, Any], box_format: str, where: str) -> Skip | None:
    """Fill width / height (from the image header when not given) and the checked (x0, y0, x1, y1) box."""
    if values.get("width") is None or values.get("height") is None:
        size = _image_size(values["image"])
        if isinstance(size, Skip):
            return size
        values["width"], values["height"] = size
    values["width"], values["height"] = int(values["width"]), int(values["height"])
    try:
        box = [float(v) for v in values["box"]]
    except (TypeError, ValueError):
        box = []
    if len(box) != 4:
        return Skip("malformed box", f"{where}: {values['box']!r}")
    if box_format == "xywh":
        box = [box[0], box[1], box[0] + box[2], box[1] + box[3]]
    checked = checked_box(box, values["width"], values["height"])
    if isinstance(checked, Skip):
        return checked
    values["box"] = checked
    return None
