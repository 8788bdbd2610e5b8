"""Visual question answering: ` {question}` -> the answer, constrained to the answer set (OFA's prompt)."""

from __future__ import annotations

from typing import Any

from unifier.data.records import VqaRecord
from unifier.tasks.base import AnswerSet, FreeText, TextOutput, UnifierTask


class VqaTask(UnifierTask):
    """Target: the record's `answer` (VQAv2's multiple_choice_answer).

    Options: `answers` (the closed answer set: decoding is constrained to it by a trie, and training masks
    logits to it by default, as OFA does); without it decoding is free text of `max_new_tokens` (8).
    """

    name = "vqa"
    record_type = VqaRecord
    metric = "vqa_accuracy"
    constrain_training = True

    def __init__(self, vocab, **options: Any):
        super().__init__(vocab, **options)
        answers = options.get("answers")
        self.answers: tuple[str, ...] | None = tuple(str(a) for a in answers) if answers else None

    def prompt(self, record: VqaRecord) -> str:
        return f" {record.question}"

    def target_ids(self, record: VqaRecord) -> list[int]:
        return [*self.vocab.encode_text(record.answer), self.vocab.eos_id]

    def constraint(self, record: VqaRecord | None = None) -> AnswerSet | FreeText:
        if self.answers is None:
            return FreeText(max_new_tokens=int(self.options.get("max_new_tokens", 8)))
        return AnswerSet(self.answers)

    def decode(self, ids: list[int], meta: dict[str, Any]) -> TextOutput:
        return TextOutput(self.vocab.decode_text(ids).strip())
