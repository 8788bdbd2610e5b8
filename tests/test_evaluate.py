"""evaluate.py on shapes `val` data written in the public layouts, with a tiny random model folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_predict import VQA_ANSWERS, build_model_folder

from unifier.data.records import VqaRecord
from unifier.data.shapes_writer import write_shapes
from unifier.evaluate import evaluate_mixture, evaluate_task, main, records_from_paths
from unifier.predict import Unifier
from unifier.tasks import load_task_config

REPO = Path(__file__).resolve().parents[1]
METRIC_KEYS = {
    "caption": {"CIDEr", "BLEU-4", "object_set_accuracy"},
    "vqa": {"vqa_accuracy"},
    "grounding": {"acc@0.5", "mean_iou"},
    "region_caption": {"exact_match"},
    "entailment": {"accuracy"},
    "text_to_image": {"exact_scene_accuracy", "attribute_accuracy"},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models on a shared 2-core machine: torch's intra-op threads cost more than the math.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_model_folder(tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def unifier(model_dir) -> Unifier:
    return Unifier.from_pretrained(model_dir, device="cpu")


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    write_shapes(out, "val", 3, workers=1)
    return out


@pytest.mark.parametrize("task", list(METRIC_KEYS))
def test_every_task_from_a_public_layout_folder(unifier, shapes_dir, tmp_path, task):
    records = records_from_paths(task, [str(shapes_dir)], "val")
    summary = evaluate_task(unifier, task, records, out_dir=tmp_path, batch_size=4, progress=False)
    assert METRIC_KEYS[task] <= set(summary["metrics"])
    assert summary["count"] == len(records) and summary["skipped"] == 0
    for key, value in summary["metrics"].items():
        assert key == "CIDEr" or 0.0 <= value <= 1.0, (key, value)
    results = json.loads((tmp_path / f"{task}_results.json").read_text())
    metrics = json.loads((tmp_path / f"{task}_metrics.json").read_text())
    assert metrics["metrics"] == pytest.approx(summary["metrics"])
    if task == "caption":
        assert [set(r) for r in results] == [{"image_id", "caption"}] * 3
        assert metrics["caption_tokenizer"].startswith("ptb-")
    if task == "vqa":
        assert len(results) == len(records) and all(set(r) == {"question_id", "answer"} for r in results)
        assert {r["answer"] for r in results} <= set(VQA_ANSWERS)
        assert {r["question_id"] for r in results} == {rec.question_id for rec in records}
    if task == "grounding":
        assert all(len(r["box"]) == 4 and 0 <= r["iou"] <= 1 for r in results)
    if task == "entailment":
        assert {r["predicted_label"] for r in results} <= {"entailment", "contradiction", "neutral"}
    if task == "text_to_image":
        assert all((tmp_path / r["file"]).is_file() for r in results) and len(results) == 3
        assert summary["decoding"]["beams"] == 5


def test_task_file_decoding_and_limits(unifier, tmp_path):
    summary = evaluate_task(
        unifier, REPO / "tasks/shapes/text_to_image.yaml", out_dir=tmp_path, limit=2, progress=False
    )
    assert summary["records"] == 2 and summary["decoding"]["samples"] == 4 and summary["decoding"]["top_k"] == 32
    rows = json.loads((tmp_path / "text_to_image_results.json").read_text())
    assert all(r["rerank_score"] < 0 for r in rows)  # four samples each, reranked by caption likelihood
    summary = evaluate_task(unifier, REPO / "tasks/shapes/vqa.yaml", limit=5, closed_set="score", progress=False)
    assert summary["records"] == 5 and summary["decoding"]["closed_set"] == "score"


def test_a_task_kind_is_decoded_as_the_model_folder_says(tmp_path, shapes_dir):
    from test_predict import write_task_decoding

    folder = build_model_folder(tmp_path / "model")
    write_task_decoding(folder, {"vqa": {"num_beams": 2, "closed_set": "score"}, "grounding": {"num_beams": 3}})
    unifier = Unifier.from_pretrained(folder, device="cpu")
    records = [records_from_paths("vqa", [str(shapes_dir)], "val")[i] for i in range(3)]
    summary = evaluate_task(unifier, "vqa", records, progress=False)
    assert summary["decoding"]["beams"] == 2 and summary["decoding"]["closed_set"] == "score"
    summary = evaluate_task(unifier, "vqa", records, decoding={"beams": 4}, closed_set="beam", progress=False)
    assert summary["decoding"]["beams"] == 4 and summary["decoding"]["closed_set"] == "beam"  # the call's win
    # A task file's decoding replaces the folder's.
    summary = evaluate_task(unifier, REPO / "tasks/shapes/vqa.yaml", limit=2, progress=False)
    assert summary["decoding"]["beams"] == 1 and summary["decoding"]["closed_set"] == "beam"


def test_a_model_and_tokenizer_pair_evaluates_like_its_folder(unifier, model_dir, shapes_dir):
    records = records_from_paths("entailment", [str(shapes_dir)], "val")
    from unifier.modeling import load_pretrained

    pair = load_pretrained(model_dir)
    by_pair = evaluate_task(pair, "entailment", records, progress=False)
    by_folder = evaluate_task(unifier, "entailment", records, progress=False)
    assert by_pair["metrics"] == by_folder["metrics"] and by_pair["count"] == len(records)


def test_a_whole_mixture(unifier, tmp_path):
    summaries = evaluate_mixture(unifier, REPO / "tasks/shapes/mixture.yaml", out_dir=tmp_path, limit=2, progress=False)
    assert {s["task"] for s in summaries.values()} == set(METRIC_KEYS)
    combined = json.loads((tmp_path / "metrics.json").read_text())
    for name, summary in summaries.items():
        assert METRIC_KEYS[summary["task"]] <= set(combined[name]) and summary["records"] == 2
    more = evaluate_mixture(
        unifier, REPO / "tasks/shapes/mixture.yaml", limit=1, decoding={"text_to_image": {"samples": 2}}, progress=False
    )
    assert more["text_to_image"]["decoding"]["samples"] == 2 and summaries["text_to_image"]["decoding"]["samples"] == 4
    assert all(more[name]["decoding"] == summaries[name]["decoding"] for name in more if name != "text_to_image")


def test_bad_records_are_skipped_and_counted(unifier, tmp_path):
    good = VqaRecord(1, 1, str(REPO / "missing.png"), "is it red?", "yes", ("yes",) * 10)
    from unifier.data.shapes import make_scene

    image = make_scene("val", 0).render()
    records = [good, VqaRecord(2, 2, image, "is it red?", "yes", ("yes",) * 10)]
    summary = evaluate_task(unifier, "vqa", records, out_dir=tmp_path, progress=False)
    assert summary["skipped"] == 1 and summary["count"] == 1


def test_cli_with_a_task_file_and_with_data(model_dir, shapes_dir, tmp_path, capsys):
    args = ["--model", str(model_dir), "--out", str(tmp_path), "--no-progress", "--device", "cpu"]
    assert main([*args, "--task", str(REPO / "tasks/shapes/entailment.yaml"), "--limit", "4"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and (tmp_path / "entailment_metrics.json").is_file()
    assert main([*args, "--task", "grounding", "--data", str(shapes_dir / "val"), "--beams", "2"]) == 0
    metrics = json.loads((tmp_path / "grounding_metrics.json").read_text())
    assert metrics["decoding"]["beams"] == 2 and "acc@0.5" in metrics["metrics"]
    # A task file with --data: the file's answer set and decoding, the folder's records.
    assert main([*args, "--task", str(REPO / "tasks/shapes/vqa.yaml"), "--data", str(shapes_dir)]) == 0
    answers = set(load_task_config(REPO / "tasks/shapes/vqa.yaml").options["answers"])
    results = json.loads((tmp_path / "vqa_results.json").read_text())
    assert len(results) == len(records_from_paths("vqa", [str(shapes_dir)], "val"))
    assert {r["answer"] for r in results} <= answers
    t2i = ["--task", str(REPO / "tasks/shapes/text_to_image.yaml"), "--limit", "2", "--samples", "2"]
    assert main([*args, *t2i, "--guidance-scale", "3"]) == 0
    metrics = json.loads((tmp_path / "text_to_image_metrics.json").read_text())
    assert metrics["decoding"]["guidance_scale"] == 3.0 and metrics["decoding"]["samples"] == 2
    assert metrics["bf16"] is False
    assert main([*args, *t2i, "--bf16"]) == 0
    metrics = json.loads((tmp_path / "text_to_image_metrics.json").read_text())
    assert metrics["bf16"] is True and metrics["count"] == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "vqa"], "give its data with --data"),
        (["--task", "pose"], "neither a task kind"),
        (["--task", "vqa", "--data", "nowhere"], "not found: nowhere"),
        (["--task", "vqa", "--data", "DIR", "--limit", "0"], "--limit"),
    ],
)
def test_cli_errors_exit_2(model_dir, shapes_dir, tmp_path, capsys, args, message):
    args = [str(shapes_dir) if a == "DIR" else a for a in args]
    assert main(["--model", str(model_dir), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evaluate: error:") and message in err
    assert not (tmp_path / "out").exists()


def test_root_script_is_thin_and_documented():
    source = (REPO / "evaluate.py").read_text()
    assert source.startswith('"""python evaluate.py ') and "unifier.evaluate import main" in source
    result = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--task" in result.stdout


def _evaluate_in_process(rank: int, world_size: int, init_file: str, model_dir: str, shapes_dir: str, out: str):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        unifier = Unifier.from_pretrained(model_dir, device="cpu")
        records = records_from_paths("vqa", [shapes_dir], "val")
        evaluate_task(unifier, "vqa", records, out_dir=out, batch_size=3, progress=False)
    finally:
        dist.destroy_process_group()


def test_two_processes_shard_records_and_sum_before_dividing(unifier, model_dir, shapes_dir, tmp_path):
    records = records_from_paths("vqa", [str(shapes_dir)], "val")
    single = evaluate_task(unifier, "vqa", records, out_dir=tmp_path / "one", batch_size=3, progress=False)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.multiprocessing.spawn(
        _evaluate_in_process,
        args=(2, str(tmp_path / "init"), str(model_dir), str(shapes_dir), str(tmp_path / "two")),
        nprocs=2,
    )
    double = json.loads((tmp_path / "two" / "vqa_metrics.json").read_text())
    assert double["processes"] == 2 and double["count"] == single["count"] == len(records)
    assert double["metrics"] == pytest.approx(single["metrics"])
    one = sorted(json.loads((tmp_path / "one" / "vqa_results.json").read_text()), key=lambda r: r["question_id"])
    two = sorted(json.loads((tmp_path / "two" / "vqa_results.json").read_text()), key=lambda r: r["question_id"])
    assert one == two
