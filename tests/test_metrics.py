"""Metrics against their reference implementations on hand-made cases."""

from __future__ import annotations

import dataclasses
import os

import pytest
from PIL import Image

from unifier.data.records import (
    CaptionRecord,
    EntailmentRecord,
    GroundingRecord,
    RegionCaptionRecord,
    TextToImageRecord,
    VqaRecord,
)
from unifier.data.shapes import make_scene
from unifier.metrics import (
    PTB_JAVA,
    PTB_PYTHON,
    box_iou,
    build_metric,
    caption_scores,
    compute_metrics,
    headline_figures,
    java_available,
    merge_states,
    normalize_vqa_answer,
    tokenize_captions,
    vqa_accuracy,
)
from unifier.tasks.base import BoxOutput, ImageOutput, TextOutput

ANSWER_TYPE_KEYS = ("vqa_accuracy/number", "vqa_accuracy/other", "vqa_accuracy/yes/no")
needs_java = pytest.mark.skipif(not java_available(), reason="Java runs pycocoevalcap's PTBTokenizer")

TYPICAL_CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs, one brown and one white, play in the park!",
    'He said "no". Mr. Smith went to Washington.',
    "it's the dog's bone; the cats' toys are (mostly) red",
    "The U.S. flag at 3:30 -- 1,000 people & $5 tickets, 50% off",
    "I'd say she won't go; they're gonna stay.",
    "a small red circle, a large blue square and a small green triangle",
    "  A  big   Man\twith a mother-in-law?",
]


@needs_java
def test_python_ptb_tokenization_matches_the_java_tokenizer():
    captions = {i: [c] for i, c in enumerate(TYPICAL_CAPTIONS)}
    java, java_name = tokenize_captions(captions, use_java=True)
    python, python_name = tokenize_captions(captions, use_java=False)
    assert (java_name, python_name) == (PTB_JAVA, PTB_PYTHON)
    assert python == java


@needs_java
def test_caption_scores_equal_pycocoevalcap_on_ptb_tokens():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    references = {
        1: ["A man riding a wave on a surfboard.", "A surfer rides a big wave.", "Man surfing in the ocean."],
        2: ["Two dogs play in the grass.", "Dogs playing on a lawn.", "A pair of dogs running outside."],
        3: ["A plate of food with broccoli.", "Broccoli and rice on a plate.", "A meal on a white plate."],
    }
    predictions = {1: "a man riding a wave on a surfboard", 2: "two dogs playing in the park", 3: "a cat on a bed"}
    figures = caption_scores(predictions, references, use_java=True)

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = tokenizer.tokenize({k: [{"caption": v}] for k, v in predictions.items()})
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert figures["CIDEr"] == pytest.approx(cider)
    assert figures["BLEU-4"] == pytest.approx(bleu[3])
    assert figures["BLEU-1"] == pytest.approx(bleu[0])
    assert figures["tokenizer"] == PTB_JAVA
    assert 0 < figures["BLEU-4"] < 1 and figures["CIDEr"] > 0


def test_caption_scores_without_java_say_so_and_reward_exact_captions():
    references = {1: ["a red circle", "there is a red circle"], 2: ["a blue square", "there is a blue square"]}
    exact = caption_scores({1: "a red circle", 2: "a blue square"}, references, use_java=False)
    wrong = caption_scores({1: "a blue square", 2: "a red circle"}, references, use_java=False)
    assert exact["tokenizer"] == PTB_PYTHON
    assert exact["BLEU-1"] == pytest.approx(1.0)
    assert exact["CIDEr"] > wrong["CIDEr"]


def test_a_java_that_cannot_run_the_ptb_tokenizer_falls_back_to_python(tmp_path, monkeypatch):
    """PTBTokenizer ignores Java's exit status: a failing Java must not leave captions untokenized (KeyError)."""
    from pycocoevalcap.tokenizer import ptbtokenizer

    fake_java = tmp_path / "java"
    fake_java.write_text("#!/bin/sh\necho 'Error: Could not find or load main class' >&2\nexit 1\n")
    fake_java.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    captions = {1: ["A red circle."], ("res", 2): ["Two blue squares, left of it."]}
    tokenized, name = tokenize_captions(captions, use_java=True)
    assert name == PTB_PYTHON
    assert tokenized == {1: ["a red circle"], ("res", 2): ["two blue squares left of it"]}
    figures = caption_scores({1: "a red circle"}, {1: ["a red circle"]}, use_java=True)
    assert figures["tokenizer"] == PTB_PYTHON and figures["BLEU-1"] == pytest.approx(1.0)
    # Java is found, but a trimmed pycocoevalcap without its Stanford CoreNLP jar cannot tokenize with it.
    assert java_available()
    monkeypatch.setattr(ptbtokenizer, "STANFORD_CORENLP_3_4_1_JAR", "missing.jar")
    assert not java_available()


# The official evaluation's rules, case by case (GT-Vision-Lab/VQA vqaEval.py).
@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two", "2"),  # number words to digits, lowercase
        ("none", "0"),
        ("the dog.", "dog"),  # articles removed, a final period dropped
        ("A red ball", "red ball"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("1,000", "1000"),  # digit,digit: punctuation deleted, not spaced
        ("yes, it is", "yes it is"),  # a comma next to a space is deleted
        ("black/white", "black white"),  # a slash inside a word becomes a space
        ("dont", "don't"),  # contractions restored
        ("isnt it", "isn't it"),
        ("  Yes\n", "yes"),
        ("t-shirt", "t-shirt"),  # hyphens are not punctuation there
    ],
)
def test_vqa_answer_normalization_follows_the_official_rules(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


def test_vqa_accuracy_leave_one_out_rule():
    other = ["no"] * 10
    # k matching human answers out of ten: mean over the ten leave-one-out subsets of min(1, matches / 3).
    assert vqa_accuracy("yes", ["yes"] * 1 + other[:9]) == pytest.approx((1 * 0 + 9 * 1 / 3) / 10)
    assert vqa_accuracy("yes", ["yes"] * 2 + other[:8]) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert vqa_accuracy("yes", ["yes"] * 3 + other[:7]) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_accuracy("yes", ["yes"] * 4 + other[:6]) == pytest.approx(1.0)
    assert vqa_accuracy("maybe", other) == 0.0
    assert vqa_accuracy("Two.", ["2"] * 10) == pytest.approx(1.0)  # normalized on both sides
    assert vqa_accuracy("2", ["two"] * 10) == pytest.approx(1.0)
    assert vqa_accuracy("two", ["two"]) == 1.0 and vqa_accuracy("one", ["two"]) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("yes", [])


def test_box_iou_by_hand():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == pytest.approx(1.0)
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (10, 10, 20, 20)) == 0.0
    assert box_iou((0, 0, 4, 4), (1, 1, 3, 3)) == pytest.approx(4 / 16)


def _states_merged(task, pairs, split_at):
    """Score `pairs` in one accumulator and in two (as two processes would) and merge."""
    whole = build_metric(task)
    for record, output in pairs:
        whole.add(record, output)
    first, second = build_metric(task), build_metric(task)
    for i, (record, output) in enumerate(pairs):
        (first if i < split_at else second).add(record, output)
    one = compute_metrics(task, merge_states([whole.state()]), use_java=False)
    two = compute_metrics(task, merge_states([first.state(), second.state()]), use_java=False)
    assert one == pytest.approx(two) if all(isinstance(v, float) for v in one.values()) else one == two
    return one


def test_vqa_grounding_entailment_region_accumulators_sum_over_shards():
    image = "unused.png"
    vqa = [
        (VqaRecord(1, 1, image, "what color?", "red", ("red",) * 10, "other"), TextOutput("red")),
        (VqaRecord(2, 1, image, "how many?", "two", ("two",) * 10, "number"), TextOutput("three")),
        (VqaRecord(3, 2, image, "is there?", "yes", ("yes",) * 3 + ("no",) * 7, "yes/no"), TextOutput("yes")),
    ]
    figures = _states_merged("vqa", vqa, 1)
    assert figures["vqa_accuracy"] == pytest.approx((1 + 0 + 0.9) / 3)
    assert figures["vqa_accuracy/number"] == 0.0 and figures["count"] == 3
    assert not any("/by_" in key for key in figures)  # records without a question type: no breakdown
    typed = [
        (dataclasses.replace(record, question_type=kind), output)
        for (record, output), kind in zip(vqa, ["what color is the", "how many", "what color is the"], strict=True)
    ]
    figures = _states_merged("vqa", typed, 2)
    assert figures["vqa_accuracy/by_question_type/what color is the"] == pytest.approx((1 + 0.9) / 2)
    assert figures["vqa_accuracy/by_question_type/how many"] == 0.0
    assert headline_figures(figures) == {k: figures[k] for k in ("count", "vqa_accuracy", *ANSWER_TYPE_KEYS)}

    grounding = [
        (GroundingRecord(1, 1, image, "red circle", (0, 0, 10, 10), 64, 64), BoxOutput((0, 0, 10, 10))),
        (GroundingRecord(2, 1, image, "blue square", (0, 0, 10, 10), 64, 64), BoxOutput((5, 0, 15, 10))),
    ]
    figures = _states_merged("grounding", grounding, 1)
    assert figures["acc@0.5"] == 0.5 and figures["mean_iou"] == pytest.approx((1 + 1 / 3) / 2)
    row = build_metric("grounding").add(*grounding[1])
    assert row["iou"] == pytest.approx(1 / 3, abs=1e-4) and row["box"] == [5, 0, 15, 10] and row["ref_id"] == 2

    entailment = [
        (EntailmentRecord(1, 1, image, "there is a red circle", "yes"), TextOutput("yes")),
        (EntailmentRecord(2, 1, image, "the red circle is heavy", "neutral"), TextOutput("maybe")),
        (EntailmentRecord(3, 1, image, "there are two shapes", "no"), TextOutput("yes")),
    ]
    figures = _states_merged("entailment", entailment, 2)
    assert figures["accuracy"] == pytest.approx(2 / 3)
    assert (figures["accuracy/by_label/entailment"], figures["accuracy/by_label/contradiction"]) == (1.0, 0.0)
    assert figures["accuracy/by_label/neutral"] == 1.0 and headline_figures(figures) == {"accuracy": 2 / 3, "count": 3}
    typed = [
        (dataclasses.replace(r, hypothesis_type=t), o)
        for (r, o), t in zip(entailment, ["exist", "neutral", "count"], strict=True)
    ]
    figures = _states_merged("entailment", typed, 1)
    assert [figures[f"accuracy/by_hypothesis_type/{t}"] for t in ("exist", "neutral", "count")] == [1.0, 1.0, 0.0]
    row = build_metric("entailment").add(*entailment[1])
    assert row["predicted_label"] == "neutral" and row["gold_label"] == "neutral" and row["pairID"] == 2

    regions = [
        (
            RegionCaptionRecord(1, 1, image, (0, 0, 9, 9), 64, 64, ("small red circle", "red circle")),
            TextOutput("red circle"),
        ),
        (RegionCaptionRecord(2, 1, image, (0, 0, 9, 9), 64, 64, ("large blue square",)), TextOutput("blue square")),
    ]
    assert _states_merged("region_caption", regions, 1)["exact_match"] == 0.5


def test_caption_accumulator_object_set_accuracy_and_cider_over_shards():
    scenes = [make_scene("val", i) for i in range(4)]
    pairs = [
        (CaptionRecord(s.image_id, "unused.png", s.captions()), TextOutput(s.captions()[1] if i < 3 else "a cat"))
        for i, s in enumerate(scenes)
    ]
    figures = _states_merged("caption", pairs, 2)
    assert figures["object_set_accuracy"] == pytest.approx(3 / 4)
    assert figures["count"] == 4 and figures["CIDEr"] > 0 and figures["tokenizer"] == PTB_PYTHON
    assert build_metric("caption").add(*pairs[0]) == {
        "image_id": 0,
        "caption": pairs[0][1].text,
        "objects_correct": True,
    }


def test_text_to_image_metric_reads_generated_pixels():
    scene = make_scene("val", 3)
    record = TextToImageRecord(uid=3, caption=scene.canonical_caption)
    metric = build_metric("text_to_image")
    metric.add(record, ImageOutput(codes=(1, 2), image=Image.fromarray(scene.render()), rerank_score=-1.5))
    blank = Image.new("RGB", (64, 64), (238, 238, 238))
    row = metric.add(record, ImageOutput(codes=(1, 2), image=blank))
    figures = compute_metrics("text_to_image", merge_states([metric.state()]))
    assert figures["exact_scene_accuracy"] == 0.5
    assert figures["attribute_accuracy"] == 0.5  # all attributes right once, all missing once
    assert row["parsed_scene"] == [] and row["uid"] == 3


def test_unknown_task_is_a_clear_error():
    with pytest.raises(KeyError, match="no metric for task 'pose'"):
        build_metric("pose")
