"""Tests that pin the shapes world to shared/shapes-world.md."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from unifier.data.records import (
    ENTAILMENT_LABELS,
    CaptionRecord,
    EntailmentRecord,
    GroundingRecord,
    RegionCaptionRecord,
    TextToImageRecord,
    VqaRecord,
)
from unifier.data.shapes import (
    ANSWER_VOCAB,
    BACKGROUND,
    CAPTION_TEMPLATES,
    COLORS,
    ENTAILMENT_NEUTRAL_PREDICATES,
    QUESTION_FAMILIES,
    SHAPES,
    SIZES,
    SPLITS,
    TASKS,
    Scene,
    ShapeObject,
    ShapesWorld,
    corpus,
    make_scene,
    scene_records,
    scene_texts,
    split_words,
    world_words,
)

N_SCENES = 400


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return [make_scene("train", index) for index in range(N_SCENES)]


def spec_round(value: float) -> int:
    return int(np.floor(value + 0.5))


def test_palette_shapes_sizes_and_vocabulary_constants():
    assert SHAPES == ("circle", "square", "triangle")
    assert COLORS == {
        "red": (215, 45, 45),
        "green": (45, 160, 70),
        "blue": (45, 90, 215),
        "yellow": (235, 195, 35),
        "purple": (145, 70, 185),
        "cyan": (40, 185, 195),
    }
    assert SIZES == ("small", "large")
    assert BACKGROUND == (238, 238, 238)
    assert SPLITS == ("train", "val", "test")
    words = "yes no zero one two three red green blue yellow purple cyan circle square triangle small large"
    assert tuple(words.split()) == ANSWER_VOCAB
    assert CAPTION_TEMPLATES == ("{list}", "there is {list}", "an image of {list}", "{list} on a gray background")
    assert ENTAILMENT_NEUTRAL_PREDICATES == (
        "made of wood",
        "made of metal",
        "heavy",
        "light",
        "new",
        "old",
        "hot",
        "cold",
    )


def test_rendered_pixels_are_background_or_the_objects_palette_color(scenes):
    for scene in scenes[:100]:
        image = scene.render()
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        inside = np.zeros((64, 64), dtype=bool)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            region = image[y0:y1, x0:x1].reshape(-1, 3)
            colors = {tuple(p) for p in region.tolist()}
            assert colors <= {BACKGROUND, COLORS[obj.color]}
            assert COLORS[obj.color] in colors
            inside[y0:y1, x0:x1] = True
        assert (image[~inside] == BACKGROUND).all()  # nothing is drawn outside the boxes


@pytest.mark.parametrize("image_size", [64, 128, 256])
def test_sizes_margin_and_no_overlap(image_size):
    n_scenes = {64: 300, 128: 150, 256: 60}[image_size]
    small = range(spec_round(0.16 * image_size), spec_round(0.20 * image_size) + 1)
    large = range(spec_round(0.30 * image_size), spec_round(0.36 * image_size) + 1)
    sides = {"small": set(), "large": set()}
    for index in range(n_scenes):
        scene = make_scene("val", index, image_size=image_size)
        assert scene.render().shape == (image_size, image_size, 3)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            assert x1 - x0 == y1 - y0 == obj.side
            assert obj.side in (small if obj.size == "small" else large)
            sides[obj.size].add(obj.side)
            assert x0 >= 1 and y0 >= 1 and x1 <= image_size - 1 and y1 <= image_size - 1  # 1 px margin
        for a, b in itertools.combinations(scene.objects, 2):
            # Grown by 2 px, a box must not meet another: at least 2 px between them along x or y.
            gap_x = max(a.box[0], b.box[0]) - min(a.box[2], b.box[2])
            gap_y = max(a.box[1], b.box[1]) - min(a.box[3], b.box[3])
            assert gap_x >= 2 or gap_y >= 2, (scene, a, b)
    assert len(sides["small"]) >= 2 and len(sides["large"]) >= 2  # sizes are drawn, not fixed


def test_object_counts_unique_pairs_and_left_to_right_order(scenes):
    counts = {len(scene.objects) for scene in scenes}
    assert counts == {1, 2, 3}
    for scene in scenes:
        pairs = [(obj.color, obj.shape) for obj in scene.objects]
        assert len(set(pairs)) == len(pairs)
        centres = [((o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2) for o in scene.objects]
        assert centres == sorted(centres)
    attributes = {(obj.shape, obj.color, obj.size) for scene in scenes for obj in scene.objects}
    assert len(attributes) == len(SHAPES) * len(COLORS) * len(SIZES)


def test_shape_masks_follow_the_pixel_rules():
    side = 12
    square = ShapeObject("square", "red", "small", (0, 0, side, side)).mask()
    circle = ShapeObject("circle", "red", "small", (0, 0, side, side)).mask()
    triangle = ShapeObject("triangle", "red", "small", (0, 0, side, side)).mask()
    assert square.all()
    # Disk of diameter s: pixel centres within s / 2 of the box centre; symmetric, touches all four sides.
    centres = np.arange(side) + 0.5
    expected = (centres[None, :] - side / 2) ** 2 + (centres[:, None] - side / 2) ** 2 <= (side / 2) ** 2
    assert (circle == expected).all()
    assert circle[:, 0].any() and circle[0, :].any() and not circle[0, 0]
    # Apex up: rows widen downward, the bottom row spans the whole base, left-right symmetric.
    widths = triangle.sum(1)
    assert (np.diff(widths) >= 0).all() and widths[-1] == side and widths[0] <= 2
    assert (triangle == triangle[:, ::-1]).all()


def test_captions_use_the_four_templates_and_the_object_list():
    red = ShapeObject("circle", "red", "small", (2, 2, 12, 12))
    blue = ShapeObject("square", "blue", "large", (20, 2, 40, 22))
    green = ShapeObject("triangle", "green", "small", (44, 30, 55, 41))
    one = Scene("val", 0, 0, 64, (red,))
    three = Scene("val", 0, 0, 64, (red, blue, green))
    assert one.captions() == (
        "a small red circle",
        "there is a small red circle",
        "an image of a small red circle",
        "a small red circle on a gray background",
    )
    assert Scene("val", 0, 0, 64, (red, blue)).captions()[0] == "a small red circle and a large blue square"
    listed = "a small red circle, a large blue square and a small green triangle"
    assert three.captions() == tuple(t.format(list=listed) for t in CAPTION_TEMPLATES)
    assert red.phrase == "small red circle" and red.expression == "red circle"


# An oracle for the VQA and entailment texts, written from the spec independently of the generator.
PAIR = r"(\w+) (circle|square|triangle)"


def truth(scene: Scene, text: str) -> str | None:
    """The answer of a question or the truth ("yes" / "no") of a hypothesis about `scene`."""
    objects = scene.objects
    by_pair = {(o.color, o.shape): o for o in objects}
    numbers = ("zero", "one", "two", "three")
    if text == "how many shapes are there?":
        return numbers[len(objects)]
    if m := re.fullmatch(r"what color is the (small|large) (circle|square|triangle)\?", text):
        matches = [o for o in objects if (o.size, o.shape) == m.groups()]
        assert len(matches) == 1, "referent must be unique"
        return matches[0].color
    if m := re.fullmatch(r"what shape is the (\w+) object\?", text):
        matches = [o for o in objects if o.color == m.group(1)]
        assert len(matches) == 1, "referent must be unique"
        return matches[0].shape
    if m := re.fullmatch(rf"what size is the {PAIR}\?", text):
        return by_pair[m.groups()].size
    if m := re.fullmatch(rf"is there a {PAIR}\?|there is a {PAIR}", text):
        pair = m.groups()[:2] if m.group(1) else m.groups()[2:]
        return "yes" if pair in by_pair else "no"
    if m := re.fullmatch(rf"is the {PAIR} to the left of the {PAIR}\?|the {PAIR} is to the left of the {PAIR}", text):
        groups = [g for g in m.groups() if g is not None]
        a, b = by_pair[tuple(groups[:2])], by_pair[tuple(groups[2:])]
        assert a.box[0] + a.box[2] != b.box[0] + b.box[2], "left of is asked only where centres differ"
        return "yes" if a.box[0] + a.box[2] < b.box[0] + b.box[2] else "no"
    if m := re.fullmatch(r"how many (\w+) shapes are there\?", text):
        assert m.group(1) in COLORS
        return numbers[sum(o.color == m.group(1) for o in objects)]
    if m := re.fullmatch(r"there (?:is|are) (one|two|three) shapes?", text):
        assert (m.group(1) == "one") == text.startswith("there is one shape") and not text.endswith("one shapes")
        return "yes" if numbers.index(m.group(1)) == len(objects) else "no"
    if m := re.fullmatch(rf"the {PAIR} is (small|large)", text):
        return "yes" if by_pair[m.groups()[:2]].size == m.group(3) else "no"
    if m := re.fullmatch(rf"the {PAIR} is ({'|'.join(ENTAILMENT_NEUTRAL_PREDICATES)})", text):
        assert m.groups()[:2] in by_pair, "neutral hypotheses are about a present object"
        return "maybe"
    return None


def test_vqa_answers_are_right_in_the_vocabulary_and_cover_it(scenes):
    used_answers, used_families = set(), set()
    for scene in scenes:
        records = scene_records(scene, "vqa")
        assert 4 <= len(records) <= len(QUESTION_FAMILIES)
        assert len({r.question_id for r in records}) == len(records)
        for record in records:
            assert isinstance(record, VqaRecord)
            assert record.answer in ANSWER_VOCAB
            assert record.answer == truth(scene, record.question), record.question
            assert record.answers == (record.answer,) * 10
            assert record.question_id // 100 == scene.image_id == record.image_id
            family = list(QUESTION_FAMILIES)[record.question_id % 100]
            used_families.add(family)
            expected_type = {"count": "number", "count_color": "number", "exist": "yes/no", "left": "yes/no"}
            assert record.answer_type == expected_type.get(family, "other")
            assert record.question_type == family  # the VQA metric's breakdown
            used_answers.add(record.answer)
    assert used_answers == set(ANSWER_VOCAB)
    assert used_families == set(QUESTION_FAMILIES)
    exist = [r.answer for s in scenes for r in scene_records(s, "vqa") if r.question.startswith("is there")]
    assert 0.4 < exist.count("yes") / len(exist) < 0.6  # present or absent pair, half each


def test_entailment_labels_are_balanced_and_true(scenes):
    labels = []
    for scene in scenes:
        records = scene_records(scene, "entailment")
        per_scene = [r.label for r in records]
        assert sorted(per_scene) == sorted(["yes", "no", "maybe"] * 2)
        assert len({r.hypothesis for r in records}) == len(records)
        for record in records:
            assert isinstance(record, EntailmentRecord)
            assert record.premise == scene.captions()[0]
            assert truth(scene, record.hypothesis) == record.label, record.hypothesis
        labels += per_scene
    assert set(labels) == set(ENTAILMENT_LABELS) == {"yes", "no", "maybe"}
    hypotheses = [(r.hypothesis, r.label) for s in scenes for r in scene_records(s, "entailment")]
    kinds = {
        (label, kind)
        for text, label in hypotheses
        for kind, pattern in [("exist", "there is a "), ("count", " shape"), ("left", " left of "), ("size", "is ")]
        if pattern in text and label != "maybe"
    }
    assert {label for label, _ in kinds} == {"yes", "no"} and len(kinds) == 8  # every template, true and false

    def template(text: str) -> str:
        if " left of " in text:
            return "left"
        if text == "there is one shape" or text.endswith(" shapes"):
            return "count"
        return "exist" if text.startswith("there is a ") else "size"

    for record in (r for s in scenes for r in scene_records(s, "entailment")):
        expected = "neutral" if record.label == "maybe" else template(record.hypothesis)
        assert record.hypothesis_type == expected, record  # the entailment metric's breakdown
    assert "there is one shape" in {text for text, _ in hypotheses}


def test_records_of_every_task(scenes):
    scene = next(s for s in scenes if len(s.objects) == 3)
    image = scene.render()
    (caption,) = scene_records(scene, "caption")
    assert isinstance(caption, CaptionRecord) and caption.captions == scene.captions()
    assert np.array_equal(caption.image, image)
    grounding = scene_records(scene, "grounding")
    assert [type(r) for r in grounding] == [GroundingRecord] * 6
    for k, obj in enumerate(scene.objects):
        full, short = grounding[2 * k : 2 * k + 2]
        assert (full.expression, short.expression) == (obj.phrase, f"{obj.color} {obj.shape}")
        assert full.ref_id == short.ref_id == scene.image_id * 10 + k
        assert full.box == short.box == obj.box and (full.width, full.height) == (64, 64)
    regions = scene_records(scene, "region_caption")
    assert [type(r) for r in regions] == [RegionCaptionRecord] * 3
    assert [r.phrases for r in regions] == [(o.phrase, o.expression) for o in scene.objects]
    assert [r.ref_id for r in regions] == [g.ref_id for g in grounding[::2]]
    (t2i,) = scene_records(scene, "text_to_image")
    assert isinstance(t2i, TextToImageRecord) and t2i.caption == scene.captions()[0]
    assert np.array_equal(t2i.image, image) and t2i.image_id == scene.image_id
    with pytest.raises(ValueError, match="unknown task"):
        scene_records(scene, "detection")


def test_world_streams_records():
    world = ShapesWorld("val", seed=3, image_size=128)
    assert world.scene(5) == make_scene("val", 5, seed=3, image_size=128)
    assert [r.image_id for r in world.iter_records("caption", 2, 6)] == [2, 3, 4, 5]
    endless = world.iter_records("region_caption")
    first = list(itertools.islice(endless, 20))
    assert len(first) == 20 and first[0].image_id == 0
    assert [r.ref_id for r in world.records("grounding", 4)][::2] == [
        40 + k for k in range(len(world.scene(4).objects))
    ]
    for task in TASKS:
        assert world.records(task, 1), task


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="split"):
        make_scene("dev", 0)
    with pytest.raises(ValueError, match="image_size"):
        make_scene("val", 0, image_size=100)
    with pytest.raises(ValueError, match="index"):
        make_scene("val", -1)


def fingerprint(split: str, index: int, seed: int, image_size: int) -> str:
    scene = make_scene(split, index, seed, image_size)
    texts = [*scene.captions(), *(r.question for r in scene_records(scene, "vqa"))]
    texts += [r.hypothesis for r in scene_records(scene, "entailment")]
    return hashlib.sha256(scene.render().tobytes() + json.dumps(texts).encode()).hexdigest()


def test_deterministic_across_processes():
    cases = [("train", 0, 0, 64), ("val", 17, 0, 128), ("test", 123456, 9, 256)]
    code = (
        "import json, sys; from tests.test_shapes import fingerprint; "
        f"print(json.dumps([fingerprint(*c) for c in {cases!r}]))"
    )
    # PYTHONHASHSEED differs so a dependence on Python's salted hash() would show.
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=root)
    assert json.loads(out.stdout) == [fingerprint(*c) for c in cases]
    assert make_scene("val", 3) == make_scene("val", 3) and make_scene("val", 3) != make_scene("val", 3, seed=1)


def test_splits_never_share_a_scene():
    hashes = {}
    for split in SPLITS:
        hashes[split] = {hashlib.sha256(make_scene(split, i).render().tobytes()).hexdigest() for i in range(300)}
    for a, b in itertools.combinations(SPLITS, 2):
        assert not hashes[a] & hashes[b], (a, b)


def test_corpus_covers_every_word_of_the_world(scenes):
    texts = list(corpus(seed=0, n_scenes=50))
    corpus_words = {word for text in texts for word in split_words(text)}
    assert corpus_words == world_words()
    assert set(ANSWER_VOCAB) <= corpus_words and {"wood", "metal", "gray", "background"} <= corpus_words
    scene_words = {word for scene in scenes for text in scene_texts(scene) for word in split_words(text)}
    assert scene_words <= world_words()
