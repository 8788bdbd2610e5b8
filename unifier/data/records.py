"""One record type per task kind: what every reader (public layouts, the shapes world) yields.

A record holds the facts of one sample and nothing about tokens; the task serializers in
`unifier/tasks/` turn records into model sequences. Records are frozen dataclasses so that
the same record can be shared between training and evaluation without surprises.

`image` is any source `unifier.images.load_image` accepts: a file path (str or Path), the
encoded bytes of an image file (as in OFA's TSV files), a PIL image or an H x W x 3 uint8
array (the shapes world renders in memory). Boxes are (x0, y0, x1, y1) in pixels of the
original image, x1 / y1 exclusive, and `width` / `height` are that image's size.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union

import numpy as np

ImageSource = Union[str, Path, bytes, "PIL.Image.Image", np.ndarray]  # noqa: F821 (PIL imported lazily)
Box = tuple[float, float, float, float]

ENTAILMENT_LABELS = ("yes", "no", "maybe")
# SNLI-VE's gold labels written as the answers the model produces (OFA's convention).
SNLI_VE_LABEL_TO_ANSWER = {"entailment": "yes", "contradiction": "no", "neutral": "maybe"}


@dataclass(frozen=True)
class CaptionRecord:
    """An image and its reference captions (COCO has about five; the shapes world four)."""

    image_id: int | str
    image: ImageSource
    captions: tuple[str, ...]
    task: str = field(default="caption", init=False)


@dataclass(frozen=True)
class VqaRecord:
    """A question about an image; `answers` keeps all ten human answers for the VQA metric."""

    question_id: int | str
    image_id: int | str
    image: ImageSource
    question: str
    answer: str  # VQAv2's multiple_choice_answer: the training target
    answers: tuple[str, ...]  # the ten human answers (fewer for some data sets)
    answer_type: str | None = None
    # Soft scores aligned with `answers` where a data set gives them instead of ten raw answers (OFA's VQA TSV
    # `conf|!+answer`); the VQA metric then scores a prediction by its answer's score. None: plain answers.
    answer_scores: tuple[float, ...] | None = None
    # VQAv2's question_type (the question's opening words, "what color is the"); the shapes world's question family.
    # The VQA metric breaks its accuracy down by it, as VQAv2's evaluation does.
    question_type: str | None = None
    task: str = field(default="vqa", init=False)


@dataclass(frozen=True)
class GroundingRecord:
    """A referring expression and the one box it describes (RefCOCO style)."""

    ref_id: int | str
    image_id: int | str
    image: ImageSource
    expression: str
    box: Box
    width: int
    height: int
    task: str = field(default="grounding", init=False)


@dataclass(frozen=True)
class RegionCaptionRecord:
    """A box and the phrases that describe it; `phrases[0]` is the training target."""

    ref_id: int | str
    image_id: int | str
    image: ImageSource
    box: Box
    width: int
    height: int
    phrases: tuple[str, ...]
    task: str = field(default="region_caption", init=False)


@dataclass(frozen=True)
class EntailmentRecord:
    """Does the image entail the hypothesis? label is one of ENTAILMENT_LABELS (yes / no / maybe)."""

    pair_id: int | str
    image_id: int | str
    image: ImageSource
    hypothesis: str
    label: str
    premise: str | None = None
    # The hypothesis's template where a data set has one (the shapes world: exist / count / size / left / neutral);
    # the entailment metric breaks its accuracy down by it.
    hypothesis_type: str | None = None
    task: str = field(default="entailment", init=False)


@dataclass(frozen=True)
class TextToImageRecord:
    """A caption and the image it describes, as pixels (`image`) and / or as VQ-GAN codes (`codes`)."""

    uid: int | str
    caption: str
    image: ImageSource | None = None
    codes: tuple[int, ...] | None = None
    image_id: int | str | None = None
    task: str = field(default="text_to_image", init=False)


Record = CaptionRecord | VqaRecord | GroundingRecord | RegionCaptionRecord | EntailmentRecord | TextToImageRecord

RECORD_TYPES: dict[str, type] = {
    "caption": CaptionRecord,
    "vqa": VqaRecord,
    "grounding": GroundingRecord,
    "region_caption": RegionCaptionRecord,
    "entailment": EntailmentRecord,
    "text_to_image": TextToImageRecord,
}


def record_fields(record: Record, *, with_image: bool = False) -> dict[str, Any]:
    """The record's fields as a dict (the image left out unless asked): for comparisons and JSON."""
    return {f.name: getattr(record, f.name) for f in fields(record) if with_image or f.name != "image"}
