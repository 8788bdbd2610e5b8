"""Task serializers: every task kind turns a shapes record into the expected token layout and decodes it back."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from unifier.data.records import ENTAILMENT_LABELS
from unifier.data.shapes import ANSWER_VOCAB, ShapesWorld, corpus
from unifier.tasks import (
    TASKS,
    TaskConfigError,
    build_task,
    build_task_from_config,
    load_mixture,
    load_task_config,
    open_records,
    prompt_texts,
    register_task,
)
from unifier.tasks.base import AnswerSet, BoxOutput, ExactBins, ExactCodes, FreeText, ImageOutput, TextOutput
from unifier.tasks.vqa import VqaTask
from unifier.tokenization.text import train_text_model
from unifier.tokenization.vocab import UnifierVocab

REPO = Path(__file__).resolve().parents[1]
NUM_BINS, NUM_CODES, GRID = 100, 32, 16


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> UnifierVocab:
    texts = [*corpus(seed=0, n_scenes=20), *prompt_texts()]
    sp = train_text_model(texts, tmp_path_factory.mktemp("sp") / "text.model", vocab_size=400)
    return UnifierVocab(sp, num_bins=NUM_BINS, num_codes=NUM_CODES)


@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return ShapesWorld("train", seed=0, image_size=64)


def text_ids(vocab, text):
    return [*vocab.encode_text(text), vocab.eos_id]


def test_registry_holds_the_six_kinds_and_refuses_duplicates_and_unknowns(vocab):
    assert set(TASKS) == {"caption", "vqa", "grounding", "region_caption", "entailment", "text_to_image"}
    with pytest.raises(ValueError, match="already registered"):
        register_task(VqaTask)
    with pytest.raises(ValueError, match="unknown task 'ocr'.*caption, vqa, grounding"):
        build_task("ocr", vocab)


def test_caption_layout_and_decode(vocab, world):
    record = world.records("caption", 3)[0]
    task = build_task("caption", vocab)
    example = task.example(record)
    assert example.prompt_ids == [vocab.bos_id, *vocab.encode_text(" what does the image describe?"), vocab.eos_id]
    assert example.image is record.image
    assert example.target_ids == text_ids(vocab, record.captions[0])
    assert task.decode(example.target_ids, example.meta) == TextOutput(record.captions[0])
    assert isinstance(task.constraint(record), FreeText) and task.metric == "cider"
    training = task.training_examples(record)
    assert [task.decode(e.target_ids, {}).text for e in training] == list(record.captions)
    assert build_task("caption", vocab, metric="object_set").metric == "object_set"


def test_vqa_layout_constraint_and_decode(vocab, world):
    records = world.records("vqa", 5)
    task = build_task("vqa", vocab, answers=list(ANSWER_VOCAB))
    for record in records:
        example = task.example(record)
        assert example.prompt_ids == [vocab.bos_id, *vocab.encode_text(f" {record.question}"), vocab.eos_id]
        assert example.target_ids == text_ids(vocab, record.answer)
        assert task.decode(example.target_ids[:-1], example.meta).text == record.answer
        assert example.train_constraint == AnswerSet(ANSWER_VOCAB)
    assert task.metric == "vqa_accuracy"
    open_task = build_task("vqa", vocab)
    assert isinstance(open_task.constraint(), FreeText)
    assert build_task("vqa", vocab, constrain_training=False).example(records[0]).train_constraint is None


def test_grounding_layout_and_decode_within_half_a_bin(vocab, world):
    task = build_task("grounding", vocab)
    for record in world.records("grounding", 7):
        example = task.example(record)
        assert example.prompt_ids == [
            vocab.bos_id,
            *vocab.encode_text(f' which region does the text " {record.expression} " describe?'),
            vocab.eos_id,
        ]
        assert len(example.target_ids) == 5 and example.target_ids[-1] == vocab.eos_id
        assert all(vocab.is_bin(i) for i in example.target_ids[:4])
        assert example.meta == {"width": 64, "height": 64}
        box = task.decode(example.target_ids, example.meta)
        assert isinstance(box, BoxOutput)
        half_bin = 64 / NUM_BINS / 2
        assert all(abs(a - b) <= half_bin + 1e-9 for a, b in zip(box.box, record.box, strict=True))
    assert task.constraint() == ExactBins(4) and task.metric == "acc_iou50"
    with pytest.raises(ValueError, match="4 location bins"):
        task.decode(example.target_ids[:2], example.meta)


def test_region_caption_prompt_embeds_the_box_as_four_bins(vocab, world):
    task = build_task("region_caption", vocab)
    record = world.records("region_caption", 2)[0]
    example = task.example(record)
    bins = vocab.encode_box(record.box, record.width, record.height)
    head = vocab.encode_text(" what does the region describe? region:")
    assert example.prompt_ids == [vocab.bos_id, *head, *bins, vocab.eos_id]
    assert task.prompt(record).startswith(" what does the region describe? region: <bin_")
    assert example.target_ids == text_ids(vocab, record.phrases[0])
    assert task.decode(example.target_ids, example.meta).text == record.phrases[0]
    assert task.metric == "exact_match"


def test_entailment_layout_and_labels(vocab, world):
    task = build_task("entailment", vocab)
    records = world.records("entailment", 4)
    assert {r.label for r in records} == set(ENTAILMENT_LABELS)
    for record in records:
        example = task.example(record)
        prompt = f' does the image describe " {record.hypothesis} "?'
        assert example.prompt_ids == [vocab.bos_id, *vocab.encode_text(prompt), vocab.eos_id]
        assert task.decode(example.target_ids, {}).text == record.label
        assert example.train_constraint == AnswerSet(ENTAILMENT_LABELS)
    bad = dataclasses.replace(records[0], label="entailment")
    with pytest.raises(ValueError, match="not one of"):
        task.example(bad)


def test_text_to_image_has_no_image_input_and_targets_codes(vocab, world):
    record = world.records("text_to_image", 1)[0]
    codes = tuple(i % NUM_CODES for i in range(GRID))
    record = dataclasses.replace(record, codes=codes)
    task = build_task("text_to_image", vocab, num_codes=GRID)
    example = task.example(record)
    assert example.image is None
    prompt = f" what is the complete image? caption: {record.caption}"
    assert example.prompt_ids == [vocab.bos_id, *vocab.encode_text(prompt), vocab.eos_id]
    assert example.target_ids == [*vocab.code_ids(codes), vocab.eos_id]
    out = task.decode(example.target_ids, {})
    assert isinstance(out, ImageOutput) and out.codes == codes
    assert task.constraint() == ExactCodes(GRID) and task.metric == "scene_accuracy"
    with pytest.raises(ValueError, match="no image tokenizer"):
        task.example(dataclasses.replace(record, codes=None))


def test_text_to_image_encodes_pixels_with_the_image_tokenizer(vocab, world):
    torch = pytest.importorskip("torch")
    from unifier.tokenization.image_tokenizer import ImageTokenizer

    torch.manual_seed(0)
    ddconfig = dict(
        ch=32,
        out_ch=3,
        ch_mult=[1, 1],
        num_res_blocks=1,
        attn_resolutions=[],
        in_channels=3,
        resolution=8,
        z_channels=4,
    )
    image_tokenizer = ImageTokenizer(ddconfig, n_embed=NUM_CODES, embed_dim=4).eval()
    assert image_tokenizer.num_codes_per_image == GRID
    task = build_task("text_to_image", vocab, image_tokenizer=image_tokenizer)
    record = world.records("text_to_image", 1)[0]
    example = task.example(record)
    expected = image_tokenizer.encode_images([record.image])[0]
    assert example.target_ids == [*vocab.code_ids(expected), vocab.eos_id]
    out = task.decode(example.target_ids, {})
    assert list(out.codes) == expected and out.image.size == (8, 8)
    # Many outputs decode in one batch, each to the image it decodes to alone, in order.
    other = [*vocab.code_ids([(c + 1) % NUM_CODES for c in expected]), vocab.eos_id]
    many = task.decode_many([other, example.target_ids], [{}, {}])
    assert [list(m.codes) for m in many] == [[(c + 1) % NUM_CODES for c in expected], expected]
    alone, batched = (np.asarray(image, dtype=int) for image in (out.image, many[1].image))
    assert np.abs(alone - batched).max() <= 1  # the same pixels, up to a batched convolution's rounding
    with pytest.raises(ValueError, match="image codes, the grid needs"):
        task.decode_many([example.target_ids, example.target_ids[:3]], [{}, {}])

    # A stream's block of records is encoded in one batch, to the codes each gets alone; a corrupt image is left
    # without codes, so serializing it fails naming the record (and the stream skips and counts it).
    records = [world.records("text_to_image", i)[0] for i in range(4)]
    records.insert(2, dataclasses.replace(records[0], uid="broken", image=b"not an image"))
    prepared = task.prepare_records(records)
    assert [p.uid for p in prepared] == [r.uid for r in records] and prepared[2].codes is None
    for record, ready in zip(records, prepared, strict=True):
        if ready.uid != "broken":
            assert list(ready.codes) == image_tokenizer.encode_images([record.image])[0]
            assert task.example(ready).target_ids == task.example(record).target_ids
    with pytest.raises(ValueError, match="broken|image"):
        task.example(prepared[2])


def test_shapes_task_files_and_mixture(vocab):
    mixture = load_mixture(REPO / "tasks/shapes/mixture.yaml")
    assert {config.kind for config, _ in mixture} == set(TASKS)
    assert all(weight > 0 for _, weight in mixture)
    for config, _ in mixture:
        task = build_task_from_config(config, vocab) if config.kind != "text_to_image" else None
        records = list(open_records(config, "val"))
        assert records and all(r.task == config.kind for r in records)
        if task is not None:
            task.example(records[0])
    vqa = next(config for config, _ in mixture if config.kind == "vqa")
    assert build_task_from_config(vqa, vocab).constraint() == AnswerSet(ANSWER_VOCAB)


def test_public_task_files_parse_and_name_missing_env_vars(monkeypatch):
    files = sorted((REPO / "tasks").glob("*/*.yaml"))
    public = [f for f in files if f.parent.name != "shapes"]
    assert {f.parent.name for f in public} == {"coco", "vqav2", "refcoco", "snli_ve"}
    for path in public:
        config = load_task_config(path)
        assert config.kind in TASKS
    monkeypatch.delenv("COCO_DIR", raising=False)
    with pytest.raises(TaskConfigError, match=r"\$\{COCO_DIR\}, which is not set"):
        open_records(load_task_config(REPO / "tasks/coco/caption.yaml"), "train")


def test_bad_task_files_fail_naming_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("kind: ocr\ndata: {source: shapes}\n")
    with pytest.raises(TaskConfigError, match="bad.yaml: field 'kind' is 'ocr'"):
        load_task_config(path)
    path.write_text("kind: vqa\ndata: {source: ftp}\n")
    with pytest.raises(TaskConfigError, match="'data.source' is 'ftp'"):
        load_task_config(path)
    path.write_text("kind: vqa\ndata: {source: shapes, splits: {train: {}}}\n")
    with pytest.raises(TaskConfigError, match="no 'val' split"):
        open_records(load_task_config(path), "val")
    path.write_text("kind: vqa\ndata: {source: shapes}\noptions: {answers: [yes, no]}\n")
    with pytest.raises(TaskConfigError, match=r"answers\[0\] is True.*quote them"):
        build_task_from_config(load_task_config(path), None)


def test_public_source_reads_real_layout_with_env_paths(tmp_path, monkeypatch, vocab):
    """An SNLI-VE task file over a tiny SNLI-VE layout: ${ENV} paths expand and records serialize."""
    import json

    from PIL import Image

    images = tmp_path / "flickr30k" / "flickr30k_images"
    images.mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(images / "1000092795.jpg")
    lines = [
        {
            "Flickr30K_ID": "1000092795",
            "sentence1": "a red card",
            "sentence2": "the card is red",
            "gold_label": "entailment",
            "pairID": "a",
        },
        {
            "Flickr30K_ID": "1000092795",
            "sentence1": "a red card",
            "sentence2": "the card is blue",
            "gold_label": "contradiction",
            "pairID": "b",
        },
    ]
    (tmp_path / "snli_ve_dev.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    monkeypatch.setenv("SNLI_VE_DIR", str(tmp_path))
    monkeypatch.setenv("FLICKR30K_DIR", str(tmp_path / "flickr30k"))
    config = load_task_config(REPO / "tasks/snli_ve/entailment.yaml")
    config.data["cache_dir"] = str(tmp_path / "cache")
    records = list(open_records(config, "val"))
    assert [r.label for r in records] == ["yes", "no"]
    task = build_task_from_config(config, vocab)
    assert task.decode(task.example(records[1]).target_ids, {}).text == "no"
