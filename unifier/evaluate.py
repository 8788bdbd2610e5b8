"""`python evaluate.py --model DIR --task tasks/shapes/vqa.yaml [--split val] [--limit N] [--out DIR]`

Evaluates a model on one task and writes the predictions in the public result formats plus a metrics JSON:

    caption          {name}_results.json  COCO caption results [{image_id, caption}]
    vqa              {name}_results.json  VQA results [{question_id, answer}]
    grounding        {name}_results.json  [{ref_id, image_id, expression, box: [x0, y0, x1, y1] pixels, iou}]
    region_caption   {name}_results.json  [{ref_id, image_id, box, caption, references}]
    entailment       {name}_results.json  SNLI-VE predictions [{pairID, image_id, hypothesis, answer,
                                          predicted_label, gold_label}]
    text_to_image    {name}_images/{uid}.png and {name}_results.json [{uid, caption, file, score, rerank_score}]
    every task       {name}_metrics.json  {task, name, split, metrics: {...}, count, skipped, decoding, bf16, ...}

The task is a task file (its data source and split, options and decoding) or a task kind (decoded as the
model folder's decoding.json says, the way its training run evaluated it). `--data`
(with either; a task file keeps its options, such as the answer set, and its decoding) reads the records
from a public layout instead: a shapes folder written by `unifier data shapes` (OUT/{split} or OUT), an
OFA TSV file, or the public files themselves:

    --task tasks/shapes/vqa.yaml --data data/shapes/val
    --task caption        --data captions.json images/            (COCO captions; Karpathy's dataset_coco.json too)
    --task vqa            --data questions.json annotations.json images/
    --task grounding      --data refs.json instances.json images/  (refs(unc).p works too)
    --task region_caption --data refs.json instances.json images/
    --task entailment     --data snli_ve_dev.jsonl images/
    --task text_to_image  --data captions.json images/

Runs in batches on the GPU when there is one; under `torchrun` / `accelerate launch` each process takes
every n-th record, and the metric sums and predictions are gathered before dividing and writing. From
Python (the training job evaluates all six tasks this way):

    figures = evaluate_task(Unifier.from_pretrained("runs/shapes-tiny/model"), "tasks/shapes/vqa.yaml",
                            records=None, out_dir="runs/shapes-tiny/eval", split="val")
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from unifier.metrics import build_metric, compute_metrics, headline_figures, merge_states
from unifier.tasks.base import BoxOutput, ImageOutput, TextOutput

DEFAULT_BATCH_SIZE = 16
# The fields of each task's rows that make its public results file (metric rows may carry more).
PUBLIC_FIELDS = {
    "caption": ("image_id", "caption"),
    "vqa": ("question_id", "answer"),
    "grounding": ("ref_id", "image_id", "expression", "box", "iou"),
    "region_caption": ("ref_id", "image_id", "box", "caption", "references"),
    "entailment": ("pairID", "image_id", "hypothesis", "answer", "predicted_label", "gold_label"),
    "text_to_image": ("uid", "caption", "file", "score", "rerank_score", "parsed_scene"),
}


class EvaluateError(ValueError):
    """Arguments or data that cannot be evaluated; the message names the file or option."""


# ---------------------------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------------------------


def process_group() -> tuple[int, int]:
    """(rank, world size) of torch.distributed when initialized, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(value: Any, world_size: int) -> list[Any]:
    """Every process's `value` (picklable), in rank order; [value] on one process."""
    if world_size == 1:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered


def init_processes_from_env() -> tuple[int, int, int]:
    """Join the process group torchrun / accelerate launch describe in the environment (rank, world, local rank)."""
    import torch
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    rank, world_size = process_group()
    return rank, world_size, local_rank


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------


def _write_json(path: Path, payload: Any) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def _save_png(image: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def _empty_output(task: str):
    """What a record with no decodable answer is scored as: a wrong answer, not a missing one."""
    if task == "grounding":
        return BoxOutput((0.0, 0.0, 0.0, 0.0))
    if task == "text_to_image":
        return ImageOutput(codes=())
    return TextOutput("")


def _resolve_task(unifier: Any, task_config_or_name: Any):
    """(task object, TaskConfig or None) from a TaskConfig, a task file path or a task kind."""
    from unifier.predict import TASK_NAMES
    from unifier.tasks import TaskConfig, build_task_from_config, load_task_config

    config = task_config_or_name
    if isinstance(config, (str, Path)) and str(config) in TASK_NAMES:
        return unifier.task(str(config)), None
    if isinstance(config, (str, Path)):
        config = load_task_config(config)
    if not isinstance(config, TaskConfig):
        raise EvaluateError(f"task: expected a task kind, a task file or a TaskConfig, got {type(config).__name__}")
    # The model folder's own options (answer sets it was trained with) under the file's.
    config = dataclasses.replace(config, options={**unifier.task_options.get(config.kind, {}), **config.options})
    return build_task_from_config(config, unifier.tokenizer), config


def evaluate_task(
    model_or_unifier: Any,
    task_config_or_name: Any,
    records: Iterable | None = None,
    out_dir: str | Path | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    split: str = "val",
    limit: int | None = None,
    decoding: dict[str, Any] | None = None,
    closed_set: str | None = None,
    progress: bool = True,
    device: Any = None,
) -> dict[str, Any]:
    """Evaluate one task; returns the metrics JSON's content (also written to out_dir with the results).

    model_or_unifier: a `Unifier`, a model folder or a (model, tokenizer) pair; task_config_or_name: a
    TaskConfig, a task file or a task kind; records: the records to score (None: the config's `split`);
    decoding: DecodingOptions field overrides (beams, samples, top_k, ...) over the task file's `decoding:`;
    closed_set: "beam" (trie-constrained beam search) or "score" (exhaustive scoring of the answer set)."""
    from tqdm.auto import tqdm

    from unifier.generation import task_decoding
    from unifier.images import load_image
    from unifier.predict import Unifier, inference_example

    unifier = model_or_unifier
    if isinstance(unifier, (str, Path)):
        unifier = Unifier.from_pretrained(unifier, device=device)
    elif isinstance(unifier, tuple):
        model, tokenizer = unifier  # e.g. the training job's model (now in eval mode) and its tokenizer
        unifier = Unifier(model, tokenizer, device=device or next(model.parameters()).device)
    task, config = _resolve_task(unifier, task_config_or_name)
    name = config.name if config is not None else task.name
    # A task file's decoding, else the model folder's for the task kind (decoding.json), under the call's.
    stored = config.decoding if config is not None else unifier.task_decoding.get(task.name)
    try:
        options, closed_set = task_decoding(stored, **(decoding or {}), closed_set=closed_set)
    except (TypeError, ValueError) as e:
        raise EvaluateError(f"{name}: decoding options: {e}") from e
    if batch_size < 1:
        raise EvaluateError(f"batch_size must be >= 1, got {batch_size}")
    if records is None:
        if config is None:
            raise EvaluateError(f"{name}: give records (or --data) or a task file that names its data")
        from unifier.tasks import open_records

        records = open_records(config, split)
    if limit is not None:
        records = itertools.islice(records, limit)
    records = list(records)

    rank, world_size = process_group()
    shard = records[rank::world_size]
    metric = build_metric(task.name)
    out = Path(out_dir) if out_dir is not None else None
    image_dir = out / f"{name}_images" if out is not None and task.name == "text_to_image" else None
    if image_dir is not None:
        image_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    counts = {"skipped": 0, "no_output": 0}
    start = time.perf_counter()
    bar = tqdm(total=len(records), desc=f"evaluate {name}", unit="ex", disable=not progress or rank != 0)
    for begin in range(0, len(shard), batch_size):
        batch_records = shard[begin : begin + batch_size]
        examples, kept = [], []
        for record in batch_records:
            # A record whose image or fields cannot be used is skipped and counted, not fatal.
            try:
                image = load_image(record.image) if task.has_image_input else None
                examples.append(inference_example(task, record, image))
                kept.append(record)
            except (ValueError, OSError, KeyError):
                counts["skipped"] += 1
        outputs = unifier.run(task, examples, options, closed_set=closed_set) if examples else []
        for record, found in zip(kept, outputs, strict=True):
            output = found[0] if found else _empty_output(task.name)
            counts["no_output"] += not found
            row = metric.add(record, output)
            if task.name == "text_to_image":
                row["score"] = output.score
                if image_dir is not None and output.image is not None:
                    file = image_dir / f"{record.uid}.png"
                    _save_png(output.image, file)
                    row["file"] = str(file.relative_to(out))
            rows.append(row)
        bar.update(len(batch_records) * world_size)
    bar.close()
    seconds = time.perf_counter() - start

    states = gather((metric.state(), rows, counts), world_size)
    state = merge_states([s for s, _, _ in states])
    all_rows = [row for _, shard_rows, _ in states for row in shard_rows]
    totals = {key: sum(c[key] for _, _, c in states) for key in counts}
    figures = compute_metrics(task.name, state)
    summary = {
        "task": task.name,
        "name": name,
        "split": split if config is not None else None,
        "metrics": {k: v for k, v in figures.items() if k not in ("count", "tokenizer")},
        "count": figures.get("count", 0),
        "records": len(records),
        "skipped": totals["skipped"],
        "no_output": totals["no_output"],
        "decoding": {**{k: v for k, v in vars(options).items() if v is not None}, "closed_set": closed_set},
        "bf16": unifier.bf16,
        "seconds": round(seconds, 2),
        "examples_per_second": round(len(shard) / seconds, 2) if seconds > 0 else None,
        "processes": world_size,
    }
    if figures.get("tokenizer"):
        summary["caption_tokenizer"] = figures["tokenizer"]
    if out is not None and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        results = _public_results(task.name, all_rows)
        summary["results_file"] = str(_write_json(out / f"{name}_results.json", results))
        summary["metrics_file"] = str(out / f"{name}_metrics.json")
        _write_json(out / f"{name}_metrics.json", summary)
    return summary


def evaluate_mixture(
    model_or_unifier: Any,
    mixture: str | Path,
    out_dir: str | Path | None = None,
    split: str = "val",
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    decoding: dict[str, dict[str, Any]] | None = None,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Every task of a mixture file on its own data (`split`, the first `limit` records of each):
    {task name: evaluate_task's summary}; with out_dir also a combined metrics.json there. decoding:
    {task name: evaluate_task's `decoding` overrides} for some of the tasks."""
    from unifier.predict import Unifier
    from unifier.tasks import load_mixture

    unifier = model_or_unifier
    if isinstance(unifier, (str, Path)):
        unifier = Unifier.from_pretrained(unifier)
    summaries = {}
    for config, _ in load_mixture(mixture):
        summaries[config.name] = evaluate_task(
            unifier,
            config,
            out_dir=out_dir,
            split=split,
            limit=limit,
            batch_size=batch_size,
            decoding=(decoding or {}).get(config.name),
            progress=progress,
        )
    if out_dir is not None and process_group()[0] == 0:
        _write_json(Path(out_dir) / "metrics.json", {name: s["metrics"] for name, s in summaries.items()})
    return summaries


def _public_results(task: str, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    fields = PUBLIC_FIELDS[task]
    results = [{k: row[k] for k in fields if k in row} for row in rows]
    if task == "caption":
        # COCO's evaluation takes one caption per image.
        seen: dict[Any, dict[str, Any]] = {}
        for result in results:
            seen.setdefault(result["image_id"], result)
        results = list(seen.values())
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Data given on the command line
# ---------------------------------------------------------------------------------------------------------------------


def records_from_paths(task: str, paths: Sequence[str], split: str | None = None) -> Any:
    """Records of `task` from files in a public layout (see the module docstring)."""
    from unifier.data import readers

    if not paths:
        raise EvaluateError("--data: give a folder or files")
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise EvaluateError(f"--data: not found: {', '.join(missing)}")
    first = Path(paths[0])
    if len(paths) == 1 and first.is_dir():
        folder = first / split if split and (first / split / "manifest.json").is_file() else first
        return readers.read_shapes_folder(folder, task)
    if len(paths) == 1 and first.suffix == ".tsv":
        kind = {"grounding": "refcoco", "entailment": "snli_ve"}.get(task, task)
        return readers.read_ofa_tsv(first, kind)
    folders = [p for p in paths if Path(p).is_dir()]
    files = [p for p in paths if Path(p).is_file()]
    if len(folders) != 1:
        raise EvaluateError(f"--data for {task}: give annotation file(s) and one images folder, got {list(paths)}")
    images = folders[0]
    if task == "caption" and len(files) == 1:
        content = json.loads(Path(files[0]).read_text())
        if isinstance(content, dict) and "annotations" not in content and "images" in content:
            return readers.read_karpathy(files[0], images, split or "test")
        return readers.read_coco_captions(files[0], images)
    if task == "text_to_image" and len(files) == 1:
        return readers.read_coco_text_to_image(files[0], images)
    if task == "vqa" and len(files) in (1, 2):
        return readers.read_vqav2(files[0], files[1] if len(files) == 2 else None, images)
    if task in ("grounding", "region_caption") and len(files) == 2:
        read = readers.read_refs if task == "grounding" else readers.read_region_captions
        return read(files[0], files[1], images, split)
    if task == "entailment" and len(files) == 1:
        return readers.read_snli_ve(files[0], images)
    raise EvaluateError(f"--data for {task}: these files do not make a known public layout: {list(paths)}")


# ---------------------------------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python evaluate.py",
        description="Evaluate a Unifier model on one task: predictions in the public result formats + metrics JSON.",
    )
    parser.add_argument("--model", required=True, help="model folder (config.json, model.safetensors, tokenizer/)")
    parser.add_argument("--task", required=True, help="a task file (tasks/shapes/vqa.yaml) or a task kind with --data")
    parser.add_argument(
        "--data", nargs="+", help="a shapes folder, an OFA TSV or public files (with a task file: instead of its data)"
    )
    parser.add_argument("--split", default="val", help="split of the task file's data (default val)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N records")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="examples per batch")
    parser.add_argument("--beams", type=int, help="beam width (default: the task file's)")
    parser.add_argument("--samples", type=int, help="sample this many outputs (text-to-image: reranked)")
    parser.add_argument("--temperature", type=float, help="sampling temperature")
    parser.add_argument("--top-k", type=int, help="sampling: keep the k most likely tokens")
    parser.add_argument("--top-p", type=float, help="sampling: nucleus probability mass")
    parser.add_argument("--seed", type=int, help="sampling seed")
    parser.add_argument(
        "--guidance-scale",
        type=float,
        help="text-to-image: classifier-free guidance scale (1: none; default: the task file's)",
    )
    parser.add_argument("--closed-set", choices=("beam", "score"), help="answer sets: beam search or exhaustive")
    parser.add_argument("--out", default="runs/eval", help="folder for the results and metrics (default runs/eval)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available; the local rank's GPU)")
    parser.add_argument(
        "--bf16", action="store_true", help="decode under bf16 autocast (faster where the CPU or GPU has bf16)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from unifier.predict import TASK_NAMES, PredictError, Unifier, quiet_libraries

    try:
        if args.limit is not None and args.limit < 1:
            raise EvaluateError(f"--limit must be >= 1, got {args.limit}")
        is_kind = args.task in TASK_NAMES
        if not is_kind and not Path(args.task).is_file():
            raise EvaluateError(f"--task {args.task}: neither a task kind ({', '.join(TASK_NAMES)}) nor a task file")
        if is_kind and not args.data:
            raise EvaluateError(f"--task {args.task} is a task kind: give its data with --data")
        if not Path(args.model).is_dir():
            raise EvaluateError(f"model folder not found: {args.model}")
        quiet_libraries()
        kind = args.task if is_kind else _config_kind(args.task)
        records = records_from_paths(kind, args.data, args.split) if args.data else None
        rank, world_size, local_rank = init_processes_from_env()
        device = args.device or (f"cuda:{local_rank}" if _cuda() else "cpu")
        unifier = Unifier.from_pretrained(args.model, device=device, bf16=args.bf16)
        decoding = {
            "beams": args.beams,
            "samples": args.samples,
            "temperature": args.temperature,
            "top_k": args.top_k,
            "top_p": args.top_p,
            "seed": args.seed,
            "guidance_scale": args.guidance_scale,
        }
        summary = evaluate_task(
            unifier,
            args.task,
            records=records,
            out_dir=args.out,
            batch_size=args.batch_size,
            split=args.split,
            limit=args.limit,
            decoding=decoding,
            closed_set=args.closed_set,
            progress=not args.no_progress,
        )
    except (EvaluateError, PredictError, ValueError, OSError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        figures = ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in headline_figures(summary["metrics"]).items()
        )
        print(f"{summary['name']} ({summary['count']} examples): {figures}")
        print(f"wrote {summary['results_file']} and {summary['metrics_file']}")
    return 0


def _config_kind(path: str) -> str:
    from unifier.tasks import load_task_config

    return load_task_config(path).kind


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
