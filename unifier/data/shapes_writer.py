"""Write one split of the shapes world to disk in the public data layouts, so the same readers serve both.

    write_shapes("data/shapes", "val", 1000)      # or: unifier data shapes --out data/shapes --split val --n 1000

Layout of OUT/{split}/ (shared/shapes-world.md, "Files"):
    images/{image_id:06d}.png      one PNG per scene
    captions.json                  COCO captions: images [{id, file_name, width, height}], annotations [{id, image_id, caption}]
    vqa_questions.json             VQAv2 questions: questions [{image_id, question, question_id}]
    vqa_annotations.json           VQAv2 annotations: [{question_id, image_id, question_type, answer_type,
                                   multiple_choice_answer, answers: 10 x {answer, answer_confidence, answer_id}}]
    instances.json                 COCO instances: images, annotations [{id, image_id, category_id, bbox [x, y, w, h],
                                   area, iscrowd}], categories (the 18 (color, shape) pairs)
    refs.json                      the refer toolkit's refs: [{ref_id, image_id, ann_id, split, category_id,
                                   sentences: [{sent, raw, tokens, sent_id}], sent_ids}], sentences
                                   [`{size} {color} {shape}`, `{color} {shape}`]
    snli_ve.jsonl                  SNLI-VE lines {Flickr30K_ID, sentence1, sentence2, gold_label, pairID} plus
                                   hypothesis_type (the template; SNLI-VE's own lines have none)
    manifest.json                  {split, n, seed, image_size, counts, files}: written last

Ids are the generator's: image id = scene index, caption id = image_id * 10 + k, question_id =
image_id * 100 + family index, ann_id = ref_id = image_id * 10 + object index, sent_id = ref_id * 10 + k,
pairID = image_id * 10 + k; Flickr30K_ID is the image file's stem (`f"{image_id:06d}"`).

The split is built in a temporary folder beside it and renamed into place at the end, so a folder
named `{split}` is always complete (`is_written` checks it); an interrupted write leaves only a
hidden `.{split}.tmp-*` folder, which the next write of that split removes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path

from PIL import Image

from unifier.data.records import SNLI_VE_LABEL_TO_ANSWER
from unifier.data.shapes import COLORS, QUESTION_FAMILIES, SHAPES, check_scene_args, make_scene, scene_records

ANSWER_TO_SNLI_VE_LABEL = {answer: label for label, answer in SNLI_VE_LABEL_TO_ANSWER.items()}
# COCO category per (color, shape) pair: ids 1..18, color-major.
CATEGORIES = [
    {"id": 1 + i, "name": f"{color} {shape}", "supercategory": shape}
    for i, (color, shape) in enumerate((color, shape) for color in COLORS for shape in SHAPES)
]
CATEGORY_IDS = {category["name"]: category["id"] for category in CATEGORIES}
FILES = (
    "captions.json",
    "vqa_questions.json",
    "vqa_annotations.json",
    "instances.json",
    "refs.json",
    "snli_ve.jsonl",
    "manifest.json",
)
MANIFEST = "manifest.json"
FAMILY_NAMES = tuple(QUESTION_FAMILIES)  # VQAv2's question_type: the family asked
DATASET_NAME = "unifier shapes world"


def image_file_name(image_id: int) -> str:
    return f"{image_id:06d}.png"


def _scene_entries(split: str, index: int, seed: int, image_size: int, image_dir: Path) -> dict[str, list]:
    """Render scene `index`, save its PNG into image_dir, and return its entries of every file."""
    scene = make_scene(split, index, seed, image_size)
    image = scene.render()
    image_id, file_name = scene.image_id, image_file_name(scene.image_id)
    Image.fromarray(image).save(image_dir / file_name, format="PNG")
    image_entry = {"id": image_id, "file_name": file_name, "width": image_size, "height": image_size}

    entries: dict[str, list] = {"images": [image_entry]}
    (caption_record,) = scene_records(scene, "caption", image)
    entries["captions"] = [
        {"id": image_id * 10 + k, "image_id": image_id, "caption": caption}
        for k, caption in enumerate(caption_record.captions)
    ]
    entries["questions"], entries["vqa_annotations"] = [], []
    for record in scene_records(scene, "vqa", image):
        family_index = record.question_id % 100
        entries["questions"].append(
            {"image_id": image_id, "question": record.question, "question_id": record.question_id}
        )
        entries["vqa_annotations"].append(
            {
                "question_id": record.question_id,
                "image_id": image_id,
                "question_type": FAMILY_NAMES[family_index],
                "answer_type": record.answer_type,
                "multiple_choice_answer": record.answer,
                "answers": [
                    {"answer": answer, "answer_confidence": "yes", "answer_id": k + 1}
                    for k, answer in enumerate(record.answers)
                ],
            }
        )
    entries["instances"], entries["refs"] = [], []
    for record, obj in zip(scene_records(scene, "region_caption", image), scene.objects, strict=True):
        x0, y0, x1, y1 = obj.box
        category_id = CATEGORY_IDS[obj.expression]
        # COCO's area is the object's pixel count, not its box's.
        area = int(obj.mask().sum())
        entries["instances"].append(
            {
                "id": record.ref_id,
                "image_id": image_id,
                "category_id": category_id,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": area,
                "iscrowd": 0,
            }
        )
        sent_ids = [record.ref_id * 10 + k for k in range(len(record.phrases))]
        entries["refs"].append(
            {
                "ref_id": record.ref_id,
                "image_id": image_id,
                "ann_id": record.ref_id,
                "split": split,
                "category_id": category_id,
                "sentences": [
                    {"sent": phrase, "raw": phrase, "tokens": phrase.split(), "sent_id": sent_id}
                    for phrase, sent_id in zip(record.phrases, sent_ids, strict=True)
                ],
                "sent_ids": sent_ids,
            }
        )
    entries["snli_ve"] = [
        {
            "Flickr30K_ID": Path(file_name).stem,
            "sentence1": record.premise,
            "sentence2": record.hypothesis,
            "gold_label": ANSWER_TO_SNLI_VE_LABEL[record.label],
            "pairID": record.pair_id,
            "hypothesis_type": record.hypothesis_type,
        }
        for record in scene_records(scene, "entailment", image)
    ]
    return entries


def _write_chunk(job: tuple[str, int, int, int, int, str]) -> dict[str, list]:
    """Pool worker: scenes [start, stop) -> their entries, concatenated in index order."""
    split, seed, image_size, start, stop, image_dir = job
    chunk: dict[str, list] = {}
    for index in range(start, stop):
        for key, values in _scene_entries(split, index, seed, image_size, Path(image_dir)).items():
            chunk.setdefault(key, []).extend(values)
    return chunk


def _dump_json(path: Path, payload) -> None:
    # json.dumps runs the C encoder; json.dump streaming into a file runs the pure-Python one (5x slower).
    path.write_text(json.dumps(payload, separators=(",", ":")), encoding="utf-8")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out_dir: Path, split: str) -> int:
    """Remove `.{split}.tmp-{pid}-*` / `.{split}.old-{pid}-*` folders whose writer process is gone; returns how many."""
    removed = 0
    for path in list(out_dir.glob(f".{split}.tmp-*")) + list(out_dir.glob(f".{split}.old-*")):
        pid_text = path.name.split("-", 2)[1]
        if path.is_dir() and not (pid_text.isdigit() and _pid_alive(int(pid_text))):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


def is_written(out_dir: str | Path, split: str) -> bool:
    """Is OUT/{split} a finished write (its manifest and every file present)?"""
    folder = Path(out_dir) / split
    return all((folder / name).is_file() for name in FILES) and (folder / "images").is_dir()


def read_manifest(out_dir: str | Path, split: str) -> dict:
    """The manifest of a finished split; a clear error when the split is missing or unfinished."""
    path = Path(out_dir) / split / MANIFEST
    if not is_written(out_dir, split):
        raise FileNotFoundError(
            f"shapes world: {path.parent} is not a finished write (no {MANIFEST} or a file missing)"
        )
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def write_shapes(
    out_dir: str | Path,
    split: str,
    n: int,
    seed: int = 0,
    image_size: int = 64,
    workers: int | None = None,
    chunk_size: int | None = None,
) -> dict[str, int]:
    """Write scenes 0 .. n - 1 of `split` to OUT/{split} in the public layouts; returns the counts
    {images, captions, questions, objects, refs, sentences, entailment_pairs}. An existing OUT/{split}
    is replaced only once the new one is complete. `workers` processes render and save the PNGs
    (default: the CPUs this process may use; 1 writes in this process)."""
    check_scene_args(split, 0, image_size)
    if n < 1:
        raise ValueError(f"shapes world: n must be at least 1, got {n}")
    workers = max(1, min(workers or default_workers(), n))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir, split)
    temporary = Path(tempfile.mkdtemp(prefix=f".{split}.tmp-{os.getpid()}-", dir=out_dir))
    try:
        temporary.chmod(0o755)  # mkdtemp makes it private; the finished split is an ordinary folder
        image_dir = temporary / "images"
        image_dir.mkdir()
        # Small chunks keep both processes busy to the end; large ones keep the pickling overhead low.
        chunk_size = chunk_size or max(16, min(500, n // (workers * 8) or 1))
        jobs = [
            (split, seed, image_size, start, min(start + chunk_size, n), str(image_dir))
            for start in range(0, n, chunk_size)
        ]
        entries: dict[str, list] = {}
        if workers == 1:
            for chunk in map(_write_chunk, jobs):
                _merge(entries, chunk)
        else:
            # spawn, not fork: forking a process that holds threads (torch, a data loader) can deadlock.
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for chunk in pool.imap(_write_chunk, jobs):
                    _merge(entries, chunk)
        counts = _write_annotation_files(temporary, entries, split, n, seed, image_size)
        _move_into_place(temporary, out_dir / split)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return counts


def _merge(entries: dict[str, list], chunk: dict[str, list]) -> None:
    for key, values in chunk.items():
        entries.setdefault(key, []).extend(values)


def _write_annotation_files(
    folder: Path, entries: dict[str, list], split: str, n: int, seed: int, image_size: int
) -> dict[str, int]:
    info = {"description": f"{DATASET_NAME}, split {split}, seed {seed}, {image_size} px", "version": "1.0"}
    images = entries["images"]
    _dump_json(folder / "captions.json", {"info": info, "images": images, "annotations": entries["captions"]})
    vqa_header = {"info": info, "task_type": "Open-Ended", "data_type": "shapes", "data_subtype": split}
    _dump_json(folder / "vqa_questions.json", {**vqa_header, "questions": entries["questions"]})
    _dump_json(folder / "vqa_annotations.json", {**vqa_header, "annotations": entries["vqa_annotations"]})
    instances = {"info": info, "images": images, "annotations": entries["instances"], "categories": CATEGORIES}
    _dump_json(folder / "instances.json", instances)
    _dump_json(folder / "refs.json", entries["refs"])
    with open(folder / "snli_ve.jsonl", "w", encoding="utf-8") as file:
        file.writelines(json.dumps(line) + "\n" for line in entries["snli_ve"])
    counts = {
        "images": len(images),
        "captions": len(entries["captions"]),
        "questions": len(entries["questions"]),
        "objects": len(entries["instances"]),
        "refs": len(entries["refs"]),
        "sentences": sum(len(ref["sentences"]) for ref in entries["refs"]),
        "entailment_pairs": len(entries["snli_ve"]),
    }
    manifest = {
        "dataset": DATASET_NAME,
        "split": split,
        "n": n,
        "seed": seed,
        "image_size": image_size,
        "counts": counts,
        "files": list(FILES),
    }
    _dump_json(folder / MANIFEST, manifest)  # last: its presence marks the files complete
    return counts


def _move_into_place(temporary: Path, final: Path) -> None:
    """Rename the finished folder to `final`; an existing `final` is set aside first and removed after."""
    if not final.exists():
        temporary.rename(final)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-{os.getpid()}-", dir=final.parent))
    old.rmdir()
    final.rename(old)
    temporary.rename(final)
    shutil.rmtree(old, ignore_errors=True)
