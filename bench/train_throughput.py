"""python bench/train_throughput.py [--sizes tiny base] [--steps 10] [--engines [--rounds 3]] [--out FILE.json]

Training throughput of the Unifier model: samples/s, tokens/s and model FLOPs utilisation (MFU) for each model size,
single process vs DeepSpeed ZeRO-2 with 2 processes, fp32 vs bf16 autocast, the ratio of DeepSpeed ZeRO-2
(single process) to a plain torch loop at the tiny size, and at the tiny size the main job's setting (ZeRO-2, one
process, bf16) with each attention kernel (`attn_implementation` sdpa and eager).

`--engines` measures only the engines of one process at the tiny size, in the precision `bf16: auto` takes here: the
plain torch loop (zero 0), DeepSpeed without partitioning (zero auto, the main job's) and ZeRO-2, in `--rounds`
alternating rounds (a shared machine drifts between configurations), and prints each round's ratios and the medians.

Every configuration runs in its own process (`torchrun` for 2 processes) through unifier.train's own accelerator
and `train_step`, on fixed pre-collated batches of the shapes-world mixture (data preparation is not timed), with a
small tokenizer built here (sentencepiece + 1000 bins + a random VQ-GAN: the model's cost, not its quality).
Model FLOPs per step are counted by torch's FlopCounterMode on one forward + backward; the peak is a measured
matmul peak on CPU (fp32 and bf16 separately) and the datasheet dense bf16 / tf32 peak on a known GPU.
Figures on a shared machine are noisy: every configuration reports the median step time.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# Dense tensor-core peaks from NVIDIA's datasheets (FLOP/s): bf16 and tf32 (the fp32 matmul path).
GPU_PEAKS = {
    "H100": {"bf16": 989e12, "fp32": 494e12},
    "H200": {"bf16": 989e12, "fp32": 494e12},
    "A100": {"bf16": 312e12, "fp32": 156e12},
}
SETTINGS = {  # per-process micro-batch, timed steps scale
    "tiny": {"batch_size": 32},
    "base": {"batch_size": 4},
    "large": {"batch_size": 2},
}


# ---- peaks --------------------------------------------------------------------------------------------------------
def measured_matmul_peak(dtype: torch.dtype, size: int = 2048, seconds: float = 2.0) -> float:
    """FLOP/s of a square matmul on this CPU with all of torch's threads (the best of a few timed runs)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def peak_flops(bf16: bool) -> tuple[float, str]:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peaks in GPU_PEAKS.items():
            if key in name:
                return peaks["bf16" if bf16 else "fp32"], f"{name} datasheet"
        raise SystemExit(f"no datasheet peak known for {name}; add it to GPU_PEAKS")
    dtype = torch.bfloat16 if bf16 else torch.float32
    return measured_matmul_peak(
        dtype
    ), f"measured {str(dtype).split('.')[-1]} matmul, {torch.get_num_threads()} threads"


# ---- one configuration (runs inside its own process) -------------------------------------------------------------
def worker(spec: dict) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from unifier.batching import Collator
    from unifier.modeling import build_model
    from unifier.tasks import build_task_from_config, load_mixture
    from unifier.tokenization import load_tokenizer
    from unifier.train import (
        MixtureSampler,
        TaskStream,
        TrainConfig,
        build_optimizer,
        lr_factor,
        make_accelerator,
        train_step,
    )

    attention = spec.get("attention", "sdpa")
    config = TrainConfig(
        zero=spec["zero"],
        bf16=spec["bf16"],
        batch_size=spec["batch_size"],
        steps=1000,
        seed=0,
        attn_implementation=attention,
    )
    accelerator = make_accelerator(config)
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(0)
    tokenizer = load_tokenizer(spec["tokenizer"])
    mixture = load_mixture(REPO / "tasks/shapes/mixture.yaml")
    tasks = [build_task_from_config(c, tokenizer) for c, _ in mixture]
    model = build_model(spec["size"], tokenizer, dropout=0.0, attn_implementation=attention)
    collate = Collator(tokenizer, model.config.image_size, [t.name for t in tasks], drop_text_only_images=False)
    streams = [TaskStream(c, t, 0, rank, world) for (c, _), t in zip(mixture, tasks, strict=True)]
    patches = model.config.num_patches
    sampler = MixtureSampler(streams, [w for _, w in mixture], collate, 0, rank, patches)
    steps = spec["warmup"] + spec["steps"]
    # The micro-batches of each update as training makes them (one batch cut into config.length_groups).
    updates = [sampler.update_batches(step, config.batch_size, 1, config.length_groups)[0] for step in range(steps)]

    flops = 0.0
    if rank == 0:  # model FLOPs of one update's forward + backward passes, counted on the bare model
        counter = FlopCounterMode(display=False)
        with counter, torch.autocast("cpu", torch.bfloat16, enabled=config.bf16 and not torch.cuda.is_available()):
            for batch in updates[0]:
                model(**batch.model_inputs()).loss.backward()
        model.zero_grad(set_to_none=True)
        flops = counter.get_total_flops() / sum(batch.size for batch in updates[0])  # per sample
    parameters = sum(p.numel() for p in model.parameters())

    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()
    times, tokens = [], 0
    for step, batches in enumerate(updates):
        batches = [batch.to(accelerator.device) for batch in batches]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        accelerator.wait_for_everyone()
        start = time.perf_counter()
        train_step(accelerator, model, optimizer, scheduler, [batches], config.max_grad_norm)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        accelerator.wait_for_everyone()
        if step >= spec["warmup"]:
            times.append(time.perf_counter() - start)
            for batch in batches:
                tokens += int(batch["attention_mask"].sum() + batch["image_mask"].sum() * patches)
                tokens += int(batch["labels"].ne(-100).sum())
    total_tokens = accelerator.reduce(torch.tensor(float(tokens), device=accelerator.device), "sum").item()
    if rank == 0:
        step_time = statistics.median(times)
        samples = config.batch_size * world
        result = {
            **{k: spec[k] for k in ("size", "zero", "bf16", "processes", "batch_size")},
            "attention": attention,
            "parameters": parameters,
            "step_s": step_time,
            "samples_per_s": samples / step_time,
            "tokens_per_s": total_tokens / sum(times),
            "flops_per_sample": flops,
            "achieved_flops": flops * samples / step_time,
        }
        Path(spec["result"]).write_text(json.dumps(result))
    accelerator.end_training()


# ---- the driver ---------------------------------------------------------------------------------------------------
def make_tokenizer(folder: Path) -> Path:
    """sentencepiece over the shapes texts + 1000 bins + a random VQ-GAN shaped like tokenizers/shapes.yaml's
    (64 x 64 -> 8 x 8 codes of 1024)."""
    from unifier.data.shapes import corpus
    from unifier.tasks import prompt_texts
    from unifier.tokenization import UnifierTokenizer
    from unifier.tokenization.image_tokenizer import ImageTokenizer
    from unifier.tokenization.text import train_text_model
    from unifier.tokenization.vocab import UnifierVocab

    torch.manual_seed(0)
    sp = train_text_model([*corpus(0, 200), *prompt_texts()], folder / "text.model", vocab_size=512)
    ddconfig = dict(
        ch=32,
        out_ch=3,
        ch_mult=[1, 1, 2, 2],
        num_res_blocks=1,
        attn_resolutions=[],
        in_channels=3,
        resolution=64,
        z_channels=64,
    )
    image_tokenizer = ImageTokenizer(ddconfig, n_embed=1024, embed_dim=64).eval()
    return UnifierTokenizer(UnifierVocab(sp, 1000, 1024), image_tokenizer).save(folder / "tokenizer")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(spec: dict, timeout: int) -> dict | None:
    threads = max(1, (os.cpu_count() or 1) // spec["processes"]) if not torch.cuda.is_available() else 8
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("WORLD_SIZE", None)
    script = [str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    if spec["processes"] > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(spec["processes"])]
        cmd = [*launcher, "--master_port", str(free_port()), *script]
    else:
        cmd = [sys.executable, *script]
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  {describe(spec)}: timed out after {timeout} s", flush=True)
        return None
    if done.returncode != 0 or not Path(spec["result"]).is_file():
        print(f"  {describe(spec)}: failed\n{done.stderr[-3000:]}", flush=True)
        return None
    return json.loads(Path(spec["result"]).read_text())


def describe(spec: dict) -> str:
    engine = {0: "plain", "auto": "DS-auto"}.get(spec["zero"], f"ZeRO-{spec['zero']}")
    precision = "bf16" if spec["bf16"] else "fp32"
    return f"{spec['size']:<5} {engine:<7} x{spec['processes']} {precision} {spec.get('attention', 'sdpa'):<5}"


def make_spec(size: str, zero, processes: int, bf16: bool, attention: str, steps: int, tokenizer: Path) -> dict:
    """One configuration for `worker` (its "result" path still to set): 2 untimed warm-up steps, then `steps`."""
    return {
        "attention": attention,
        "size": size,
        "zero": zero,
        "processes": processes,
        "bf16": bf16,
        "batch_size": SETTINGS[size]["batch_size"],
        "steps": steps,
        "warmup": 2,
        "tokenizer": str(tokenizer),
    }


def write_summary(summary: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out)
    print(f"written {out}")


def compare_engines(args: argparse.Namespace) -> int:
    """The tiny model on one process under each engine, in alternating rounds: samples/s and ratios to ZeRO-2."""
    from unifier.precision import has_native_bf16

    bf16 = has_native_bf16("cuda" if torch.cuda.is_available() else "cpu")  # what bf16: auto takes here
    work = Path(tempfile.mkdtemp(prefix="unifier-bench-"))
    tokenizer = make_tokenizer(work)
    engines = {0: "plain torch loop", "auto": "DeepSpeed, no partitioning (zero auto)", 2: "DeepSpeed ZeRO-2"}
    rates: dict = {zero: [] for zero in engines}
    for round_index in range(args.rounds):
        for zero in engines:
            spec = make_spec("tiny", zero, 1, bf16, "eager", args.steps, tokenizer)  # eager: the main job's kernel
            spec["result"] = str(work / f"engines-{zero}-{round_index}.json")
            result = run(spec, args.timeout)
            if result is None:
                return 1
            rates[zero].append(result["samples_per_s"])
        print(
            f"round {round_index + 1}: "
            + ", ".join(f"{name} {rates[z][-1]:.1f}" for z, name in engines.items())
            + f" samples/s; auto / ZeRO-2 {rates['auto'][-1] / rates[2][-1]:.2f}",
            flush=True,
        )
    medians = {z: statistics.median(r) for z, r in rates.items()}
    print(f"tiny, 1 process, {'bf16' if bf16 else 'fp32'}, median of {args.rounds} rounds of {args.steps} updates:")
    for zero, name in engines.items():
        print(f"  {name:<40} {medians[zero]:6.1f} samples/s  {medians[zero] / medians[2]:.2f}x ZeRO-2")
    summary = {"bf16": bf16, "samples_per_s": {str(z): r for z, r in rates.items()}}
    summary["median_over_zero2"] = {str(z): m / medians[2] for z, m in medians.items()}
    write_summary(summary, Path(args.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=sorted(SETTINGS))
    parser.add_argument("--steps", type=int, default=10, help="timed steps at the tiny size (fewer for larger ones)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    parser.add_argument("--engines", action="store_true", help="only the one-process engines, alternating")
    parser.add_argument("--rounds", type=int, default=3, help="--engines: alternating rounds")
    parser.add_argument("--out", default="runs/bench/train_throughput.json")
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    if args.engines:
        return compare_engines(args)

    peaks = {bf16: peak_flops(bf16) for bf16 in (False, True)}
    for bf16, (peak, how) in peaks.items():
        print(f"peak {'bf16' if bf16 else 'fp32'}: {peak / 1e9:.1f} GFLOP/s ({how})")
    # What `bf16: auto` makes of this device, beside the measured peaks that should agree with it.
    from unifier.precision import describe_device, has_native_bf16

    device = "cuda" if torch.cuda.is_available() else "cpu"
    native = has_native_bf16(device)
    print(
        f"{describe_device(device)}: bf16 in hardware {native}, so bf16: auto trains in {'bf16' if native else 'fp32'}"
    )
    work = Path(tempfile.mkdtemp(prefix="unifier-bench-"))
    tokenizer = make_tokenizer(work)
    results = []
    for size in args.sizes:
        steps = args.steps if size == "tiny" else max(2, args.steps // 4)
        grid = [(0, 1, False), (0, 1, True), (2, 1, False), (2, 1, True), (2, 2, False), (2, 2, True)]
        grid = [(*setting, "sdpa") for setting in grid]
        if size == "tiny":  # the main job's setting with the other kernel
            grid.append((2, 1, True, "eager"))
        for zero, processes, bf16, attention in grid:
            spec = make_spec(size, zero, processes, bf16, attention, steps, tokenizer)
            spec["result"] = str(work / f"{size}-{zero}-{processes}-{bf16}.json")
            result = run(spec, args.timeout)
            if result is None:
                continue
            peak = peaks[bf16][0]
            result["mfu"] = result["achieved_flops"] / peak
            results.append(result)
            print(
                f"  {describe(spec)}: {result['samples_per_s']:7.1f} samples/s {result['tokens_per_s']:9.0f} tokens/s "
                f"MFU {100 * result['mfu']:5.1f}%  ({result['parameters'] / 1e6:.1f}M params, "
                f"{result['flops_per_sample'] / 1e9:.2f} GFLOP/sample, step {result['step_s']:.2f} s)",
                flush=True,
            )

    def find(size, zero, processes, bf16, attention="sdpa"):
        key = (size, zero, processes, bf16, attention)
        return next(
            (r for r in results if (r["size"], r["zero"], r["processes"], r["bf16"], r["attention"]) == key), None
        )

    plain, zero2 = find("tiny", 0, 1, False), find("tiny", 2, 1, False)
    summary = {"peaks": {("bf16" if k else "fp32"): v[0] for k, v in peaks.items()}, "results": results}
    if plain and zero2:
        summary["tiny_zero2_over_plain"] = zero2["samples_per_s"] / plain["samples_per_s"]
        print(f"tiny, 1 process, fp32: DeepSpeed ZeRO-2 / plain torch loop = {summary['tiny_zero2_over_plain']:.2f}")
    sdpa, eager = find("tiny", 2, 1, True), find("tiny", 2, 1, True, "eager")
    if sdpa and eager:
        summary["tiny_eager_over_sdpa"] = eager["samples_per_s"] / sdpa["samples_per_s"]
        print(
            f"tiny, ZeRO-2, 1 process, bf16: eager / sdpa attention samples/s = {summary['tiny_eager_over_sdpa']:.2f}"
        )
    for size in args.sizes:
        fp32, bf16 = find(size, 0, 1, False), find(size, 0, 1, True)
        if fp32 and bf16:
            print(
                f"{size}, plain, 1 process: bf16 / fp32 samples/s = {bf16['samples_per_s'] / fp32['samples_per_s']:.2f}"
            )
    write_summary(summary, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
