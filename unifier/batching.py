"""Batches of task examples as the model's tensors.

    collate = Collator(tokenizer, image_size=64, task_names=["caption", "vqa"])
    batch = collate([vqa_task.example(record), ...])
    loss = model(**batch.model_inputs()).loss          # `task_ids` stays out of the model

A batch holds (B examples, prompts padded to L, targets padded to T, V the vocabulary size):

    pixel_values      (B, 3, S, S) float in [-1, 1]; zeros where an example has no image; None when no example
                      of the batch has one and the collator drops text-only images (the model then leaves the
                      image positions out)
    image_mask        (B,) bool: the example has an image (None with pixel_values None)
    input_ids         (B, L) long: <s> prompt </s>, right-padded with pad
    attention_mask    (B, L) long: 1 on prompt tokens
    decoder_input_ids (B, T) long: <s> + target[:-1], pad after
    labels            (B, T) long: target, -100 on pads
    task_ids          (B,) long: index of each example's task in `task_names` (for per-task losses)
    allowed_tokens    (R, T', V) bool, only when some examples carry a training constraint: the tokens the
                      constraint allows at each of their first T' target positions (True past a target's end)
    allowed_rows      (R,) long: which examples those R rows are
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from unifier.images import image_to_tensor, load_image
from unifier.tasks.base import AnswerSet, Constraint, ExactBins, ExactCodes, Example

MODEL_INPUTS = (
    "pixel_values",
    "image_mask",
    "input_ids",
    "attention_mask",
    "decoder_input_ids",
    "labels",
    "allowed_tokens",
    "allowed_rows",
)


class Batch(dict):
    """A dict of tensors with `model_inputs()` (what forward takes) and `to(device)`."""

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.items() if k in MODEL_INPUTS}

    def to(self, device: torch.device | str) -> Batch:
        return Batch({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})

    @property
    def size(self) -> int:
        return int(self["input_ids"].shape[0])


class Collator:
    """Pads and stacks task `Example`s into a `Batch` (the layout in the module docstring)."""

    def __init__(
        self,
        tokenizer: Any,
        image_size: int,
        task_names: Sequence[str] | None = None,
        drop_text_only_images: bool = True,
    ):
        """drop_text_only_images: a batch without any image gets pixel_values None (inference: less to encode).
        Training keeps the zeros: under DeepSpeed every process must use the same parameters (the image stem
        too) in every micro-batch, or their gradient reductions no longer match."""
        from unifier.tasks import TASKS

        self.vocab = getattr(tokenizer, "vocab", tokenizer)
        self.image_size = int(image_size)
        self.drop_text_only_images = drop_text_only_images
        self.task_names = list(task_names) if task_names is not None else list(TASKS)
        self.task_index = {name: i for i, name in enumerate(self.task_names)}
        # AnswerSet -> {target prefix: allowed next ids}; built once per answer set.
        self._tries: dict[AnswerSet, dict[tuple[int, ...], set[int]]] = {}
        self.unconstrained_targets = 0  # constrained examples whose target lies outside their constraint

    def __call__(self, examples: Sequence[Example]) -> Batch:
        if not examples:
            raise ValueError("Collator: cannot collate an empty list of examples")
        unknown = sorted({e.task for e in examples} - set(self.task_index))
        if unknown:
            raise ValueError(f"Collator: examples of task(s) {unknown} not in task_names {self.task_names}")
        pad, bos = self.vocab.pad_id, self.vocab.bos_id
        b = len(examples)
        prompt_length = max(len(e.prompt_ids) for e in examples)
        target_length = max(len(e.target_ids) for e in examples)

        input_ids = torch.full((b, prompt_length), pad, dtype=torch.long)
        attention_mask = torch.zeros((b, prompt_length), dtype=torch.long)
        labels = torch.full((b, target_length), -100, dtype=torch.long)
        decoder_input_ids = torch.full((b, target_length), pad, dtype=torch.long)
        pixel_values = torch.zeros((b, 3, self.image_size, self.image_size))
        image_mask = torch.zeros(b, dtype=torch.bool)
        for i, example in enumerate(examples):
            if not example.target_ids:
                raise ValueError(f"Collator: example {i} ({example.task}) has an empty target")
            prompt, target = torch.tensor(example.prompt_ids), torch.tensor(example.target_ids)
            input_ids[i, : len(prompt)] = prompt
            attention_mask[i, : len(prompt)] = 1
            labels[i, : len(target)] = target
            decoder_input_ids[i, 0] = bos
            decoder_input_ids[i, 1 : len(target)] = target[:-1]
            if example.image is not None:
                pixel_values[i] = image_to_tensor(load_image(example.image), self.image_size)
                image_mask[i] = True

        if self.drop_text_only_images and not image_mask.any():
            pixel_values = image_mask = None  # text-only batch (text-to-image): no image positions to encode
        batch = Batch(
            pixel_values=pixel_values,
            image_mask=image_mask,
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            labels=labels,
            task_ids=torch.tensor([self.task_index[e.task] for e in examples], dtype=torch.long),
        )
        batch.update(self.constraint_masks(examples))
        return batch

    # ---- training-time constraints (OFA): mask the loss's logits to what decoding would allow -------------------
    def constraint_masks(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """allowed_tokens (R, T', V) and allowed_rows (R,) for the examples with a train_constraint, else {}."""
        rows, masks = [], []
        for i, example in enumerate(examples):
            if example.train_constraint is None:
                continue
            mask = self.allowed_mask(example.train_constraint, example.target_ids)
            if mask is None:
                self.unconstrained_targets += 1
                continue
            rows.append(i)
            masks.append(mask)
        if not rows:
            return {}
        span = max(m.shape[0] for m in masks)
        allowed = torch.ones((len(rows), span, self.vocab.size), dtype=torch.bool)
        for r, mask in enumerate(masks):
            allowed[r, : mask.shape[0]] = mask
        return {"allowed_tokens": allowed, "allowed_rows": torch.tensor(rows, dtype=torch.long)}

    def allowed_mask(self, constraint: Constraint, target: Sequence[int]) -> torch.Tensor | None:
        """(len(target), V) bool: the tokens `constraint` allows after each target prefix; None when the target
        itself breaks the constraint (an answer outside the set) or the constraint is free text."""
        size, eos = self.vocab.size, self.vocab.eos_id
        mask = torch.zeros((len(target), size), dtype=torch.bool)
        if isinstance(constraint, AnswerSet):
            trie = self._trie(constraint)
            for t in range(len(target)):
                allowed = trie.get(tuple(target[:t]))
                if not allowed or target[t] not in allowed:
                    return None
                mask[t, list(allowed)] = True
            return mask
        if isinstance(constraint, (ExactBins, ExactCodes)):
            span = self.vocab.bin_range if isinstance(constraint, ExactBins) else self.vocab.code_range
            if len(target) != constraint.count + 1 or any(i not in span for i in target[:-1]) or target[-1] != eos:
                return None
            mask[: constraint.count, span.start : span.stop] = True
            mask[constraint.count, eos] = True
            return mask
        return None

    def _trie(self, constraint: AnswerSet) -> dict[tuple[int, ...], set[int]]:
        if constraint not in self._tries:
            trie: dict[tuple[int, ...], set[int]] = {}
            for answer in constraint.answers:
                ids = [*self.vocab.encode_text(answer), self.vocab.eos_id]
                for t in range(len(ids)):
                    trie.setdefault(tuple(ids[:t]), set()).add(ids[t])
            self._tries[constraint] = trie
        return self._tries[constraint]
