"""Reader of OFA's TSV files: one sample a line, tab-separated columns, images as base64 of the file bytes.

Column layouts (OFA's `dataset/*` files; the image column is urlsafe base64 of the original file):
    caption        uid, image id, caption(s) joined by "&&", object labels (unused), image
    vqa            question id, image id, question, answers "conf|!+answer&&conf|!+answer", object labels,
                   image [, caption]
    refcoco        uid, image id, text, "x0,y0,x1,y1" in pixels, image
    snli_ve        uid, image id, image, hypothesis, caption premise, label (entailment / contradiction / neutral)
    text_to_image  uid, space-separated VQ-GAN codes, caption
record.image is the decoded file bytes (load_image decodes them later); ids made only of digits become ints.
A line with the wrong number of columns is a malformed file (ReaderError with the line number); a bad
value inside a line (undecodable base64, a box that is not 4 numbers) skips that record.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from unifier.data.records import (
    ENTAILMENT_LABELS,
    SNLI_VE_LABEL_TO_ANSWER,
    CaptionRecord,
    EntailmentRecord,
    GroundingRecord,
    TextToImageRecord,
    VqaRecord,
)
from unifier.data.recordset import ReaderError, RecordSet, Skip, build_record_set, checked_box, text_id

# kind -> (accepted column counts, task of its records)
OFA_TSV_KINDS: dict[str, tuple[tuple[int, ...], str]] = {
    "caption": ((5,), "caption"),
    "vqa": ((6, 7), "vqa"),
    "refcoco": ((5,), "grounding"),
    "snli_ve": ((6,), "entailment"),
    "text_to_image": ((3,), "text_to_image"),
}


def read_ofa_tsv(path: str | Path, kind: str, *, cache_dir=None) -> RecordSet:
    """An OFA TSV file of `kind` (caption / vqa / refcoco / snli_ve / text_to_image) -> its records."""
    if kind not in OFA_TSV_KINDS:
        raise ValueError(f"read_ofa_tsv: kind must be one of {tuple(OFA_TSV_KINDS)}, got {kind!r}")
    if not os.path.exists(path):
        raise ReaderError(f"{path}: OFA TSV file not found")
    kwargs = {"path": os.path.abspath(path), "kind": kind}
    task = OFA_TSV_KINDS[kind][1]
    return build_record_set(
        task, _ofa_tsv_records, kwargs, sources=[kwargs["path"]], cache_dir=cache_dir, name=f"ofa {kind} tsv {path}"
    )


def _ofa_tsv_records(path: str, kind: str) -> Iterator:
    counts = OFA_TSV_KINDS[kind][0]
    parse = _PARSERS[kind]
    # Binary lines split only at "\n": a caption may hold a stray "\r" that text mode would split on.
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                continue
            try:
                columns = line.decode("utf-8").split("\t")
            except UnicodeDecodeError as err:
                raise ReaderError(f"{path}: line {number} is not UTF-8 text ({err})") from err
            if len(columns) not in counts:
                expected = " or ".join(map(str, counts))
                raise ReaderError(
                    f"{path}: line {number} has {len(columns)} tab-separated columns; OFA's {kind} layout has {expected}"
                )
            yield parse(columns, f"line {number}")


def _image_bytes(text: str, where: str) -> bytes | Skip:
    try:
        data = base64.urlsafe_b64decode(text.strip())  # also accepts standard base64 ("+/")
    except (binascii.Error, ValueError) as err:
        return Skip("undecodable base64 image", f"{where}: {err}")
    return data if data else Skip("empty image", where)


def _caption(columns: list[str], where: str) -> CaptionRecord | Skip:
    _uid, image_id, captions, _objects, image = columns
    data = _image_bytes(image, where)
    texts = tuple(text.strip() for text in captions.split("&&") if text.strip())
    if isinstance(data, Skip):
        return data
    return (
        CaptionRecord(image_id=text_id(image_id), image=data, captions=texts) if texts else Skip("empty caption", where)
    )


def _vqa(columns: list[str], where: str) -> VqaRecord | Skip:
    question_id, image_id, question, answers_text, _objects, image = columns[:6]
    data = _image_bytes(image, where)
    if isinstance(data, Skip):
        return data
    if not question.strip():
        return Skip("empty question", where)
    scored = []
    for item in answers_text.split("&&") if answers_text.strip() else []:
        confidence, separator, answer = item.partition("|!+")
        try:
            score = float(confidence)
        except ValueError:
            score = None
        if not separator or score is None or not answer.strip():
            return Skip("malformed answers", f"{where}: {item!r}")
        scored.append((score, answer.strip()))
    scored.sort(key=lambda pair: -pair[0])  # stable: equal scores keep the file's order
    return VqaRecord(
        question_id=text_id(question_id),
        image_id=text_id(image_id),
        image=data,
        question=question.strip(),
        answer=scored[0][1] if scored else "",
        answers=tuple(answer for _, answer in scored),
        answer_scores=tuple(score for score, _ in scored) if scored else None,
    )


def _refcoco(columns: list[str], where: str) -> GroundingRecord | Skip:
    uid, image_id, text, box_text, image = columns
    data = _image_bytes(image, where)
    if isinstance(data, Skip):
        return data
    try:
        # Only the header is read: PIL's open is lazy, the pixels are decoded later by load_image.
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
    except (OSError, SyntaxError, ValueError) as err:
        return Skip("unreadable image header", f"{where}: {err}")
    try:
        coordinates = [float(v) for v in box_text.split(",")]
    except ValueError:
        coordinates = []
    if len(coordinates) != 4:
        return Skip("malformed box", f"{where}: {box_text!r}")
    box = checked_box(coordinates, width, height)
    if isinstance(box, Skip):
        return box
    if not text.strip():
        return Skip("empty expression", where)
    return GroundingRecord(
        ref_id=text_id(uid),
        image_id=text_id(image_id),
        image=data,
        expression=text.strip(),
        box=box,
        width=width,
        height=height,
    )


def _snli_ve(columns: list[str], where: str) -> EntailmentRecord | Skip:
    uid, image_id, image, hypothesis, premise, label = columns
    answer = SNLI_VE_LABEL_TO_ANSWER.get(label.strip(), label.strip() if label.strip() in ENTAILMENT_LABELS else None)
    if answer is None:
        return Skip("unknown label", f"{where}: {label!r}")
    data = _image_bytes(image, where)
    if isinstance(data, Skip):
        return data
    if not hypothesis.strip():
        return Skip("empty hypothesis", where)
    return EntailmentRecord(
        pair_id=text_id(uid),
        image_id=text_id(image_id),
        image=data,
        hypothesis=hypothesis.strip(),
        label=answer,
        premise=premise.strip() or None,
    )


def _text_to_image(columns: list[str], where: str) -> TextToImageRecord | Skip:
    uid, codes_text, caption = columns
    try:
        codes = tuple(int(code) for code in codes_text.split())
    except ValueError:
        return Skip("malformed codes", where)
    if not caption.strip():
        return Skip("empty caption", where)
    return TextToImageRecord(uid=text_id(uid), caption=caption.strip(), codes=codes or None)


_PARSERS = {"caption": _caption, "vqa": _vqa, "refcoco": _refcoco, "snli_ve": _snli_ve, "text_to_image": _text_to_image}
