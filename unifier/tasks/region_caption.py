"""Region captioning (REG): ` what does the region describe? region: <4 bins>` -> the phrase (OFA's prompt)."""

from __future__ import annotations

from typing import Any

from unifier.data.records import RegionCaptionRecord
from unifier.tasks.base import FreeText, TextOutput, UnifierTask


class RegionCaptionTask(UnifierTask):
    """The prompt's text ends with "region:" and is followed by the box's 4 bin tokens; target `phrases[0]`."""

    name = "region_caption"
    record_type = RegionCaptionRecord
    metric = "exact_match"
    PROMPT = " what does the region describe? region:"

    def prompt(self, record: RegionCaptionRecord) -> str:
        bins = self.vocab.encode_box(record.box, record.width, record.height)
        return f"{self.PROMPT} {' '.join(self.vocab.token_name(i) for i in bins)}"

    def prompt_ids(self, record: RegionCaptionRecord) -> list[int]:
        bins = self.vocab.encode_box(record.box, record.width, record.height)
        return [self.vocab.bos_id, *self.vocab.encode_text(self.PROMPT), *bins, self.vocab.eos_id]

    def target_ids(self, record: RegionCaptionRecord) -> list[int]:
        if not record.phrases:
            raise ValueError(f"region caption record {record.ref_id!r} has no phrases")
        return [*self.vocab.encode_text(record.phrases[0]), self.vocab.eos_id]

    def constraint(self, record: RegionCaptionRecord | None = None) -> FreeText:
        return FreeText(max_new_tokens=int(self.options.get("max_new_tokens", 16)))

    def meta(self, record: RegionCaptionRecord) -> dict[str, Any]:
        return {"width": record.width, "height": record.height}

    def decode(self, ids: list[int], meta: dict[str, Any]) -> TextOutput:
        return TextOutput(self.vocab.decode_text(ids).strip())
