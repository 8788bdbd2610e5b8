"""Visual grounding (REC): ` which region does the text " {expression} " describe?` -> 4 location bins."""

from __future__ import annotations

from typing import Any

from unifier.data.records import GroundingRecord
from unifier.tasks.base import BoxOutput, ExactBins, UnifierTask
from unifier.tokenization.vocab import BoxError


class GroundingTask(UnifierTask):
    """Target: the box as <bin x0> <bin y0> <bin x1> <bin y1> </s>; decoded at bin centres in input-image pixels."""

    name = "grounding"
    record_type = GroundingRecord
    metric = "acc_iou50"

    def prompt(self, record: GroundingRecord) -> str:
        return f' which region does the text " {record.expression} " describe?'

    def target_ids(self, record: GroundingRecord) -> list[int]:
        return [*self.vocab.encode_box(record.box, record.width, record.height), self.vocab.eos_id]

    def constraint(self, record: GroundingRecord | None = None) -> ExactBins:
        return ExactBins(4)

    def meta(self, record: GroundingRecord) -> dict[str, Any]:
        return {"width": record.width, "height": record.height}

    def decode(self, ids: list[int], meta: dict[str, Any]) -> BoxOutput:
        bins = [i for i in ids if self.vocab.is_bin(int(i))]
        if len(bins) < 4:
            names = [self.vocab.token_name(int(i)) for i in ids]
            raise BoxError(f"grounding output needs 4 location bins, got {len(bins)}: {names}")
        return BoxOutput(self.vocab.decode_box(bins[:4], meta["width"], meta["height"]))
