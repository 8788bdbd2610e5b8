"""Image captioning: ` what does the image describe?` -> the caption (OFA's prompt)."""

from __future__ import annotations

from typing import Any

from unifier.data.records import CaptionRecord
from unifier.tasks.base import Example, FreeText, TextOutput, UnifierTask


class CaptionTask(UnifierTask):
    """Target: `captions[0]`; for training every reference caption gives its own example (as OFA trains on COCO).

    Options: `metric` ("cider", or "object_set" on the shapes world), `max_new_tokens` (32),
    `all_captions` (True: one training example per reference).
    """

    name = "caption"
    record_type = CaptionRecord
    metric = "cider"
    PROMPT = " what does the image describe?"

    def __init__(self, vocab, **options: Any):
        super().__init__(vocab, **options)
        self.metric = options.get("metric", type(self).metric)

    def prompt(self, record: CaptionRecord) -> str:
        return self.PROMPT

    def target_ids(self, record: CaptionRecord, caption: str | None = None) -> list[int]:
        if caption is None:
            if not record.captions:
                raise ValueError(f"caption record {record.image_id!r} has no captions")
            caption = record.captions[0]
        return [*self.vocab.encode_text(caption), self.vocab.eos_id]

    def training_examples(self, record: CaptionRecord) -> list[Example]:
        example = self.example(record)
        if not self.options.get("all_captions", True):
            return [example]
        examples = [example]
        for caption in record.captions[1:]:
            examples.append(
                Example(
                    task=example.task,
                    prompt_ids=example.prompt_ids,
                    image=example.image,
                    target_ids=self.target_ids(record, caption),
                    record=record,
                    meta=example.meta,
                    train_constraint=example.train_constraint,
                )
            )
        return examples

    def constraint(self, record: CaptionRecord | None = None) -> FreeText:
        return FreeText(max_new_tokens=int(self.options.get("max_new_tokens", 32)))

    def decode(self, ids: list[int], meta: dict[str, Any]) -> TextOutput:
        return TextOutput(self.vocab.decode_text(ids).strip())
