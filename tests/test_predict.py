"""Prompt-style inference on a tiny randomly initialised model folder: task recognition, typed outputs, CLI, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unifier.data.shapes import corpus, make_scene
from unifier.generation import DecodingOptions, encode_batch, generate
from unifier.predict import (
    FREE,
    TASK_NAMES,
    PredictError,
    Unifier,
    main,
    parse_region,
    prompt_fields,
    read_task_decoding,
    read_task_options,
    recognise_prompt,
    task_decoding_of,
    task_options_from_files,
    write_task_decoding,
    write_task_options,
)
from unifier.tasks import load_mixture, load_task_config
from unifier.tasks.base import BoxOutput, Example, ImageOutput, TextOutput


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models on a shared 2-core machine: torch's intra-op threads wait on each other far longer than
    # the math takes (measured 100x slower decoding under load), so these tests run single-threaded.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


REPO = Path(__file__).resolve().parents[1]
VQA_ANSWERS = ["yes", "no", "red", "blue", "two"]
IMAGE_SIZE = 32  # the model's input size; shapes scenes are 64 px and get resized
TINY_MODEL = dict(
    d_model=32,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=80,
    image_size=IMAGE_SIZE,
    patch_size=8,
    dropout=0.0,
)


def build_model_folder(folder: Path, vqa_answers=VQA_ANSWERS) -> Path:
    """A complete model folder (config.json, model.safetensors, tokenizer/, tasks.json) of random weights."""
    from unifier.modeling import build_model
    from unifier.tokenization import UnifierTokenizer
    from unifier.tokenization.image_tokenizer import ImageTokenizer
    from unifier.tokenization.text import train_text_model
    from unifier.tokenization.vocab import UnifierVocab

    torch.manual_seed(0)
    sp = train_text_model(corpus(0, 30), folder.parent / f"{folder.name}-text.model", vocab_size=500)
    ddconfig = dict(
        ch=32,
        out_ch=3,
        ch_mult=[1, 1, 1],
        num_res_blocks=1,
        attn_resolutions=[],
        in_channels=3,
        resolution=16,
        z_channels=4,
    )
    image_tokenizer = ImageTokenizer(ddconfig, n_embed=24, embed_dim=4).eval()  # 16 px images as 4 x 4 codes
    vocab = UnifierVocab(sp, num_bins=32, num_codes=24)
    model = build_model(TINY_MODEL, vocab)
    model.save_pretrained(folder)
    UnifierTokenizer(vocab, image_tokenizer).save(folder / "tokenizer")
    write_task_options(folder, {"vqa": {"answers": vqa_answers}} if vqa_answers else {})
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_model_folder(tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def unifier(model_dir) -> Unifier:
    return Unifier.from_pretrained(model_dir, device="cpu")


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "scene.png"
    Image.fromarray(make_scene("val", 2).render()).save(path)
    return path


@pytest.mark.parametrize(
    ("prompt", "task", "fields"),
    [
        (" what does the image describe?", "caption", {}),
        ("What does the image describe", "caption", {}),
        (' which region does the text " red circle " describe?', "grounding", {"expression": "red circle"}),
        ('which region does the text "the  big dog" describe?', "grounding", {"expression": "the big dog"}),
        (" what does the region describe? region: 1,2,30,40", "region_caption", {"region": "1,2,30,40"}),
        (" what does the region describe? region:", "region_caption", {"region": ""}),
        (" what does the region describe?", "region_caption", {"region": ""}),
        (' does the image describe " there is a red circle "?', "entailment", {"hypothesis": "there is a red circle"}),
        (
            " what is the complete image? caption: a small red circle",
            "text_to_image",
            {"caption": "a small red circle"},
        ),
        (" what color is the small circle?", None, {}),
        ("hello there", None, {}),
    ],
)
def test_prompts_are_recognised_by_their_templates(prompt, task, fields):
    assert recognise_prompt(prompt) == (task, fields)


def test_named_tasks_take_the_template_field_or_the_whole_prompt():
    assert prompt_fields("grounding", ' which region does the text " red circle " describe?') == {
        "expression": "red circle"
    }
    assert prompt_fields("grounding", "red  circle") == {"expression": "red circle"}
    assert prompt_fields("vqa", " what color is it?") == {"question": "what color is it?"}
    assert prompt_fields("text_to_image", "a small red circle") == {"caption": "a small red circle"}
    assert prompt_fields("caption", "anything") == {}


def test_regions_in_pixels_or_bins(unifier):
    vocab = unifier.vocab
    assert parse_region("1, 2, 30.5, 40", vocab, 64, 64) == (1.0, 2.0, 30.5, 40.0)
    assert parse_region("(1,2,30,40)", vocab, 64, 64) == (1.0, 2.0, 30.0, 40.0)
    assert parse_region("<bin_0> <bin_0> <bin_31> <bin_31>", vocab, 64, 64) == (1.0, 1.0, 63.0, 63.0)
    assert parse_region("", vocab, 64, 64) is None
    with pytest.raises(PredictError, match="x0,y0,x1,y1"):
        parse_region("the left half", vocab, 64, 64)
    with pytest.raises(PredictError, match="32 bins"):
        parse_region("<bin_0> <bin_0> <bin_40> <bin_40>", vocab, 64, 64)


def test_model_folder_tasks_file(model_dir, tmp_path):
    assert read_task_options(model_dir) == {"vqa": {"answers": VQA_ANSWERS}}
    assert read_task_options(tmp_path) == {}
    (tmp_path / "tasks.json").write_text('{"pose": {}}')
    with pytest.raises(PredictError, match="unknown task kind"):
        read_task_options(tmp_path)
    with pytest.raises(PredictError, match="not a model folder"):
        Unifier.from_pretrained(tmp_path)


def test_every_task_returns_its_typed_output(unifier, scene_png):
    scene = np.asarray(Image.open(scene_png))
    caption = unifier.predict(image=scene_png, prompt=" what does the image describe?")
    assert isinstance(caption, TextOutput) and caption.score < 0
    answer = unifier.predict(image=scene, prompt=" what color is the small circle?")
    assert isinstance(answer, TextOutput) and answer.text in VQA_ANSWERS  # vqa: the trie keeps it in the set
    box = unifier.predict(image=Image.open(scene_png), prompt=' which region does the text " red circle " describe?')
    assert isinstance(box, BoxOutput)
    assert all(0 <= v <= 64 for v in box.box)  # pixels of the 64 px input, not of the model's 32 px view
    for kwargs in (
        {"prompt": " what does the region describe? region: 1,2,30,40"},
        {"prompt": "", "box": (1, 2, 30, 40)},
    ):
        region = unifier.predict(image=scene, task="region_caption", **kwargs)
        assert isinstance(region, TextOutput)
    verdict = unifier.predict(image=scene, prompt=' does the image describe " there is a red circle "?')
    assert verdict.text in ("yes", "no", "maybe")
    free = unifier.predict(prompt=" tell me a story")
    assert isinstance(free, TextOutput)


def test_text_to_image_samples_are_reranked_by_the_caption_likelihood(unifier):
    prompt = " what is the complete image? caption: a small red circle"
    samples = unifier.predict(prompt=prompt, samples=3, seed=0, top_k=8)
    assert len(samples) == 3 and all(isinstance(s, ImageOutput) for s in samples)
    assert all(len(s.codes) == 16 and s.image.size == (16, 16) for s in samples)
    reranks = [s.rerank_score for s in samples]
    assert reranks == sorted(reranks, reverse=True) and all(r < 0 for r in reranks)
    again = unifier.predict(prompt=prompt, samples=3, seed=0, top_k=8)
    assert [s.codes for s in again] == [s.codes for s in samples]
    single = unifier.predict(prompt=prompt, beams=2)
    assert isinstance(single, ImageOutput) and single.rerank_score is None

    # Guidance contrasts the caption with the bare instruction. Random weights tell the two apart by ~1e-4 in log-prob,
    # so the scale is huge: the same seed then draws other images, exactly those of a direct guided generate call.
    guided = unifier.predict(prompt=prompt, samples=3, seed=0, top_k=8, guidance_scale=2000.0)
    assert len(guided) == 3 and all(len(s.codes) == 16 for s in guided)
    assert {s.codes for s in guided} != {s.codes for s in samples}
    task = unifier.task("text_to_image")
    bare = Example("text_to_image", task.encode_prompt(" what is the complete image? caption:"), None, [2])
    encoded = [encode_batch(unifier.model, unifier.collator([e])) for e in (unifier.request(prompt).example, bare)]
    options = DecodingOptions(samples=3, seed=0, top_k=8, guidance_scale=2000.0)
    direct = generate(unifier.model, *encoded[0], [task.constraint()], unifier.vocab, options, encoded[1])[0]
    assert {tuple(unifier.vocab.codes_of(h.ids)) for h in direct} == {s.codes for s in guided}
    unguided = unifier.predict(prompt=prompt, samples=3, seed=0, top_k=8, guidance_scale=1.0)
    assert [s.codes for s in unguided] == [s.codes for s in samples]


def test_bf16_runs_the_model_and_the_image_decoder_in_bf16_and_keeps_the_weights(model_dir, scene_png):
    """Under bf16 the model's matrix products and the VQ-GAN decoder's convolutions run in bf16 (what makes it
    faster), the weights stay fp32, and answer scores stay within bf16's rounding of the fp32 model's."""
    fp32, bf16 = (Unifier.from_pretrained(model_dir, device="cpu", bf16=flag) for flag in (False, True))
    seen: dict[str, set] = {"lm_head": set(), "decoder_conv": set()}
    hooks = [
        bf16.model.lm_head.register_forward_hook(lambda m, i, out: seen["lm_head"].add(out.dtype)),
        bf16.image_tokenizer.decoder.conv_out.register_forward_hook(
            lambda m, i, out: seen["decoder_conv"].add(out.dtype)
        ),
    ]
    prompt = " what is the complete image? caption: a small red circle"
    images = bf16.predict(prompt=prompt, samples=2, seed=0, top_k=8)
    assert all(isinstance(s, ImageOutput) and s.image.size == (16, 16) for s in images)
    assert seen == {"lm_head": {torch.bfloat16}, "decoder_conv": {torch.bfloat16}}
    for hook in hooks:
        hook.remove()
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    question = " what color is the small circle?"
    scored = [u.predict(image=scene_png, prompt=question, closed_set="score", num_return=5) for u in (fp32, bf16)]
    fp32_scores, bf16_scores = ({a.text: a.score for a in answers} for answers in scored)
    assert set(fp32_scores) == set(VQA_ANSWERS)
    assert bf16_scores == pytest.approx(fp32_scores, abs=0.05)  # bf16 keeps ~3 significant digits
    assert torch.is_autocast_enabled("cpu") is False  # the autocast ends with the call


def test_a_batch_of_mixed_prompts_answers_like_single_calls(unifier, scene_png):
    prompts = [
        " what color is the small circle?",
        ' which region does the text " red circle " describe?',
        " is there a blue square?",
        ' does the image describe " there are two shapes "?',
    ]
    batch = unifier.predict(image=scene_png, prompt=prompts, beams=3, batch_size=2)
    singles = [unifier.predict(image=scene_png, prompt=p, beams=3) for p in prompts]
    assert [type(b) for b in batch] == [TextOutput, BoxOutput, TextOutput, TextOutput]
    for b, s in zip(batch, singles, strict=True):
        assert b.score == pytest.approx(s.score, abs=1e-3)
        assert (b.text == s.text) if isinstance(b, TextOutput) else b.box == pytest.approx(s.box)


def test_closed_sets_can_be_scored_exhaustively(unifier, scene_png):
    ranked = unifier.predict(image=scene_png, prompt=" is it red?", closed_set="score", num_return=3)
    beams = unifier.predict(image=scene_png, prompt=" is it red?", beams=len(VQA_ANSWERS), num_return=3)
    assert [r.text for r in ranked] == [b.text for b in beams]
    assert [r.score for r in ranked] == pytest.approx([b.score for b in beams], abs=1e-3)


def test_the_model_folders_decoding_is_each_tasks_default(tmp_path, scene_png, monkeypatch, capsys):
    folder = build_model_folder(tmp_path / "model")
    decoding = {
        "text_to_image": {"do_sample": True, "top_k": 8, "num_candidates": 3},
        "vqa": {"num_beams": 1, "closed_set": "score"},
    }
    write_task_decoding(folder, decoding)
    assert read_task_decoding(folder) == decoding
    unifier = Unifier.from_pretrained(folder, device="cpu")
    prompt = " what is the complete image? caption: a small red circle"
    # The folder's 3 candidates at top_k 8, reranked: one image, the best of the three an explicit call returns.
    best = unifier.predict(prompt=prompt, seed=0)
    three = unifier.predict(prompt=prompt, samples=3, top_k=8, seed=0)
    assert isinstance(best, ImageOutput) and best.codes == three[0].codes and best.rerank_score is not None
    assert [s.codes for s in unifier.predict(prompt=prompt, samples=3, seed=0)] == [s.codes for s in three]
    wider = unifier.predict(prompt=prompt, samples=3, top_k=24, seed=0)  # the call's options win
    assert [s.codes for s in wider] != [s.codes for s in three]
    ranked = unifier.predict(image=scene_png, prompt=" is it red?", num_return=3)
    exhaustive = unifier.predict(image=scene_png, prompt=" is it red?", closed_set="score", num_return=3)
    assert [r.score for r in ranked] == pytest.approx([r.score for r in exhaustive], abs=1e-6)
    # A task file given at load time replaces the folder's decoding of its task; the other tasks keep theirs.
    with_file = Unifier.from_pretrained(folder, device="cpu", task_files=[REPO / "tasks/shapes/text_to_image.yaml"])
    assert with_file.decoding("text_to_image")[0].top_k == 32 and with_file.decoding("vqa")[1] == "score"
    assert unifier.decoding("caption") == (DecodingOptions(), "beam")  # not in the folder: the defaults

    monkeypatch.chdir(tmp_path)
    assert main(["--model", str(folder), "--prompt", prompt, "--seed", "0", "--out", "one.png"]) == 0
    assert "wrote 1 generated image(s)" in capsys.readouterr().out
    assert list(np.asarray(Image.open("one.png")).shape) == [16, 16, 3]

    (folder / "decoding.json").write_text('{"vqa": {"num_beam": 3}}')
    with pytest.raises(PredictError, match=r"vqa decoding: .*unknown key\(s\) \['num_beam'\]"):
        Unifier.from_pretrained(folder, device="cpu")


def test_decoding_of_the_shapes_mixture():
    decoding = task_decoding_of([c for c, _ in load_mixture(REPO / "tasks/shapes/mixture.yaml")])
    assert set(decoding) == set(TASK_NAMES) and decoding["vqa"] == {"num_beams": 1, "closed_set": "beam"}
    assert decoding["text_to_image"] == {"do_sample": True, "num_candidates": 4, "top_k": 32, "closed_set": "beam"}
    overridden = task_decoding_of([c for c, _ in load_mixture(REPO / "tasks/shapes/mixture.yaml")], {
        "text_to_image": {"samples": 16, "guidance_scale": 3.0}
    })  # fmt: skip
    assert overridden["text_to_image"]["num_candidates"] == 16 and overridden["text_to_image"]["guidance_scale"] == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image": "missing.png", "prompt": " what does the image describe?"}, "missing.png"),
        ({"image": "SCENE", "prompt": " what is the complete image? caption: a red circle"}, "takes no image"),
        ({"prompt": " what does the image describe?"}, "needs an image"),
        ({"image": "SCENE", "prompt": "   "}, "empty"),
        ({"image": "SCENE", "prompt": " is it " + "very " * 80 + "red?"}, "at most"),
        ({"image": "SCENE", "prompt": " is it red?", "task": "pose"}, "unknown task 'pose'"),
        ({"image": "SCENE", "prompt": " what does the region describe?"}, "needs a region"),
        ({"image": "SCENE", "prompt": " what does the region describe? region: 9,9,2,2"}, "empty or inverted"),
        ({"image": "SCENE", "prompt": " is it red?", "beams": 0}, "beams"),
        ({"image": "SCENE", "prompt": " is it red?", "samples": 2, "guidance_scale": 3.0}, "no unconditional prompt"),
        ({"prompt": " what is the complete image? caption: a red circle", "guidance_scale": 3.0}, "not beam search"),
    ],
)
def test_bad_requests_fail_with_a_clear_message(unifier, scene_png, kwargs, message):
    kwargs = {k: (scene_png if v == "SCENE" else v) for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        unifier.predict(**kwargs)


def test_cli_prints_answers_and_saves_boxes_and_images(model_dir, scene_png, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert (
        main(["--model", str(model_dir), "--image", str(scene_png), "--prompt", " is it red?", "--device", "cpu"]) == 0
    )
    assert capsys.readouterr().out.strip() in VQA_ANSWERS

    prompt = ' which region does the text " red circle " describe?'
    assert main(["--model", str(model_dir), "--image", str(scene_png), "--prompt", prompt, "--out", "box.png"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("box: ") and "box.png" in out
    drawn = np.asarray(Image.open(tmp_path / "box.png"))
    assert drawn.shape == (64, 64, 3) and (drawn == (255, 0, 0)).all(-1).any()
    assert main(["--model", str(model_dir), "--image", str(scene_png), "--prompt", prompt]) == 0
    assert "scene-box.png (default name" in capsys.readouterr().out and (tmp_path / "scene-box.png").is_file()

    prompt = " what is the complete image? caption: a small red circle"
    assert (
        main(["--model", str(model_dir), "--prompt", prompt, "--samples", "2", "--seed", "1", "--out", "gen.png"]) == 0
    )
    assert "gen-0.png" in capsys.readouterr().out
    assert Image.open(tmp_path / "gen-1.png").size == (16, 16)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "nope.png", "--prompt", " what does the image describe?"], "nope.png"),
        (["--image", "SCENE", "--prompt", " what is the complete image? caption: a red circle"], "takes no image"),
        (["--prompt", ' which region does the text " red circle " describe?'], "needs an image"),
        (["--image", "SCENE", "--prompt", ""], "empty"),
        (["--image", "SCENE", "--prompt", " is it " + "very " * 80 + "red?"], "at most"),
        (["--image", "SCENE", "--prompt", " is it red?", "--task", "pose"], "unknown task"),
        (["--image", "NOTANIMAGE", "--prompt", " what does the image describe?"], "NOTANIMAGE"),
    ],
)
def test_cli_errors_exit_2_with_one_line_and_write_nothing(
    model_dir, scene_png, tmp_path, monkeypatch, capsys, args, message
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "NOTANIMAGE").write_text("this is not an image")
    args = [str(scene_png) if a == "SCENE" else a for a in args]
    assert main(["--model", str(model_dir), *args, "--out", str(tmp_path / "out.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unifier predict: error:") and message in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["NOTANIMAGE"]


def test_unifier_is_exported_lazily():
    code = (
        "import sys, unifier; assert 'torch' not in sys.modules; from unifier import Unifier; print(Unifier.__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "Unifier"


def test_free_prompts_without_an_answer_set_and_answer_sets_from_task_files(tmp_path, capsys):
    folder = build_model_folder(tmp_path / "model", vqa_answers=None)
    unifier = Unifier.from_pretrained(folder, device="cpu")
    assert not unifier.vqa_has_answer_set
    scene = make_scene("val", 0).render()
    request = unifier.request(" what color is it?", scene)
    assert request.task == FREE and request.example.image is not None
    assert isinstance(unifier.predict(image=scene, prompt=" what color is it?"), TextOutput)

    shapes_answers = load_task_config(REPO / "tasks/shapes/vqa.yaml").options["answers"]
    options = task_options_from_files([REPO / "tasks/shapes/mixture.yaml"], unifier.tokenizer)
    assert options["vqa"]["answers"] == shapes_answers and set(options) == set(TASK_NAMES)
    unifier = Unifier.from_pretrained(folder, device="cpu", task_files=[REPO / "tasks/shapes/vqa.yaml"])
    assert unifier.request(" what color is it?", scene).task == "vqa"
    assert unifier.predict(image=scene, prompt=" what color is it?").text in shapes_answers
    Image.fromarray(scene).save(tmp_path / "scene.png")
    args = ["--model", str(folder), "--image", str(tmp_path / "scene.png"), "--prompt", " what color is it?"]
    assert main([*args, "--tasks", str(REPO / "tasks/shapes/mixture.yaml")]) == 0
    assert capsys.readouterr().out.strip() in shapes_answers
    with pytest.raises(PredictError, match="task file not found"):
        Unifier.from_pretrained(folder, task_files=[tmp_path / "nope.yaml"])
