"""python bench/evaluation.py [--model runs/shapes-tiny/model] [--limit N] [--mixture tasks/shapes/mixture.yaml]

The main job's final evaluation (every task of the mixture on its `val` records, decoded as its task file says),
timed in fp32 and under bf16 autocast (`Unifier(bf16=True)`, what the job uses when it trains in bf16), one after
the other in this process. Prints per task the seconds of each, their ratio and the task's headline metric in
each, so that the speed-up and what it does to the figures are read off one run. The model and the tokenizer load
once; each pass writes its predictions to a scratch folder. Figures on a shared machine are noisy: the load average
is printed with them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEADLINE = {
    "caption": "object_set_accuracy",
    "vqa": "vqa_accuracy",
    "grounding": "acc@0.5",
    "region_caption": "exact_match",
    "entailment": "accuracy",
    "text_to_image": "exact_scene_accuracy",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/shapes-tiny/model", help="a trained model folder")
    parser.add_argument("--mixture", default=str(REPO / "tasks/shapes/mixture.yaml"), help="the tasks to evaluate")
    parser.add_argument("--limit", type=int, help="records per task (default: each task file's whole val split)")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per batch (the main job's 64)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from unifier.evaluate import evaluate_mixture
    from unifier.predict import Unifier, quiet_libraries

    quiet_libraries()
    fp32 = Unifier.from_pretrained(args.model)
    bf16 = Unifier(
        fp32.model, fp32.tokenizer, fp32.task_options, device=fp32.device, task_decoding=fp32.task_decoding, bf16=True
    )
    seconds: dict[str, dict[str, float]] = {}
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, unifier in (("fp32", fp32), ("bf16", bf16)):
            start = time.perf_counter()
            summaries = evaluate_mixture(
                unifier,
                args.mixture,
                Path(scratch) / name,
                limit=args.limit,
                batch_size=args.batch_size,
                progress=False,
            )
            seconds[name] = {task: s["seconds"] for task, s in summaries.items()}
            seconds[name]["all"] = time.perf_counter() - start
            figures[name] = {
                task: s["metrics"].get(HEADLINE.get(s["task"], ""), float("nan")) for task, s in summaries.items()
            }
    print(f"model {args.model}, records per task: {args.limit or 'all'}, load average {os.getloadavg()[0]:.2f}")
    print(f"{'task':16s} {'fp32 s':>8s} {'bf16 s':>8s} {'speed-up':>9s} {'fp32 metric':>12s} {'bf16 metric':>12s}")
    for task in seconds["fp32"]:
        ratio = seconds["fp32"][task] / max(seconds["bf16"][task], 1e-9)
        metrics = "" if task == "all" else f" {figures['fp32'][task]:12.4f} {figures['bf16'][task]:12.4f}"
        print(f"{task:16s} {seconds['fp32'][task]:8.1f} {seconds['bf16'][task]:8.1f} {ratio:8.2f}x{metrics}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
