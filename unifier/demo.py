"""`unifier demo --model runs/shapes-tiny/model [--host 127.0.0.1] [--port 7860] [--share]`

A Gradio web app around one model: a tab per task (caption, VQA, grounding, region caption, entailment,
text-to-image) and a free-prompt tab. Upload an image or pick a shapes-world scene (by number, at
random, or from the example gallery); picking a scene also fills every tab with a question, an
expression, a region, a hypothesis and a caption of that scene, so each tab is one click away from an answer.

    from unifier.demo import build_demo, launch_demo
    demo = build_demo(Unifier.from_pretrained("runs/shapes-tiny/model"))
    url = launch_demo(demo, port=7860, block=False)     # serves on http://127.0.0.1:7860 until demo.close()

Safe defaults: bound to 127.0.0.1 (`--host 0.0.0.0` to serve a network), uploads capped at
MAX_UPLOAD_SIZE, no `allowed_paths` (the app serves only the files Gradio itself caches), no public
share link unless `--share`, no telemetry.
"""

from __future__ import annotations

import argparse
import functools
import random
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

try:
    import gradio as gr
except ImportError as err:  # gradio is the optional `demo` extra
    raise ImportError("unifier demo needs gradio: pip install 'unifier[demo]'") from err

from unifier.data.shapes import ShapesWorld
from unifier.gallery import (
    ENTAILMENT_WORDS,
    PANEL_SIZE,
    PREDICTED_BOX_COLOR,
    TRUE_BOX_COLOR,
    as_list,
    draw_boxes,
    enlarge,
    task_prompt,
)
from unifier.tasks.base import BoxOutput, ImageOutput, TextOutput

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
MAX_UPLOAD_SIZE = "5mb"
# Scenes are 64 px: show every image scaled up to its box with crisp pixels instead of as a thumbnail.
PAGE_CSS = """
#image img, #grounding-image img, #region-image img, #free-image img { width: 100%; height: 100%; object-fit: contain; }
img { image-rendering: pixelated; }
"""
EXAMPLE_SCENES = 8  # scenes in the example gallery
MAX_SAMPLES = 8  # text-to-image samples per click
SCENES_PER_SPLIT = 100_000  # the random scene button picks among scenes 0 .. this - 1


class DemoError(ValueError):
    """A request the demo cannot answer; its message is shown to the user."""


def _box_text(box: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in box) + ")"


class DemoModel:
    """The demo's calls into the model: one lock (one model, answered one request at a time) and clear errors."""

    def __init__(self, unifier: Any, split: str = "val", image_size: int | None = None):
        self.unifier = unifier
        self.world = ShapesWorld(split, image_size=image_size or int(getattr(unifier, "image_size", 64)))
        self.lock = threading.Lock()

    def predict(self, image: Any, prompt: str, task: str | None, **options: Any) -> Any:
        with self.lock:
            try:
                return self.unifier.predict(image=image, prompt=prompt, task=task, **options)
            except (ValueError, TypeError, FileNotFoundError) as err:
                raise DemoError(str(err)) from err

    @staticmethod
    def need_image(image: np.ndarray | None) -> np.ndarray:
        if image is None:
            raise DemoError("no image: upload one or pick a shapes scene first")
        return image

    @staticmethod
    def need_text(text: str | None, what: str) -> str:
        text = (text or "").strip()
        if not text:
            raise DemoError(f"no {what}: type one first")
        return text

    # ---- one method per tab: inputs as Gradio gives them, outputs as Gradio shows them ----
    def caption(self, image: np.ndarray | None) -> str:
        output = self.predict(self.need_image(image), task_prompt("caption"), "caption")
        return output.text

    def vqa(self, image: np.ndarray | None, question: str) -> str:
        question = self.need_text(question, "question")
        return self.predict(self.need_image(image), task_prompt("vqa", question), "vqa").text

    def grounding(self, image: np.ndarray | None, expression: str) -> tuple[Any, str]:
        expression = self.need_text(expression, "expression")
        image = self.need_image(image)
        output = self.predict(image, task_prompt("grounding", expression), "grounding")
        return draw_boxes(image, [(output.box, PREDICTED_BOX_COLOR)], size=2 * PANEL_SIZE), _box_text(output.box)

    def region_caption(self, image: np.ndarray | None, x0: float, y0: float, x1: float, y1: float) -> tuple[Any, str]:
        image = self.need_image(image)
        box = tuple(float(v) if v is not None else float("nan") for v in (x0, y0, x1, y1))
        if not all(np.isfinite(box)):
            raise DemoError("region: give all four coordinates x0, y0, x1, y1")
        output = self.predict(image, task_prompt("region_caption"), "region_caption", box=box)
        return draw_boxes(image, [(box, TRUE_BOX_COLOR)], size=2 * PANEL_SIZE), output.text

    def entailment(self, image: np.ndarray | None, hypothesis: str) -> str:
        hypothesis = self.need_text(hypothesis, "hypothesis")
        verdict = self.predict(self.need_image(image), task_prompt("entailment", hypothesis), "entailment").text
        return ENTAILMENT_WORDS.get(verdict, verdict)

    def text_to_image(
        self, caption: str, samples: float, seed: float, guidance: float | None = None
    ) -> list[tuple[Any, str]]:
        """guidance: classifier-free guidance scale (None or 1: none; needs a model trained with caption_dropout)."""
        caption = self.need_text(caption, "caption")
        samples = int(min(MAX_SAMPLES, max(1, samples or 1)))
        outputs = self.predict(
            None,
            task_prompt("text_to_image", caption),
            "text_to_image",
            samples=samples,
            seed=int(seed or 0),
            guidance_scale=None if guidance is None else float(guidance),
        )
        return [(enlarge(o.image, PANEL_SIZE), self._image_label(j, o)) for j, o in enumerate(as_list(outputs))]

    def free_prompt(self, image: np.ndarray | None, use_image: bool, prompt: str) -> tuple[str, Any, list]:
        """Any prompt; the task is recognised from it. Returns (text, image with a box, generated images)."""
        if not (prompt or "").strip():
            raise DemoError("no prompt: type one first")
        image = self.need_image(image) if use_image else None
        outputs = as_list(self.predict(image, prompt, None))
        first = outputs[0]
        if isinstance(first, TextOutput):
            return first.text, None, []
        if isinstance(first, BoxOutput):
            if image is None:
                return f"box {_box_text(first.box)}", None, []
            return (
                f"box {_box_text(first.box)}",
                draw_boxes(image, [(first.box, PREDICTED_BOX_COLOR)], 2 * PANEL_SIZE),
                [],
            )
        if isinstance(first, ImageOutput):
            return (
                f"{len(outputs)} generated image(s)",
                None,
                [(enlarge(o.image), self._image_label(j, o)) for j, o in enumerate(outputs)],
            )
        raise DemoError(f"unexpected output {type(first).__name__}")

    @staticmethod
    def _image_label(index: int, output: ImageOutput) -> str:
        label = f"sample {index + 1}"
        if output.rerank_score is not None:
            label += f" (rerank {output.rerank_score:.2f})"
        return label

    # ---- scenes ----
    def scene(self, index: float | None) -> tuple[Any, ...]:
        """Everything a picked scene fills: image, description, and one input per tab (see build_demo)."""
        index = int(index or 0)
        if index < 0:
            raise DemoError(f"scene number must be 0 or more, got {index}")
        scene = self.world.scene(index)
        image = scene.render()
        question = self.world.records("vqa", index)[0].question
        first = scene.objects[0]
        hypothesis = self.world.records("entailment", index)[0].hypothesis
        objects = ", ".join(f"{obj.phrase} at {obj.box}" for obj in scene.objects)
        info = f"**{self.world.split} scene {index}**: {objects}"
        return (index, image, info, question, first.expression, *first.box, hypothesis, scene.canonical_caption)


def _errors_to_gradio(fn):
    """Show a DemoError as Gradio's error toast instead of a generic failure."""

    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except DemoError as err:
            raise gr.Error(str(err)) from err

    return wrapper


def build_demo(unifier: Any, split: str = "val", image_size: int | None = None) -> Any:
    """The app as a `gr.Blocks` (not launched): a scene picker above one tab per task and a free-prompt tab."""
    model = DemoModel(unifier, split, image_size)
    examples = [(enlarge(model.world.scene(i).render(), 96), f"scene {i}") for i in range(EXAMPLE_SCENES)]
    with gr.Blocks(title="Unifier demo", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(
            "# Unifier\nOne encoder-decoder for captioning, VQA, grounding, region captioning, entailment and "
            f"text-to-image. Upload an image or pick a shapes-world `{split}` scene, then ask in any tab."
        )
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(
                    label="image",
                    type="numpy",
                    format="png",
                    sources=["upload", "clipboard"],
                    height=280,
                    elem_id="image",
                )
            with gr.Column(scale=1):
                with gr.Row():
                    scene_index = gr.Number(
                        label=f"{split} scene", value=0, precision=0, minimum=0, elem_id="scene-index"
                    )
                    load_button = gr.Button("load scene", elem_id="load-scene")
                    random_button = gr.Button("random scene", elem_id="random-scene")
                scene_info = gr.Markdown(elem_id="scene-info")
                example_gallery = gr.Gallery(
                    value=examples, label="shapes scenes (click one)", columns=4, rows=2, height=300, allow_preview=False,
                    object_fit="contain", format="png", elem_id="examples",
                )  # fmt: skip
        with gr.Tabs():
            with gr.Tab("Caption", id="caption"):
                caption_button = gr.Button("describe the image", variant="primary", elem_id="caption-run")
                caption_out = gr.Textbox(label="caption", elem_id="caption-out")
            with gr.Tab("VQA", id="vqa"):
                question = gr.Textbox(
                    label="question", placeholder="how many shapes are there?", elem_id="vqa-question"
                )
                vqa_button = gr.Button("answer", variant="primary", elem_id="vqa-run")
                vqa_out = gr.Textbox(label="answer", elem_id="vqa-answer")
            with gr.Tab("Grounding", id="grounding"):
                expression = gr.Textbox(
                    label="referring expression", placeholder="red circle", elem_id="grounding-text"
                )
                grounding_button = gr.Button("find it", variant="primary", elem_id="grounding-run")
                with gr.Row():
                    grounding_image = gr.Image(
                        label="predicted box", format="png", interactive=False, elem_id="grounding-image"
                    )
                    grounding_out = gr.Textbox(label="box (x0, y0, x1, y1) in pixels", elem_id="grounding-box")
            with gr.Tab("Region caption", id="region_caption"):
                with gr.Row():
                    corners = [gr.Number(label=name, precision=1) for name in ("x0", "y0", "x1", "y1")]
                region_button = gr.Button("describe the region", variant="primary", elem_id="region-run")
                with gr.Row():
                    region_image = gr.Image(label="region", format="png", interactive=False, elem_id="region-image")
                    region_out = gr.Textbox(label="region caption", elem_id="region-out")
            with gr.Tab("Entailment", id="entailment"):
                hypothesis = gr.Textbox(
                    label="hypothesis", placeholder="there is a red circle", elem_id="entailment-text"
                )
                entailment_button = gr.Button("does the image entail it?", variant="primary", elem_id="entailment-run")
                entailment_out = gr.Textbox(label="verdict", elem_id="entailment-out")
            with gr.Tab("Text-to-image", id="text_to_image"):
                t2i_caption = gr.Textbox(label="caption", placeholder="a small red circle", elem_id="t2i-caption")
                with gr.Row():
                    samples = gr.Slider(1, MAX_SAMPLES, value=4, step=1, label="samples", elem_id="t2i-samples")
                    seed = gr.Number(label="seed", value=0, precision=0, elem_id="t2i-seed")
                    guidance = gr.Number(label="guidance scale (1: none)", value=1.0, elem_id="t2i-guidance")
                t2i_button = gr.Button("generate", variant="primary", elem_id="t2i-run")
                t2i_out = gr.Gallery(
                    label="generated images", columns=MAX_SAMPLES // 2, format="png", elem_id="t2i-out"
                )
            with gr.Tab("Free prompt", id="free"):
                prompt = gr.Textbox(
                    label="prompt (the task is recognised from OFA's templates; anything else is free text)",
                    value=task_prompt("caption"), elem_id="free-prompt",
                )  # fmt: skip
                use_image = gr.Checkbox(label="with the image", value=True, elem_id="free-use-image")
                free_button = gr.Button("run", variant="primary", elem_id="free-run")
                free_text = gr.Textbox(label="output", elem_id="free-out")
                with gr.Row():
                    free_image = gr.Image(label="box", format="png", interactive=False, elem_id="free-image")
                    free_gallery = gr.Gallery(label="generated images", format="png", elem_id="free-gallery")

        scene_outputs = [scene_index, image, scene_info, question, expression, *corners, hypothesis, t2i_caption]
        load_scene = _errors_to_gradio(model.scene)
        load_button.click(load_scene, scene_index, scene_outputs)
        scene_index.submit(load_scene, scene_index, scene_outputs)
        random_button.click(lambda: load_scene(random.randrange(SCENES_PER_SPLIT)), None, scene_outputs)

        def pick_example(selected: gr.SelectData):
            return load_scene(selected.index)

        example_gallery.select(pick_example, None, scene_outputs)

        caption_button.click(_errors_to_gradio(model.caption), image, caption_out)
        vqa_button.click(_errors_to_gradio(model.vqa), [image, question], vqa_out)
        question.submit(_errors_to_gradio(model.vqa), [image, question], vqa_out)
        grounding_button.click(
            _errors_to_gradio(model.grounding), [image, expression], [grounding_image, grounding_out]
        )
        region_button.click(_errors_to_gradio(model.region_caption), [image, *corners], [region_image, region_out])
        entailment_button.click(_errors_to_gradio(model.entailment), [image, hypothesis], entailment_out)
        t2i_button.click(_errors_to_gradio(model.text_to_image), [t2i_caption, samples, seed, guidance], t2i_out)
        free_button.click(
            _errors_to_gradio(model.free_prompt), [image, use_image, prompt], [free_text, free_image, free_gallery]
        )
        demo.load(load_scene, scene_index, scene_outputs)
    return demo


def launch_demo(
    demo: Any, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, share: bool = False, block: bool = True
) -> str:
    """Serve the app with the safe defaults; returns its local URL (block=False: serve from a thread)."""
    demo.queue(default_concurrency_limit=1)
    _, local_url, share_url = demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=MAX_UPLOAD_SIZE,
        allowed_paths=None,
        show_error=True,
        prevent_thread_lock=not block,
        quiet=not block,
        css=PAGE_CSS,
    )
    if share_url:
        print(f"public share link (anyone with it can use the demo): {share_url}")
    return local_url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unifier demo", description="serve the Gradio web demo of a model")
    parser.add_argument("--model", required=True, help="a model folder written by training (from_pretrained)")
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine only)"
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    parser.add_argument(
        "--split", default="val", choices=("train", "val", "test"), help="shapes world split to pick from"
    )
    args = parser.parse_args(argv)
    if not Path(args.model).is_dir():
        print(f"unifier demo: model folder {args.model} does not exist", file=sys.stderr)
        return 2
    from unifier.predict import Unifier

    demo = build_demo(Unifier.from_pretrained(args.model), split=args.split)
    launch_demo(demo, host=args.host, port=args.port, share=args.share, block=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
