"""Text-to-image: ` what is the complete image? caption: {caption}` -> the image's G VQ-GAN codes (OFA's prompt)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from unifier.data.records import TextToImageRecord
from unifier.tasks.base import ExactCodes, ImageOutput, UnifierTask
from unifier.tokenization.vocab import VocabError


class TextToImageTask(UnifierTask):
    """No image input; target: `record.codes`, or the image tokenizer's codes of `record.image`, then </s>.

    Options: `image_tokenizer` (an ImageTokenizer: encodes targets from pixels and decodes generated codes
    to a PIL image), `num_codes` (G when there is no image tokenizer: the length of the code grid),
    `caption_dropout` (the share of training examples shown without their caption, which classifier-free
    guidance needs: decoding's `guidance_scale`).
    """

    name = "text_to_image"
    record_type = TextToImageRecord
    metric = "scene_accuracy"
    has_image_input = False
    PROMPT = " what is the complete image? caption:"

    def __init__(self, vocab, image_tokenizer=None, **options: Any):
        super().__init__(vocab, **options)
        self.image_tokenizer = image_tokenizer
        if image_tokenizer is not None:
            self.num_codes = int(image_tokenizer.num_codes_per_image)
        elif options.get("num_codes"):
            self.num_codes = int(options["num_codes"])
        else:
            self.num_codes = None
        self.prompt_dropout = float(options.get("caption_dropout", 0.0))
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"text_to_image: caption_dropout must be in [0, 1), got {options['caption_dropout']!r}")

    def prompt(self, record: TextToImageRecord) -> str:
        return f"{self.PROMPT} {record.caption}"

    def unconditional_prompt_ids(self) -> list[int]:
        return self.encode_prompt(self.PROMPT)

    def codes(self, record: TextToImageRecord) -> list[int]:
        """The record's codes: given, or encoded from its image (under no_grad, by the image tokenizer)."""
        if record.codes is not None:
            codes = list(record.codes)
        elif record.image is None:
            raise ValueError(f"text-to-image record {record.uid!r} has neither codes nor an image")
        elif self.image_tokenizer is None:
            raise ValueError(
                f"text-to-image record {record.uid!r} has an image but no codes, and the task has no image tokenizer"
            )
        else:
            from unifier.images import load_image

            codes = self.image_tokenizer.encode_images([load_image(record.image)])[0]
        if self.num_codes is not None and len(codes) != self.num_codes:
            raise ValueError(
                f"text-to-image record {record.uid!r} has {len(codes)} codes, the task expects {self.num_codes}"
            )
        return codes

    def prepare_records(self, records: Sequence[TextToImageRecord]) -> list[TextToImageRecord]:
        """Records with images but no codes get their codes from one batched VQ-GAN pass (measured on the 2-core
        CPU: 17 ms an image one at a time)."""
        from unifier.images import load_image

        pending, images = [], []
        for i, record in enumerate(records):
            if record.codes is None and record.image is not None and self.image_tokenizer is not None:
                try:
                    images.append(load_image(record.image))
                except (OSError, ValueError):  # ImageLoadError is a ValueError
                    continue  # left without codes: serializing it raises, and the stream skips and counts it
                pending.append(i)
        prepared = list(records)
        if images:
            for i, codes in zip(pending, self.image_tokenizer.encode_images(images), strict=True):
                prepared[i] = dataclasses.replace(records[i], codes=tuple(codes))
        return prepared

    def target_ids(self, record: TextToImageRecord) -> list[int]:
        return [*self.vocab.code_ids(self.codes(record)), self.vocab.eos_id]

    def constraint(self, record: TextToImageRecord | None = None) -> ExactCodes:
        count = self.num_codes
        if count is None and record is not None and record.codes is not None:
            count = len(record.codes)
        if count is None:
            raise ValueError(
                "text_to_image: the code count G is unknown: give the task an image tokenizer or num_codes"
            )
        return ExactCodes(count)

    def decode(self, ids: list[int], meta: dict[str, Any]) -> ImageOutput:
        return self.decode_many([ids], [meta])[0]

    def decode_many(self, ids: Sequence[list[int]], metas: Sequence[dict[str, Any]]) -> list[ImageOutput]:
        """Every output's codes, drawn by one batched pass of the VQ-GAN decoder (measured on the 2-core CPU:
        10.5 ms an image in batches of 64 against 13.7 one at a time)."""
        grids = []
        for output_ids in ids:
            code_ids = [int(i) for i in output_ids if self.vocab.is_code(int(i))]
            if self.num_codes is not None and len(code_ids) != self.num_codes:
                raise VocabError(
                    f"text-to-image output has {len(code_ids)} image codes, the grid needs {self.num_codes}"
                )
            grids.append(tuple(self.vocab.codes_of(code_ids)))
        images = [None] * len(grids)
        if self.image_tokenizer is not None and grids:
            images = self.image_tokenizer.decode_codes(grids)
        return [ImageOutput(codes=codes, image=image) for codes, image in zip(grids, images, strict=True)]
