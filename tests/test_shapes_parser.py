"""The pixel parser reads every clean scene exactly; the caption parser inverts the captions."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from unifier.data.shapes import BACKGROUND, CAPTION_TEMPLATES, COLORS, Scene, ShapeObject, make_scene
from unifier.data.shapes_parser import (
    REFERENCE_COLORS,
    attribute_accuracy,
    nearest_color_index,
    parse_caption,
    parse_objects,
    parse_scene,
    scene_matches,
)


def expected_objects(scene: Scene) -> list[tuple[str, str, str]]:
    return [(obj.size, obj.color, obj.shape) for obj in scene.objects]


def assert_parses_exactly(split: str, indexes: range, image_size: int) -> None:
    for index in indexes:
        scene = make_scene(split, index, image_size=image_size)
        parsed = parse_objects(scene.render())
        assert [(o.size, o.color, o.shape) for o in parsed] == expected_objects(scene), scene
        for got, true in zip(parsed, scene.objects, strict=True):
            # Squares and disks fill their placement box's extent; a triangle's apex row may be empty.
            if true.shape != "triangle":
                assert got.box == true.box
            assert got.box[0] == true.box[0] and got.box[2:] == true.box[2:]


@pytest.mark.parametrize(("image_size", "n_scenes"), [(64, 2000), (128, 1000)])
def test_parser_reads_every_clean_scene_exactly(image_size, n_scenes):
    assert_parses_exactly("train", range(n_scenes), image_size)


@pytest.mark.slow
@pytest.mark.parametrize(("image_size", "n_scenes"), [(32, 1000), (48, 1000), (64, 5000), (128, 1500), (256, 300)])
def test_parser_reads_every_clean_scene_exactly_many(image_size, n_scenes):
    for split in ("train", "val", "test"):
        assert_parses_exactly(split, range(n_scenes), image_size)


def test_parser_is_robust_to_small_noise_and_specks():
    rng = np.random.default_rng(0)
    for index in range(200):
        scene = make_scene("val", index)
        clean = scene.render()
        image = clean.astype(np.int16) + rng.integers(-15, 16, size=(64, 64, 3))
        image = np.clip(image, 0, 255).astype(np.uint8)
        # A 9 px speck away from every object: under 0.4 * (0.16 * 64)^2 = 41.9 px, so dropped.
        y, x = next(
            (y, x) for y in range(0, 60, 4) for x in range(0, 60, 4) if (clean[y : y + 5, x : x + 5] == 238).all()
        )
        image[y + 1 : y + 4, x + 1 : x + 4] = COLORS["red"]
        assert parse_scene(image) == expected_objects(scene)
    assert parse_scene(Image.fromarray(make_scene("val", 1).render())) == expected_objects(make_scene("val", 1))


def test_parser_rules_on_drawn_components():
    image = np.full((64, 64, 3), BACKGROUND, dtype=np.uint8)
    image[5:20, 5:20] = COLORS["blue"]  # 15 px: side < 0.25 * 64 = 16 -> small; full -> square
    image[30:46, 2:14] = COLORS["green"]  # 16 px tall: large; full -> square
    image[40:60, 40:60] = COLORS["cyan"]
    image[40:50, 40:50] = BACKGROUND  # fill 300 / 400 = 0.75 -> circle
    assert parse_scene(image) == [
        ("large", "green", "square"),
        ("small", "blue", "square"),
        ("large", "cyan", "circle"),
    ]
    # Two 4-connected pieces that touch only at a corner are two components.
    image = np.full((64, 64, 3), BACKGROUND, dtype=np.uint8)
    image[10:20, 10:20] = COLORS["red"]
    image[20:30, 20:30] = COLORS["red"]
    assert parse_scene(image) == [("small", "red", "square"), ("small", "red", "square")]
    assert parse_scene(np.full((64, 64, 3), BACKGROUND, dtype=np.uint8)) == []


def test_nearest_color_index_maps_each_reference_to_itself():
    colors = REFERENCE_COLORS.astype(np.uint8)[None]  # (1, 7, 3)
    assert nearest_color_index(colors).tolist() == [list(range(7))]
    assert nearest_color_index(np.array([[[250, 250, 250], [200, 40, 60]]], dtype=np.uint8)).tolist() == [[0, 1]]


def test_parser_rejects_bad_images():
    with pytest.raises(ValueError, match="square"):
        parse_scene(np.zeros((64, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="RGB"):
        parse_scene(np.zeros((64, 64), dtype=np.uint8))


def test_parse_caption_inverts_every_template():
    for index in range(500):
        scene = make_scene("test", index)
        for caption in scene.captions():
            assert parse_caption(caption) == expected_objects(scene)
    assert parse_caption("  There is a small red circle AND a large blue square. ") == [
        ("small", "red", "circle"),
        ("large", "blue", "square"),
    ]


@pytest.mark.parametrize(
    "caption",
    [
        "",
        "a small red",
        "a tiny red circle",
        "a small red circle, a large blue square",  # a list ends with "and"
        "a small red circle and large blue square",
        "there is",
        "a photo of a small red circle",
        "a small red circle on a gray background and more",
    ],
)
def test_parse_caption_rejects_non_captions(caption):
    assert parse_caption(caption) is None


def test_parse_caption_reads_any_template_and_length():
    objects = [ShapeObject("circle", c, "small", (0, 0, 1, 1)) for c in ("red", "green", "blue")]
    listed = "a small red circle, a small green circle and a small blue circle"
    for template in CAPTION_TEMPLATES:
        assert parse_caption(template.format(list=listed)) == [(o.size, o.color, o.shape) for o in objects]


def test_attribute_accuracy_and_scene_matches():
    expected = [("small", "red", "circle"), ("large", "blue", "square")]
    assert attribute_accuracy(expected, expected) == 1.0 and scene_matches(expected, expected)
    one_wrong = [("small", "red", "circle"), ("large", "blue", "triangle")]
    assert attribute_accuracy(one_wrong, expected) == pytest.approx(5 / 6)
    assert not scene_matches(one_wrong, expected)
    assert attribute_accuracy(expected[:1], expected) == pytest.approx(3 / 6)  # a missing object: three misses
    assert attribute_accuracy(expected + [("small", "cyan", "circle")], expected) == pytest.approx(6 / 9)
    assert attribute_accuracy([], expected) == 0.0 and attribute_accuracy(None, expected) == 0.0
    assert attribute_accuracy([], []) == 1.0
    assert not scene_matches(None, expected) and not scene_matches(expected[::-1], expected)
    assert scene_matches([list(o) for o in expected], expected)
