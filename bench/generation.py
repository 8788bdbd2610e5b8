"""python bench/generation.py [--model DIR] [--devices cpu cuda] [--repeats 5] [--threads N]

Prints, per device (CPU, and the GPU when there is one):
1. generation latency and throughput per task at batch 1 and 32 with beam search (5 beams): one
   `Unifier.run` call = collate (images to tensors) + encoder + constrained beam search + decoding;
2. the overhead of each constraint against unconstrained beam search of the same length (same model, same
   encoder states, the same number of decoder steps): the answer trie (a 17-answer set like the shapes
   world's and a 3000-answer set like VQAv2's) and the exact-length spans of boxes and images. Goal: < 5 %.

Without --model it times the project's `tiny` model size with random weights, a shapes tokenizer trained on
the spot (1000 location bins, 1024 image codes, 8 x 8 codes per image) and the shapes task files; free text
then runs to its token budget (a random model rarely says </s>), so caption latencies are upper bounds.
Figures on a shared machine are noisy: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TASKS = ("caption", "vqa", "grounding", "region_caption", "entailment", "text_to_image")


def random_unifier(device: str, scratch: Path):
    """The tiny model size with random weights over a shapes vocabulary (bins 1000, codes 1024, 8 x 8 grid)."""
    from unifier.data.shapes import corpus
    from unifier.modeling import build_model
    from unifier.predict import Unifier
    from unifier.tokenization import UnifierTokenizer
    from unifier.tokenization.image_tokenizer import ImageTokenizer
    from unifier.tokenization.text import train_text_model
    from unifier.tokenization.vocab import UnifierVocab

    torch.manual_seed(0)
    sp = train_text_model(corpus(0, 500), scratch / "text.model", vocab_size=1000)
    vocab = UnifierVocab(sp, num_bins=1000, num_codes=1024)
    ddconfig = dict(
        ch=32,
        out_ch=3,
        ch_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        attn_resolutions=[],
        in_channels=3,
        resolution=64,
        z_channels=64,
    )
    image_tokenizer = ImageTokenizer(ddconfig, n_embed=1024, embed_dim=64).eval()
    model = build_model("tiny", vocab)
    return Unifier(model, UnifierTokenizer(vocab, image_tokenizer), device=device)


def task_examples(unifier, count: int):
    """{task: (task object from tasks/shapes/*.yaml, `count` examples of shapes val records)}."""
    from unifier.data.shapes import ShapesWorld
    from unifier.predict import inference_example
    from unifier.tasks import build_task_from_config, load_task_config

    world = ShapesWorld("val")
    out = {}
    for name in TASKS:
        task = build_task_from_config(load_task_config(REPO / "tasks" / "shapes" / f"{name}.yaml"), unifier.tokenizer)
        records = list(world.iter_records(name, 0, count))[:count]
        out[name] = (task, [inference_example(task, r) for r in records])
    return out


def timed(fn, repeats: int, device: str) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_tasks(unifier, examples, repeats: int, device: str) -> None:
    from unifier.generation import DecodingOptions

    options = DecodingOptions(beams=5)
    print(f"\n[{device}] latency and throughput per task, beam search with 5 beams")
    print(f"{'task':<16}{'batch':>6}{'latency s':>12}{'examples/s':>12}{'tokens out':>12}")
    for name, (task, task_examples_) in examples.items():
        for batch_size in (1, 32):
            batch = task_examples_[:batch_size]
            outputs = []

            def call(batch=batch, task=task, outputs=outputs):
                outputs[:] = unifier.run(task, batch, options)

            seconds = timed(call, repeats if batch_size == 1 else max(1, repeats // 2), device)
            length = _output_length(outputs[0][0]) if outputs and outputs[0] else 0
            print(f"{name:<16}{batch_size:>6}{seconds:>12.4f}{batch_size / seconds:>12.1f}{length:>12}")


def _output_length(output) -> int:
    from unifier.tasks.base import BoxOutput, ImageOutput

    if isinstance(output, BoxOutput):
        return 4
    if isinstance(output, ImageOutput):
        return len(output.codes)
    return len(output.text.split())


def bench_overhead(unifier, examples, repeats: int, device: str) -> None:
    """Constrained vs unconstrained beam search of the same number of steps, batch 32, 5 beams."""
    from transformers import LogitsProcessorList

    from unifier.generation import (
        DecodingOptions,
        SpanLogitsProcessor,
        TrieLogitsProcessor,
        _generation_config,
        _range_mask,
        build_trie_table,
        encode_batch,
        fresh_encoder_outputs,
    )

    vocab, model = unifier.vocab, unifier.model
    task, batch_examples = examples["vqa"]
    batch = unifier.collator(batch_examples[:32]).to(unifier.device)
    with torch.no_grad():
        encoder_outputs, mask = encode_batch(model, batch)
    ids = (vocab.bos_id, vocab.eos_id, vocab.pad_id)
    options = DecodingOptions(beams=5)
    generator = torch.Generator().manual_seed(0)
    text_ids = torch.arange(4, vocab.text_size)

    def answer_set(size: int, tokens: int) -> list[tuple[int, ...]]:
        answers: set[tuple[int, ...]] = set()
        while len(answers) < size:
            picks = text_ids[torch.randint(len(text_ids), (tokens,), generator=generator)].tolist()
            answers.add((*picks, vocab.eos_id))
        return sorted(answers)

    def span(allowed: range, count: int) -> SpanLogitsProcessor:
        return SpanLogitsProcessor(_range_mask(vocab.size, allowed), _range_mask(vocab.size, [vocab.eos_id]), count)

    cases = []
    for size, tokens in ((17, 1), (17, 3), (3000, 3)):
        table, example_sets = build_trie_table([answer_set(size, tokens)] * 32, vocab.eos_id, vocab.size, mask.device)
        roots = table.roots[torch.tensor(example_sets, device=mask.device)]
        cases.append((f"trie, {size} answers of {tokens} token(s)", TrieLogitsProcessor(table, roots), tokens + 1))
    cases.append(("box: 4 bins + </s>", span(vocab.bin_range, 4), 5))
    codes = unifier.task("text_to_image").num_codes or 64
    cases.append((f"image: {codes} codes + </s>", span(vocab.code_range, codes), codes + 1))

    print(f"\n[{device}] constraint overhead at batch 32, 5 beams (same number of decoder steps)")
    print("  wall: median over interleaved runs of (constrained - free) / free;")
    print("  inside: the processor's own time / the constrained generate's time (robust to machine load)")
    print(f"{'constraint':<34}{'steps':>6}{'free s':>10}{'constrained s':>15}{'wall':>9}{'inside':>9}")
    for label, processor, steps in cases:
        # Both searches run `steps` decoder steps: the constrained one by construction, the free one because
        # </s> is held off until then (a trained model would stop early; a note is printed if lengths differ).
        constrained_config = _generation_config(steps, options, 0.0, ids)
        free_config = copy.deepcopy(constrained_config)
        free_config.min_new_tokens = steps
        timer = TimedProcessor(processor, device)
        lengths, free_times, constrained_times, shares = {}, [], [], []
        configs = {"free": free_config, "constrained": constrained_config}

        def run(processors, key, lengths=lengths, configs=configs):
            config = configs[key]
            start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(
                    encoder_outputs=fresh_encoder_outputs(encoder_outputs),
                    attention_mask=mask,
                    generation_config=config,
                    logits_processor=LogitsProcessorList(processors),
                )
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            lengths[key] = out.sequences.shape[1] - 1
            return time.perf_counter() - start

        run([], "free"), run([timer], "constrained")  # warm-up
        for _ in range(repeats):
            free_times.append(run([], "free"))
            timer.seconds = 0.0
            constrained_times.append(run([timer], "constrained"))
            shares.append(timer.seconds / constrained_times[-1])
        free, constrained = statistics.median(free_times), statistics.median(constrained_times)
        same = "" if lengths["free"] == lengths["constrained"] else f"  (lengths {lengths})"
        wall, inside = 100 * (constrained - free) / free, 100 * statistics.median(shares)
        print(f"{label:<34}{steps:>6}{free:>10.4f}{constrained:>15.4f}{wall:>8.1f}%{inside:>8.2f}%{same}")


class TimedProcessor:
    """Wraps a logits processor and adds up the seconds spent in it."""

    def __init__(self, processor, device: str):
        self.processor, self.device, self.seconds = processor, device, 0.0

    def __call__(self, input_ids, scores):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = self.processor(input_ids, scores)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model folder (default: the tiny size with random weights)")
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="devices to time (cuda if available)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per figure (median)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--skip-tasks", action="store_true", help="only the constraint overhead")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from unifier.predict import Unifier

    devices = [d for d in args.devices if d == "cpu" or (d.startswith("cuda") and torch.cuda.is_available())]
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="bench-generation-") as scratch:
        for device in devices:
            if args.model:
                unifier = Unifier.from_pretrained(args.model, device=device)
            else:
                unifier = random_unifier(device, Path(scratch))
            config = unifier.model.config
            print(
                f"\nmodel: {'random tiny' if not args.model else args.model}: d_model {config.d_model}, "
                f"{config.encoder_layers}+{config.decoder_layers} layers, vocabulary {config.vocab_size}, "
                f"{sum(p.numel() for p in unifier.model.parameters()) / 1e6:.1f} M parameters, device {device}"
            )
            examples = task_examples(unifier, 32)
            if not args.skip_tasks:
                bench_tasks(unifier, examples, args.repeats, device)
            bench_overhead(unifier, examples, args.repeats, device)
    print(f"\nload average at the end {os.getloadavg()} (the machine is shared: figures are noisy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
