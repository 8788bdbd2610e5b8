"""What every task kind is: a serializer from records to token sequences, a decoding constraint, a metric.

One `UnifierTask` subclass per task kind (caption, vqa, grounding, region_caption,
entailment, text_to_image). The same `example()` builds training and evaluation
sequences, so the two cannot drift; `decode()` turns generated ids back into a typed output.

Sequence conventions (OFA's):
    encoder text  = <s> + prompt pieces + </s>             (image patches go in front, in the model)
    decoder input = <s> + target[:-1]  (shifted right by the model / collator)
    target        = target pieces + </s>
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from unifier.data.records import ImageSource, Record
from unifier.tokenization.vocab import UnifierVocab


# ---- decoding constraints: what `unifier.generation` must enforce ----------------------------
@dataclass(frozen=True)
class FreeText:
    """Unconstrained text, up to `max_new_tokens`, ending at </s>."""

    max_new_tokens: int = 32


@dataclass(frozen=True)
class AnswerSet:
    """Exactly one of `answers` (a prefix trie over their token sequences, each + </s>)."""

    answers: tuple[str, ...]


@dataclass(frozen=True)
class ExactBins:
    """Exactly `count` location-bin tokens, then </s>."""

    count: int = 4


@dataclass(frozen=True)
class ExactCodes:
    """Exactly `count` image-code tokens, then </s>."""

    count: int


Constraint = FreeText | AnswerSet | ExactBins | ExactCodes


# ---- typed outputs: what decode() and predict() return -------------------------------------------
@dataclass
class TextOutput:
    text: str
    score: float | None = None


@dataclass
class BoxOutput:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the input image
    score: float | None = None


@dataclass
class ImageOutput:
    codes: tuple[int, ...]  # raster-order VQ-GAN codes
    image: Any = None  # PIL.Image once decoded by the image tokenizer
    score: float | None = None
    rerank_score: float | None = None


Output = TextOutput | BoxOutput | ImageOutput


@dataclass
class Example:
    """One serialized sample: everything the collator needs, plus the record for evaluation."""

    task: str
    prompt_ids: list[int]  # encoder text ids: <s> prompt </s>
    image: ImageSource | None  # encoder image, None for text-only prompts (text-to-image)
    target_ids: list[int]  # decoder target ids ending in </s>
    record: Record | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. image width / height for box decoding
    # Masks the training loss's logits to this constraint (OFA's constrained training); None: unconstrained.
    train_constraint: Constraint | None = None


class UnifierTask(ABC):
    """Base class of the task kinds; subclasses set the class attributes and implement the three methods."""

    name: ClassVar[str]  # registry key, e.g. "vqa"
    record_type: ClassVar[type]
    metric: ClassVar[str]  # name of the metric in unifier.metrics
    has_image_input: ClassVar[bool] = True
    # Default of the `constrain_training` option: mask training logits to constraint() (closed-set tasks).
    constrain_training: ClassVar[bool] = False

    def __init__(self, vocab: UnifierVocab, **options: Any):
        self.vocab = vocab
        self.options = options

    @abstractmethod
    def prompt(self, record: Record) -> str:
        """The prompt text of design.md's table for this record."""

    @abstractmethod
    def target_ids(self, record: Record) -> list[int]:
        """Decoder target ids, ending in </s>."""

    @abstractmethod
    def constraint(self, record: Record | None = None) -> Constraint:
        """How generation is constrained for this task (per record where the answer set varies)."""

    @abstractmethod
    def decode(self, ids: list[int], meta: dict[str, Any]) -> Output:
        """Generated ids (no bos, eos optional) -> typed output."""

    def decode_many(self, ids: Sequence[list[int]], metas: Sequence[dict[str, Any]]) -> list[Output]:
        """`decode` of many outputs at once (a task whose decoding runs a network batches it)."""
        return [self.decode(i, meta) for i, meta in zip(ids, metas, strict=True)]

    def encode_prompt(self, prompt: str) -> list[int]:
        return [self.vocab.bos_id, *self.vocab.encode_text(prompt), self.vocab.eos_id]

    def example(self, record: Record) -> Example:
        """Serialize one record; the same call serves training and evaluation."""
        constrain = self.options.get("constrain_training", self.constrain_training)
        return Example(
            task=self.name,
            prompt_ids=self.prompt_ids(record),
            image=getattr(record, "image", None) if self.has_image_input else None,
            target_ids=self.target_ids(record),
            record=record,
            meta=self.meta(record),
            train_constraint=self.constraint(record) if constrain else None,
        )

    def prompt_ids(self, record: Record) -> list[int]:
        """Encoder text ids <s> prompt </s>; tasks whose prompt holds non-text tokens (bins) override this."""
        return self.encode_prompt(self.prompt(record))

    def prepare_records(self, records: Sequence[Record]) -> list[Record]:
        """The same records with any expensive per-record work done for all of them at once (text-to-image: the
        VQ-GAN codes of their images, in one batched pass); the default does nothing. A record that cannot be
        prepared is returned as it is, so that serializing it later fails and is skipped and counted."""
        return list(records)

    def training_examples(self, record: Record) -> list[Example]:
        """The examples one record gives for training (caption: one per reference caption); default one."""
        return [self.example(record)]

    # Training: the share of examples whose prompt the stream swaps for unconditional_prompt_ids(), so that the
    # model also learns the unconditional distribution that classifier-free guidance contrasts with.
    prompt_dropout: float = 0.0

    def unconditional_prompt_ids(self) -> list[int] | None:
        """Encoder text ids of the prompt without its condition (text-to-image: the instruction, no caption);
        None for tasks that have none."""
        return None

    def meta(self, record: Record) -> dict[str, Any]:
        return {}
