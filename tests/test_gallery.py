"""The static gallery: page structure, panels, escaping, training curves, atomic replacement, the CLI on a real model."""

from __future__ import annotations

import json
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import CHROMIUM, require_chromium
from PIL import Image

from unifier.data.shapes import make_scene, scene_records
from unifier.gallery import (
    GALLERY_MARKER,
    PREDICTED_BOX_COLOR,
    TASK_TITLES,
    TEXT_TO_IMAGE_SAMPLES,
    TRUE_BOX_COLOR,
    Card,
    Line,
    box_iou,
    draw_boxes,
    log_series,
    main,
    plot_curves,
    read_log,
    render_page,
    series_colors,
    stage_logs,
    write_gallery,
)
from unifier.tasks.base import BoxOutput, ImageOutput, TextOutput

REPO = Path(__file__).resolve().parents[1]

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


class PageParser(HTMLParser):
    """Collects the ids of sections and the sources of images of a page."""

    def __init__(self):
        super().__init__()
        self.section_ids: list[str] = []
        self.image_sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.section_ids.append(attrs.get("id"))
        if tag == "img":
            self.image_sources.append(attrs.get("src"))


def parse_page(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def write_log(path: Path, steps: int = 60) -> Path:
    """A training log in the JSON-lines shape unifier.train writes (task_loss, val_loss), plus validation
    metrics entries and one unreadable line."""
    with open(path, "w", encoding="utf-8") as log:
        for step in range(5, steps + 1, 5):
            losses = {task: 4.0 / (1 + step / (10 + k)) for k, task in enumerate(TASK_TITLES)}
            entry = {
                "step": step,
                "loss": sum(losses.values()) / 6,
                "lr": 1e-3,
                "grad_norm": 1.5,
                "samples_per_s": 70.0,
            }
            log.write(json.dumps({**entry, "tokens_per_s": 4000.0, "task_loss": losses}) + "\n")
            if step % 20 == 0:
                log.write(json.dumps({"step": step, "val_loss": {"vqa": 3.0 / step, "caption": 5.0 / step}}) + "\n")
                metrics = {"vqa": {"accuracy": step / steps}, "grounding": {"acc@0.5": step / 80}}
                log.write(json.dumps({"step": step, "split": "val", "metrics": metrics}) + "\n")
        log.write("{truncated line\n")
    return path


class ShapesOracle:
    """A stand-in predictor that answers every shapes-world prompt from the scene's truth (to test the marks)."""

    image_size = 64

    def __init__(self, n_scenes: int):
        self.scenes = [make_scene("val", i) for i in range(n_scenes)]

    def _scene(self, image):
        return next(s for s in self.scenes if np.array_equal(s.render(), np.asarray(image)))

    def predict(self, image=None, prompt=None, task=None, samples=None, **options):
        """Unifier.predict's calling convention: a list of prompts (and of images) gives a list of outputs."""
        if isinstance(prompt, list):
            images = image if isinstance(image, list) else [image] * len(prompt)
            return [self.predict_one(i, p, task, samples) for i, p in zip(images, prompt, strict=True)]
        return self.predict_one(image, prompt, task, samples)

    def predict_one(self, image, prompt, task, samples):
        if task == "text_to_image":
            scene = next(s for s in self.scenes if prompt.endswith(s.canonical_caption))
            return [ImageOutput(codes=(), image=Image.fromarray(scene.render())) for _ in range(samples)]
        scene = self._scene(image)
        quoted = re.search(r'" (.*) "', prompt)
        if task == "caption":
            return TextOutput(scene.captions()[2])
        if task == "vqa":
            return TextOutput(next(r.answer for r in scene_records(scene, "vqa") if r.question == prompt.strip()))
        if task == "grounding":
            obj = next(o for o in scene.objects if quoted.group(1) in (o.phrase, o.expression))
            return BoxOutput(tuple(float(v) for v in obj.box))
        if task == "region_caption":
            box = tuple(int(v) for v in prompt.rpartition("region: ")[2].split(","))
            return TextOutput(next(o.phrase for o in scene.objects if tuple(o.box) == box))
        if task == "entailment":
            return TextOutput(
                next(r.label for r in scene_records(scene, "entailment") if r.hypothesis == quoted.group(1))
            )
        raise AssertionError(f"unexpected task {task}")


def test_a_perfect_predictor_gets_every_mark_right(tmp_path):
    index = write_gallery(ShapesOracle(3), tmp_path / "gallery", n=3, log_path=write_log(tmp_path / "log.jsonl"))
    page = index.read_text(encoding="utf-8")
    assert "&#10007;" not in page  # no wrong mark anywhere
    # the summary table: caption 3, vqa 3 x 3 questions (every scene has >= 3), grounding 3, region 3,
    # entailment 3 x 3 labels, text-to-image 3 prompts
    for title, right in zip(TASK_TITLES.values(), (3, 9, 3, 3, 9, 3), strict=True):
        assert f"<td>{title}</td><td>{right} / {right}</td>" in page
    assert "1 unreadable lines skipped" in page


def test_text_to_image_samples_are_drawn_as_the_model_decodes(tmp_path):
    asked = []

    class Recording(ShapesOracle):
        def predict(self, image=None, prompt=None, task=None, samples=None, **options):
            asked.append((task, samples, options))
            return super().predict(image, prompt, task, samples, **options)

    write_gallery(Recording(2), tmp_path / "gallery", n=2, log_path=write_log(tmp_path / "log.jsonl"))
    # Only how many and a fixed seed: top_k and the rest are the model folder's (decoding.json, as evaluated).
    ((_, samples, options),) = [a for a in asked if a[0] == "text_to_image"]
    assert samples == TEXT_TO_IMAGE_SAMPLES and options == {"seed": 0}


def test_a_wrong_predictor_gets_wrong_marks_with_the_truth(tmp_path):
    class Wrong(ShapesOracle):
        def predict_one(self, image, prompt, task, samples):
            if task == "grounding":
                return BoxOutput((0.0, 0.0, 2.0, 2.0))
            if task == "text_to_image":
                blank = np.full((64, 64, 3), 238, dtype=np.uint8)
                return [ImageOutput(codes=(), image=Image.fromarray(blank))] * samples
            return TextOutput("nothing")

    page = write_gallery(Wrong(2), tmp_path / "gallery", n=2).read_text(encoding="utf-8")
    assert "&#10003;" not in page
    assert "(true: there is" not in page  # the canonical caption is the one shown as the truth
    assert f"(true: {make_scene('val', 0).canonical_caption})" in page
    assert "No training curves" in page


def test_log_series_groups_losses_and_validation_metrics(tmp_path):
    entries, skipped = read_log(write_log(tmp_path / "log.jsonl"))
    assert skipped == 1 and len(entries) == 12 + 3 + 3
    series = log_series(entries)
    assert set(series) == {"training loss", "validation loss", "validation metrics"}
    assert set(series["training loss"]) == {"loss", *(f"task_loss/{task}" for task in TASK_TITLES)}
    assert set(series["validation loss"]) == {"val_loss/vqa", "val_loss/caption"}
    assert set(series["validation metrics"]) == {"metrics/vqa/accuracy", "metrics/grounding/acc@0.5"}
    assert series["validation loss"]["val_loss/vqa"] == [(20.0, 0.15), (40.0, 0.075), (60.0, 0.05)]
    # learning rate, gradient norm and throughput are not curves of the page
    names = {name for curves in series.values() for name in curves}
    assert not names & {"lr", "grad_norm", "samples_per_s", "tokens_per_s"}
    colors = series_colors(series)
    assert (
        colors["task_loss/vqa"] == colors["val_loss/vqa"] and colors["task_loss/caption"] == colors["val_loss/caption"]
    )
    assert len({colors[name] for name in series["training loss"]}) == len(series["training loss"])
    many = {"training loss": {f"task_loss/task{i}": [(1.0, 1.0)] for i in range(14)}}
    assert len(set(series_colors(many).values())) == 14  # past the ten-color cycle too
    png = plot_curves(series, tmp_path / "curves.png")
    with Image.open(png) as image:
        assert image.width > 3 * image.height / 2  # one row of three plots


def write_stage(run_dir: Path, steps: int, init_from: Path | None) -> Path:
    """A fine-tuning stage's run folder as train.py leaves it: log.jsonl beside a config.yaml naming its init_from."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"steps: {steps}\ninit_from: {'null' if init_from is None else init_from}\n")
    return write_log(run_dir / "log.jsonl", steps)


def test_a_fine_tuned_run_s_curves_follow_those_of_the_runs_it_started_from(tmp_path):
    write_stage(tmp_path / "base", 60, None)
    write_stage(tmp_path / "stage2", 40, tmp_path / "base" / "model")
    last = write_stage(tmp_path / "stage3", 20, tmp_path / "stage2" / "model")
    stages, notes = stage_logs(last)
    assert [stage.path.parent.name for stage in stages] == ["base", "stage2", "stage3"]
    assert [stage.step_offset for stage in stages] == [0, 60, 100] and notes == []
    index = write_gallery(ShapesOracle(2), tmp_path / "gallery", n=2, log_path=last)
    page = index.read_text(encoding="utf-8")
    assert "from step 60, fine-tuning the run before" in page and "from step 100," in page
    assert (tmp_path / "gallery" / "curves.png").is_file()
    series = log_series([{**e, "step": e["step"] + s.step_offset} for s in stages for e in s.entries])
    assert [step for step, _ in series["validation loss"]["val_loss/vqa"]] == [20, 40, 60, 80, 100, 120]

    # A stage whose earlier log is gone plots from itself and says so; a loop of init_froms ends.
    (tmp_path / "base" / "log.jsonl").unlink()
    stages, notes = stage_logs(tmp_path / "stage2" / "log.jsonl")
    assert len(stages) == 1 and "is not there" in notes[0] and str(tmp_path / "base" / "log.jsonl") in notes[0]
    write_stage(tmp_path / "a", 10, tmp_path / "b" / "model")
    write_stage(tmp_path / "b", 10, tmp_path / "a" / "model")
    stages, _ = stage_logs(tmp_path / "a" / "log.jsonl")
    assert [stage.path.parent.name for stage in stages] == ["b", "a"]
    (tmp_path / "a" / "config.yaml").write_text("init_from: [unclosed\n")
    stages, notes = stage_logs(tmp_path / "a" / "log.jsonl")
    assert len(stages) == 1 and "not readable YAML" in notes[0]


def test_log_series_reads_validation_by_key_names_too():
    entries = [{"step": 10, "train_loss_vqa": 1.0}, {"step": 10, "val_loss_vqa": 2.0, "val_accuracy_vqa": 0.5}]
    series = log_series(entries)
    assert series["training loss"] == {"train_loss_vqa": [(10.0, 1.0)]}
    assert series["validation loss"] == {"val_loss_vqa": [(10.0, 2.0)]}
    assert series["validation metrics"] == {"val_accuracy_vqa": [(10.0, 0.5)]}
    assert log_series([{"loss": 1.0}]) == {}  # no step: nothing to plot against


def test_every_text_is_escaped():
    cards = {
        "caption": [
            Card("<b>title</b>", [("panels/a&b.png", '"alt"')], [Line("<i>", "<script>x</script>", "<u>", False)])
        ]
    }
    page = render_page(cards, None, ["<note>"], "<model>", "val", 1)
    assert "<script>" not in page and "<b>title" not in page and "<note>" not in page and "<model>" not in page
    assert "&lt;script&gt;x&lt;/script&gt;" in page and "(true: &lt;u&gt;)" in page
    assert 'src="panels/a&amp;b.png"' in page


def test_draw_boxes_outlines_each_box_in_its_color():
    image = np.full((64, 64, 3), 238, dtype=np.uint8)
    panel = np.asarray(draw_boxes(image, [((8, 8, 24, 24), TRUE_BOX_COLOR), ((40, 40, 60, 56), PREDICTED_BOX_COLOR)]))
    assert panel.shape == (192, 192, 3)
    assert tuple(panel[24, 30]) == TRUE_BOX_COLOR  # top edge of the first box, scaled by 3
    assert tuple(panel[130, 120]) == PREDICTED_BOX_COLOR  # left edge of the second
    assert tuple(panel[48, 48]) == (238, 238, 238)  # inside stays as it was
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_only_a_gallery_folder_is_replaced_and_nothing_half_written_is_left(tmp_path):
    precious = tmp_path / "model"
    precious.mkdir()
    (precious / "weights.safetensors").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a gallery"):
        write_gallery(ShapesOracle(1), precious, n=1)
    assert (precious / "weights.safetensors").read_text() == "keep me"

    out = tmp_path / "gallery"
    write_gallery(ShapesOracle(1), out, n=1)
    (out / "stale.png").write_text("from an older gallery")
    write_gallery(ShapesOracle(1), out, n=1)
    assert (out / GALLERY_MARKER).is_file() and not (out / "stale.png").exists()

    class Failing(ShapesOracle):
        def predict_one(self, image, prompt, task, samples):
            if task == "entailment":
                raise RuntimeError("model crashed")
            return super().predict_one(image, prompt, task, samples)

    before = (out / "index.html").read_text()
    with pytest.raises(RuntimeError, match="model crashed"):
        write_gallery(Failing(1), out, n=1)
    assert (out / "index.html").read_text() == before  # the old gallery is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gallery", "model"]  # no temporary folder left


def screenshot(page: Path, png: Path, height: int = 2400) -> None:
    subprocess.run(
        [
            str(CHROMIUM),
            *CHROMIUM_FLAGS,
            f"--window-size=1280,{height}",
            f"--screenshot={png}",
            page.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def test_the_prompts_are_the_ones_predict_recognises():
    from unifier.gallery import region_text, task_prompt
    from unifier.predict import recognise_prompt

    assert recognise_prompt(task_prompt("caption")) == ("caption", {})
    assert recognise_prompt(task_prompt("grounding", "red circle")) == ("grounding", {"expression": "red circle"})
    assert recognise_prompt(task_prompt("region_caption")) == ("region_caption", {"region": ""})
    assert recognise_prompt(task_prompt("region_caption", region_text((4, 5.5, 20, 21)))) == (
        "region_caption",
        {"region": "4,5.5,20,21"},
    )
    assert recognise_prompt(task_prompt("entailment", "there is a red circle")) == (
        "entailment",
        {"hypothesis": "there is a red circle"},
    )
    assert recognise_prompt(task_prompt("text_to_image", "a small red circle")) == (
        "text_to_image",
        {"caption": "a small red circle"},
    )
    assert recognise_prompt(task_prompt("vqa", "how many shapes are there?"))[0] is None  # vqa: any other prompt
    with pytest.raises(ValueError, match="unknown task"):
        task_prompt("detection")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch
    from test_predict import build_model_folder

    from unifier.data.shapes import ANSWER_VOCAB

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model on a shared 2-core machine: threads cost more than the math
    yield build_model_folder(tmp_path_factory.mktemp("model") / "model", vqa_answers=list(ANSWER_VOCAB))
    torch.set_num_threads(threads)


def test_cli_writes_a_gallery_of_a_real_model_that_a_browser_renders(model_dir, tmp_path):
    log = write_log(model_dir.parent / "log.jsonl")  # found next to the model folder without --log
    out = tmp_path / "gallery"
    assert main(["--model", str(model_dir), "--out", str(out), "--n", "2"]) == 0
    index = out / "index.html"
    page = index.read_text(encoding="utf-8")
    parsed = parse_page(index)
    assert parsed.section_ids == [*TASK_TITLES, "curves"]
    assert "curves.png" in parsed.image_sources and str(log) in page
    # every panel: 2 scenes, 6 tasks (text-to-image: the true scene + 4 samples) and the curves
    assert len(parsed.image_sources) == 2 * (5 + 1 + 4) + 1
    for source in parsed.image_sources:
        assert not re.match(r"^[a-z]+:", source) and ".." not in source  # relative, inside the folder
        with Image.open(out / source) as image:
            assert image.format == "PNG" and image.width >= 64
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert {p.name for p in out.iterdir()} == {"index.html", "panels", "curves.png", GALLERY_MARKER}

    assert main(["--model", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert main(["--model", str(model_dir), "--out", str(out), "--log", str(tmp_path / "no.jsonl")]) == 2
    require_chromium("page not rendered")
    png = tmp_path / "gallery.png"
    screenshot(index, png)
    with Image.open(png) as shot:
        pixels = np.asarray(shot.convert("RGB"))
    assert pixels.shape[:2] == (2400, 1280)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # rendered panels and text, not a blank page
