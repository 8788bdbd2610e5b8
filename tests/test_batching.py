"""The collator: padding, shifted decoder inputs, images, task ids and training-constraint masks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from unifier.batching import Collator
from unifier.data.shapes import ANSWER_VOCAB, ShapesWorld, corpus
from unifier.images import image_to_tensor, load_image
from unifier.tasks import build_task, prompt_texts
from unifier.tokenization.text import train_text_model
from unifier.tokenization.vocab import UnifierVocab

TASK_NAMES = ["caption", "vqa", "grounding", "region_caption", "entailment", "text_to_image"]


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> UnifierVocab:
    sp = train_text_model([*corpus(0, 20), *prompt_texts()], tmp_path_factory.mktemp("sp") / "t.model", vocab_size=400)
    return UnifierVocab(sp, num_bins=100, num_codes=16)


@pytest.fixture(scope="module")
def examples(vocab):
    world = ShapesWorld("train", seed=0, image_size=32)
    out = []
    for name in TASK_NAMES:
        options = {"answers": list(ANSWER_VOCAB)} if name == "vqa" else {}
        options.update({"num_codes": 16} if name == "text_to_image" else {})
        record = world.records(name, 1)[0]
        if name == "text_to_image":
            record = dataclasses.replace(record, codes=tuple(range(16)))
        out.append(build_task(name, vocab, **options).example(record))
    return out


def test_layout_padding_and_shift(vocab, examples):
    batch = Collator(vocab, image_size=32, task_names=TASK_NAMES)(examples)
    b = len(examples)
    prompt_length = max(len(e.prompt_ids) for e in examples)
    target_length = max(len(e.target_ids) for e in examples)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (b, prompt_length)
    assert batch["labels"].shape == batch["decoder_input_ids"].shape == (b, target_length)
    assert batch["pixel_values"].shape == (b, 3, 32, 32)
    assert batch["task_ids"].tolist() == list(range(b))
    for i, example in enumerate(examples):
        n, t = len(example.prompt_ids), len(example.target_ids)
        assert batch["input_ids"][i, :n].tolist() == example.prompt_ids
        assert batch["input_ids"][i, n:].eq(vocab.pad_id).all() and batch["attention_mask"][i].sum() == n
        assert batch["labels"][i, :t].tolist() == example.target_ids and batch["labels"][i, t:].eq(-100).all()
        assert batch["decoder_input_ids"][i, :t].tolist() == [vocab.bos_id, *example.target_ids[:-1]]
        assert batch["decoder_input_ids"][i, t:].eq(vocab.pad_id).all()
        if example.image is None:
            assert not batch["image_mask"][i] and batch["pixel_values"][i].eq(0).all()
        else:
            assert batch["image_mask"][i]
            assert torch.equal(batch["pixel_values"][i], image_to_tensor(load_image(example.image), 32))
    assert batch.model_inputs().keys() >= {"pixel_values", "labels", "allowed_tokens"}
    text_only = Collator(vocab, 32)([e for e in examples if e.image is None])
    assert text_only["pixel_values"] is None and text_only["image_mask"] is None
    assert text_only.to("cpu")["pixel_values"] is None
    assert "task_ids" not in batch.model_inputs()


def test_constraint_masks_follow_the_answer_trie(vocab, examples):
    collate = Collator(vocab, image_size=32, task_names=TASK_NAMES)
    batch = collate(examples)
    constrained = [i for i, e in enumerate(examples) if e.train_constraint is not None]
    assert batch["allowed_rows"].tolist() == constrained == [1, 4]  # vqa and entailment by default
    first_tokens = {vocab.encode_text(a)[0] for a in ANSWER_VOCAB}
    vqa_mask = batch["allowed_tokens"][0]
    assert set(vqa_mask[0].nonzero().flatten().tolist()) == first_tokens
    target = examples[1].target_ids
    for t, token in enumerate(target):
        assert vqa_mask[t, token]
    assert vqa_mask[len(target) :].all()  # past the target: no restriction (those labels are -100)
    assert vqa_mask[len(target) - 1].nonzero().flatten().tolist() == [vocab.eos_id]

    outside = dataclasses.replace(examples[1], target_ids=[*vocab.encode_text("purple square"), vocab.eos_id])
    batch = collate([outside, examples[0]])
    assert "allowed_tokens" not in batch and collate.unconstrained_targets == 1


def test_exact_bins_mask(vocab, examples):
    from unifier.tasks.base import ExactBins

    grounding = dataclasses.replace(examples[2], train_constraint=ExactBins(4))
    batch = Collator(vocab, image_size=32, task_names=TASK_NAMES)([grounding])
    mask = batch["allowed_tokens"][0]
    assert mask.shape == (5, vocab.size)
    assert mask[:4].sum(-1).tolist() == [vocab.num_bins] * 4 and mask[:4, vocab.bin_start].all()
    assert mask[4].nonzero().flatten().tolist() == [vocab.eos_id]


def test_bad_batches_fail_clearly(vocab, examples):
    collate = Collator(vocab, image_size=32, task_names=["vqa"])
    with pytest.raises(ValueError, match="empty list"):
        collate([])
    with pytest.raises(ValueError, match=r"task\(s\) \['caption'\] not in task_names"):
        collate([examples[0]])
