"""`unifier gallery --model runs/shapes-tiny/model --out runs/shapes-tiny/gallery [--n 8] [--log runs/shapes-tiny/log.jsonl]`

A static HTML page of what a model does on shapes-world scenes: captions under images, questions and
answers, grounding boxes (predicted and true in two colors), region captions, entailment verdicts,
text-to-image samples beside their prompts, and the training curves of the run's log as plots (a fine-tuned
model's after those of the runs it was fine-tuned from).

    from unifier.gallery import write_gallery
    index = write_gallery(Unifier.from_pretrained("runs/shapes-tiny/model"), "runs/shapes-tiny/gallery")

The folder holds `index.html` and PNG panels only: no script, no external URL, so it opens from disk in
any browser. It is written to a temporary folder beside the target and renamed into place, so a reader
never sees half a gallery. Every text on the page goes through html.escape.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, ImageDraw

from unifier.data.shapes import ShapesWorld
from unifier.data.shapes_parser import parse_caption, parse_scene, scene_matches
from unifier.images import load_image
from unifier.tasks.base import BoxOutput, ImageOutput, TextOutput

TASK_TITLES: dict[str, str] = {
    "caption": "Captioning",
    "vqa": "Visual question answering",
    "grounding": "Grounding (referring expressions)",
    "region_caption": "Region captioning",
    "entailment": "Visual entailment",
    "text_to_image": "Text-to-image",
}
PANEL_SIZE = 192  # px: shapes scenes are 64 px, enlarged with nearest-neighbour so flat colors stay flat
TRUE_BOX_COLOR = (20, 150, 60)  # green
PREDICTED_BOX_COLOR = (225, 20, 140)  # magenta: distinct from every palette color of the shapes world
QUESTIONS_PER_SCENE = 3
HYPOTHESES_PER_SCENE = 3
TEXT_TO_IMAGE_SAMPLES = 4  # drawn as the model folder's decoding.json says (the shapes model: top_k 32)
LOG_FILE_NAME = "log.jsonl"
RUN_CONFIG_FILE_NAME = "config.yaml"  # a training run's settings, beside its log


# ---- drawing -----------------------------------------------------------------------------------------------------
def enlarge(image: Any, size: int = PANEL_SIZE) -> Image.Image:
    """Any image source -> RGB PIL image whose longer side is `size` px (nearest-neighbour: crisp pixels)."""
    image = load_image(image)
    scale = size / max(image.size)
    new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(new_size, Image.Resampling.NEAREST)


def draw_boxes(
    image: Any,
    boxes: Sequence[tuple[Sequence[float], tuple[int, int, int]]],
    size: int = PANEL_SIZE,
) -> Image.Image:
    """The image enlarged to `size` px with each (box, rgb) drawn as a 3 px outline.

    A box is (x0, y0, x1, y1) in pixels of the original image, x1 / y1 exclusive (the records' convention).
    """
    original = load_image(image)
    panel = enlarge(original, size)
    scale_x, scale_y = panel.width / original.width, panel.height / original.height
    draw = ImageDraw.Draw(panel)
    for box, color in boxes:
        x0, y0, x1, y1 = (float(v) for v in box)
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            continue
        draw.rectangle(
            [x0 * scale_x, y0 * scale_y, max(x0 * scale_x, x1 * scale_x - 1), max(y0 * scale_y, y1 * scale_y - 1)],
            outline=color,
            width=3,
        )
    return panel


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes; 0 for empty ones."""
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# ---- training curves ---------------------------------------------------------------------------------------------
def read_log(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """The JSON objects of a JSON-lines log, and how many lines were skipped (not JSON, not an object)."""
    entries, skipped = [], 0
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if isinstance(entry, dict):
                entries.append(entry)
            else:
                skipped += 1
    return entries, skipped


def _numeric_leaves(entry: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """{"val": {"vqa": {"accuracy": 0.9}}} -> {"val/vqa/accuracy": 0.9}; non-numbers are left out."""
    leaves: dict[str, float] = {}
    for key, value in entry.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            leaves.update(_numeric_leaves(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            leaves[name] = float(value)
    return leaves


# Which plot a series belongs in, by its name; anything else (learning rate, throughput, time) is not plotted.
CURVE_GROUPS = ("training loss", "validation loss", "validation metrics")
_VALIDATION_WORDS = ("val", "eval", "valid", "validation")
_STEP_KEYS = ("step", "global_step", "iteration")


def _curve_group(name: str, entry_is_validation: bool) -> str | None:
    parts = name.lower().replace("-", "_").split("/")
    words = {word for part in parts for word in part.split("_")}
    is_validation = entry_is_validation or bool(words & set(_VALIDATION_WORDS))
    if any(word in ("loss", "losses") for word in words):
        return "validation loss" if is_validation else "training loss"
    if is_validation:
        return "validation metrics"
    return None


def log_series(entries: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Per plot group, per series name: [(step, value), ...] from log entries that have a step.

    Tolerant of the log's exact keys: a series is any numeric field (nested dicts flattened with "/"); an
    entry counts as validation when one of its keys (or a "split" / "kind" / "type" field) says so.
    """
    groups: dict[str, dict[str, list[tuple[float, float]]]] = {group: {} for group in CURVE_GROUPS}
    for entry in entries:
        step = next((entry[key] for key in _STEP_KEYS if isinstance(entry.get(key), (int, float))), None)
        if step is None:
            continue
        tags = " ".join(str(entry.get(key, "")) for key in ("split", "kind", "type", "phase", "event")).lower()
        entry_is_validation = any(word in tags.split() for word in _VALIDATION_WORDS)
        for name, value in _numeric_leaves(entry).items():
            if name in _STEP_KEYS or name in ("epoch", "time", "elapsed", "samples", "tokens"):
                continue
            group = _curve_group(name, entry_is_validation)
            if group is not None:
                groups[group].setdefault(name, []).append((float(step), value))
    return {group: series for group, series in groups.items() if series}


def series_colors(series: dict[str, dict[str, list[tuple[float, float]]]]) -> dict[str, str]:
    """A matplotlib color per series name, the same for the series of one task in every plot (the name after its
    first part: `task_loss/vqa` and `val_loss/vqa` are both "vqa"), so a task is one color across the plots."""
    keys = sorted({name.split("/", 1)[-1] for curves in series.values() for name in curves})
    if len(keys) <= 10:
        palette = [f"C{i}" for i in range(len(keys))]  # matplotlib's default color cycle
    else:  # more tasks than the cycle's ten colors: spread them over a continuous map
        import matplotlib

        colormap = matplotlib.colormaps["turbo"]
        palette = [matplotlib.colors.to_hex(colormap(i / (len(keys) - 1))) for i in range(len(keys))]
    by_key = dict(zip(keys, palette, strict=True))
    return {name: by_key[name.split("/", 1)[-1]] for curves in series.values() for name in curves}


def plot_curves(
    series: dict[str, dict[str, list[tuple[float, float]]]],
    out_path: str | Path,
    stage_starts: Sequence[float] = (),
) -> Path:
    """One row of plots (one per group of log_series) saved as a PNG; losses on a log scale when positive; a dashed
    line at each step in `stage_starts`, where a fine-tuning stage began."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    if not series:
        raise ValueError("plot_curves: no numeric series with a step in the log")
    colors = series_colors(series)
    fig, axes = plt.subplots(1, len(series), figsize=(5.2 * len(series), 3.8), squeeze=False)
    for ax, (group, curves) in zip(axes[0], series.items(), strict=True):
        for name, points in sorted(curves.items()):
            points = sorted(points)
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                label=name,
                color=colors[name],
                linewidth=1.4,
                marker="." if len(points) < 30 else None,
            )
        values = [v for points in curves.values() for _, v in points]
        if "loss" in group and min(values) > 0:
            ax.set_yscale("log")
        for start in stage_starts:
            ax.axvline(start, color="0.4", linestyle="--", linewidth=0.9)
        ax.set_title(group)
        ax.set_xlabel("step" if not stage_starts else "step (dashed: a fine-tuning stage starts)")
        ax.grid(alpha=0.3)
        # Under the axes, not inside: seven curves leave no corner free of lines.
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return Path(out_path)


@dataclass
class StageLog:
    """One training run's log within a chain of fine-tuning stages: its entries, and the offset added to their steps
    so that they follow the stage before (0 for the first)."""

    path: Path
    entries: list[dict[str, Any]]
    skipped: int
    step_offset: float


def _last_step(entries: Sequence[dict[str, Any]]) -> float:
    steps = [entry[key] for entry in entries for key in _STEP_KEYS if isinstance(entry.get(key), (int, float))]
    return float(max(steps, default=0))


def _fine_tuned_from(log_path: Path) -> tuple[Path | None, str | None]:
    """The log of the run that `log_path`'s run fine-tuned (`init_from: runs/<name>/model` in the config.yaml beside
    the log) and, when that chain breaks off, a note saying why."""
    config_path = log_path.parent / RUN_CONFIG_FILE_NAME
    if not config_path.is_file():
        return None, None
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        return None, f"{config_path} is not readable YAML ({type(error).__name__}): the curves start at its run"
    init_from = config.get("init_from") if isinstance(config, dict) else None
    if not init_from:
        return None, None
    earlier = Path(init_from).parent / LOG_FILE_NAME  # init_from is a model folder, runs/<name>/model
    if not earlier.is_file():
        return None, f"the log of the run it fine-tuned ({earlier}) is not there: the curves start at this run"
    return earlier, None


def stage_logs(log_path: str | Path, max_stages: int = 20) -> tuple[list[StageLog], list[str]]:
    """The log at `log_path` and the logs of the runs it was fine-tuned from, oldest first, each stage's steps placed
    after the last step of the stage before; and notes where the chain breaks off (a missing earlier log).

    A fine-tuned model's own log starts again at step 1, so without its earlier stages the page would show only the
    last stretch of its training.
    """
    chain, notes = [Path(log_path)], []
    seen = {Path(log_path).resolve()}
    while len(chain) < max_stages:
        earlier, note = _fine_tuned_from(chain[0])
        if note:
            notes.append(note)
        if earlier is None or earlier.resolve() in seen:
            break
        seen.add(earlier.resolve())
        chain.insert(0, earlier)
    stages, offset = [], 0.0
    for path in chain:
        entries, skipped = read_log(path)
        stages.append(StageLog(path, entries, skipped, offset))
        offset += _last_step(entries)
    return stages, notes


def _shift_steps(entries: Sequence[dict[str, Any]], offset: float) -> list[dict[str, Any]]:
    if not offset:
        return list(entries)
    shifted = []
    for entry in entries:
        entry = dict(entry)
        for key in _STEP_KEYS:
            if isinstance(entry.get(key), (int, float)) and not isinstance(entry[key], bool):
                entry[key] = entry[key] + offset
        shifted.append(entry)
    return shifted


def describe_stages(stages: Sequence[StageLog]) -> str:
    """The page's line under the curves: which logs, and where each fine-tuning stage starts."""
    parts = []
    for index, stage in enumerate(stages):
        skipped = f", {stage.skipped} unreadable lines skipped" if stage.skipped else ""
        start = f" from step {stage.step_offset:,.0f}, fine-tuning the run before" if index else ""
        parts.append(f"{stage.path} ({len(stage.entries)} entries{skipped}){start}")
    return "log: " + "; then ".join(parts)


def find_log(model_dir: str | Path) -> Path | None:
    """The training log next to a model folder (runs/<name>/log.jsonl for runs/<name>/model), if any."""
    for candidate in (Path(model_dir) / LOG_FILE_NAME, Path(model_dir).parent / LOG_FILE_NAME):
        if candidate.is_file():
            return candidate
    return None


# ---- asking the model ----------------------------------------------------------------------------------------------
def task_prompt(task: str, text: str = "") -> str:
    """The OFA prompt of design.md for `task`, filled with `text` (question, expression, hypothesis, caption;
    for region_caption the region as "x0,y0,x1,y1" pixels, or "" when it is passed to predict as box=)."""
    templates = {
        "caption": " what does the image describe?",
        "vqa": " {text}",
        "grounding": ' which region does the text " {text} " describe?',
        "region_caption": " what does the region describe? region: {text}",
        "entailment": ' does the image describe " {text} "?',
        "text_to_image": " what is the complete image? caption: {text}",
    }
    if task not in templates:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(templates)}")
    return templates[task].format(text=text).rstrip()


def region_text(box: Sequence[float]) -> str:
    """A pixel box as a prompt writes it: "x0,y0,x1,y1"."""
    return ",".join(f"{v:g}" for v in box)


def ask_all(unifier: Any, task: str, images: Sequence[Any] | None, texts: Sequence[str], **options: Any) -> list[Any]:
    """One batched unifier.predict call: per prompt its typed output (a list of them when samples > 1).

    images: one per text, or None for text-only prompts (text-to-image).
    """
    if not texts:
        return []
    prompts = [task_prompt(task, text) for text in texts]
    return list(unifier.predict(image=None if images is None else list(images), prompt=prompts, task=task, **options))


def as_list(outputs: Any) -> list[Any]:
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def output_text(output: Any) -> str:
    """The answer of a text output ("" for none), to show and to compare."""
    if isinstance(output, TextOutput):
        return output.text.strip()
    raise TypeError(f"expected a text answer, got {type(output).__name__}")


# ---- the page's content ------------------------------------------------------------------------------------------
@dataclass
class Line:
    """One line under a panel: `label: text`, marked right or wrong against `expected` when known."""

    label: str
    text: str
    expected: str | None = None
    correct: bool | None = None


@dataclass
class Card:
    """A group of panels (PNG file names relative to the gallery folder) with lines of text under them."""

    title: str
    panels: list[tuple[str, str]]  # (file name, alt text)
    lines: list[Line] = field(default_factory=list)


ENTAILMENT_WORDS = {"yes": "yes (entailment)", "no": "no (contradiction)", "maybe": "maybe (neutral)"}


class PanelWriter:
    """Saves PNG panels into `folder` under unique names."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)

    def save(self, image: Image.Image, name: str) -> str:
        path = self.folder / f"{name}.png"
        image.save(path, format="PNG")
        return f"{self.folder.name}/{path.name}"


def scene_objects(scene: Any) -> list[tuple[str, str, str]]:
    return [(obj.size, obj.color, obj.shape) for obj in scene.objects]


def gallery_cards(
    unifier: Any,
    panels: PanelWriter,
    n: int,
    split: str = "val",
    image_size: int = 64,
    samples: int = TEXT_TO_IMAGE_SAMPLES,
) -> dict[str, list[Card]]:
    """Ask the model every task about scenes 0 .. n-1 of `split` (one batched call per task); the cards per task."""
    from tqdm.auto import tqdm

    world = ShapesWorld(split, image_size=image_size)
    scenes = [world.scene(index) for index in range(n)]
    images = [scene.render() for scene in scenes]
    titles = [f"{split} scene {index}" for index in range(n)]
    scene_panels = [(panels.save(enlarge(image), f"scene-{i}"), titles[i]) for i, image in enumerate(images)]
    truths = [scene_objects(scene) for scene in scenes]
    cards: dict[str, list[Card]] = {task: [] for task in TASK_TITLES}
    progress = tqdm(total=len(TASK_TITLES), desc="gallery", unit="task")

    captions = [output_text(o) for o in ask_all(unifier, "caption", images, [""] * n)]
    for i, caption in enumerate(captions):
        correct = scene_matches(parse_caption(caption), truths[i])
        cards["caption"].append(
            Card(titles[i], [scene_panels[i]], [Line("caption", caption, scenes[i].canonical_caption, correct)])
        )
    progress.update()

    # VQA: a few questions per scene, rotating through the question families across scenes.
    asked = []
    for i in range(n):
        questions = world.records("vqa", i)
        start = i % len(questions)
        asked += [(i, record) for record in (questions[start:] + questions[:start])[:QUESTIONS_PER_SCENE]]
    answers = ask_all(unifier, "vqa", [images[i] for i, _ in asked], [record.question for _, record in asked])
    lines: dict[int, list[Line]] = {i: [] for i in range(n)}
    for (i, record), output in zip(asked, answers, strict=True):
        answer = output_text(output)
        lines[i].append(Line(record.question, answer, record.answer, answer == record.answer))
    cards["vqa"] = [Card(titles[i], [scene_panels[i]], lines[i]) for i in range(n)]
    progress.update()

    # Grounding and region captions: one object per scene, rotating through its objects.
    objects = [i % len(scene.objects) for i, scene in enumerate(scenes)]
    grounding = [world.records("grounding", i)[2 * k + 1] for i, k in enumerate(objects)]  # `{color} {shape}`
    boxes = ask_all(unifier, "grounding", images, [record.expression for record in grounding])
    for i, (record, predicted) in enumerate(zip(grounding, boxes, strict=True)):
        if not isinstance(predicted, BoxOutput):
            raise TypeError(f"grounding: expected a box, got {type(predicted).__name__}")
        iou = box_iou(predicted.box, record.box)
        panel = draw_boxes(images[i], [(record.box, TRUE_BOX_COLOR), (predicted.box, PREDICTED_BOX_COLOR)])
        box_text = ", ".join(f"{v:.0f}" for v in predicted.box)
        cards["grounding"].append(
            Card(
                titles[i],
                [(panels.save(panel, f"grounding-{i}"), f"boxes for {record.expression}")],
                [Line("expression", record.expression), Line("box", f"({box_text}), IoU {iou:.2f}", None, iou >= 0.5)],
            )
        )
    progress.update()

    regions = [world.records("region_caption", i)[k] for i, k in enumerate(objects)]
    phrases = ask_all(unifier, "region_caption", images, [region_text(record.box) for record in regions])
    for i, (record, output) in enumerate(zip(regions, phrases, strict=True)):
        phrase = output_text(output)
        panel = draw_boxes(images[i], [(record.box, TRUE_BOX_COLOR)])
        cards["region_caption"].append(
            Card(
                titles[i],
                [(panels.save(panel, f"region-{i}"), "the region asked about")],
                [Line("region", phrase, record.phrases[0], phrase in record.phrases)],
            )
        )
    progress.update()

    asked = []
    for i in range(n):
        one_per_label: dict[str, Any] = {}
        for record in world.records("entailment", i):
            one_per_label.setdefault(record.label, record)
        asked += [(i, record) for record in list(one_per_label.values())[:HYPOTHESES_PER_SCENE]]
    verdicts = ask_all(unifier, "entailment", [images[i] for i, _ in asked], [record.hypothesis for _, record in asked])
    lines = {i: [] for i in range(n)}
    for (i, record), output in zip(asked, verdicts, strict=True):
        verdict = output_text(output)
        words = ENTAILMENT_WORDS.get(verdict, verdict)
        lines[i].append(Line(record.hypothesis, words, ENTAILMENT_WORDS[record.label], verdict == record.label))
    cards["entailment"] = [Card(titles[i], [scene_panels[i]], lines[i]) for i in range(n)]
    progress.update()

    prompts = [scene.canonical_caption for scene in scenes]
    generated = ask_all(unifier, "text_to_image", None, prompts, samples=samples, seed=0)
    small = PANEL_SIZE * 2 // 3
    for i, outputs in enumerate(generated):
        figures, exact = [(panels.save(enlarge(images[i], small), f"truth-{i}"), "the true scene")], 0
        for j, output in enumerate(as_list(outputs)):
            if not isinstance(output, ImageOutput) or output.image is None:
                raise TypeError(f"text-to-image: expected generated images, got {type(output).__name__}")
            # the parser reads scenes at the world's size; a VQ-GAN of another size is resampled to it
            pixels = np.asarray(load_image(output.image).resize((image_size, image_size), Image.Resampling.NEAREST))
            exact += scene_matches(parse_scene(pixels), truths[i])
            figures.append((panels.save(enlarge(output.image, small), f"generated-{i}-{j}"), f"sample {j + 1}"))
        read_back = Line(
            "samples read back exactly by the pixel parser", f"{exact} of {len(figures) - 1}", None, exact > 0
        )
        cards["text_to_image"].append(Card(prompts[i], figures, [read_back]))
    progress.update()
    progress.close()
    return cards


# ---- the page ----------------------------------------------------------------------------------------------------
PAGE_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #222; background: #fafafa; }
h1 { margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 2px solid #ddd; padding-bottom: 4px; }
.meta { color: #666; font-size: 14px; }
nav a { margin-right: 14px; }
.cards { display: flex; flex-wrap: wrap; gap: 14px; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 10px; max-width: 420px; }
.card.wide { max-width: 100%; }
.card h3 { font-size: 14px; margin: 0 0 6px 0; font-weight: 600; }
.panels { display: flex; gap: 6px; flex-wrap: wrap; align-items: flex-end; }
.panels figure { margin: 0; text-align: center; font-size: 12px; color: #666; }
.panels img { image-rendering: pixelated; border: 1px solid #ccc; display: block; }
.line { font-size: 14px; margin-top: 6px; overflow-wrap: anywhere; }
.label { color: #555; }
.ok { color: #138a36; font-weight: 600; } .bad { color: #c0152f; font-weight: 600; }
.expected { color: #888; }
table.summary { border-collapse: collapse; font-size: 14px; }
table.summary td, table.summary th { border: 1px solid #ddd; padding: 4px 10px; text-align: left; }
.legend span { display: inline-block; width: 14px; height: 14px; vertical-align: middle; margin: 0 4px 0 10px; }
img.curves { max-width: 100%; border: 1px solid #ddd; background: #fff; }
"""


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _rgb(color: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*color)


def _card_html(card: Card, wide: bool = False) -> str:
    figures = "".join(
        f'<figure><img src="{_esc(src)}" alt="{_esc(alt)}">'
        + (f"<figcaption>{_esc(alt)}</figcaption>" if alt != card.title else "")
        + "</figure>"
        for src, alt in card.panels
    )
    lines = []
    for line in card.lines:
        mark = ""
        if line.correct is not None:
            mark = '<span class="ok">&#10003;</span>' if line.correct else '<span class="bad">&#10007;</span>'
        expected = ""
        if line.expected is not None and line.correct is False:
            expected = f' <span class="expected">(true: {_esc(line.expected)})</span>'
        lines.append(
            f'<div class="line"><span class="label">{_esc(line.label)}:</span> <b>{_esc(line.text)}</b> {mark}{expected}</div>'
        )
    classes = "card wide" if wide else "card"
    return (
        f'<div class="{classes}"><h3>{_esc(card.title)}</h3><div class="panels">{figures}</div>{"".join(lines)}</div>'
    )


def _tally(cards: Sequence[Card]) -> tuple[int, int]:
    marks = [line.correct for card in cards for line in card.lines if line.correct is not None]
    return sum(marks), len(marks)


def render_page(
    cards: dict[str, list[Card]], curves: str | None, notes: Sequence[str], model_name: str, split: str, n: int
) -> str:
    """The gallery's index.html as a string (every text escaped; images by relative path)."""
    nav = " ".join(f'<a href="#{task}">{_esc(title)}</a>' for task, title in TASK_TITLES.items())
    rows = []
    for task, title in TASK_TITLES.items():
        right, total = _tally(cards.get(task, []))
        rows.append(f"<tr><td>{_esc(title)}</td><td>{right} / {total}</td></tr>")
    sections = []
    legends = {
        "grounding": (
            '<p class="legend">'
            f'<span style="background:{_rgb(TRUE_BOX_COLOR)}"></span>true box'
            f'<span style="background:{_rgb(PREDICTED_BOX_COLOR)}"></span>predicted box</p>'
        ),
        "region_caption": f'<p class="legend"><span style="background:{_rgb(TRUE_BOX_COLOR)}"></span>region given</p>',
    }
    for task, title in TASK_TITLES.items():
        body = "".join(_card_html(card, wide=task == "text_to_image") for card in cards.get(task, []))
        sections.append(
            f'<section id="{task}"><h2>{_esc(title)}</h2>{legends.get(task, "")}<div class="cards">{body}</div></section>'
        )
    if curves is not None:
        curve_html = f'<img class="curves" src="{_esc(curves)}" alt="training curves">'
    else:
        curve_html = "<p>No training curves: no log was given or found next to the model folder.</p>"
    notes_html = "".join(f"<p class='meta'>{_esc(note)}</p>" for note in notes)
    generated = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Unifier gallery: {_esc(model_name)}</title>
<style>{PAGE_STYLE}</style>
</head>
<body>
<h1>Unifier gallery</h1>
<p class="meta">model {_esc(model_name)} &middot; shapes world {_esc(split)} scenes 0 to {n - 1} &middot; written {_esc(generated)}</p>
<nav>{nav} <a href="#curves">Training curves</a></nav>
<h2>On these scenes</h2>
<table class="summary"><tr><th>task</th><th>right / shown</th></tr>{"".join(rows)}</table>
<p class="meta">A handful of examples to look at, not an evaluation: run <code>unifier evaluate</code> for the metrics.</p>
{"".join(sections)}
<section id="curves"><h2>Training curves</h2>{curve_html}{notes_html}</section>
</body>
</html>
"""


GALLERY_MARKER = ".unifier-gallery"  # marks a folder this module wrote, so that only such a folder is replaced


def _replace_folder(new: Path, out_dir: Path) -> None:
    """Rename `new` to `out_dir`, replacing a gallery written before (never any other folder)."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"gallery: --out {out_dir} exists and is not a folder")
        if any(out_dir.iterdir()) and not (out_dir / GALLERY_MARKER).is_file():
            raise FileExistsError(
                f"gallery: --out {out_dir} is a non-empty folder that is not a gallery; give a new or empty folder"
            )
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.rename(out_dir, old)
        os.rename(new, out_dir)
        shutil.rmtree(old)
    else:
        os.rename(new, out_dir)


def write_gallery(
    unifier: Any,
    out_dir: str | Path,
    n: int = 8,
    log_path: str | Path | None = None,
    split: str = "val",
    image_size: int | None = None,
    model_name: str | None = None,
) -> Path:
    """Write the gallery folder (index.html, panels/*.png, curves.png) and return the path of index.html.

    log_path: a training log (JSON lines) to plot; None looks for log.jsonl next to the model's folder
    (`unifier.model_dir` when the model knows it). Where the run fine-tuned another (`init_from` in the config.yaml
    beside its log), that run's log is plotted before it, and so on back to the first stage. image_size: of the scenes; None: the model's own.
    """
    if n < 1:
        raise ValueError(f"gallery: n must be at least 1, got {n}")
    out_dir = Path(out_dir)
    model_dir = getattr(unifier, "model_dir", None)
    if log_path is None and model_dir is not None:
        log_path = find_log(model_dir)
    if log_path is not None and not Path(log_path).is_file():
        raise FileNotFoundError(f"gallery: training log {log_path} does not exist")
    image_size = image_size or int(getattr(unifier, "image_size", 64))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        cards = gallery_cards(unifier, PanelWriter(staging / "panels"), n, split, image_size)
        curves, notes = None, []
        if log_path is not None:
            stages, chain_notes = stage_logs(log_path)
            entries = [entry for stage in stages for entry in _shift_steps(stage.entries, stage.step_offset)]
            series = log_series(entries)
            if series:
                plot_curves(series, staging / "curves.png", [stage.step_offset for stage in stages[1:]])
                curves = "curves.png"
            notes += [describe_stages(stages), *chain_notes]
            if not series:
                notes.append("the log holds no numeric loss or validation series with a step")
        name = model_name or (str(model_dir) if model_dir is not None else type(unifier).__name__)
        (staging / "index.html").write_text(render_page(cards, curves, notes, name, split, n), encoding="utf-8")
        (staging / GALLERY_MARKER).write_text("written by unifier.gallery\n", encoding="utf-8")
        _replace_folder(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir / "index.html"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="unifier gallery", description="write a static HTML gallery of a model's outputs on shapes-world scenes"
    )
    parser.add_argument("--model", required=True, help="a model folder written by training (from_pretrained)")
    parser.add_argument("--out", required=True, help="the gallery folder to write (replaced if it holds a gallery)")
    parser.add_argument("--n", type=int, default=8, help="scenes per task (default 8)")
    parser.add_argument("--log", default=None, help="training log to plot (default: log.jsonl next to the model)")
    parser.add_argument("--split", default="val", choices=("train", "val", "test"), help="shapes world split")
    args = parser.parse_args(argv)
    if not Path(args.model).is_dir():
        print(f"unifier gallery: model folder {args.model} does not exist", file=sys.stderr)
        return 2
    if args.log is not None and not Path(args.log).is_file():
        print(f"unifier gallery: training log {args.log} does not exist", file=sys.stderr)
        return 2
    log_path = args.log if args.log is not None else find_log(args.model)
    from unifier.predict import PredictError, Unifier

    try:
        unifier = Unifier.from_pretrained(args.model)
        index = write_gallery(unifier, args.out, n=args.n, log_path=log_path, split=args.split, model_name=args.model)
    except (FileExistsError, FileNotFoundError, PredictError, ValueError) as err:
        print(f"unifier gallery: {err}", file=sys.stderr)
        return 2
    print(f"gallery written: {index} (open it in a browser: file://{index.resolve()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
