"""Read a shapes-world scene back from pixels or from a caption, to score generated images and captions.

The pixel parser follows `shared/shapes-world.md`:
1. every pixel takes the nearest of the seven reference colors (background + palette) by RGB distance;
2. 4-connected components of each palette color, dropping those under 0.4 * (0.16 * S)^2 pixels;
3. per component: bounding box; `large` if its longer side >= 0.25 * S else `small`; fill ratio
   (pixels / box area) >= 0.90 `square`, >= 0.65 `circle`, else `triangle`;
4. the objects left to right by box centre (ties: smaller centre y first).

    parse_scene(make_scene("val", 0).render())     # [("small", "red", "circle"), ...]
    parse_caption("there is a small red circle and a large blue square")
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from unifier.data.shapes import BACKGROUND, CAPTION_TEMPLATES, COLORS, SHAPES, SIZES, ShapeObject, left_to_right

# Row 0 is the background, rows 1.. the palette in COLORS order.
REFERENCE_COLORS = np.array([BACKGROUND, *COLORS.values()], dtype=np.int32)  # (7, 3)
COLOR_NAMES = tuple(COLORS)
MIN_COMPONENT_FRACTION = 0.4 * 0.16**2  # of S^2: 0.4 * (0.16 * S)^2 pixels
LARGE_SIDE_FRACTION = 0.25
SQUARE_FILL, CIRCLE_FILL = 0.90, 0.65
# 4-connectivity: neighbours share an edge (scipy's default structure in 2-D, spelled out for the reader).
FOUR_CONNECTED = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)

ParsedObject = tuple[str, str, str]  # (size, color, shape)


def nearest_color_index(images: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 pixels -> (...) int: 0 for background, 1 + k for the k-th palette color of COLORS."""
    # |p - c|^2 = |p|^2 - 2 p.c + |c|^2 and |p|^2 is the same for every c, so one small matmul decides;
    # every term is a whole number below 2^24, hence exact in float32.
    pixels = images.reshape(-1, 3).astype(np.float32)  # (P, 3)
    references = REFERENCE_COLORS.astype(np.float32)  # (7, 3)
    scores = (references**2).sum(-1) - 2 * pixels @ references.T  # (P, 7)
    return scores.argmin(-1).reshape(images.shape[:-1])


def _as_image(image) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] != array.shape[1]:
        raise ValueError(f"shapes parser: expected a square (S, S, 3) RGB image, got an array of shape {array.shape}")
    return array


def parse_objects(image: np.ndarray) -> list[ShapeObject]:
    """The objects the parser reads in a (S, S, 3) RGB image (array or PIL image), left to right; an
    object's box is its component's bounding box (x0, y0, x1, y1), x1 / y1 exclusive.

    One image at a time on purpose: measured on 64 px scenes, labelling a (B, S, S) stack at once was
    three times slower than this loop (the big temporaries leave the cache)."""
    image = _as_image(image)
    side = image.shape[0]
    min_pixels = MIN_COMPONENT_FRACTION * side * side
    color_index = nearest_color_index(image)  # (S, S)
    objects: list[ShapeObject] = []
    present = np.flatnonzero(np.bincount(color_index.ravel(), minlength=len(REFERENCE_COLORS))[1:]) + 1
    for k in present.tolist():
        labels, n_components = ndimage.label(color_index == k, structure=FOUR_CONNECTED)  # (S, S)
        pixel_counts = np.bincount(labels.ravel(), minlength=n_components + 1)
        for label, (rows, cols) in enumerate(ndimage.find_objects(labels), start=1):
            if pixel_counts[label] < min_pixels:
                continue
            height, width = rows.stop - rows.start, cols.stop - cols.start
            size = SIZES[1] if max(height, width) >= LARGE_SIDE_FRACTION * side else SIZES[0]
            fill = pixel_counts[label] / (height * width)
            shape = "square" if fill >= SQUARE_FILL else "circle" if fill >= CIRCLE_FILL else "triangle"
            box = (cols.start, rows.start, cols.stop, rows.stop)
            objects.append(ShapeObject(shape=shape, color=COLOR_NAMES[k - 1], size=size, box=box))
    return list(left_to_right(objects))


def parse_scene(image: np.ndarray) -> list[ParsedObject]:
    """The parsed scene of a (S, S, 3) RGB image: [(size, color, shape), ...] left to right."""
    return [(obj.size, obj.color, obj.shape) for obj in parse_objects(image)]


def _parse_object_phrase(text: str) -> ParsedObject | None:
    words = text.split(" ")
    if len(words) != 4 or words[0] != "a":
        return None
    _, size, color, shape = words
    if size not in SIZES or color not in COLORS or shape not in SHAPES:
        return None
    return size, color, shape


def parse_object_list(text: str) -> list[ParsedObject] | None:
    """ "a X", "a X and a Y", "a X, a Y and a Z" -> [(size, color, shape), ...]; None if it is not such a list."""
    head, joiner, last = text.rpartition(" and ")
    items = [*head.split(", "), last] if joiner else [text]
    parsed = [_parse_object_phrase(item) for item in items]
    return None if any(obj is None for obj in parsed) else parsed


# Templates with the most fixed text first, so "{list}" alone is the last resort.
_TEMPLATE_PARTS = sorted(
    (tuple(template.split("{list}")) for template in CAPTION_TEMPLATES), key=lambda parts: -len("".join(parts))
)


def parse_caption(caption: str) -> list[ParsedObject] | None:
    """A caption of any of the four templates back to its object list [(size, color, shape), ...] in
    its order; None when it is not a caption of the world. Case, spacing and a final period are forgiven."""
    text = " ".join(caption.lower().split()).removesuffix(".").strip()
    for prefix, suffix in _TEMPLATE_PARTS:
        if text.startswith(prefix) and text.endswith(suffix) and len(text) > len(prefix) + len(suffix):
            parsed = parse_object_list(text[len(prefix) : len(text) - len(suffix)])
            if parsed is not None:
                return parsed
    return None


def attribute_accuracy(parsed: Sequence[ParsedObject] | None, expected: Sequence[ParsedObject]) -> float:
    """Matching sizes, colors and shapes object by object (position i against position i), over
    3 * max(len(parsed), len(expected)) attributes: a missing or extra object counts as three misses."""
    parsed = list(parsed or [])
    n_objects = max(len(parsed), len(expected))
    if n_objects == 0:
        return 1.0
    matches = sum(a == b for got, want in zip(parsed, expected, strict=False) for a, b in zip(got, want, strict=True))
    return matches / (3 * n_objects)


def scene_matches(parsed: Sequence[ParsedObject] | None, expected: Sequence[ParsedObject]) -> bool:
    """Exactly the same objects in the same order."""
    return parsed is not None and [tuple(obj) for obj in parsed] == [tuple(obj) for obj in expected]
