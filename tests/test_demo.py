"""The Gradio demo in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright), plus its safe defaults.

The app serves a tiny randomly initialised model: its answers are nonsense, but they must be exactly what
`Unifier.predict` returns for the same image and prompt, and they must reach the page.
"""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
import torch
from conftest import CHROMIUM, require_chromium
from PIL import Image

from unifier.data.shapes import ANSWER_VOCAB, make_scene
from unifier.demo import MAX_UPLOAD_SIZE, DemoError, DemoModel, build_demo, launch_demo, main
from unifier.predict import Unifier
from unifier.tasks.base import ImageOutput

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000  # per browser wait: the machine is shared, a tiny model answers in well under a second
TABS = ("Caption", "VQA", "Grounding", "Region caption", "Entailment", "Text-to-image", "Free prompt")


@pytest.fixture(scope="module")
def unifier(tmp_path_factory):
    from test_predict import build_model_folder

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model on a shared 2-core machine: threads cost more than the math
    folder = build_model_folder(tmp_path_factory.mktemp("model") / "model", vqa_answers=list(ANSWER_VOCAB))
    yield Unifier.from_pretrained(folder, device="cpu")
    torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Recording:
    """The model as the app sees it, keeping the arguments of every predict call (to check what arrived)."""

    def __init__(self, unifier: Unifier):
        self.unifier, self.image_size, self.calls = unifier, unifier.image_size, []

    def predict(self, **arguments):
        self.calls.append(arguments)
        return self.unifier.predict(**arguments)


@pytest.fixture(scope="module")
def recording(unifier) -> Recording:
    return Recording(unifier)


@pytest.fixture(scope="module")
def served(recording):
    """(demo, url): the app served from a thread on 127.0.0.1 with the CLI's defaults."""
    demo = build_demo(recording)
    url = launch_demo(demo, port=free_port(), block=False)
    yield demo, url
    demo.close()


@pytest.fixture(scope="module")
def page(served):
    require_chromium("no browser to drive")
    from playwright.sync_api import sync_playwright

    _, url = served
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        yield page
        browser.close()


def wait_for_value(page, selector: str) -> str:
    """The value of a textbox once an answer has arrived in it."""
    page.wait_for_function(
        "selector => { const box = document.querySelector(selector); return box && box.value.length > 0; }",
        arg=selector,
    )
    return page.locator(selector).input_value()


def test_the_page_loads_with_a_tab_per_task_and_a_scene(page):
    page.locator("#scene-info").get_by_text("val scene 0").wait_for()  # filled on load by the app
    assert page.title() == "Unifier demo"
    for name in TABS:
        assert page.get_by_role("tab", name=name, exact=True).is_visible()
    assert page.locator("#examples img").count() == 8


def test_an_uploaded_scene_gets_the_models_vqa_answer(page, unifier, recording, tmp_path):
    image = make_scene("val", 5, image_size=64).render()
    png = tmp_path / "scene.png"
    Image.fromarray(image).save(png)
    page.locator("#image").get_by_role("button", name="Remove Image").click()
    page.locator("#image img").wait_for(state="detached")
    page.locator("#image input[type=file]").set_input_files(str(png))
    page.locator("#image img").wait_for()
    page.get_by_role("tab", name="VQA", exact=True).click()
    question = "what color is the small circle?"
    page.locator("#vqa-question textarea").fill(question)
    page.locator("#vqa-run").click()
    shown = wait_for_value(page, "#vqa-answer textarea")
    expected = unifier.predict(image=image, prompt=f" {question}", task="vqa").text
    assert shown in ANSWER_VOCAB
    assert shown == expected
    # the model saw exactly the uploaded pixels (PNG all the way, no lossy re-encoding on the way)
    assert recording.calls[-1]["task"] == "vqa" and np.array_equal(recording.calls[-1]["image"], image)
    page.screenshot(path=str(tmp_path / "vqa.png"), full_page=True)


def test_a_picked_scene_fills_the_tabs_and_grounding_draws_a_box(page, unifier, recording):
    page.locator("#scene-index input").fill("3")
    page.locator("#load-scene").click()
    page.locator("#scene-info").get_by_text("val scene 3").wait_for()
    scene = make_scene("val", 3, image_size=unifier.image_size)
    page.get_by_role("tab", name="Grounding", exact=True).click()
    assert page.locator("#grounding-text textarea").input_value() == scene.objects[0].expression
    page.locator("#grounding-run").click()
    page.locator("#grounding-image img").wait_for()
    shown = wait_for_value(page, "#grounding-box textarea")
    box = unifier.predict(
        image=scene.render(), prompt=f' which region does the text " {scene.objects[0].expression} " describe?'
    ).box
    assert shown == "(" + ", ".join(f"{v:.1f}" for v in box) + ")"
    assert np.array_equal(recording.calls[-1]["image"], scene.render())  # the scene came back from the page intact


def test_a_text_to_image_prompt_shows_generated_images(page, tmp_path):
    page.get_by_role("tab", name="Text-to-image", exact=True).click()
    page.locator("#t2i-caption textarea").fill("a large red circle and a small blue square")
    page.locator("#t2i-run").click()
    page.locator("#t2i-out img").first.wait_for()
    # four samples, each a decoded picture (an image still loading has naturalWidth 0)
    page.wait_for_function(
        "() => { const images = [...document.querySelectorAll('#t2i-out img')];"
        " return images.length === 4 && images.every(i => i.complete && i.naturalWidth > 0); }"
    )
    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    with Image.open(shot) as image:
        assert image.width == 1280 and len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 50


def test_the_server_is_local_caps_uploads_and_serves_no_other_files(served, tmp_path):
    demo, url = served
    assert url.startswith("http://127.0.0.1:")
    assert demo.share is False and demo.server_name == "127.0.0.1"
    assert demo.max_file_size == 5 * 1024 * 1024 and MAX_UPLOAD_SIZE == "5mb"
    secret = tmp_path / f"secret-{uuid.uuid4().hex}.txt"
    secret.write_text("not for the web")
    for path in (f"gradio_api/file={secret}", "gradio_api/file=/etc/passwd"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url + path, timeout=30)
        assert refused.value.code in (403, 404)
    too_big = b"x" * (6 * 1024 * 1024)
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + too_big
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        url + "gradio_api/upload", data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 413


def test_the_free_prompt_returns_each_kind_of_output(unifier):
    model = DemoModel(unifier)
    image = model.world.scene(1).render()
    text, box_image, images = model.free_prompt(image, True, " what does the image describe?")
    assert text == unifier.predict(image=image, prompt=" what does the image describe?").text
    assert box_image is None and images == []
    text, box_image, images = model.free_prompt(image, True, ' which region does the text " red circle " describe?')
    assert text.startswith("box (") and box_image.size == (384, 384) and images == []
    text, box_image, images = model.free_prompt(
        image, False, " what is the complete image? caption: a small red circle"
    )
    assert text == "1 generated image(s)" and box_image is None and len(images) == 1
    region_image, phrase = model.region_caption(image, 4, 4, 20, 20)
    assert phrase == unifier.predict(image=image, prompt=" what does the region describe?", box=(4, 4, 20, 20)).text
    outputs = model.text_to_image("a small red circle", 3, 7)
    again = unifier.predict(prompt=" what is the complete image? caption: a small red circle", samples=3, seed=7)
    assert len(outputs) == 3 and all(isinstance(o, ImageOutput) for o in again)
    assert [label for _, label in outputs] == [
        f"sample {j + 1} (rerank {o.rerank_score:.2f})" for j, o in enumerate(again)
    ]
    guided = model.text_to_image("a small red circle", 3, 7, 2000.0)
    prompt = " what is the complete image? caption: a small red circle"
    again = unifier.predict(prompt=prompt, samples=3, seed=7, guidance_scale=2000.0)
    assert [label for _, label in guided] == [
        f"sample {j + 1} (rerank {o.rerank_score:.2f})" for j, o in enumerate(again)
    ]


def test_bad_requests_are_clear_errors(unifier):
    model = DemoModel(unifier)
    with pytest.raises(DemoError, match="no image"):
        model.vqa(None, "how many shapes are there?")
    with pytest.raises(DemoError, match="no question"):
        model.vqa(model.world.scene(0).render(), "  ")
    with pytest.raises(DemoError, match="four coordinates"):
        model.region_caption(model.world.scene(0).render(), 1, 2, None, 4)
    with pytest.raises(DemoError, match="region"):  # x1 <= x0: predict's own message comes through
        model.region_caption(model.world.scene(0).render(), 20, 2, 10, 4)
    with pytest.raises(DemoError, match="0 or more"):
        model.scene(-1)


def test_main_refuses_a_missing_model_folder(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
