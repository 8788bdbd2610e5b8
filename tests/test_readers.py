"""Readers of the public layouts, on fixtures written in those exact layouts (a few records each).

Every test writes its annotation files and images into tmp_path and reads them with a private
datasets cache (tmp_path / "cache"), so nothing leaks between tests.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import pickle
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from unifier.data.readers import (
    ReaderError,
    RecordSet,
    load_plain_pickle,
    read_coco_captions,
    read_coco_text_to_image,
    read_hf_dataset,
    read_karpathy,
    read_ofa_tsv,
    read_refs,
    read_region_captions,
    read_snli_ve,
    read_vqav2,
)
from unifier.data.records import (
    CaptionRecord,
    EntailmentRecord,
    GroundingRecord,
    RegionCaptionRecord,
    TextToImageRecord,
    VqaRecord,
    record_fields,
)
from unifier.images import load_image


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def write_image(path, size=(8, 6), color=(10, 20, 30), format=None) -> bytes:
    """Write a small flat image (size = (width, height)) and return its encoded bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=format)
    return path.read_bytes()


def encoded(size=(8, 6), color=(10, 20, 30), format="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=format)
    return buffer.getvalue()


def write_json(path, payload) -> str:
    path.write_text(json.dumps(payload))
    return str(path)


# ---- COCO captions and Karpathy ------------------------------------------------------------------------------------
def coco_captions(tmp_path):
    images = tmp_path / "train2014"
    for image_id in (9, 25):
        write_image(images / f"COCO_train2014_{image_id:012d}.jpg", format="JPEG")
    payload = {
        "info": {},
        "images": [
            {"id": image_id, "file_name": f"COCO_train2014_{image_id:012d}.jpg", "width": 8, "height": 6}
            for image_id in (9, 25, 30, 42)  # 30: no image file; 42: no caption
        ],
        "annotations": [
            {"id": 1, "image_id": 9, "caption": "A dog on a couch. "},
            {"id": 2, "image_id": 25, "caption": "Two giraffes."},
            {"id": 3, "image_id": 9, "caption": "a brown dog\n"},
            {"id": 4, "image_id": 30, "caption": "A missing picture."},
            {"id": 5, "image_id": 9, "caption": "   "},  # empty captions are dropped, not counted
        ],
    }
    return write_json(tmp_path / "captions_train2014.json", payload), images


def test_coco_captions_grouped_per_image_and_bad_images_skipped(tmp_path, cache, caplog):
    annotations, images = coco_captions(tmp_path)
    with caplog.at_level(logging.WARNING):
        records = read_coco_captions(annotations, images, cache_dir=cache)
    assert isinstance(records, RecordSet) and len(records) == 2
    assert records[0] == CaptionRecord(
        image_id=9,
        image=os.path.join(os.path.abspath(images), "COCO_train2014_000000000009.jpg"),
        captions=("A dog on a couch.", "a brown dog"),
    )
    assert records[1].captions == ("Two giraffes.",) and records[-1] == records[1]
    assert records.skipped == 2
    assert records.skip_reasons == {"missing image file": 1, "image without captions": 1}
    assert "skipped 2 of 4 records" in caplog.text and "COCO_train2014_000000000030.jpg" in caplog.text
    assert [r.image_id for r in records] == [9, 25]
    assert load_image(records[0].image).size == (8, 6)
    with pytest.raises(IndexError):
        records[2]


def test_coco_text_to_image_first_or_every_caption(tmp_path, cache):
    annotations, images = coco_captions(tmp_path)
    first = read_coco_text_to_image(annotations, images, cache_dir=cache)
    assert [(r.uid, r.caption, r.image_id) for r in first] == [(9, "A dog on a couch.", 9), (25, "Two giraffes.", 25)]
    every = read_coco_text_to_image(annotations, images, every_caption=True, cache_dir=cache)
    assert [(r.uid, r.caption) for r in every] == [(1, "A dog on a couch."), (3, "a brown dog"), (2, "Two giraffes.")]
    assert isinstance(every[0], TextToImageRecord) and every[0].codes is None


def test_malformed_coco_files_fail_at_once_naming_file_and_field(tmp_path, cache):
    images = tmp_path / "images"
    images.mkdir()
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(ReaderError, match=r"broken.json: not valid JSON"):
        read_coco_captions(broken, images, cache_dir=cache)
    no_key = write_json(tmp_path / "no_key.json", {"images": []})
    with pytest.raises(ReaderError, match=r"no_key.json: top level has no field 'annotations'"):
        read_coco_captions(no_key, images, cache_dir=cache)
    no_field = write_json(
        tmp_path / "no_field.json",
        {"images": [], "annotations": [{"id": 1, "image_id": 1, "caption": "x"}, {"id": 2, "image_id": 1}]},
    )
    with pytest.raises(ReaderError, match=r"no_field.json: annotations\[1\] has no field 'caption'"):
        read_coco_captions(no_field, images, cache_dir=cache)
    wrong_type = write_json(tmp_path / "wrong_type.json", {"images": {}, "annotations": []})
    with pytest.raises(ReaderError, match=r"wrong_type.json: top level.images should be list, got dict"):
        read_coco_captions(wrong_type, images, cache_dir=cache)
    with pytest.raises(ReaderError, match="absent.json: annotation file not found"):
        read_coco_captions(tmp_path / "absent.json", images, cache_dir=cache)
    with pytest.raises(ReaderError, match="no_images: images folder not found"):
        read_coco_captions(no_key, tmp_path / "no_images", cache_dir=cache)


def test_karpathy_splits_and_restval(tmp_path, cache):
    root = tmp_path / "coco"
    entries = []
    for k, split in enumerate(("train", "restval", "val", "test")):
        folder = "train2014" if split in ("train", "restval") else "val2014"
        filename = f"COCO_{folder}_{k:012d}.jpg"
        write_image(root / folder / filename, format="JPEG")
        sentences = [{"raw": f"Caption {k} a.", "tokens": ["caption"]}, {"raw": f"Caption {k} b.", "tokens": []}]
        entries.append(
            {"filepath": folder, "filename": filename, "cocoid": 100 + k, "split": split, "sentences": sentences}
        )
    dataset_json = write_json(tmp_path / "dataset_coco.json", {"images": entries, "dataset": "coco"})

    train = read_karpathy(dataset_json, root, "train", cache_dir=cache)
    assert [r.image_id for r in train] == [100, 101]
    assert train[0].captions == ("Caption 0 a.", "Caption 0 b.")
    assert train[0].image == os.path.join(os.path.abspath(root), "train2014", "COCO_train2014_000000000000.jpg")
    assert [r.image_id for r in read_karpathy(dataset_json, root, "train", include_restval=False, cache_dir=cache)] == [
        100
    ]
    assert [r.image_id for r in read_karpathy(dataset_json, root, "test", cache_dir=cache)] == [103]
    assert len(read_karpathy(dataset_json, root, None, cache_dir=cache)) == 4
    with pytest.raises(ValueError, match="split must be one of"):
        read_karpathy(dataset_json, root, "dev", cache_dir=cache)


# ---- VQAv2 -----------------------------------------------------------------------------------------------------------
def vqa_files(tmp_path, subtype="val2014"):
    images = tmp_path / subtype
    for image_id in (42, 73):
        write_image(images / f"COCO_{subtype}_{image_id:012d}.jpg", format="JPEG")
    questions = [
        {"image_id": 42, "question": "What color is the cat?", "question_id": 420},
        {"image_id": 73, "question": "How many dogs?", "question_id": 730},
        {"image_id": 73, "question": "  ", "question_id": 731},  # empty question
        {"image_id": 99, "question": "Is it raining?", "question_id": 990},  # no image file
    ]
    header = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": subtype}
    questions_json = write_json(
        tmp_path / f"v2_OpenEnded_mscoco_{subtype}_questions.json", {**header, "questions": questions}
    )
    answers_42 = ["black"] * 7 + ["gray", "dark gray", "black"]
    annotations = [
        {
            "question_id": question["question_id"],
            "image_id": question["image_id"],
            "question_type": "what color is the",
            "answer_type": "other" if question["question_id"] == 420 else "number",
            "multiple_choice_answer": "black" if question["question_id"] == 420 else "2",
            "answers": [
                {"answer": answer, "answer_confidence": "yes", "answer_id": k + 1}
                for k, answer in enumerate(answers_42 if question["question_id"] == 420 else ["2"] * 10)
            ],
        }
        for question in questions
    ]
    annotations_json = write_json(
        tmp_path / f"v2_mscoco_{subtype}_annotations.json", {**header, "annotations": annotations}
    )
    return questions_json, annotations_json, images


def test_vqav2_keeps_all_ten_answers(tmp_path, cache):
    questions_json, annotations_json, images = vqa_files(tmp_path)
    records = read_vqav2(questions_json, annotations_json, images, cache_dir=cache)
    assert len(records) == 2 and records.skip_reasons == {"empty question": 1, "missing image file": 1}
    first = records[0]
    assert isinstance(first, VqaRecord)
    assert (first.question_id, first.image_id, first.question, first.answer, first.answer_type) == (
        420,
        42,
        "What color is the cat?",
        "black",
        "other",
    )
    assert first.answers == ("black",) * 7 + ("gray", "dark gray", "black")
    assert first.question_type == "what color is the"  # the VQA metric's breakdown, as VQAv2's evaluation gives it
    assert first.image.endswith("val2014/COCO_val2014_000000000042.jpg") and first.answer_scores is None
    assert records[1].answers == ("2",) * 10


def test_vqav2_test_dev_without_annotations_and_custom_names(tmp_path, cache):
    questions_json, _, images = vqa_files(tmp_path, subtype="test2015")
    records = read_vqav2(questions_json, None, images, cache_dir=cache)
    assert [(r.question_id, r.answer, r.answers) for r in records] == [(420, "", ()), (730, "", ())]
    assert records[0].image.endswith("COCO_test2015_000000000042.jpg")
    pattern = read_vqav2(
        questions_json, None, images, image_name="COCO_{split}2015_{image_id:012d}.jpg", cache_dir=cache
    )
    assert [r.image for r in pattern] == [r.image for r in records]
    by_callable = read_vqav2(
        questions_json, None, images, image_name=lambda i: f"COCO_test2015_{i:012d}.jpg", cache_dir=cache
    )
    assert [r.image for r in by_callable] == [r.image for r in records]


def test_vqav2_errors(tmp_path, cache):
    questions_json, annotations_json, images = vqa_files(tmp_path)
    data = json.loads(Path(questions_json).read_text())
    del data["data_subtype"]
    no_subtype = write_json(tmp_path / "no_subtype.json", data)
    with pytest.raises(ReaderError, match=r"no_subtype.json: image_name .* needs \{data_subtype\}"):
        read_vqav2(no_subtype, None, images, cache_dir=cache)
    annotations = json.loads(Path(annotations_json).read_text())
    del annotations["annotations"][1]["answers"][3]["answer"]
    bad = write_json(tmp_path / "bad_annotations.json", annotations)
    with pytest.raises(ReaderError, match=r"bad_annotations.json: annotations\[1\].answers\[3\] has no field 'answer'"):
        read_vqav2(questions_json, bad, images, cache_dir=cache)
    annotations = json.loads(Path(annotations_json).read_text())
    annotations["annotations"] = annotations["annotations"][1:]  # question 420 has no annotation
    partial = write_json(tmp_path / "partial.json", annotations)
    assert read_vqav2(questions_json, partial, images, cache_dir=cache).skip_reasons["question without annotation"] == 1


# ---- RefCOCO ---------------------------------------------------------------------------------------------------------
REFS = [
    {
        "ref_id": 7,
        "ann_id": 1001,
        "image_id": 5,
        "split": "train",
        "category_id": 1,
        "sent_ids": [70, 71],
        "sentences": [
            {
                "sent": "man on the left",
                "raw": "Man on the left.",
                "tokens": ["man", "on", "the", "left"],
                "sent_id": 70,
            },
            {"sent": "left guy", "raw": "left guy", "tokens": ["left", "guy"], "sent_id": 71},
        ],
    },
    {
        "ref_id": 8,
        "ann_id": 1002,
        "image_id": 5,
        "split": "val",
        "category_id": 1,
        "sent_ids": [80],
        "sentences": [{"sent": "right woman", "raw": "right woman", "tokens": ["right", "woman"], "sent_id": 80}],
    },
    {  # its box runs out of the image: skipped (one skip per sentence for grounding)
        "ref_id": 9,
        "ann_id": 1003,
        "image_id": 5,
        "split": "train",
        "category_id": 1,
        "sent_ids": [90],
        "sentences": [{"sent": "the giant", "raw": "the giant", "tokens": ["the", "giant"], "sent_id": 90}],
    },
]


def refcoco_files(tmp_path):
    images = tmp_path / "train2014"
    write_image(images / "COCO_train2014_000000000005.jpg", size=(40, 30), format="JPEG")
    instances = {
        "images": [{"id": 5, "file_name": "COCO_train2014_000000000005.jpg", "width": 40, "height": 30}],
        "annotations": [
            {"id": 1001, "image_id": 5, "category_id": 1, "bbox": [2.5, 3.0, 10.0, 20.0], "area": 200, "iscrowd": 0},
            {"id": 1002, "image_id": 5, "category_id": 1, "bbox": [20, 1, 19.5, 28], "area": 500, "iscrowd": 0},
            {"id": 1003, "image_id": 5, "category_id": 1, "bbox": [30, 5, 25, 10], "area": 250, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "person", "supercategory": "person"}],
    }
    return write_json(tmp_path / "instances.json", instances), images


def test_refs_json_grounding_per_sentence(tmp_path, cache):
    instances, images = refcoco_files(tmp_path)
    refs = write_json(tmp_path / "refs.json", REFS)
    records = read_refs(refs, instances, images, cache_dir=cache)
    image = os.path.join(os.path.abspath(images), "COCO_train2014_000000000005.jpg")
    common = {"image_id": 5, "image": image, "width": 40, "height": 30}
    assert list(records) == [
        GroundingRecord(ref_id=7, expression="man on the left", box=(2.5, 3.0, 12.5, 23.0), **common),
        GroundingRecord(ref_id=7, expression="left guy", box=(2.5, 3.0, 12.5, 23.0), **common),
        GroundingRecord(ref_id=8, expression="right woman", box=(20.0, 1.0, 39.5, 29.0), **common),
    ]
    assert records.skip_reasons == {"box outside the image": 1}
    assert [r.ref_id for r in read_refs(refs, instances, images, split="train", cache_dir=cache)] == [7, 7]


def test_region_captions_one_per_ref(tmp_path, cache):
    instances, images = refcoco_files(tmp_path)
    refs = write_json(tmp_path / "refs.json", REFS)
    records = read_region_captions(refs, instances, images, cache_dir=cache)
    assert [(r.ref_id, r.phrases, r.box) for r in records] == [
        (7, ("man on the left", "left guy"), (2.5, 3.0, 12.5, 23.0)),
        (8, ("right woman",), (20.0, 1.0, 39.5, 29.0)),
    ]
    assert isinstance(records[0], RegionCaptionRecord) and records.skipped == 1


def test_refer_toolkit_pickle_reads_like_the_json(tmp_path, cache):
    instances, images = refcoco_files(tmp_path)
    from_json = read_refs(write_json(tmp_path / "refs.json", REFS), instances, images, cache_dir=cache)
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"refs(unc)-{protocol}.p"
        path.write_bytes(pickle.dumps(REFS, protocol=protocol))
        assert [record_fields(r) for r in read_refs(path, instances, images, cache_dir=cache)] == [
            record_fields(r) for r in from_json
        ]


def test_python2_pickle_byte_strings_are_decoded():
    # A Python 2 protocol-2 pickle of [{'sent': 'caf\xc3\xa9', 'ref_id': 3}] (str as SHORT_BINSTRING, UTF-8 bytes).
    data = b"\x80\x02]q\x00}q\x01(U\x04sentq\x02U\x05caf\xc3\xa9q\x03U\x06ref_idq\x04K\x03ua."
    assert pickle.loads(data, encoding="utf-8") == [{"sent": "café", "ref_id": 3}]  # the fixture is what we think


def test_python2_pickle_through_the_restricted_loader(tmp_path):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(b"\x80\x02]q\x00}q\x01(U\x04sentq\x02U\x05caf\xc3\xa9q\x03U\x06ref_idq\x04K\x03ua.")
    assert load_plain_pickle(path) == [{"sent": "café", "ref_id": 3}]


class Exploit:
    """Unpickling this calls os.system: the restricted loader must refuse it before anything runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path, cache):
    instances, images = refcoco_files(tmp_path)
    marker = tmp_path / "pwned"
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1, "sentences": [Exploit(marker)]}], protocol=2))
    with pytest.raises(ReaderError, match=r"refs\(unc\).p: unsafe pickle: refused global '(posix|nt).system'"):
        read_refs(path, instances, images, cache_dir=cache)
    assert not marker.exists()
    with pytest.raises(ReaderError, match="refused global 'builtins.eval'"):
        load_plain_pickle(_write(tmp_path / "eval.p", pickle.dumps(eval)))
    with pytest.raises(ReaderError, match="pickle holds a set"):
        load_plain_pickle(_write(tmp_path / "set.p", pickle.dumps([{"a": {1, 2}}], protocol=4)))
    with pytest.raises(ReaderError, match="cut.p: not a readable pickle of plain data .*truncated"):
        load_plain_pickle(_write(tmp_path / "cut.p", pickle.dumps(REFS, protocol=2)[:40]))


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_refs_errors(tmp_path, cache):
    instances, images = refcoco_files(tmp_path)
    not_list = write_json(tmp_path / "refs_dict.json", {"refs": REFS})
    with pytest.raises(ReaderError, match="refs_dict.json: top level should be a list of refs"):
        read_refs(not_list, instances, images, cache_dir=cache)
    no_sent = write_json(tmp_path / "no_sent.json", [{**REFS[0], "sentences": [{"raw": "x"}]}])
    with pytest.raises(ReaderError, match=r"no_sent.json: refs\[0\].sentences\[0\] has no field 'sent'"):
        read_refs(no_sent, instances, images, cache_dir=cache)
    dangling = write_json(tmp_path / "dangling.json", [{**REFS[0], "ann_id": 5555}])
    assert read_refs(dangling, instances, images, cache_dir=cache).skip_reasons == {"ref's ann_id not in instances": 2}


# ---- SNLI-VE ---------------------------------------------------------------------------------------------------------
def test_snli_ve_lines(tmp_path, cache, caplog):
    images = tmp_path / "flickr30k_images"
    write_image(images / "3416050480.jpg", format="JPEG")
    lines = [
        {"Flickr30K_ID": "3416050480", "sentence1": "A man rides a bike.", "sentence2": "A person is outside.",
         "gold_label": "entailment", "pairID": "3416050480.jpg#4r1e"},
        {"Flickr30K_ID": "3416050480", "sentence1": "A man rides a bike.", "sentence2": "The man is asleep.",
         "gold_label": "contradiction", "pairID": "3416050480.jpg#4r1c"},
        {"Flickr30K_ID": "3416050480", "sentence1": "A man rides a bike.", "sentence2": "He is late.",
         "gold_label": "neutral", "pairID": "3416050480.jpg#4r1n"},
        {"Flickr30K_ID": "3416050480", "sentence1": "A man rides a bike.", "sentence2": "Undecided.",
         "gold_label": "-", "pairID": "3416050480.jpg#4r1x"},
    ]  # fmt: skip
    path = tmp_path / "snli_ve_dev.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    with caplog.at_level(logging.WARNING):
        records = read_snli_ve(path, images, cache_dir=cache)
    assert [(r.label, r.pair_id) for r in records] == [
        ("yes", "3416050480.jpg#4r1e"),
        ("no", "3416050480.jpg#4r1c"),
        ("maybe", "3416050480.jpg#4r1n"),
    ]
    assert records[0] == EntailmentRecord(
        pair_id="3416050480.jpg#4r1e",
        image_id=3416050480,
        image=os.path.join(os.path.abspath(images), "3416050480.jpg"),
        hypothesis="A person is outside.",
        label="yes",
        premise="A man rides a bike.",
    )
    assert records.skipped == 1 and records.skip_reasons == {"unknown gold_label": 1}
    assert "unknown gold_label x1" in caplog.text

    path.write_text(json.dumps(lines[0]) + "\n{not json\n")
    with pytest.raises(ReaderError, match=r"snli_ve_dev.jsonl: line 2 is not valid JSON"):
        read_snli_ve(path, images, cache_dir=cache)
    path.write_text(json.dumps({"Flickr30K_ID": "1", "gold_label": "neutral"}) + "\n")
    with pytest.raises(ReaderError, match=r"line 1 has no field 'sentence2'"):
        read_snli_ve(path, images, cache_dir=cache)


# ---- OFA TSV ---------------------------------------------------------------------------------------------------------
def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii")


def write_tsv(path, rows) -> str:
    path.write_text("".join("\t".join(map(str, row)) + "\n" for row in rows))
    return str(path)


def test_ofa_caption_tsv(tmp_path, cache):
    image = encoded(format="JPEG")
    path = write_tsv(
        tmp_path / "caption_val.tsv",
        [
            (1, 391895, "a man riding a bike&&a person on a bicycle", "person&&bicycle", b64(image)),
            (2, 522418, "a woman cutting a cake", "", "!!!not base64!!!"),
        ],
    )
    records = read_ofa_tsv(path, "caption", cache_dir=cache)
    assert len(records) == 1 and records.skip_reasons == {"undecodable base64 image": 1}
    assert records[0] == CaptionRecord(
        image_id=391895, image=image, captions=("a man riding a bike", "a person on a bicycle")
    )
    assert load_image(records[0].image).size == (8, 6)


def test_ofa_vqa_tsv_keeps_answer_confidences(tmp_path, cache):
    image = encoded()
    path = write_tsv(
        tmp_path / "vqa_val.tsv",
        [
            (11, 42, "what color is the cat?", "0.6|!+gray&&1.0|!+black&&0.3|!+dark gray", "cat", b64(image)),
            (12, 42, "is it day?", "1.0|!+yes", "", b64(image), "a cat on a sofa"),  # OFA's 7-column variant
            (13, 42, "is it broken?", "yes", "", b64(image)),  # malformed answers
        ],
    )
    records = read_ofa_tsv(path, "vqa", cache_dir=cache)
    assert records[0] == VqaRecord(
        question_id=11,
        image_id=42,
        image=image,
        question="what color is the cat?",
        answer="black",
        answers=("black", "gray", "dark gray"),
        answer_scores=(1.0, 0.6, 0.3),
    )
    assert records[1].answers == ("yes",) and records.skip_reasons == {"malformed answers": 1}


def test_ofa_refcoco_tsv_reads_size_from_the_header(tmp_path, cache):
    image = encoded(size=(50, 40), format="JPEG")
    path = write_tsv(
        tmp_path / "refcoco_val.tsv",
        [
            (5, 581857, "woman in red", "1.5,2.0,30.25,39.0", b64(image)),
            (6, 581857, "far right", "10,10,90,20", b64(image)),  # outside the 50 x 40 image
            (7, 581857, "a thing", "1,2,3", b64(image)),
        ],
    )
    records = read_ofa_tsv(path, "refcoco", cache_dir=cache)
    assert list(records) == [
        GroundingRecord(
            ref_id=5,
            image_id=581857,
            image=image,
            expression="woman in red",
            box=(1.5, 2.0, 30.25, 39.0),
            width=50,
            height=40,
        )
    ]
    assert records.skip_reasons == {"box outside the image": 1, "malformed box": 1}


def test_ofa_snli_ve_and_text_to_image_tsv(tmp_path, cache):
    image = encoded()
    snli = write_tsv(
        tmp_path / "snli_ve_dev.tsv",
        [
            ("a1", "3416050480", b64(image), "a person is outside", "a man rides a bike", "entailment"),
            ("a2", "3416050480", b64(image), "the man sleeps", "a man rides a bike", "contradiction"),
            ("a3", "3416050480", b64(image), "he is late", "a man rides a bike", "-"),
        ],
    )
    records = read_ofa_tsv(snli, "snli_ve", cache_dir=cache)
    assert [(r.pair_id, r.image_id, r.label, r.premise) for r in records] == [
        ("a1", 3416050480, "yes", "a man rides a bike"),
        ("a2", 3416050480, "no", "a man rides a bike"),
    ]
    assert records.skip_reasons == {"unknown label": 1}
    codes = " ".join(str(c) for c in [5, 8191, 0, 17])
    t2i = write_tsv(tmp_path / "coco_vqgan_dev.tsv", [(1, codes, "a bowl of fruit"), (2, "3 x 4", "bad codes")])
    records = read_ofa_tsv(t2i, "text_to_image", cache_dir=cache)
    assert list(records) == [TextToImageRecord(uid=1, caption="a bowl of fruit", codes=(5, 8191, 0, 17))]
    assert records.skip_reasons == {"malformed codes": 1}


def test_ofa_tsv_wrong_layout_fails_with_the_line(tmp_path, cache):
    path = write_tsv(tmp_path / "caption_val.tsv", [(1, 2, "a caption", "", b64(encoded())), (1, 2, "too few")])
    with pytest.raises(
        ReaderError, match=r"caption_val.tsv: line 2 has 3 tab-separated columns; OFA's caption layout has 5"
    ):
        read_ofa_tsv(path, "caption", cache_dir=cache)
    with pytest.raises(ValueError, match="kind must be one of"):
        read_ofa_tsv(path, "ocr", cache_dir=cache)


# ---- Hugging Face data sets ------------------------------------------------------------------------------------------
def test_hf_dataset_vqa_with_a_column_mapping(tmp_path):
    pixels = np.zeros((6, 8, 3), dtype=np.uint8)
    table = datasets.Dataset.from_dict(
        {
            "img": [Image.fromarray(pixels), Image.fromarray(pixels + 5), Image.fromarray(pixels)],
            "q": ["what is it?", "how many?", ""],
            "ans": [[{"answer": "cat"}, {"answer": "dog"}, {"answer": "cat"}], [{"answer": "2"}], [{"answer": "x"}]],
            "question_id": [100, 101, 102],
        },
        features=datasets.Features(
            {
                "img": datasets.Image(),
                "q": datasets.Value("string"),
                "ans": datasets.List({"answer": datasets.Value("string")}),
                "question_id": datasets.Value("int64"),
            }
        ),
    )
    records = read_hf_dataset(table, "vqa", columns={"image": "img", "question": "q", "answers": "ans"})
    assert len(records) == 2 and records.skip_reasons == {"empty question": 1}
    first = records[0]
    assert (first.question_id, first.image_id, first.question, first.answer, first.answers) == (
        100,
        0,
        "what is it?",
        "cat",
        ("cat", "dog", "cat"),
    )
    assert isinstance(first.image, bytes) and np.array_equal(np.asarray(load_image(records[1].image)), pixels + 5)


def test_hf_dataset_entailment_grounding_caption(tmp_path):
    image_path = tmp_path / "pic.png"
    write_image(image_path, size=(20, 10))
    snli = datasets.Dataset.from_dict(
        {"path": ["pic.png"] * 3, "hyp": ["a b", "c d", "e f"], "label": [0, 2, 1]},
        features=datasets.Features(
            {
                "path": datasets.Value("string"),
                "hyp": datasets.Value("string"),
                "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]),
            }
        ),
    )
    records = read_hf_dataset(snli, "entailment", {"image": "path", "hypothesis": "hyp"}, images_dir=tmp_path)
    assert [(r.pair_id, r.label, r.image) for r in records] == [
        (0, "yes", str(image_path)),
        (1, "no", str(image_path)),
        (2, "maybe", str(image_path)),
    ]
    boxes = datasets.Dataset.from_dict(
        {"image": [str(image_path)] * 2, "text": ["left", "far"], "bbox": [[1, 2, 5, 4], [18, 2, 5, 4]]}
    )
    grounding = read_hf_dataset(boxes, "grounding", {"expression": "text", "box": "bbox"}, box_format="xywh")
    assert [(r.box, r.width, r.height) for r in grounding] == [((1.0, 2.0, 6.0, 6.0), 20, 10)]
    assert grounding.skip_reasons == {"box outside the image": 1}
    captions = datasets.DatasetDict(
        {"test": datasets.Dataset.from_dict({"image": [str(image_path)], "sentences": ["one caption"]})}
    )
    (record,) = read_hf_dataset(captions, "caption", {"captions": "sentences"}, split="test")
    assert record.captions == ("one caption",) and record.image_id == 0
    saved = tmp_path / "saved"
    captions.save_to_disk(str(saved))
    assert list(read_hf_dataset(saved, "caption", {"captions": "sentences"}, split="test")) == [record]


def test_hf_dataset_mapping_errors(tmp_path):
    table = datasets.Dataset.from_dict({"image": ["x.png"], "q": ["why?"]})
    with pytest.raises(ReaderError, match=r"no column 'question_text' \(mapped to field 'question'\)"):
        read_hf_dataset(table, "vqa", {"question": "question_text"})
    with pytest.raises(ReaderError, match="no column for field 'answer' or 'answers'"):
        read_hf_dataset(table, "vqa", {"question": "q"})
    with pytest.raises(ReaderError, match="no column for field 'hypothesis'"):
        read_hf_dataset(table, "entailment")
    with pytest.raises(ValueError, match=r"\['colour'\] are not fields"):
        read_hf_dataset(table, "caption", {"colour": "q"})
    with pytest.raises(ValueError, match="a DatasetDict needs split"):
        read_hf_dataset(datasets.DatasetDict({"train": table}), "caption", {"captions": "q"})


# ---- RecordSet: cache and image check ---------------------------------------------------------------------------------
def test_second_read_uses_the_cache_and_an_edited_file_is_reread(tmp_path, cache):
    annotations, images = coco_captions(tmp_path)
    first = read_coco_captions(annotations, images, cache_dir=cache)
    again = read_coco_captions(annotations, images, cache_dir=cache)
    assert again.dataset.cache_files and first.dataset.cache_files[0] == again.dataset.cache_files[0]
    assert list(first) == list(again) and again.skipped == 2  # the skip count survives the cache

    data = json.loads(Path(annotations).read_text())
    data["annotations"].append({"id": 9, "image_id": 42, "caption": "Now with a caption."})
    write_image(images / "COCO_train2014_000000000042.jpg", format="JPEG")
    write_json(tmp_path / "captions_train2014.json", data)
    edited = read_coco_captions(annotations, images, cache_dir=cache)
    assert [r.image_id for r in edited] == [9, 25, 42] and edited.skipped == 1


def test_check_images_reports_bad_files(tmp_path, cache, caplog):
    annotations, images = coco_captions(tmp_path)
    (images / "COCO_train2014_000000000025.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    records = read_coco_captions(annotations, images, cache_dir=cache)
    assert len(records) == 2  # reading does not decode images
    with caplog.at_level(logging.WARNING):
        errors = records.check_images()
    assert [index for index, _ in errors] == [1] and "COCO_train2014_000000000025.jpg" in errors[0][1]
    assert "1 of 2 images cannot be loaded" in caplog.text


def test_empty_files_and_datasets_give_empty_record_sets(tmp_path, cache):
    images = tmp_path / "images"
    images.mkdir()
    empty = read_coco_captions(
        write_json(tmp_path / "empty.json", {"images": [], "annotations": []}), images, cache_dir=cache
    )
    assert len(empty) == 0 and empty.skipped == 0 and list(empty) == []
    write_image(images / "a.png")
    # A dataset viewed through an indices mapping (select) is read in its selected order.
    table = datasets.Dataset.from_dict({"image": ["missing.png", "a.png"], "caption": ["x", "y"]}).select([1, 0])
    records = read_hf_dataset(table, "caption", {"captions": "caption"}, images_dir=images)
    assert [(r.image_id, r.captions) for r in records] == [(0, ("y",))] and records.skipped == 1
