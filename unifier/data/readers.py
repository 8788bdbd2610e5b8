"""Readers of the public data layouts: the one entry point (`from unifier.data.readers import read_...`).

Every reader returns a `RecordSet`: the records of one task kind (unifier/data/records.py), backed by a
memory-mapped Arrow `datasets.Dataset`, with `len()`, indexing, iteration, `.skipped` (bad records left
out, with a logged summary) and `.check_images()`. Images are not decoded while reading.

    read_coco_captions(annotations_json, images_dir)                 -> CaptionRecord per image
    read_karpathy(dataset_coco_json, images_root, split)             -> CaptionRecord per image
    read_coco_text_to_image(annotations_json, images_dir)            -> TextToImageRecord per image
    read_vqav2(questions_json, annotations_json | None, images_dir)  -> VqaRecord per question
    read_refs(refs_path, instances_json, images_dir, split)          -> GroundingRecord per sentence
    read_region_captions(refs_path, instances_json, images_dir)      -> RegionCaptionRecord per ref
    read_snli_ve(jsonl_path, images_dir)                             -> EntailmentRecord per line
    read_ofa_tsv(path, kind)                                         -> records of OFA's TSV files
    read_hf_dataset(dataset_or_name, task, columns)                  -> records of a Hugging Face data set
    read_shapes_folder(folder, task)                                 -> records of a written shapes split

A malformed annotation file raises ReaderError (naming the file and the field) at once.
"""

from __future__ import annotations

from pathlib import Path

from unifier.data.readers_hf import read_hf_dataset
from unifier.data.readers_ofa import OFA_TSV_KINDS, read_ofa_tsv
from unifier.data.readers_public import (
    load_plain_pickle,
    load_refs,
    read_coco_captions,
    read_coco_text_to_image,
    read_karpathy,
    read_refs,
    read_region_captions,
    read_snli_ve,
    read_vqav2,
)
from unifier.data.recordset import ReaderError, RecordSet, Skip

__all__ = [
    "OFA_TSV_KINDS",
    "ReaderError",
    "RecordSet",
    "Skip",
    "load_plain_pickle",
    "load_refs",
    "read_coco_captions",
    "read_coco_text_to_image",
    "read_hf_dataset",
    "read_karpathy",
    "read_ofa_tsv",
    "read_refs",
    "read_region_captions",
    "read_shapes_folder",
    "read_snli_ve",
    "read_vqav2",
]


def read_shapes_folder(folder: str | Path, task: str, *, cache_dir: str | Path | None = None) -> RecordSet:
    """Records of one split written by `unifier.data.shapes_writer.write_shapes` (the folder OUT/{split}),
    read through the public-layout readers above, so they check each other.

    task: caption (captions.json), vqa (vqa_questions.json + vqa_annotations.json), grounding and
    region_caption (refs.json + instances.json), entailment (snli_ve.jsonl), text_to_image (the first,
    canonical caption of each image in captions.json).
    """
    folder = Path(folder)
    if not (folder / "manifest.json").is_file():
        raise ReaderError(f"{folder}: not a finished shapes split (no manifest.json; see unifier.data.shapes_writer)")
    images = folder / "images"
    if task == "caption":
        return read_coco_captions(folder / "captions.json", images, cache_dir=cache_dir)
    if task == "text_to_image":
        return read_coco_text_to_image(folder / "captions.json", images, cache_dir=cache_dir)
    if task == "vqa":
        return read_vqav2(
            folder / "vqa_questions.json",
            folder / "vqa_annotations.json",
            images,
            image_name="{image_id:06d}.png",
            cache_dir=cache_dir,
        )
    if task == "grounding":
        return read_refs(folder / "refs.json", folder / "instances.json", images, cache_dir=cache_dir)
    if task == "region_caption":
        return read_region_captions(folder / "refs.json", folder / "instances.json", images, cache_dir=cache_dir)
    if task == "entailment":
        return read_snli_ve(folder / "snli_ve.jsonl", images, image_ext=".png", cache_dir=cache_dir)
    raise ValueError(
        f"read_shapes_folder: unknown task {task!r}; expected caption, vqa, grounding, region_caption, "
        "entailment or text_to_image"
    )
