"""The shapes world: the built-in, procedurally generated vision-language benchmark.

Follows `shared/shapes-world.md` to the letter. A scene is a pure function of
(split, index, seed): its random generator is seeded from a SHA-256 of the triple (never
Python's salted `hash()`), so the same triple gives the same pixels and texts in every
process and on every machine, and the split being part of the seed keeps splits disjoint.

    scene = make_scene("val", 7)                 # Scene: up to 3 objects, left to right
    image = scene.render()                       # (S, S, 3) uint8
    scene.captions()                             # four references, canonical first
    scene_records(scene, "vqa")                  # VqaRecords of unifier/data/records.py
    ShapesWorld("train").iter_records("grounding")   # endless stream for training on the fly

Pixel rules (exact, no anti-aliasing, so the pixel parser reads clean scenes exactly):
a pixel (column i, row j) of an object's s x s box belongs to the shape when its centre
(i + 0.5, j + 0.5) lies inside it; in integers, with u = 2i + 1 - s and v = 2j + 1 - s:
square: always; circle (disk of diameter s): u^2 + v^2 <= s^2; triangle (apex at the top
middle, base the box's bottom side): 2|u| <= 2j + 1.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from unifier.data.records import (
    CaptionRecord,
    EntailmentRecord,
    GroundingRecord,
    Record,
    RegionCaptionRecord,
    TextToImageRecord,
    VqaRecord,
)

SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 45),
    "green": (45, 160, 70),
    "blue": (45, 90, 215),
    "yellow": (235, 195, 35),
    "purple": (145, 70, 185),
    "cyan": (40, 185, 195),
}
SIZES = ("small", "large")
# Side s of the object's box as a fraction of the canvas side S: uniform in [low, high].
SIZE_RANGES: dict[str, tuple[float, float]] = {"small": (0.16, 0.20), "large": (0.30, 0.36)}
BACKGROUND = (238, 238, 238)
SPLITS = ("train", "val", "test")
TASKS = ("caption", "vqa", "grounding", "region_caption", "entailment", "text_to_image")

MIN_OBJECTS, MAX_OBJECTS = 1, 3
CANVAS_MARGIN = 1  # px between every box and the canvas edge
BOX_GAP = 2  # a box grown by this many px on every side must not meet another box
MAX_PLACEMENT_TRIES = 100  # rejections of one object before the whole scene is drawn again
# The smallest canvas the pixel parser reads exactly (at S = 16 a 3 px circle is a full square).
MIN_IMAGE_SIZE = 32

NUMBER_WORDS = ("zero", "one", "two", "three")
ANSWER_VOCAB: tuple[str, ...] = ("yes", "no", *NUMBER_WORDS, *COLORS, *SHAPES, *SIZES)

CAPTION_TEMPLATES = ("{list}", "there is {list}", "an image of {list}", "{list} on a gray background")

# family -> question template; a question is asked only where its referent is unique.
QUESTION_FAMILIES: dict[str, str] = {
    "count": "how many shapes are there?",
    "color": "what color is the {size} {shape}?",
    "shape": "what shape is the {color} object?",
    "size": "what size is the {color} {shape}?",
    "exist": "is there a {color} {shape}?",
    "left": "is the {color} {shape} to the left of the {color2} {shape2}?",
    "count_color": "how many {color} shapes are there?",
}
# VQAv2's answer_type of each family.
QUESTION_ANSWER_TYPES: dict[str, str] = {
    "count": "number",
    "color": "other",
    "shape": "other",
    "size": "other",
    "exist": "yes/no",
    "left": "yes/no",
    "count_color": "number",
}
VQA_ANSWER_COPIES = 10  # VQAv2 keeps ten human answers; here all ten agree

# Entailment (yes) and contradiction (no) hypotheses share these templates: true or made false.
ENTAILMENT_TEMPLATES: dict[str, str] = {
    "exist": "there is a {color} {shape}",
    "count": "there are {number} shapes",  # "there is one shape" for one
    "size": "the {color} {shape} is {size}",
    "left": "the {color} {shape} is to the left of the {color2} {shape2}",
}
NEUTRAL_TEMPLATE = "the {color} {shape} is {predicate}"
ENTAILMENT_NEUTRAL_PREDICATES = ("made of wood", "made of metal", "heavy", "light", "new", "old", "hot", "cold")
HYPOTHESES_PER_LABEL = 2  # entailment records per scene: this many each of yes / no / maybe


def round_half_up(value: float) -> int:
    """Whole pixels from a fraction of S; half rounds up (Python's round() would go to even)."""
    return int(np.floor(value + 0.5))


def scene_rng(split: str, index: int, seed: int, purpose: str = "scene") -> np.random.Generator:
    """A generator that depends only on (split, seed, index, purpose), stable across processes and machines."""
    digest = hashlib.sha256(f"{split}:{seed}:{index}:{purpose}".encode()).digest()
    return np.random.default_rng(np.frombuffer(digest[:16], dtype="<u4").tolist())


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene; `box` = (x0, y0, x1, y1) in pixels, x1 / y1 exclusive, x1 - x0 = y1 - y0 = s."""

    shape: str
    color: str
    size: str
    box: tuple[int, int, int, int]

    @property
    def phrase(self) -> str:
        """`{size} {color} {shape}`, e.g. "small red circle" (the region caption target)."""
        return f"{self.size} {self.color} {self.shape}"

    @property
    def expression(self) -> str:
        """`{color} {shape}`: the short referring expression, unique within a scene."""
        return f"{self.color} {self.shape}"

    @property
    def side(self) -> int:
        return self.box[2] - self.box[0]

    @property
    def centre2(self) -> tuple[int, int]:
        """Twice the box centre (x, y): whole numbers, so ordering and left-of comparisons are exact."""
        x0, y0, x1, y1 = self.box
        return x0 + x1, y0 + y1

    def mask(self) -> np.ndarray:
        """(s, s) bool: the box's pixels that belong to the shape (the pixel rules of the module docstring)."""
        s = self.side
        u = 2 * np.arange(s) + 1 - s  # (s,) column centre offsets from the box middle, doubled
        v = u[:, None]  # (s, 1) the same for rows
        if self.shape == "square":
            return np.ones((s, s), dtype=bool)
        if self.shape == "circle":
            return u[None, :] ** 2 + v**2 <= s * s
        row = np.arange(s)[:, None]  # (s, 1)
        return 2 * np.abs(u[None, :]) <= 2 * row + 1


@dataclass(frozen=True)
class Scene:
    """A scene of the shapes world; `objects` are listed left to right (box centre x, then y)."""

    split: str
    index: int
    seed: int
    image_size: int
    objects: tuple[ShapeObject, ...]

    @property
    def image_id(self) -> int:
        return self.index

    def render(self) -> np.ndarray:
        """The scene's pixels: (S, S, 3) uint8, background (238, 238, 238), flat palette colors."""
        image = np.empty((self.image_size, self.image_size, 3), dtype=np.uint8)
        image[:] = BACKGROUND
        for obj in self.objects:
            x0, y0, x1, y1 = obj.box
            image[y0:y1, x0:x1][obj.mask()] = COLORS[obj.color]
        return image

    @property
    def object_list(self) -> str:
        """ "a small red circle, a large blue square and a small green triangle" (left to right)."""
        return object_list_text(self.objects)

    def captions(self) -> tuple[str, ...]:
        """The four reference captions, canonical (the bare object list) first."""
        return tuple(template.format(list=self.object_list) for template in CAPTION_TEMPLATES)

    @property
    def canonical_caption(self) -> str:
        return self.captions()[0]


def object_list_text(objects: tuple[ShapeObject, ...] | list[ShapeObject]) -> str:
    """The spec's object list: "a X", "a X and a Y", "a X, a Y and a Z"."""
    items = [f"a {obj.phrase}" for obj in objects]
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def check_scene_args(split: str, index: int, image_size: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"shapes world: unknown split {split!r}; expected one of {SPLITS}")
    if not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"shapes world: index must be a non-negative integer, got {index!r}")
    if image_size % 16 or image_size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"shapes world: image_size must be a multiple of 16 and at least {MIN_IMAGE_SIZE}, got {image_size}"
        )


def _draw_objects(rng: np.random.Generator, image_size: int) -> list[ShapeObject] | None:
    """One attempt at a scene's objects, or None when an object failed MAX_PLACEMENT_TRIES placements."""
    n_objects = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    # Distinct (color, shape) pairs drawn together, so no pair repeats by construction.
    pairs = rng.choice(len(COLORS) * len(SHAPES), size=n_objects, replace=False)
    color_names = tuple(COLORS)
    placed: list[ShapeObject] = []
    for pair in pairs.tolist():
        color, shape = color_names[pair // len(SHAPES)], SHAPES[pair % len(SHAPES)]
        size = SIZES[int(rng.integers(len(SIZES)))]
        low, high = SIZE_RANGES[size]
        side = round_half_up(rng.uniform(low, high) * image_size)
        highest = image_size - CANVAS_MARGIN - side  # the box [x, x + s) ends at most 1 px before the edge
        for _ in range(MAX_PLACEMENT_TRIES):
            x, y = (int(v) for v in rng.integers(CANVAS_MARGIN, highest + 1, size=2))
            box = (x, y, x + side, y + side)
            if not any(boxes_within_gap(box, other.box, BOX_GAP) for other in placed):
                placed.append(ShapeObject(shape=shape, color=color, size=size, box=box))
                break
        else:
            return None
    return placed


def boxes_within_gap(box: tuple[int, ...], other: tuple[int, ...], gap: int) -> bool:
    """Does `box`, grown by `gap` px on every side, meet `other`? (x1 / y1 exclusive.)"""
    return box[0] - gap < other[2] and other[0] < box[2] + gap and box[1] - gap < other[3] and other[1] < box[3] + gap


def left_to_right(objects: list[ShapeObject] | tuple[ShapeObject, ...]) -> tuple[ShapeObject, ...]:
    """Objects ordered by box centre x, ties by smaller centre y."""
    return tuple(sorted(objects, key=lambda obj: obj.centre2))


def make_scene(split: str, index: int, seed: int = 0, image_size: int = 64) -> Scene:
    """The scene (split, index, seed) at canvas size `image_size` (a multiple of 16, at least 32)."""
    check_scene_args(split, index, image_size)
    rng = scene_rng(split, int(index), int(seed))
    objects = None
    while objects is None:
        objects = _draw_objects(rng, image_size)
    return Scene(split=split, index=int(index), seed=int(seed), image_size=image_size, objects=left_to_right(objects))


# ---------------------------------------------------------------------------------------------------------------------
# Questions and hypotheses: each a pure function of the scene (its own generator per purpose).


def _pick(rng: np.random.Generator, items: list):
    return items[int(rng.integers(len(items)))]


def _absent_pairs(scene: Scene) -> list[tuple[str, str]]:
    present = {(obj.color, obj.shape) for obj in scene.objects}
    return [(color, shape) for color in COLORS for shape in SHAPES if (color, shape) not in present]


def _ordered_pairs(scene: Scene) -> list[tuple[ShapeObject, ShapeObject]]:
    """Ordered object pairs whose centres differ in x, so "to the left of" has a definite answer."""
    return [(a, b) for a, b in itertools.permutations(scene.objects, 2) if a.centre2[0] != b.centre2[0]]


def count_text(n: int) -> str:
    """`there are {n} shapes`, and `there is one shape` for one."""
    return "there is one shape" if n == 1 else ENTAILMENT_TEMPLATES["count"].format(number=NUMBER_WORDS[n])


def scene_questions(scene: Scene) -> list[tuple[str, str, str]]:
    """(family, question, answer) for every family askable in the scene, in QUESTION_FAMILIES order."""
    rng = scene_rng(scene.split, scene.index, scene.seed, "vqa")
    objects = list(scene.objects)
    questions: list[tuple[str, str, str]] = []
    for family, template in QUESTION_FAMILIES.items():
        if family == "count":
            questions.append((family, template, NUMBER_WORDS[len(objects)]))
        elif family == "color":
            unique = [o for o in objects if sum((p.size, p.shape) == (o.size, o.shape) for p in objects) == 1]
            if unique:
                obj = _pick(rng, unique)
                questions.append((family, template.format(size=obj.size, shape=obj.shape), obj.color))
        elif family == "shape":
            unique = [o for o in objects if sum(p.color == o.color for p in objects) == 1]
            if unique:
                obj = _pick(rng, unique)
                questions.append((family, template.format(color=obj.color), obj.shape))
        elif family == "size":
            obj = _pick(rng, objects)
            questions.append((family, template.format(color=obj.color, shape=obj.shape), obj.size))
        elif family == "exist":
            if rng.random() < 0.5:
                obj = _pick(rng, objects)
                color, shape, answer = obj.color, obj.shape, "yes"
            else:
                (color, shape), answer = _pick(rng, _absent_pairs(scene)), "no"
            questions.append((family, template.format(color=color, shape=shape), answer))
        elif family == "left":
            pairs = _ordered_pairs(scene)
            if pairs:
                a, b = _pick(rng, pairs)
                text = template.format(color=a.color, shape=a.shape, color2=b.color, shape2=b.shape)
                questions.append((family, text, "yes" if a.centre2[0] < b.centre2[0] else "no"))
        elif family == "count_color":
            color = _pick(rng, list(COLORS))
            count = sum(obj.color == color for obj in objects)
            questions.append((family, template.format(color=color), NUMBER_WORDS[count]))
    return questions


def _true_hypotheses(scene: Scene, rng: np.random.Generator) -> dict[str, str]:
    """family -> a true statement about the scene (left only where two centres differ in x)."""
    obj = _pick(rng, list(scene.objects))
    hypotheses = {
        "exist": ENTAILMENT_TEMPLATES["exist"].format(color=obj.color, shape=obj.shape),
        "count": count_text(len(scene.objects)),
        "size": ENTAILMENT_TEMPLATES["size"].format(color=obj.color, shape=obj.shape, size=obj.size),
    }
    pairs = [(a, b) for a, b in _ordered_pairs(scene) if a.centre2[0] < b.centre2[0]]
    if pairs:
        a, b = _pick(rng, pairs)
        hypotheses["left"] = ENTAILMENT_TEMPLATES["left"].format(
            color=a.color, shape=a.shape, color2=b.color, shape2=b.shape
        )
    return hypotheses


def _false_hypotheses(scene: Scene, rng: np.random.Generator) -> dict[str, str]:
    """family -> the same templates made false: an absent pair, a wrong count, the other size, the relation reversed."""
    obj = _pick(rng, list(scene.objects))
    color, shape = _pick(rng, _absent_pairs(scene))
    wrong_count = _pick(rng, [n for n in range(MIN_OBJECTS, MAX_OBJECTS + 1) if n != len(scene.objects)])
    other_size = SIZES[1 - SIZES.index(obj.size)]
    hypotheses = {
        "exist": ENTAILMENT_TEMPLATES["exist"].format(color=color, shape=shape),
        "count": count_text(wrong_count),
        "size": ENTAILMENT_TEMPLATES["size"].format(color=obj.color, shape=obj.shape, size=other_size),
    }
    pairs = [(a, b) for a, b in _ordered_pairs(scene) if a.centre2[0] > b.centre2[0]]
    if pairs:
        a, b = _pick(rng, pairs)
        hypotheses["left"] = ENTAILMENT_TEMPLATES["left"].format(
            color=a.color, shape=a.shape, color2=b.color, shape2=b.shape
        )
    return hypotheses


def scene_hypotheses(scene: Scene) -> list[tuple[str, str, str]]:
    """(template, hypothesis, label): HYPOTHESES_PER_LABEL each of yes, no, maybe, from distinct templates (a key of
    ENTAILMENT_TEMPLATES, or "neutral" for NEUTRAL_TEMPLATE)."""
    rng = scene_rng(scene.split, scene.index, scene.seed, "entailment")
    pairs: list[tuple[str, str, str]] = []
    for label, candidates in (("yes", _true_hypotheses(scene, rng)), ("no", _false_hypotheses(scene, rng))):
        families = list(candidates)
        for k in rng.choice(len(families), size=HYPOTHESES_PER_LABEL, replace=False).tolist():
            pairs.append((families[k], candidates[families[k]], label))
    predicates = rng.choice(len(ENTAILMENT_NEUTRAL_PREDICATES), size=HYPOTHESES_PER_LABEL, replace=False)
    for k in predicates.tolist():
        obj = _pick(rng, list(scene.objects))
        text = NEUTRAL_TEMPLATE.format(color=obj.color, shape=obj.shape, predicate=ENTAILMENT_NEUTRAL_PREDICATES[k])
        pairs.append(("neutral", text, "maybe"))
    return pairs


# ---------------------------------------------------------------------------------------------------------------------
# Records


def question_id(image_id: int, family: str) -> int:
    """image_id * 100 + the family's position in QUESTION_FAMILIES (at most one question per family)."""
    return image_id * 100 + list(QUESTION_FAMILIES).index(family)


def ref_id(image_id: int, object_index: int) -> int:
    """image_id * 10 + the object's left-to-right index: shared by its grounding and region caption records."""
    return image_id * 10 + object_index


def scene_records(scene: Scene, task: str, image: np.ndarray | None = None) -> list[Record]:
    """The scene's records of one task (a key of TASKS); `image` defaults to scene.render().

    caption: 1 CaptionRecord (the four references); vqa: one VqaRecord per askable family;
    grounding: 2 per object (`{size} {color} {shape}` then `{color} {shape}`); region_caption:
    1 per object; entailment: HYPOTHESES_PER_LABEL each of yes / no / maybe; text_to_image: 1.
    """
    if task not in TASKS:
        raise ValueError(f"shapes world: unknown task {task!r}; expected one of {TASKS}")
    image = scene.render() if image is None else image
    image_id, size = scene.image_id, scene.image_size
    if task == "caption":
        return [CaptionRecord(image_id=image_id, image=image, captions=scene.captions())]
    if task == "vqa":
        return [
            VqaRecord(
                question_id=question_id(image_id, family),
                image_id=image_id,
                image=image,
                question=question,
                answer=answer,
                answers=(answer,) * VQA_ANSWER_COPIES,
                answer_type=QUESTION_ANSWER_TYPES[family],
                question_type=family,
            )
            for family, question, answer in scene_questions(scene)
        ]
    if task == "grounding":
        return [
            GroundingRecord(
                ref_id=ref_id(image_id, k),
                image_id=image_id,
                image=image,
                expression=expression,
                box=tuple(float(v) for v in obj.box),
                width=size,
                height=size,
            )
            for k, obj in enumerate(scene.objects)
            for expression in (obj.phrase, obj.expression)
        ]
    if task == "region_caption":
        return [
            RegionCaptionRecord(
                ref_id=ref_id(image_id, k),
                image_id=image_id,
                image=image,
                box=tuple(float(v) for v in obj.box),
                width=size,
                height=size,
                phrases=(obj.phrase, obj.expression),
            )
            for k, obj in enumerate(scene.objects)
        ]
    if task == "entailment":
        premise = scene.canonical_caption
        return [
            EntailmentRecord(
                pair_id=image_id * 10 + k,
                image_id=image_id,
                image=image,
                hypothesis=text,
                label=label,
                premise=premise,
                hypothesis_type=template,
            )
            for k, (template, text, label) in enumerate(scene_hypotheses(scene))
        ]
    return [TextToImageRecord(uid=image_id, caption=scene.canonical_caption, image=image, image_id=image_id)]


class ShapesWorld:
    """One split of the shapes world: scenes and records by index, or an endless record stream."""

    def __init__(self, split: str = "train", seed: int = 0, image_size: int = 64):
        check_scene_args(split, 0, image_size)
        self.split, self.seed, self.image_size = split, seed, image_size

    def __repr__(self) -> str:
        return f"ShapesWorld(split={self.split!r}, seed={self.seed}, image_size={self.image_size})"

    def scene(self, index: int) -> Scene:
        return make_scene(self.split, index, self.seed, self.image_size)

    def records(self, task: str, index: int) -> list[Record]:
        return scene_records(self.scene(index), task)

    def iter_records(self, task: str, start: int = 0, stop: int | None = None) -> Iterator[Record]:
        """Records of scenes start, start + 1, ... (stop exclusive; None streams forever)."""
        indexes = itertools.count(start) if stop is None else range(start, stop)
        for index in indexes:
            yield from self.records(task, index)


# ---------------------------------------------------------------------------------------------------------------------
# Texts for the tokenizer


def vocabulary_texts() -> Iterator[str]:
    """Every phrase, question, answer and hypothesis shape the world can produce, each filled with every word."""
    pairs = [(color, shape) for color in COLORS for shape in SHAPES]
    phrases = [ShapeObject(shape, color, size, (0, 0, 1, 1)) for color, shape in pairs for size in SIZES]
    yield from ANSWER_VOCAB
    for obj in phrases:
        yield obj.phrase
        yield obj.expression
        for template in CAPTION_TEMPLATES:
            yield template.format(list=object_list_text([obj]))
    for template in CAPTION_TEMPLATES:  # the joining words of two- and three-object lists
        yield template.format(list=object_list_text(phrases[:2]))
        yield template.format(list=object_list_text(phrases[::17]))
    yield QUESTION_FAMILIES["count"]
    for n in range(MIN_OBJECTS, MAX_OBJECTS + 1):
        yield count_text(n)
    for color in COLORS:
        yield QUESTION_FAMILIES["shape"].format(color=color)
        yield QUESTION_FAMILIES["count_color"].format(color=color)
    for size, shape in itertools.product(SIZES, SHAPES):
        yield QUESTION_FAMILIES["color"].format(size=size, shape=shape)
    for color, shape in pairs:
        yield QUESTION_FAMILIES["size"].format(color=color, shape=shape)
        yield QUESTION_FAMILIES["exist"].format(color=color, shape=shape)
        yield ENTAILMENT_TEMPLATES["exist"].format(color=color, shape=shape)
        for size in SIZES:
            yield ENTAILMENT_TEMPLATES["size"].format(color=color, shape=shape, size=size)
        for predicate in ENTAILMENT_NEUTRAL_PREDICATES:
            yield NEUTRAL_TEMPLATE.format(color=color, shape=shape, predicate=predicate)
    for (color, shape), (color2, shape2) in itertools.permutations(pairs, 2):
        yield QUESTION_FAMILIES["left"].format(color=color, shape=shape, color2=color2, shape2=shape2)
        yield ENTAILMENT_TEMPLATES["left"].format(color=color, shape=shape, color2=color2, shape2=shape2)


def scene_texts(scene: Scene) -> Iterator[str]:
    """Every text of one scene: captions, questions, answers, hypotheses, phrases and expressions."""
    yield from scene.captions()
    for _, question, answer in scene_questions(scene):
        yield question
        yield answer
    for _, hypothesis, _ in scene_hypotheses(scene):
        yield hypothesis
    for obj in scene.objects:
        yield obj.phrase
        yield obj.expression


def corpus(seed: int = 0, n_scenes: int = 2000, image_size: int = 64) -> Iterator[str]:
    """Texts to train the sentencepiece model on: vocabulary_texts() (every word of the world, so the
    corpus covers the whole vocabulary), then the texts of train scenes 0 .. n_scenes - 1."""
    yield from vocabulary_texts()
    for index in range(n_scenes):
        yield from scene_texts(make_scene("train", index, seed, image_size))


def world_words() -> frozenset[str]:
    """Every word (whitespace-separated, "?" and "," split off) any text of the world uses."""
    return frozenset(word for text in vocabulary_texts() for word in split_words(text))


def split_words(text: str) -> list[str]:
    """Whitespace-separated words with "?" and "," as words of their own."""
    return text.replace("?", " ?").replace(",", " ,").split()
