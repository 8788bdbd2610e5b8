"""The shapes world on disk: public layouts, the same facts as the generator's records, atomic writes, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import unifier.data.shapes_writer as shapes_writer
from unifier.cli import main as unifier_main
from unifier.data.cli import main as data_main
from unifier.data.records import SNLI_VE_LABEL_TO_ANSWER
from unifier.data.shapes import QUESTION_FAMILIES, make_scene, scene_records
from unifier.data.shapes_writer import FILES, is_written, read_manifest, write_shapes

N = 12


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes")
    counts = write_shapes(out, "val", N, seed=3, image_size=64, workers=1, chunk_size=5)
    return out / "val", counts


def load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def scenes():
    return [make_scene("val", index, seed=3) for index in range(N)]


def test_every_file_and_image_is_written(written):
    folder, counts = written
    assert sorted(p.name for p in folder.iterdir()) == sorted([*FILES, "images"])
    assert sorted(p.name for p in (folder / "images").iterdir()) == [f"{i:06d}.png" for i in range(N)]
    for scene in scenes():
        with Image.open(folder / "images" / f"{scene.image_id:06d}.png") as image:
            assert image.format == "PNG" and image.mode == "RGB"
            assert np.array_equal(np.asarray(image), scene.render())
    manifest = load(folder / "manifest.json")
    assert manifest["split"] == "val" and manifest["n"] == N and manifest["seed"] == 3 and manifest["image_size"] == 64
    assert manifest["counts"] == counts
    n_objects = sum(len(scene.objects) for scene in scenes())
    assert counts["images"] == N and counts["captions"] == 4 * N and counts["entailment_pairs"] == 6 * N
    assert counts["objects"] == counts["refs"] == n_objects and counts["sentences"] == 2 * n_objects


def test_coco_captions_layout(written):
    folder, _ = written
    captions = load(folder / "captions.json")
    assert captions["images"] == [{"id": i, "file_name": f"{i:06d}.png", "width": 64, "height": 64} for i in range(N)]
    for scene in scenes():
        mine = [a for a in captions["annotations"] if a["image_id"] == scene.image_id]
        assert [a["caption"] for a in mine] == list(scene.captions())
    ids = [a["id"] for a in captions["annotations"]]
    assert len(set(ids)) == len(ids)


def test_vqa_layout_holds_the_generator_records(written):
    folder, counts = written
    questions = load(folder / "vqa_questions.json")["questions"]
    annotations = load(folder / "vqa_annotations.json")["annotations"]
    assert len(questions) == len(annotations) == counts["questions"]
    by_id = {a["question_id"]: a for a in annotations}
    read_back = []
    for question in questions:
        assert set(question) == {"image_id", "question", "question_id"}
        annotation = by_id[question["question_id"]]
        assert annotation["image_id"] == question["image_id"]
        assert annotation["question_type"] in QUESTION_FAMILIES
        assert [a["answer_id"] for a in annotation["answers"]] == list(range(1, 11))
        assert {a["answer_confidence"] for a in annotation["answers"]} == {"yes"}
        read_back.append(
            (
                question["question_id"],
                question["image_id"],
                question["question"],
                annotation["multiple_choice_answer"],
                tuple(a["answer"] for a in annotation["answers"]),
                annotation["answer_type"],
                annotation["question_type"],
            )
        )
    expected = [
        (r.question_id, r.image_id, r.question, r.answer, r.answers, r.answer_type, r.question_type)
        for scene in scenes()
        for r in scene_records(scene, "vqa")
    ]
    assert read_back == expected


def test_instances_and_refs_layout_hold_the_grounding_and_region_records(written):
    folder, _ = written
    instances = load(folder / "instances.json")
    refs = load(folder / "refs.json")
    assert len(instances["categories"]) == 18
    category_names = {c["id"]: c["name"] for c in instances["categories"]}
    annotations = {a["id"]: a for a in instances["annotations"]}
    images = {i["id"]: i for i in instances["images"]}
    grounding, regions = [], []
    for ref in refs:
        assert set(ref) == {"ref_id", "image_id", "ann_id", "split", "category_id", "sentences", "sent_ids"}
        assert ref["split"] == "val"
        assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
        for sentence in ref["sentences"]:
            assert sentence["raw"] == sentence["sent"] and sentence["tokens"] == sentence["sent"].split()
        annotation = annotations[ref["ann_id"]]
        assert annotation["image_id"] == ref["image_id"] and annotation["category_id"] == ref["category_id"]
        x, y, w, h = annotation["bbox"]
        box = (x, y, x + w, y + h)
        width, height = images[ref["image_id"]]["width"], images[ref["image_id"]]["height"]
        phrases = tuple(s["sent"] for s in ref["sentences"])
        assert phrases[1] == category_names[ref["category_id"]]  # "{color} {shape}"
        for phrase in phrases:
            grounding.append((ref["ref_id"], ref["image_id"], phrase, box, width, height))
        regions.append((ref["ref_id"], ref["image_id"], box, width, height, phrases))
    expected_grounding = [
        (r.ref_id, r.image_id, r.expression, r.box, r.width, r.height)
        for scene in scenes()
        for r in scene_records(scene, "grounding")
    ]
    expected_regions = [
        (r.ref_id, r.image_id, r.box, r.width, r.height, r.phrases)
        for scene in scenes()
        for r in scene_records(scene, "region_caption")
    ]
    assert grounding == expected_grounding and regions == expected_regions
    for scene in scenes():  # area counts the shape's pixels in the image
        image = scene.render()
        for k, obj in enumerate(scene.objects):
            x0, y0, x1, y1 = obj.box
            drawn = (image[y0:y1, x0:x1] != 238).any(-1).sum()
            assert annotations[scene.image_id * 10 + k]["area"] == drawn


def test_snli_ve_layout_holds_the_entailment_records(written):
    folder, _ = written
    lines = (folder / "snli_ve.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    for row in rows:
        assert set(row) == {"Flickr30K_ID", "sentence1", "sentence2", "gold_label", "pairID", "hypothesis_type"}
        assert (folder / "images" / f"{row['Flickr30K_ID']}.png").is_file()
    read_back = [
        (row["pairID"], int(row["Flickr30K_ID"]), row["sentence2"], SNLI_VE_LABEL_TO_ANSWER[row["gold_label"]],
         row["sentence1"], row["hypothesis_type"])
        for row in rows
    ]  # fmt: skip
    expected = [
        (r.pair_id, r.image_id, r.hypothesis, r.label, r.premise, r.hypothesis_type)
        for scene in scenes()
        for r in scene_records(scene, "entailment")
    ]
    assert read_back == expected
    assert {row["gold_label"] for row in rows} == {"entailment", "contradiction", "neutral"}


def test_worker_processes_write_the_same_bytes(tmp_path, written):
    folder, _ = written
    write_shapes(tmp_path, "val", N, seed=3, image_size=64, workers=2, chunk_size=4)
    for name in FILES:
        assert (tmp_path / "val" / name).read_bytes() == (folder / name).read_bytes(), name
    for image in (folder / "images").iterdir():
        assert (tmp_path / "val" / "images" / image.name).read_bytes() == image.read_bytes()


def test_unfinished_writes_never_look_finished(tmp_path, monkeypatch):
    stale = tmp_path / ".val.tmp-notapid-abc"  # left by a killed writer: no live process owns it
    (stale / "images").mkdir(parents=True)
    (stale / "captions.json").write_text("{}")
    live = tmp_path / f".val.tmp-{os.getpid()}-xyz"  # a writer that is still running
    live.mkdir()
    assert not is_written(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="not a finished write"):
        read_manifest(tmp_path, "val")

    write_shapes(tmp_path, "val", 3, workers=1)
    assert is_written(tmp_path, "val") and read_manifest(tmp_path, "val")["n"] == 3
    assert not stale.exists() and live.exists()
    live.rmdir()

    # A write that dies before the end leaves the finished split as it was and no temporary folder.
    def fail(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(shapes_writer, "_write_annotation_files", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        write_shapes(tmp_path, "val", 5, workers=1)
    assert read_manifest(tmp_path, "val")["n"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val"]
    monkeypatch.undo()

    # A finished write replaces the old split as a whole.
    write_shapes(tmp_path, "val", 5, workers=1)
    assert read_manifest(tmp_path, "val")["n"] == 5 and len(list((tmp_path / "val" / "images").iterdir())) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val"]
    (tmp_path / "val" / "refs.json").unlink()
    assert not is_written(tmp_path, "val")


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="n must be"):
        write_shapes(tmp_path, "val", 0)
    with pytest.raises(ValueError, match="split"):
        write_shapes(tmp_path, "dev", 3)
    with pytest.raises(SystemExit):
        data_main(["shapes", "--out", str(tmp_path), "--n", "2", "--image-size", "100"])
    assert not any(tmp_path.iterdir())


def test_cli(tmp_path, capsys):
    assert data_main(["shapes", "--out", str(tmp_path), "--split", "test", "--n", "4", "--workers", "1"]) == 0
    assert "4 images" in capsys.readouterr().out
    assert read_manifest(tmp_path, "test")["counts"]["images"] == 4
    assert unifier_main(["data", "shapes", "--out", str(tmp_path / "b"), "--n", "2", "--image-size", "128"]) == 0
    assert read_manifest(tmp_path / "b", "train")["image_size"] == 128
    command = [sys.executable, "-m", "unifier.cli", "data", "shapes", "--out", str(tmp_path / "c"), "--split", "val"]
    result = subprocess.run([*command, "--n", "3", "--seed", "7"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(tmp_path / "c", "val")
    assert (manifest["n"], manifest["seed"]) == (3, 7)
