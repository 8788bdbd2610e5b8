"""Readers of the public annotation layouts: COCO captions, Karpathy splits, VQAv2, RefCOCO refs, SNLI-VE.

Each `read_*` returns a `RecordSet` (see unifier/data/recordset.py); the `_*_records` generators
behind them yield records, or `Skip`s for bad ones (missing image file, box outside the image,
empty text, unknown label), which are counted and summarized. A malformed file (not JSON, a
required key or field missing or of the wrong type) raises ReaderError at once, naming the file
and the field. Images are not decoded here: records carry the image path.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from unifier.data.records import (
    SNLI_VE_LABEL_TO_ANSWER,
    CaptionRecord,
    EntailmentRecord,
    GroundingRecord,
    RegionCaptionRecord,
    TextToImageRecord,
    VqaRecord,
)
from unifier.data.recordset import (
    ImageFiles,
    ReaderError,
    RecordSet,
    Skip,
    build_record_set,
    checked_box,
    load_json,
    require,
    text_id,
)

PathLike = str | Path
KARPATHY_SPLITS = ("train", "val", "test", "restval")
# VQAv2's questions files name their image folder in `data_subtype` (train2014, val2014, test2015).
VQA_IMAGE_NAME = "COCO_{data_subtype}_{image_id:012d}.jpg"
PICKLE_SUFFIXES = (".p", ".pkl", ".pickle")


def _existing(path: PathLike, what: str) -> str:
    """The absolute path, or a ReaderError when it does not exist (before any parsing starts)."""
    if not os.path.exists(path):
        raise ReaderError(f"{path}: {what} not found")
    return os.path.abspath(path)


def _image_or_skip(files: ImageFiles, path: str) -> Skip | None:
    return None if files.exists(path) else Skip("missing image file", path)


# ---- COCO captions ---------------------------------------------------------------------------------------------------
def read_coco_captions(annotations_json: PathLike, images_dir: PathLike, *, cache_dir=None) -> RecordSet:
    """COCO captions JSON (`captions_train2014.json`) -> one CaptionRecord per image, its captions in file order."""
    kwargs = {
        "annotations_json": _existing(annotations_json, "annotation file"),
        "images_dir": _existing(images_dir, "images folder"),
    }
    sources = kwargs.values()
    return build_record_set(
        "caption",
        _coco_caption_records,
        kwargs,
        sources=sources,
        cache_dir=cache_dir,
        name=f"coco captions {annotations_json}",
    )


def read_coco_text_to_image(
    annotations_json: PathLike, images_dir: PathLike, *, every_caption: bool = False, cache_dir=None
) -> RecordSet:
    """COCO captions JSON -> TextToImageRecord: the first caption of each image (uid = image id), or,
    with every_caption, one record per caption (uid = the caption annotation's id)."""
    kwargs = {
        "annotations_json": _existing(annotations_json, "annotation file"),
        "images_dir": _existing(images_dir, "images folder"),
        "every_caption": every_caption,
    }
    sources = [kwargs["annotations_json"], kwargs["images_dir"]]
    return build_record_set(
        "text_to_image",
        _coco_text_to_image_records,
        kwargs,
        sources=sources,
        cache_dir=cache_dir,
        name=f"coco text-to-image {annotations_json}",
    )


def _coco_images_and_captions(annotations_json: str) -> tuple[list[tuple[Any, str]], dict[Any, list[tuple[Any, str]]]]:
    """[(image id, file name)] in file order and {image id: [(annotation id, caption)]} in file order."""
    data = load_json(annotations_json)
    images = require(data, "images", "top level", annotations_json, list)
    annotations = require(data, "annotations", "top level", annotations_json, list)
    image_files = []
    for i, image in enumerate(images):
        where = f"images[{i}]"
        image_id = require(image, "id", where, annotations_json, (int, str))
        image_files.append((image_id, require(image, "file_name", where, annotations_json, str)))
    captions: dict[Any, list[tuple[Any, str]]] = defaultdict(list)
    for i, annotation in enumerate(annotations):
        where = f"annotations[{i}]"
        image_id = require(annotation, "image_id", where, annotations_json, (int, str))
        caption = require(annotation, "caption", where, annotations_json, str)
        captions[image_id].append((annotation.get("id", i), caption.strip()))
    return image_files, captions


def _coco_caption_records(annotations_json: str, images_dir: str) -> Iterator[CaptionRecord | Skip]:
    image_files, captions = _coco_images_and_captions(annotations_json)
    files = ImageFiles()
    for image_id, file_name in image_files:
        texts = tuple(text for _, text in captions.pop(image_id, ()) if text)
        path = os.path.join(images_dir, file_name)
        skip = _image_or_skip(files, path) if texts else Skip("image without captions", str(image_id))
        yield skip or CaptionRecord(image_id=image_id, image=path, captions=texts)
    for image_id in captions:  # captions whose image is not listed under `images`
        yield Skip("captions of an unlisted image", str(image_id))


def _coco_text_to_image_records(annotations_json: str, images_dir: str, every_caption: bool) -> Iterator:
    image_files, captions = _coco_images_and_captions(annotations_json)
    files = ImageFiles()
    for image_id, file_name in image_files:
        texts = [(ann_id, text) for ann_id, text in captions.pop(image_id, ()) if text]
        path = os.path.join(images_dir, file_name)
        skip = _image_or_skip(files, path) if texts else Skip("image without captions", str(image_id))
        if skip:
            yield skip
            continue
        for ann_id, text in texts if every_caption else texts[:1]:
            uid = ann_id if every_caption else image_id
            yield TextToImageRecord(uid=uid, caption=text, image=path, image_id=image_id)
    for image_id in captions:
        yield Skip("captions of an unlisted image", str(image_id))


# ---- Karpathy splits ---------------------------------------------------------------------------------------------------
def read_karpathy(
    dataset_json: PathLike, images_root: PathLike, split: str | None, *, include_restval: bool = True, cache_dir=None
) -> RecordSet:
    """Karpathy's `dataset_coco.json` (or `dataset_flickr30k.json`) -> CaptionRecord per image of `split`.

    split: train / val / test / restval, or None for all; "train" includes "restval" unless include_restval
    is False. Image path: images_root / filepath / filename (Flickr30K's file has no filepath);
    image_id: cocoid, else imgid; captions: the `raw` sentences.
    """
    if split is not None and split not in KARPATHY_SPLITS:
        raise ValueError(f"read_karpathy: split must be one of {KARPATHY_SPLITS} or None, got {split!r}")
    splits = None if split is None else sorted({split, "restval"} if split == "train" and include_restval else {split})
    kwargs = {
        "dataset_json": _existing(dataset_json, "Karpathy split file"),
        "images_root": _existing(images_root, "images folder"),
        "splits": splits,
    }
    sources = [kwargs["dataset_json"], kwargs["images_root"]]
    return build_record_set(
        "caption",
        _karpathy_records,
        kwargs,
        sources=sources,
        cache_dir=cache_dir,
        name=f"karpathy {split} {dataset_json}",
    )


def _karpathy_records(dataset_json: str, images_root: str, splits: list[str] | None) -> Iterator[CaptionRecord | Skip]:
    images = require(load_json(dataset_json), "images", "top level", dataset_json, list)
    files = ImageFiles()
    for i, image in enumerate(images):
        where = f"images[{i}]"
        image_split = require(image, "split", where, dataset_json, str)
        if splits is not None and image_split not in splits:
            continue
        filename = require(image, "filename", where, dataset_json, str)
        image_id = image["cocoid"] if "cocoid" in image else require(image, "imgid", where, dataset_json, (int, str))
        sentences = require(image, "sentences", where, dataset_json, list)
        texts = tuple(
            text
            for k, sentence in enumerate(sentences)
            if (text := require(sentence, "raw", f"{where}.sentences[{k}]", dataset_json, str).strip())
        )
        path = os.path.join(images_root, image.get("filepath", ""), filename)
        skip = _image_or_skip(files, path) if texts else Skip("image without captions", str(image_id))
        yield skip or CaptionRecord(image_id=image_id, image=path, captions=texts)


# ---- VQAv2 -------------------------------------------------------------------------------------------------------------
def read_vqav2(
    questions_json: PathLike,
    annotations_json: PathLike | None,
    images_dir: PathLike,
    image_name: str | Callable[[Any], str] = VQA_IMAGE_NAME,
    *,
    cache_dir=None,
) -> RecordSet:
    """VQAv2 questions (+ annotations) JSON -> one VqaRecord per question with all ten answers.

    annotations_json: None for test / test-dev (answer "" and no answers).
    image_name: a format string over {image_id}, {data_subtype} (the questions file's, e.g. "val2014")
    and {split} (data_subtype without its year, e.g. "val"), or a callable image_id -> file name.
    The default gives COCO's `COCO_val2014_000000000042.jpg` (and `COCO_test2015_...` for test).
    """
    kwargs = {
        "questions_json": _existing(questions_json, "questions file"),
        "annotations_json": None if annotations_json is None else _existing(annotations_json, "annotations file"),
        "images_dir": _existing(images_dir, "images folder"),
        "image_name": image_name,
    }
    sources = [kwargs["questions_json"], kwargs["annotations_json"], kwargs["images_dir"]]
    return build_record_set(
        "vqa", _vqav2_records, kwargs, sources=sources, cache_dir=cache_dir, name=f"vqav2 {questions_json}"
    )


def _vqa_image_namer(image_name: str | Callable[[Any], str], data: dict, questions_json: str) -> Callable[[Any], str]:
    if callable(image_name):
        return image_name
    subtype = data.get("data_subtype")
    fields = {"data_subtype": subtype, "split": None if subtype is None else re.sub(r"\d+$", "", str(subtype))}
    for needed in ("data_subtype", "split"):
        if "{" + needed in image_name and fields[needed] is None:
            raise ReaderError(
                f"{questions_json}: image_name {image_name!r} needs {{{needed}}} but the file has no field "
                "'data_subtype'; pass image_name without it (or a callable)"
            )
    return lambda image_id: image_name.format(image_id=image_id, **fields)


def _vqav2_records(questions_json: str, annotations_json: str | None, images_dir: str, image_name) -> Iterator:
    data = load_json(questions_json)
    questions = require(data, "questions", "top level", questions_json, list)
    name_of = _vqa_image_namer(image_name, data, questions_json)
    by_question: dict[Any, dict] = {}
    if annotations_json is not None:
        annotations = require(load_json(annotations_json), "annotations", "top level", annotations_json, list)
        for i, annotation in enumerate(annotations):
            where = f"annotations[{i}]"
            question_id = require(annotation, "question_id", where, annotations_json, (int, str))
            answers = require(annotation, "answers", where, annotations_json, list)
            by_question[question_id] = {
                "answer": require(annotation, "multiple_choice_answer", where, annotations_json, str).strip(),
                "answers": tuple(
                    require(a, "answer", f"{where}.answers[{k}]", annotations_json, str).strip()
                    for k, a in enumerate(answers)
                ),
                "answer_type": annotation.get("answer_type"),
                "question_type": annotation.get("question_type"),
            }
    files = ImageFiles()
    for i, question in enumerate(questions):
        where = f"questions[{i}]"
        question_id = require(question, "question_id", where, questions_json, (int, str))
        image_id = require(question, "image_id", where, questions_json, (int, str))
        text = require(question, "question", where, questions_json, str).strip()
        try:
            path = os.path.join(images_dir, name_of(image_id))
        except (KeyError, IndexError, ValueError) as err:
            raise ReaderError(f"image_name {image_name!r} cannot name image {image_id!r}: {err!r}") from err
        if not text:
            yield Skip("empty question", str(question_id))
            continue
        if annotations_json is None:
            answer = {"answer": "", "answers": (), "answer_type": None, "question_type": None}
        elif question_id not in by_question:
            yield Skip("question without annotation", str(question_id))
            continue
        else:
            answer = by_question[question_id]
            if not answer["answer"]:
                yield Skip("empty answer", str(question_id))
                continue
        yield _image_or_skip(files, path) or VqaRecord(
            question_id=question_id, image_id=image_id, image=path, question=text, **answer
        )


# ---- RefCOCO / RefCOCO+ / RefCOCOg ------------------------------------------------------------------------------------
class RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a class or function: refused before it is called."""


class _PlainUnpickler(pickle.Unpickler):
    """Admits only what pickle builds without a global (dict, list, tuple, str, int, float, bool, None, ...):
    any class or function reference (os.system, a custom class) is refused, so loading runs no code."""

    def find_class(self, module: str, name: str) -> Any:
        raise RefusedGlobal(
            f"refused global '{module}.{name}': only plain containers and scalars "
            "(dict, list, tuple, str, int, float, bool, None) may be loaded"
        )


PLAIN_TYPES = (dict, list, tuple, str, int, float, bool, type(None))


def load_plain_pickle(path: PathLike) -> Any:
    """Load a pickle of plain data (the refer toolkit's `refs(unc).p`) without running any code it names.

    Python 2 byte strings are decoded as UTF-8. Raises ReaderError for a refused global, a value of any
    other type (sets, bytes, ...) or an unreadable file.
    """
    try:
        with open(path, "rb") as file:
            data = _PlainUnpickler(file, encoding="utf-8").load()
    except RefusedGlobal as err:
        raise ReaderError(f"{path}: unsafe pickle: {err}") from err
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        UnicodeDecodeError,
    ) as err:
        raise ReaderError(f"{path}: not a readable pickle of plain data ({err!r})") from err
    seen: set[int] = set()
    stack = [data]
    while stack:  # iterative: a deep structure must not hit the recursion limit
        value = stack.pop()
        if not isinstance(value, PLAIN_TYPES):
            raise ReaderError(
                f"{path}: pickle holds a {type(value).__name__}; only plain containers and scalars are allowed"
            )
        if isinstance(value, (dict, list, tuple)) and id(value) not in seen:
            seen.add(id(value))
            # keys and values, not items(): fresh item tuples could reuse a freed id and hide their contents
            stack.extend([*value.keys(), *value.values()] if isinstance(value, dict) else value)
    return data


def load_refs(refs_path: PathLike) -> list:
    """The refs list from a refs JSON file or a refer toolkit pickle (`.p`, read by load_plain_pickle)."""
    with open(refs_path, "rb") as file:
        head = file.read(1)
    is_pickle = str(refs_path).endswith(PICKLE_SUFFIXES) or head == b"\x80"
    refs = load_plain_pickle(refs_path) if is_pickle else load_json(refs_path)
    if not isinstance(refs, list):
        raise ReaderError(f"{refs_path}: top level should be a list of refs, got {type(refs).__name__}")
    return refs


def read_refs(
    refs_path: PathLike, instances_json: PathLike, images_dir: PathLike, split: str | None = None, *, cache_dir=None
) -> RecordSet:
    """RefCOCO-style refs + COCO instances -> one GroundingRecord per sentence (ref_id shared by its sentences).

    refs_path: a refs JSON list or the refer toolkit's `refs(unc).p` / `refs(umd).p` / `refs(google).p`;
    split: keep refs of this split (train / val / testA / testB / test), None for all.
    Box: the annotation's bbox [x, y, w, h] -> (x, y, x + w, y + h); width / height: the instances image's.
    """
    return _read_refs("grounding", refs_path, instances_json, images_dir, split, cache_dir)


def read_region_captions(
    refs_path: PathLike, instances_json: PathLike, images_dir: PathLike, split: str | None = None, *, cache_dir=None
) -> RecordSet:
    """The same files as read_refs -> one RegionCaptionRecord per ref, phrases = its sentences in order."""
    return _read_refs("region_caption", refs_path, instances_json, images_dir, split, cache_dir)


def _read_refs(task: str, refs_path, instances_json, images_dir, split, cache_dir) -> RecordSet:
    kwargs = {
        "refs_path": _existing(refs_path, "refs file"),
        "instances_json": _existing(instances_json, "instances file"),
        "images_dir": _existing(images_dir, "images folder"),
        "split": split,
        "per_sentence": task == "grounding",
    }
    sources = [kwargs["refs_path"], kwargs["instances_json"], kwargs["images_dir"]]
    return build_record_set(
        task, _ref_records, kwargs, sources=sources, cache_dir=cache_dir, name=f"refs {split} {refs_path}"
    )


def _instances(instances_json: str) -> tuple[dict, dict]:
    """{image id: (file name, width, height)} and {annotation id: (image id, bbox)} of a COCO instances file."""
    data = load_json(instances_json)
    images = {}
    for i, image in enumerate(require(data, "images", "top level", instances_json, list)):
        where = f"images[{i}]"
        images[require(image, "id", where, instances_json, (int, str))] = (
            require(image, "file_name", where, instances_json, str),
            require(image, "width", where, instances_json, int),
            require(image, "height", where, instances_json, int),
        )
    boxes = {}
    for i, annotation in enumerate(require(data, "annotations", "top level", instances_json, list)):
        where = f"annotations[{i}]"
        bbox = require(annotation, "bbox", where, instances_json, list)
        if len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
            raise ReaderError(f"{instances_json}: {where}.bbox should be 4 numbers [x, y, w, h], got {bbox!r}")
        boxes[require(annotation, "id", where, instances_json, (int, str))] = (
            require(annotation, "image_id", where, instances_json, (int, str)),
            bbox,
        )
    return images, boxes


def _ref_records(
    refs_path: str, instances_json: str, images_dir: str, split: str | None, per_sentence: bool
) -> Iterator:
    refs = load_refs(refs_path)
    images, boxes = _instances(instances_json)
    files = ImageFiles()
    for i, ref in enumerate(refs):
        where = f"refs[{i}]"
        if split is not None and require(ref, "split", where, refs_path, str) != split:
            continue
        ref_id = require(ref, "ref_id", where, refs_path, (int, str))
        image_id = require(ref, "image_id", where, refs_path, (int, str))
        ann_id = require(ref, "ann_id", where, refs_path, (int, str))
        sentences = [
            require(sentence, "sent", f"{where}.sentences[{k}]", refs_path, str).strip()
            for k, sentence in enumerate(require(ref, "sentences", where, refs_path, list))
        ]
        skip = _ref_skip(ref_id, image_id, ann_id, images, boxes)
        if skip is None:
            file_name, width, height = images[image_id]
            path = os.path.join(images_dir, file_name)
            x, y, w, h = boxes[ann_id][1]
            box = checked_box((x, y, x + w, y + h), width, height)
            skip = box if isinstance(box, Skip) else _image_or_skip(files, path)
        if skip is not None:
            yield from [skip] * (len(sentences) if per_sentence and sentences else 1)
            continue
        common = {"ref_id": ref_id, "image_id": image_id, "image": path, "box": box, "width": width, "height": height}
        if per_sentence:
            for sentence in sentences:
                yield (
                    GroundingRecord(expression=sentence, **common) if sentence else Skip("empty sentence", str(ref_id))
                )
        else:
            phrases = tuple(s for s in sentences if s)
            yield (
                RegionCaptionRecord(phrases=phrases, **common)
                if phrases
                else Skip("ref without sentences", str(ref_id))
            )


def _ref_skip(ref_id, image_id, ann_id, images: dict, boxes: dict) -> Skip | None:
    if ann_id not in boxes:
        return Skip("ref's ann_id not in instances", f"ref {ref_id}: ann {ann_id}")
    if image_id not in images:
        return Skip("ref's image_id not in instances", f"ref {ref_id}: image {image_id}")
    if boxes[ann_id][0] != image_id:
        return Skip("ref and its annotation disagree on the image", f"ref {ref_id}")
    return None


# ---- SNLI-VE -----------------------------------------------------------------------------------------------------------
def read_snli_ve(jsonl_path: PathLike, images_dir: PathLike, image_ext: str = ".jpg", *, cache_dir=None) -> RecordSet:
    """SNLI-VE JSON lines (`snli_ve_dev.jsonl`) -> EntailmentRecord per line.

    Image: images_dir / (Flickr30K_ID + image_ext); image_id: Flickr30K_ID (an int when it is all digits);
    label: gold_label as yes / no / maybe (a line with another label, such as "-", is skipped);
    pair_id: pairID (the line number where a file has none); premise: sentence1 if present.
    """
    kwargs = {
        "jsonl_path": _existing(jsonl_path, "SNLI-VE file"),
        "images_dir": _existing(images_dir, "images folder"),
        "image_ext": image_ext,
    }
    sources = [kwargs["jsonl_path"], kwargs["images_dir"]]
    return build_record_set(
        "entailment", _snli_ve_records, kwargs, sources=sources, cache_dir=cache_dir, name=f"snli-ve {jsonl_path}"
    )


def _snli_ve_records(jsonl_path: str, images_dir: str, image_ext: str) -> Iterator[EntailmentRecord | Skip]:
    files = ImageFiles()
    with open(jsonl_path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"line {number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise ReaderError(f"{jsonl_path}: {where} is not valid JSON ({err})") from err
            flickr_id = str(require(item, "Flickr30K_ID", where, jsonl_path, (int, str)))
            hypothesis = require(item, "sentence2", where, jsonl_path, str).strip()
            gold_label = require(item, "gold_label", where, jsonl_path, str)
            pair_id = item.get("pairID", number)
            path = os.path.join(images_dir, flickr_id + image_ext)
            if gold_label not in SNLI_VE_LABEL_TO_ANSWER:
                yield Skip("unknown gold_label", f"{gold_label!r} on {where}")
            elif not hypothesis:
                yield Skip("empty hypothesis", where)
            else:
                premise, hypothesis_type = item.get("sentence1"), item.get("hypothesis_type")
                yield _image_or_skip(files, path) or EntailmentRecord(
                    pair_id=pair_id,
                    image_id=text_id(flickr_id),
                    image=path,
                    hypothesis=hypothesis,
                    label=SNLI_VE_LABEL_TO_ANSWER[gold_label],
                    premise=premise.strip() if isinstance(premise, str) else None,
                    # Not an SNLI-VE field: a shapes split written by `unifier data shapes` adds its template.
                    hypothesis_type=hypothesis_type if isinstance(hypothesis_type, str) else None,
                )
