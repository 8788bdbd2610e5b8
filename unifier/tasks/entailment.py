"""Visual entailment (SNLI-VE): ` does the image describe " {hypothesis} "?` -> yes / no / maybe (OFA's prompt)."""

from __future__ import annotations

from typing import Any

from unifier.data.records import ENTAILMENT_LABELS, EntailmentRecord
from unifier.tasks.base import AnswerSet, TextOutput, UnifierTask


class EntailmentTask(UnifierTask):
    """Target: the label word; decoding and (by default) training are constrained to ENTAILMENT_LABELS."""

    name = "entailment"
    record_type = EntailmentRecord
    metric = "accuracy"
    constrain_training = True

    def prompt(self, record: EntailmentRecord) -> str:
        return f' does the image describe " {record.hypothesis} "?'

    def target_ids(self, record: EntailmentRecord) -> list[int]:
        if record.label not in ENTAILMENT_LABELS:
            raise ValueError(
                f"entailment record {record.pair_id!r}: label {record.label!r} is not one of {ENTAILMENT_LABELS}"
            )
        return [*self.vocab.encode_text(record.label), self.vocab.eos_id]

    def constraint(self, record: EntailmentRecord | None = None) -> AnswerSet:
        return AnswerSet(ENTAILMENT_LABELS)

    def decode(self, ids: list[int], meta: dict[str, Any]) -> TextOutput:
        return TextOutput(self.vocab.decode_text(ids).strip())
