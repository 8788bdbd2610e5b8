"""python train.py [--config configs/train/shapes.yaml] [--steps N] [--zero {auto,0,1,2,3}] [--resume latest] ...

Trains the generalist model on a mixture of tasks, with Accelerate driving DeepSpeed ZeRO (stage 1, 2 or 3 from
configs/zero{1,2,3}.json; --zero 0 is a plain torch loop; --zero auto, the presets' setting, is stage 2 across several
processes and DeepSpeed's engine without partitioning, configs/zero0.json, on one: `deepspeed_stage`). The same
script runs under a launcher:

    torchrun --nproc_per_node 2 train.py --steps 100
    accelerate launch --config_file configs/accelerate/zero2_cpu.yaml train.py
    deepspeed --num_gpus 8 train.py --model base --batch-size 32

Top to bottom: configuration, data (one resumable stream per task, mixed by weight into every batch),
the optimizer and schedule, checkpoints, validation, and the loop in `train(config)`.
Writes runs/<name>/: log.jsonl, checkpoints/step-N/{model/, state/, data-rank*.json}, model/ (the final model:
config.json + model.safetensors + tokenizer/, loadable by `unifier.modeling.load_pretrained`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import os
import random
import shlex
import shutil
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from unifier.config_files import load_yaml_with_base
from unifier.metrics import headline_figures
from unifier.precision import bf16_setting_problem, describe_device, resolve_bf16

REPO = Path(__file__).resolve().parents[1]
PRESETS_DIR = REPO / "configs" / "train"
DEFAULT_CONFIG = PRESETS_DIR / "shapes.yaml"
ZERO_SETTINGS = ("auto", 0, 1, 2, 3)
# Under a time budget these updates are timed (after start-up, up to the default warmup's end) to fit `steps`.
BUDGET_PROBE = (20, 100)
# Left unplanned in a budget: the model folder, the gallery, the results table.
BUDGET_MARGIN_SECONDS = 60.0
# The probe's first fit plans each update at this much more than the probe measured: later updates also pay for
# validation passes and checkpoints, and a shared machine drifts (measured on a slow hour: 0.61 s an update in the
# probe, 0.70 over the run). Every BUDGET_REFIT_EVERY updates after it the budget fits again, from the mean since the
# probe (which holds those costs already) with the small BUDGET_REFIT_SLACK: it raises `steps` (up to the configured
# count) or lowers it, and the decay goes on from where it is (see `reschedule`).
BUDGET_UPDATE_SLACK = 1.15
BUDGET_REFIT_SLACK = 1.03
BUDGET_REFIT_EVERY = 200


# ---------------------------------------------------------------------------------------------------------------------
# Configuration
@dataclass
class TrainConfig:
    """Every knob of a run; configs/train/*.yaml set them, command-line flags override the file."""

    output_dir: str = "runs/shapes-tiny"
    tokenizer: str = "runs/tokenizer-shapes"  # tokenizer folder
    tokenizer_recipe: str | None = "tokenizers/shapes.yaml"  # builds `tokenizer` when the folder is missing
    mixture: str = "tasks/shapes/mixture.yaml"
    model: str | None = "tiny"  # a size of configs/model/ or a YAML path; None in a fine-tune's config.yaml
    pretrained_bart: str | None = None  # initialise the transformer from this BART (folder or hub name)
    # Fine-tune: start from the weights of this trained model folder (runs/<name>/model) with a fresh optimizer and
    # schedule. Its size comes from the folder (`model` is not used), and its tokenizer must be the run's, byte for
    # byte: the same ids would otherwise name other pieces, bins or codes.
    init_from: str | None = None
    dropout: float | None = None  # overrides the model size's dropout
    gradient_checkpointing: bool = False
    # Attention kernel for training: "sdpa" (torch's scaled_dot_product_attention, transformers' default) or "eager"
    # (plain matrix products and softmax). None: transformers' default. Inference always loads the default: both give
    # the same results, and neither is faster there.
    attn_implementation: str | None = None
    steps: int = 2000  # optimizer updates
    # Minutes for the whole job (tokenizer build, training, final evaluation, gallery); 0: none. Training times
    # its updates BUDGET_PROBE and sets `steps` (at most the configured count) to what fits, reserving
    # `final_eval_updates` updates' time for the evaluation, then fits it again every BUDGET_REFIT_EVERY updates: the
    # same job then ends in time on a slower hour or machine, with fewer updates.
    time_budget_minutes: float = 0.0
    # The final evaluation's duration in units of one update's, for the budget (shapes mixture, 1,000 val scenes per
    # task, 4 text-to-image candidates, updates of 32: measured 380-490 on the 2-core CPU). An update's time follows
    # its batch and the evaluation's does not, so another batch size needs its own figure (16: about 540).
    final_eval_updates: int = 450
    batch_size: int = 32  # examples per micro-batch per process
    grad_accum: int = 1  # batches per update
    # Each batch is cut by target length into this many micro-batches, so that the few long targets (text-to-image
    # codes) do not pad every short one; the update is the same weighted mean over the whole batch, and the groups
    # share one backward pass.
    length_groups: int = 2
    # Make the next update's batches in a background thread while this one trains. "auto": on a GPU, where the
    # update's CPU side (Python and kernel launches) waits for the device often enough to leave the CPU free; off on
    # a CPU, whose cores the update already keeps busy.
    prefetch: bool | str = "auto"
    # Each example's token-mean loss weighs (its target tokens) ** loss_length_power in the update. 1: every target
    # token counts once (the token-mean: a 65-code image outweighs a one-word answer 30 to 1); 0: every example
    # counts once, so the mixture weights alone set each task's share of the gradient.
    loss_length_power: float = 1.0
    # From this fraction of the run's updates on (of `steps` as a time budget fits it), weigh examples by
    # late_loss_length_power instead: the fine-tuning stages learnt entailment's size claims only once every example
    # counted once (README finding 21), while that weighting from the first update starves the long targets (finding 6).
    late_loss_length_power: float | None = None
    late_loss_from: float = 0.7
    lr: float = 5e-4
    min_lr_ratio: float = 0.1  # the decay ends at lr * min_lr_ratio
    warmup_steps: int = 100
    decay: str = "cosine"  # cosine | linear | constant
    # [step, progress]: where the decay goes on from after a time budget changed `steps` mid-run (set by the run and
    # kept in its checkpoints; not a flag). None: from the warm-up's end at progress 0.
    schedule_anchor: list[float] | None = None
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    # bf16 autocast (measured: bench/train_throughput.py). "auto": where the device multiplies bf16 in hardware,
    # fp32 elsewhere (unifier.precision); the run's config.yaml and summary record which it took.
    bf16: bool | str = False
    # DeepSpeed ZeRO stage; 0 = plain torch loop (DDP under a launcher); "auto": 2 across processes, 0 on one
    # (deepspeed_stage)
    zero: int | str = 2
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200  # per-task validation loss every N steps (0: only at the end)
    val_records: int = 32  # validation records per task (the first ones of its val split)
    val_batch_size: int = 64
    checkpoint_every: int = 500  # 0: no intermediate checkpoints
    keep_last: int = 2  # checkpoints kept
    resume: str | None = None  # a checkpoint folder, or "latest"
    progress: bool = True  # tqdm progress bar on the main process
    tensorboard: bool = True  # also log to TensorBoard when it is installed
    # After training (the main job): every task of the mixture evaluated on its eval split, then the gallery.
    final_eval: bool = True
    eval_split: str = "val"
    eval_limit: int | None = None  # records per task (None: the task file's whole split)
    eval_batch_size: int = 64
    gallery: bool = True  # shapes-world mixtures only: runs/<name>/gallery/index.html
    gallery_scenes: int = 8
    # {task name: {metric: minimum}}: the bar each figure of the results table is checked against.
    targets: dict[str, dict[str, float]] = field(default_factory=dict)
    # {task name: DecodingOptions fields} over the task file's `decoding:` in the final evaluation, e.g.
    # {text_to_image: {samples: 16}}: a longer run can afford more reranked candidates than the 30-minute default.
    eval_decoding: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes stored with the run

    def __post_init__(self):
        problems = []
        if self.zero not in ZERO_SETTINGS:
            problems.append(f"zero must be auto, 0, 1, 2 or 3, got {self.zero!r}")
        for name in ("loss_length_power", "late_loss_length_power", "late_loss_from"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                problems.append(f"{name} must lie in [0, 1], got {value}")
        if self.attn_implementation not in (None, "sdpa", "eager"):
            problems.append(f"attn_implementation must be sdpa or eager, got {self.attn_implementation!r}")
        if self.decay not in ("cosine", "linear", "constant"):
            problems.append(f"decay must be cosine, linear or constant, got {self.decay!r}")
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "log_every",
            "val_batch_size",
            "keep_last",
            "eval_batch_size",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.length_groups < 1 or self.length_groups > self.batch_size:
            problems.append(f"length_groups must lie in [1, batch_size], got {self.length_groups}")
        if self.schedule_anchor is not None and (
            len(self.schedule_anchor) != 2 or not 0.0 <= float(self.schedule_anchor[1]) <= 1.0
        ):
            problems.append(f"schedule_anchor must be [step, progress in [0, 1]], got {self.schedule_anchor!r}")
        if not isinstance(self.prefetch, bool) and self.prefetch != "auto":
            problems.append(f"prefetch must be true, false or auto, got {self.prefetch!r}")
        if bf16_setting_problem(self.bf16):
            problems.append(bf16_setting_problem(self.bf16))
        if self.time_budget_minutes < 0 or self.final_eval_updates < 0:
            problems.append("time_budget_minutes and final_eval_updates must be >= 0")
        if self.eval_limit is not None and self.eval_limit < 1:
            problems.append(f"eval_limit must be >= 1 (or unset), got {self.eval_limit}")
        for task, bars in self.targets.items():
            if not isinstance(bars, dict) or not all(isinstance(v, (int, float)) for v in bars.values()):
                problems.append(f"targets.{task} must map metric names to numbers, got {bars!r}")
        if self.eval_decoding:
            from unifier.generation import DecodingOptions
        for task, options in self.eval_decoding.items():
            try:
                DecodingOptions(**options)
            except (TypeError, ValueError) as e:
                problems.append(f"eval_decoding.{task}: {e}")
        if problems:
            raise ValueError("train config: " + "; ".join(problems))


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A TrainConfig from a YAML file (unknown keys are an error) and then `overrides`.

    A file may start from another with `base: other.yaml` (a path relative to it) and set only what differs
    (unifier.config_files: mappings such as `targets` merge key by key)."""
    values = _config_values(Path(path)) if path is not None else {}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return TrainConfig(**values)


def _config_values(path: Path) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(TrainConfig)}

    def check(values: dict[str, Any], where: Path) -> None:
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")

    return load_yaml_with_base(path, "train config", ValueError, FileNotFoundError, check)


def build_parser() -> argparse.ArgumentParser:
    """One flag per TrainConfig field (--batch-size, --bf16 / --no-bf16, ...), all defaulting to "not given"."""
    parser = argparse.ArgumentParser(
        prog="train.py", description="Train the Unifier generalist model on a task mixture."
    )
    parser.add_argument("--config", help=f"a TrainConfig YAML (default: {DEFAULT_CONFIG.relative_to(REPO)})")
    parser.add_argument(
        "--preset",
        help=f"a config of {PRESETS_DIR.relative_to(REPO)}/ by name: shapes (the default), full (12,000 steps), "
        "full-stage2 and full-stage3 (fine-tuning the full preset's model, then stage 2's), gpu (the full preset's "
        "samples as 3,000 steps of 128)",
    )
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("extra", "targets", "eval_decoding", "schedule_anchor"):
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if kind.startswith("bool"):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        elif kind.startswith("int | str"):  # a number or a word (--zero auto)
            parser.add_argument(flag, dest=f.name, type=_int_or_word, default=None)
        elif kind.startswith("int"):
            parser.add_argument(flag, dest=f.name, type=int, default=None)
        elif kind.startswith("float"):
            parser.add_argument(flag, dest=f.name, type=float, default=None)
        else:
            parser.add_argument(flag, dest=f.name, default=None)
    # The `deepspeed` launcher appends --local_rank=N; the rank is read from the environment instead.
    parser.add_argument(
        "--local_rank", "--local-rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS
    )
    return parser


def _int_or_word(value: str) -> int | str:
    return int(value) if value.lstrip("-").isdigit() else value


# ---------------------------------------------------------------------------------------------------------------------
# Process setup
def set_single_process_defaults() -> None:
    """Without a launcher, look like rank 0 of 1 so that DeepSpeed (which always initialises torch.distributed)
    works from a plain `python train.py`."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def set_build_cache_default() -> None:
    """DeepSpeed JIT-builds its CPU ops with g++ (about 20 s); keep them in one project-local cache so that runs and
    tests reuse them."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def deepspeed_stage(zero: int | str, world_size: int) -> int | None:
    """The ZeRO stage DeepSpeed's engine runs for a `zero` setting, or None for the plain torch loop (zero 0).

    "auto" is stage 2 across several processes and stage 0, the engine without partitioning, on one: ZeRO shards the
    gradients and optimizer state over the processes, so a lone process holds all of them at any stage, while stage
    2's copies into its flat buffers cost 2-10% of the main job's update on the 2-core CPU, with the same losses
    (README finding 17; `python bench/train_throughput.py --engines`)."""
    if zero == "auto":
        return 2 if world_size > 1 else 0
    return int(zero) or None


def describe_engine(stage: int | None) -> str:
    if stage is None:
        return "plain torch loop"
    return f"DeepSpeed ZeRO-{stage}" if stage else "DeepSpeed without ZeRO partitioning (stage 0)"


def zero_setting_of(stage: int | None) -> str:
    """The `zero` setting that runs an engine `deepspeed_stage` returned on one process (stage 0: auto)."""
    return "0" if stage is None else "auto" if stage == 0 else str(stage)


def deepspeed_config(config: TrainConfig, world_size: int) -> dict[str, Any]:
    """configs/zero{stage}.json with its "auto" batch, clipping and precision fields filled from the run's config."""
    stage = deepspeed_stage(config.zero, world_size)
    if stage is None:
        raise ValueError("zero 0 trains with the plain torch loop, which has no DeepSpeed config")
    path = REPO / "configs" / f"zero{stage}.json"
    ds = json.loads(path.read_text())
    # DeepSpeed counts backward passes: one per batch, whose length groups share it (see train_step).
    ds["train_micro_batch_size_per_gpu"] = config.batch_size
    ds["gradient_accumulation_steps"] = config.grad_accum
    ds["train_batch_size"] = config.batch_size * config.grad_accum * world_size
    ds["gradient_clipping"] = config.max_grad_norm
    # bf16 as torch autocast inside the engine: weights, optimizer state and the saved model stay fp32. (DeepSpeed's
    # own bf16 mode keeps bf16 weights, so the model folder would hold bf16 weights too.)
    ds["bf16"] = {"enabled": False}
    ds["torch_autocast"] = {"enabled": bool(config.bf16), "dtype": "bfloat16"}
    return ds


def make_accelerator(config: TrainConfig):
    """Accelerate with DeepSpeed (the stage `deepspeed_stage` gives) or plain; gloo on CPU, NCCL on GPU."""
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import InitProcessGroupKwargs

    set_build_cache_default()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # unset: one process, as set_single_process_defaults says
    stage = deepspeed_stage(config.zero, world_size)
    if stage is not None:
        set_single_process_defaults()
    # train.py's own flags (--zero, --bf16, --grad-accum, --max-grad-norm) define the DeepSpeed setup; the copies
    # `accelerate launch` exports from its config file would clash with them in DeepSpeedPlugin's checks.
    for name in [n for n in os.environ if n.startswith("ACCELERATE_DEEPSPEED_")] + [
        "ACCELERATE_USE_DEEPSPEED",
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
        "ACCELERATE_GRADIENT_CLIPPING",
        "ACCELERATE_MIXED_PRECISION",
    ]:
        os.environ.pop(name, None)
    plugin = None
    if stage is not None:
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(config, world_size))
    # Accelerate defaults to NCCL-only process groups; CPU processes need gloo. A lone plain process needs none.
    handlers = []
    if plugin is not None or world_size > 1:
        handlers.append(InitProcessGroupKwargs(backend="nccl" if torch.cuda.is_available() else "gloo"))
    return Accelerator(
        mixed_precision="bf16" if config.bf16 and plugin is None else "no",  # DeepSpeed: its torch_autocast
        gradient_accumulation_steps=config.grad_accum,
        deepspeed_plugin=plugin,
        kwargs_handlers=handlers,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Data: one deterministic, resumable stream of training examples per task
class TaskStream:
    """The training examples of one task for one process.

    The shapes world streams scenes rank, rank + W, rank + 2W, ... (W processes); a finite record set is walked
    in a permutation drawn per epoch from the seed, each process taking every W-th record. Positions are read in
    blocks of BLOCK: the task prepares a block's records in one batch (`UnifierTask.prepare_records`: text-to-image
    encodes their images in one VQ-GAN pass), and the stream serves them interleaved, one record of every position
    of the block, then another, ..., so that the several records of one scene (its questions, its hypotheses) spread
    over many batches instead of filling one: a batch's examples of a task then show as many scenes as it has
    examples. Each scene's records are shuffled first (drawn from the seed, the epoch and the block): a scene
    lists them by kind (question families in order; entailment's two "yes", then two "no", then two "maybe"), and
    interleaved in that order every batch for several updates held one kind and one answer. The state (epoch, block
    start, place in the block) is a few integers, saved with each checkpoint. A record that fails to serialize is
    skipped and counted, not fatal.
    """

    MAX_CONSECUTIVE_SKIPS = 1000
    BLOCK = 32

    def __init__(self, task_config, task, seed: int, rank: int, world_size: int):
        from unifier.tasks import open_records, shapes_world

        self.name, self.task = task_config.name, task
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.world = shapes_world(task_config, "train") if task_config.data["source"] == "shapes" else None
        self.records = None if self.world is not None else open_records(task_config, "train")
        if self.records is not None and not isinstance(self.records, Sequence):
            raise TypeError(f"task {self.name}: its train records must be a sequence (a RecordSet)")
        if self.records is not None and len(self.records) < world_size:
            raise ValueError(f"task {self.name}: {len(self.records)} train records cannot feed {world_size} processes")
        # index: the block's first position; offset: the place in its interleaved records.
        self.state = {"epoch": 0, "index": 0, "offset": 0, "served": 0, "skipped": 0}
        self._cache: tuple[tuple[int, int], list, int] | None = None  # ((epoch, index), records, positions)

    def _block(self, epoch: int, index: int) -> tuple[list, int]:
        """(the prepared records of positions index .. index + BLOCK - 1 within the epoch, interleaved; how many
        positions that is)."""
        if self._cache is None or self._cache[0] != (epoch, index):
            if self.world is not None:
                positions = range(index, index + self.BLOCK)
                blocks = [self.world.records(self.task.name, self.rank + i * self.world_size) for i in positions]
                shuffle = np.random.default_rng([self.seed, epoch, index, self.rank, _stable_hash(self.name)])
                blocks = [[block[k] for k in shuffle.permutation(len(block))] for block in blocks]
            else:
                order = np.random.default_rng([self.seed, epoch, _stable_hash(self.name)]).permutation(
                    len(self.records)
                )
                last = (len(self.records) - 1 - self.rank) // self.world_size  # this process's last position
                positions = range(index, min(index + self.BLOCK, last + 1))
                blocks = [[self.records[int(order[self.rank + i * self.world_size])]] for i in positions]
            interleaved = [
                block[r] for r in range(max(map(len, blocks), default=0)) for block in blocks if r < len(block)
            ]
            self._cache = ((epoch, index), self.task.prepare_records(interleaved), len(positions))
        return self._cache[1], self._cache[2]

    def _advance(self, positions: int) -> None:
        s = self.state
        s["offset"] = 0
        s["index"] += positions
        if self.records is not None and self.rank + s["index"] * self.world_size >= len(self.records):
            s["epoch"], s["index"] = s["epoch"] + 1, 0

    def next_example(self):
        s, skips = self.state, 0
        while True:
            records, positions = self._block(s["epoch"], s["index"])
            if s["offset"] >= len(records):
                self._advance(positions)
                continue
            record = records[s["offset"]]
            s["offset"] += 1
            try:
                examples = self.task.training_examples(record)
            except (ValueError, OSError) as e:
                s["skipped"] += 1
                skips += 1
                if skips >= self.MAX_CONSECUTIVE_SKIPS:
                    raise RuntimeError(f"task {self.name}: {skips} records in a row failed; the last: {e}") from e
                continue
            # A record with several targets (a caption's references) gives one, chosen by the stream position.
            choice = np.random.default_rng([self.seed, self.rank, s["served"], _stable_hash(self.name)])
            s["served"] += 1
            example = examples[int(choice.integers(len(examples)))]
            if self.task.prompt_dropout and choice.random() < self.task.prompt_dropout:
                example = dataclasses.replace(example, prompt_ids=self.task.unconditional_prompt_ids())
            return example

    def state_dict(self) -> dict[str, int]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.state = {k: int(state[k]) for k in self.state}
        self._cache = None


def _stable_hash(text: str) -> int:
    """A process-independent hash (Python's hash() is salted per process)."""
    return int.from_bytes(text.encode()[:8].ljust(8, b"\0"), "little") ^ len(text)


class MixtureSampler:
    """Batches whose examples' tasks are drawn by the mixture weights from a generator keyed by
    (seed, rank, step, batch): the same on every run, so resuming needs only the streams' positions.

    `image_positions` (the model's patches per image) weighs what an image costs when a batch is cut into
    length groups."""

    def __init__(
        self, streams: list[TaskStream], weights: list[float], collate, seed: int, rank: int, image_positions: int = 0
    ):
        self.streams, self.collate, self.seed, self.rank = streams, collate, seed, rank
        self.image_positions = image_positions
        total = float(sum(weights))
        self.probabilities = np.array([w / total for w in weights])

    def examples(self, step: int, index: int, batch_size: int) -> list:
        rng = np.random.default_rng([self.seed, self.rank, step, index])
        choices = rng.choice(len(self.streams), size=batch_size, p=self.probabilities)
        return [self.streams[int(c)].next_example() for c in choices]

    def batch(self, step: int, index: int, batch_size: int):
        """Batch `index` of update `step`, collated whole."""
        return self.collate(self.examples(step, index, batch_size))

    def update_batches(self, step: int, batch_size: int, grad_accum: int, length_groups: int) -> list[list]:
        """The grad_accum batches of update `step`, each as the micro-batches of its length_groups length groups."""
        batches = []
        for index in range(grad_accum):
            groups = split_by_length(self.examples(step, index, batch_size), length_groups, self.image_positions)
            batches.append([self.collate(group) for group in groups])
        return batches

    def state_dict(self) -> dict[str, dict[str, int]]:
        return {s.name: s.state_dict() for s in self.streams}

    def load_state_dict(self, state: dict[str, dict[str, int]]) -> None:
        for s in self.streams:
            if s.name not in state:
                raise ValueError(f"the checkpoint has no data position for task {s.name!r} (it has {sorted(state)})")
            s.load_state_dict(state[s.name])


class BatchPrefetcher:
    """A MixtureSampler's update batches, made one update ahead in a background thread when `enabled`.

    `batches(step)` returns update `step`'s batches (made now, or taken from the thread that made them while the
    last update trained) and starts on step + 1's. The streams' positions then run one update ahead of the training,
    so a checkpoint saves `state_dict()`: the positions right after update `step`'s batches, as without prefetching.
    One thread calling the sampler in step order draws exactly the batches the training loop would (every draw is
    keyed by seed, step and stream position; none uses a global generator)."""

    def __init__(
        self,
        sampler: MixtureSampler,
        batch_size: int,
        grad_accum: int,
        length_groups: int,
        enabled: bool,
        device: torch.device | None = None,
    ):
        from concurrent.futures import ThreadPoolExecutor

        self.sampler, self.shape = sampler, (batch_size, grad_accum, length_groups)
        self.state = sampler.state_dict()
        self.pending = None  # (step, future of (batches, positions after them))
        # The thread's CUDA calls (the text-to-image VQ-GAN encode) go to this process's GPU, not GPU 0.
        on_cuda = device is not None and device.type == "cuda"
        init = (lambda: torch.cuda.set_device(device)) if on_cuda else None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="batches", initializer=init) if enabled else None

    def _make(self, step: int) -> tuple[list[list], dict]:
        batches = self.sampler.update_batches(step, *self.shape)
        return batches, self.sampler.state_dict()

    def batches(self, step: int, last_step: int) -> list[list]:
        """Update `step`'s batches; makes `step + 1`'s in the background unless `step` is `last_step`."""
        if self.pending is not None and self.pending[0] == step:
            batches, self.state = self.pending[1].result()
        else:
            if self.pending is not None:  # a batch made for a step the loop did not take
                raise RuntimeError(f"prefetched update {self.pending[0]}'s batches, but update {step} was asked for")
            batches, self.state = self._make(step)
        self.pending = None
        if self.executor is not None and step < last_step:
            self.pending = (step + 1, self.executor.submit(self._make, step + 1))
        return batches

    def state_dict(self) -> dict[str, dict[str, int]]:
        return self.state

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
        self.pending = None


def split_by_length(examples: Sequence, groups: int, image_positions: int = 0) -> list[list]:
    """Cut `examples` into `groups` non-empty micro-batches that pad as little as possible.

    The examples are ordered by (no image, target length, prompt length) and cut into contiguous runs; a run costs
    its size times its padded length (longest target + longest prompt + the image positions when any example has
    an image), and the cuts minimise the total (a small dynamic programme: n is a batch, groups a handful)."""
    order = sorted(examples, key=lambda e: (e.image is None, len(e.target_ids), len(e.prompt_ids)))
    n = len(order)
    if not 1 <= groups <= n:
        raise ValueError(f"cannot cut {n} examples into {groups} non-empty length groups")

    # cost[i][j]: examples order[i:j] as one micro-batch, filled by running maxima from each start.
    cost = [[0] * (n + 1) for _ in range(n + 1)]
    for i in range(n):
        target = prompt = 0
        image = False
        for j in range(i + 1, n + 1):
            e = order[j - 1]
            target, prompt = max(target, len(e.target_ids)), max(prompt, len(e.prompt_ids))
            image = image or e.image is not None
            cost[i][j] = (j - i) * (target + prompt + (image_positions if image else 0))

    # best[g][j]: the least cost of order[:j] in g runs; cut[g][j]: where its last run starts.
    best = [[math.inf] * (n + 1) for _ in range(groups + 1)]
    cut = [[0] * (n + 1) for _ in range(groups + 1)]
    best[0][0] = 0
    for g in range(1, groups + 1):
        for j in range(g, n + 1):
            for i in range(g - 1, j):
                total = best[g - 1][i] + cost[i][j]
                if total < best[g][j]:
                    best[g][j], cut[g][j] = total, i
    runs, j = [], n
    for g in range(groups, 0, -1):
        runs.append(order[cut[g][j] : j])
        j = cut[g][j]
    return runs[::-1]


def validation_batches(mixture, tasks, collate, count: int, batch_size: int) -> dict[str, list]:
    """task name -> fixed batches of the first `count` records of its val split (none when it has no val split)."""
    from itertools import islice

    from unifier.tasks import open_records

    batches = {}
    for (task_config, _), task in zip(mixture, tasks, strict=True):
        if count <= 0 or "val" not in (task_config.data.get("splits") or {}):
            continue
        examples = [task.example(r) for r in islice(open_records(task_config, "val"), count)]
        batches[task_config.name] = [collate(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]
    return batches


# ---------------------------------------------------------------------------------------------------------------------
# Model, optimizer and schedule
def build_training_model(config: TrainConfig, tokenizer):
    """The model a run trains: freshly initialised at its size, or a trained model's weights (`init_from`, whose
    tokenizer must match the run's `tokenizer` folder); then its dropout, attention kernel and checkpointing."""
    from unifier.modeling import UnifierForConditionalGeneration, build_model

    overrides = {"dropout": config.dropout, "attn_implementation": config.attn_implementation}
    if config.init_from:
        if config.pretrained_bart:
            raise ValueError("init_from and pretrained_bart both set: a run starts from one model's weights")
        folder = check_init_folder(config.init_from)
        check_same_tokenizer(folder / "tokenizer", config.tokenizer)
        given = {k: v for k, v in overrides.items() if v is not None}
        model = UnifierForConditionalGeneration.from_pretrained(folder, **given)
    else:
        model = build_model(config.model, tokenizer, pretrained_bart=config.pretrained_bart, **overrides)
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model


def check_init_folder(init_from: str | Path) -> Path:
    """The model folder a fine-tune starts from, or an error saying why it cannot."""
    folder = Path(init_from)
    if not folder.is_dir():
        raise FileNotFoundError(f"init_from {folder}: no such folder; train that model first (it is runs/<name>/model)")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"init_from {folder}: no config.json, not a Unifier model folder (runs/<name>/model)")
    return folder


# The files that give a tokenizer's ids their meaning (text pieces and token ranges; the VQ-GAN's codes).
TOKENIZER_IDENTITY_FILES = ("text.model", "vocab.json", "image_tokenizer/model.safetensors")


def check_same_tokenizer(model_tokenizer: str | Path, run_tokenizer: str | Path) -> None:
    """Raise unless the two tokenizer folders hold the same identity files, byte for byte."""
    for name in TOKENIZER_IDENTITY_FILES:
        ours, theirs = Path(run_tokenizer) / name, Path(model_tokenizer) / name
        if not theirs.is_file():
            raise FileNotFoundError(f"init_from: {theirs} is missing: the model folder has no complete tokenizer")
        if not ours.is_file() or ours.read_bytes() != theirs.read_bytes():
            raise ValueError(
                f"init_from: the model's tokenizer ({model_tokenizer}) differs from the run's ({run_tokenizer}) in "
                f"{name}: give the run --tokenizer {model_tokenizer}"
            )


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and embeddings (the usual transformer recipe). Fused: one kernel over
    each parameter group (measured on the 2-core CPU for the tiny model's 7.7M parameters: 4.7 ms a step against 28
    for the one-tensor-at-a-time loop); DeepSpeed ZeRO steps it on its flat partitions."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim < 2 or "embed" in name or "norm" in name
        (no_decay if skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps, fused=True
    )


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine or linear decay to min_lr_ratio at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.decay == "constant":
        return 1.0
    progress = schedule_progress(step, config)
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if config.decay == "cosine" else 1.0 - progress
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * shape


def schedule_progress(step: int, config: TrainConfig) -> float:
    """How far the decay is at `step` (0 at the warm-up's end, 1 at config.steps): linear in the step from the
    schedule's anchor on."""
    anchor_step, anchor_progress = config.schedule_anchor or (config.warmup_steps, 0.0)
    fraction = (step - anchor_step) / max(1, config.steps - anchor_step)
    return min(1.0, max(0.0, anchor_progress + (1.0 - anchor_progress) * fraction))


def reschedule(config: TrainConfig, done: int, steps: int) -> None:
    """Make the run `steps` updates long after `done` of them: the decay goes on from where it is at `done` and
    reaches its end at the new last step, so the learning rate neither jumps nor rises on the way."""
    if steps == config.steps:
        return
    if done >= config.warmup_steps:
        config.schedule_anchor = [done, schedule_progress(done, config)]
    config.steps = steps


def fit_to_budget(
    config: TrainConfig,
    accelerator,
    log,
    bar,
    done: int,
    job_start: float,
    since: float,
    updates_since: int,
    slack: float,
    most_steps: int,
) -> None:
    """Set config.steps to what fits the time budget (at most `most_steps`), planning each further update at `slack`
    times the mean of the `updates_since` updates timed since `since`; the same count on every process (the main
    process's). Logs the decision and keeps it in config.extra["time_budget"]."""
    from accelerate.utils import broadcast

    per_update = (time.perf_counter() - since) / updates_since
    planned = steps_within_budget(config, done, time.perf_counter() - job_start, per_update * slack, most_steps)
    steps = int(broadcast(torch.tensor([planned], device=accelerator.device), from_process=0).item())
    previous = config.steps
    config.extra["time_budget"] = {
        "configured_steps": most_steps,
        "steps": steps,
        "seconds_per_update": per_update,
        "fits": config.extra.get("time_budget", {}).get("fits", 0) + 1,
    }
    log.write({"step": done, "time_budget": config.extra["time_budget"]})
    if steps != previous:
        accelerator.print(
            f"time budget {config.time_budget_minutes:g} min at update {done}: {per_update:.2f} s per update here, "
            f"so {steps} updates (planned: {previous})"
        )
        reschedule(config, done, steps)
        bar.total = steps
        bar.refresh()


def process_age_seconds() -> float:
    """Seconds since this process started (0 where psutil, which accelerate installs, cannot tell)."""
    try:
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - an unknown age only makes the budget a little less strict
        return 0.0


def steps_within_budget(
    config: TrainConfig, done: int, elapsed_seconds: float, seconds_per_update: float, most_steps: int | None = None
) -> int:
    """The most updates (at most `most_steps`, by default config.steps, and at least `done`) that keep the job inside
    its time budget, with `elapsed_seconds` of it spent after `done` updates and each further update, and the final
    evaluation's `final_eval_updates`, taking `seconds_per_update`."""
    left = config.time_budget_minutes * 60.0 - BUDGET_MARGIN_SECONDS - elapsed_seconds
    affordable = int(left / seconds_per_update) - (config.final_eval_updates if config.final_eval else 0)
    return max(done, min(config.steps if most_steps is None else most_steps, done + affordable))


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
def save_model_folder(
    accelerator, model, tokenizer_folder: Path, out: Path, task_options: dict, task_decoding: dict
) -> None:
    """Write a self-contained model folder (config.json, model.safetensors, tokenizer/, tasks.json: the options,
    such as answer sets, each task was trained with; decoding.json: how the run evaluates each task) via a
    temporary name.

    Every process must call this: under ZeRO-3 gathering the weights is collective."""
    from unifier.predict import write_task_decoding, write_task_options

    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        tmp = out.parent / f".{out.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict)
        shutil.copytree(tokenizer_folder, tmp / "tokenizer")
        write_task_options(tmp, task_options)
        write_task_decoding(tmp, task_decoding)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    accelerator.wait_for_everyone()


def save_checkpoint(
    accelerator,
    model,
    tokenizer_folder: Path,
    task_options: dict,
    task_decoding: dict,
    run_dir: Path,
    step: int,
    sampler,
    keep: int,
    schedule: dict[str, Any] | None = None,
) -> Path:
    """checkpoints/step-N/: model/ (from_pretrained), state/ (optimizer, scheduler, RNG: accelerate's save_state)
    and data-rank*.json (stream positions, and `schedule`: the run's planned `steps` and `schedule_anchor`); built
    under .step-N.tmp and renamed when complete."""
    root = run_dir / "checkpoints"
    final, tmp = root / f"step-{step}", root / f".step-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "state"))
    position = {"step": step, "world_size": accelerator.num_processes, "zero_stage": engine_stage(accelerator)}
    position["streams"] = sampler.state_dict()
    position.update(schedule or {})
    (tmp / f"data-rank{accelerator.process_index}.json").write_text(json.dumps(position, indent=1))
    save_model_folder(accelerator, model, tokenizer_folder, tmp / "model", task_options, task_decoding)
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def engine_stage(accelerator) -> int | None:
    """The ZeRO stage of the prepared DeepSpeed engine, None for the plain torch loop."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    return None if wrapped is None else int(wrapped.engine.zero_optimization_stage())


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def resolve_resume(resume: str, run_dir: Path) -> Path:
    if resume == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise FileNotFoundError(f"--resume latest: no checkpoint under {run_dir / 'checkpoints'}")
        return found[-1]
    path = Path(resume)
    if not (path / "state").is_dir():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no state/ inside)")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Logging and validation
class RunLog:
    """log.jsonl (one JSON object a line) on the main process, plus TensorBoard when installed and wanted."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, start_step: int = 0):
        """start_step: where a resumed run continues; the entries after it are dropped, since the run redoes those
        steps (the curves would hold them twice)."""
        self.enabled = enabled
        self.path = run_dir / "log.jsonl"
        self.writer = None
        if enabled and start_step:
            self._truncate(start_step)
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step or None)
            except ImportError:  # TensorBoard is optional
                self.writer = None

    def _truncate(self, step: int) -> None:
        """Keeps the log's entries up to `step`, rewritten under a temporary name first."""
        if not self.path.is_file():
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        if len(kept) < len(lines):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)

    def write(self, entry: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        if self.writer is not None:
            for key, value in _flatten(entry).items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, entry["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _flatten(entry: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in entry.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


@torch.no_grad()
def validate(model, batches: dict[str, list], device) -> dict[str, float]:
    """Per-task teacher-forced loss (mean over target tokens) on the fixed validation batches."""
    model.eval()
    losses = {}
    for name, task_batches in batches.items():
        total, tokens = 0.0, 0
        for batch in task_batches:
            out = model(**batch.to(device).model_inputs())
            total += float(out.token_loss.sum())
            tokens += int(batch["labels"].ne(-100).sum())
        losses[name] = total / max(1, tokens)
    model.train()
    return losses


# ---------------------------------------------------------------------------------------------------------------------
# The run
def loss_length_power_at(config: TrainConfig, step: int) -> float:
    """The example weighting of update `step` (0-based): `late_loss_length_power` from `late_loss_from` of the run on."""
    if config.late_loss_length_power is not None and step >= config.late_loss_from * config.steps:
        return config.late_loss_length_power
    return config.loss_length_power


def train_step(
    accelerator, model, optimizer, scheduler, batches: list[list], max_grad_norm: float, length_power: float = 1.0
):
    """One optimizer update over `batches`: its grad_accum batches, each a list of its length groups' micro-batches.

    The update minimises the weighted mean over all the micro-batches' examples of each example's token-mean
    loss, an example of n target tokens weighing n ** length_power (1: the token-mean over the whole batch).
    Each micro-batch's loss is scaled by its share of the total weight (times the batch count, which Accelerate /
    DeepSpeed divide by). The length groups of one batch share one backward pass: under DeepSpeed every backward
    pass is an accumulation micro-step with its own gradient hooks and reduction (measured: 11% of a tiny update
    with two groups), and a batch's groups together hold no more activations than the batch itself.
    Returns ([(loss, token_loss (B, T)) detached, per micro-batch, in order], the gradient norm before clipping).
    Under DeepSpeed the engine clips, steps and counts accumulation itself (the optimizer / scheduler calls are
    no-ops there) and the norm is read from it.
    """
    engine = getattr(accelerator, "deepspeed_engine_wrapped", None)
    targets = [[group["labels"].ne(-100).sum(1).double() for group in batch] for batch in batches]  # (B,) each
    weights = [[n.clamp(min=1) ** length_power * n.gt(0) for n in batch] for batch in targets]  # no targets: 0
    total = max(1e-12, float(sum(w.sum() for batch in weights for w in batch)))
    outputs, grad_norm = [], None
    for groups, lengths, group_weights in zip(batches, targets, weights, strict=True):
        with accelerator.accumulate(model):
            loss = 0.0
            for group, n, w in zip(groups, lengths, group_weights, strict=True):
                out = model(**group.model_inputs())
                scale = (w / n.clamp(min=1) * (len(batches) / total)).to(out.token_loss.dtype)  # (B,): per token
                loss = loss + (out.token_loss.sum(1) * scale).sum()
                outputs.append((out.loss.detach(), out.token_loss.detach()))  # not the logits: they would pile up
            accelerator.backward(loss)
            if accelerator.sync_gradients and engine is None:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    if engine is not None:
        grad_norm = engine.get_global_grad_norm()
    return outputs, grad_norm


def prepare_tokenizer(
    config: TrainConfig, is_main: bool, poll_seconds: float = 5.0, patience_hours: float = 6.0
) -> Path:
    """The tokenizer folder, built from the recipe first when missing, by the main process only.

    A folder that was built from this same recipe file, which has changed since, is rebuilt (the build reuses it
    when nothing changed); a folder made otherwise is used as it is. The other processes poll for the finished
    folder (the build renames it into place when complete) rather than waiting in a collective, whose timeout
    (30 minutes) a VQ-GAN build can outlast."""
    folder = Path(config.tokenizer)
    if folder.is_dir():
        if is_main and config.tokenizer_recipe and _built_from(folder) == str(config.tokenizer_recipe):
            from unifier.tokenization.build import build_tokenizer, load_recipe, recipe_hash

            if _built_from(folder, "recipe_hash") != recipe_hash(load_recipe(config.tokenizer_recipe)):
                print(f"{config.tokenizer_recipe} changed since {folder} was built from it: rebuilding", flush=True)
                build_tokenizer(config.tokenizer_recipe, folder, force=True)
        return folder
    if not config.tokenizer_recipe:
        raise FileNotFoundError(f"tokenizer folder {folder} not found and no tokenizer_recipe to build it from")
    if is_main:
        from unifier.tokenization.build import build_tokenizer

        build_tokenizer(config.tokenizer_recipe, folder)
        return folder
    deadline = time.monotonic() + patience_hours * 3600
    while not (folder / "vocab.json").is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {patience_hours} h for the main process to build {folder}")
        time.sleep(poll_seconds)
    return folder


def _built_from(folder: Path, key: str = "recipe") -> str | None:
    """A field of the build_info.json that `unifier tokenizer build` leaves in a folder (None: no such file)."""
    info = folder / "build_info.json"
    try:
        return str(json.loads(info.read_text()).get(key)) if info.is_file() else None
    except json.JSONDecodeError:
        return None


def train(config: TrainConfig) -> Path:
    """Train as `config` says; returns the final model folder (runs/<name>/model)."""
    from tqdm.auto import tqdm

    from unifier.batching import Collator
    from unifier.predict import task_decoding_of, task_options_of
    from unifier.tasks import build_task_from_config, load_mixture
    from unifier.tokenization import load_tokenizer

    unknown = sorted(set(config.eval_decoding) - {c.name for c, _ in load_mixture(config.mixture)})
    if unknown:  # before the tokenizer build and the training, not when the evaluation starts
        raise ValueError(f"eval_decoding names task(s) {unknown} that the mixture {config.mixture} does not have")
    if config.init_from:  # now, not after a tokenizer build of many minutes
        model_tokenizer = check_init_folder(config.init_from) / "tokenizer"
        if not Path(config.tokenizer).is_dir():  # the model brings the tokenizer it needs: nothing to build
            config.tokenizer = str(model_tokenizer)
        config.model = None  # the size is the model folder's: config.yaml must not name one the run did not use
    run_dir = Path(config.output_dir)
    previous = [p.name for p in (run_dir / "log.jsonl", run_dir / "checkpoints", run_dir / "model") if p.exists()]
    if previous and not config.resume:  # a second run would append to its log and mix the two runs' checkpoints
        raise FileExistsError(
            f"{run_dir} already holds a run ({', '.join(previous)}): continue it with --resume latest, or give "
            "another --output-dir (or remove that folder)"
        )
    config.bf16 = resolve_bf16(config.bf16, "cuda" if torch.cuda.is_available() else "cpu")
    accelerator = make_accelerator(config)
    if config.prefetch == "auto":  # resolved like bf16, so that the run's config.yaml says what it did
        config.prefetch = accelerator.device.type == "cuda"
    accelerator.print(
        f"precision: {'bf16 autocast' if config.bf16 else 'fp32'} on {describe_device(accelerator.device)}"
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    seed_everything(config.seed)

    job_start = time.perf_counter() - process_age_seconds()  # the time budget counts the imports too
    timings = {"startup_seconds": time.perf_counter() - job_start, "start": time.perf_counter()}
    tokenizer_folder = prepare_tokenizer(config, accelerator.is_main_process)
    timings["tokenizer_seconds"] = time.perf_counter() - timings.pop("start")
    timings["train_start"] = time.perf_counter()
    accelerator.wait_for_everyone()
    # On the accelerator's device: the text-to-image stream encodes its targets' images with the VQ-GAN as it serves
    # them (on the 2-core CPU two thirds of making a batch; on the H200 12.2 ms a batch on the GPU, 15.3 on its CPUs).
    tokenizer = load_tokenizer(tokenizer_folder, map_location=str(accelerator.device))
    mixture = load_mixture(config.mixture)
    tasks = [build_task_from_config(task_config, tokenizer) for task_config, _ in mixture]
    model = build_training_model(config, tokenizer)
    task_options = task_options_of(tasks)
    # How the final evaluation decodes each task, kept in the model folder for predict, the demo and the gallery.
    task_decoding = task_decoding_of([task_config for task_config, _ in mixture], config.eval_decoding)
    task_names = list(dict.fromkeys(t.name for t in tasks))  # task kinds, for per-task losses
    collate = Collator(tokenizer, model.config.image_size, task_names=task_names, drop_text_only_images=False)
    streams = [
        TaskStream(task_config, task, config.seed, rank, world)
        for (task_config, _), task in zip(mixture, tasks, strict=True)
    ]
    image_positions = model.config.num_patches
    sampler = MixtureSampler(streams, [w for _, w in mixture], collate, config.seed, rank, image_positions)
    val_batches = validation_batches(mixture, tasks, collate, config.val_records, config.val_batch_size)

    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    start = 0
    if config.resume:
        checkpoint = resolve_resume(config.resume, run_dir)
        position_file = checkpoint / f"data-rank{rank}.json"
        if not position_file.is_file():
            raise FileNotFoundError(f"{checkpoint} has no {position_file.name}: it was written by fewer processes")
        position = json.loads(position_file.read_text())
        if position["world_size"] != world:
            raise ValueError(f"{checkpoint} was written by {position['world_size']} processes, this run has {world}")
        # Each engine saves its optimizer state in its own layout (older checkpoints do not say which they used).
        stage = engine_stage(accelerator)
        if "zero_stage" in position and position["zero_stage"] != stage:
            written = position["zero_stage"]
            raise ValueError(
                f"{checkpoint} was written under {describe_engine(written)} and this run trains under "
                f"{describe_engine(stage)}: resume it with --zero {zero_setting_of(written)}"
            )
        accelerator.load_state(str(checkpoint / "state"))
        sampler.load_state_dict(position["streams"])
        start = position["step"]
        if config.time_budget_minutes and "steps" in position:
            # as the budget fitted them, so the schedule goes on unchanged
            config.steps, config.schedule_anchor = position["steps"], position.get("schedule_anchor")
        accelerator.print(f"resumed from {checkpoint} at step {start}")

    log = RunLog(run_dir, accelerator.is_main_process, config.tensorboard, start_step=start)
    shape = (config.batch_size, config.grad_accum, config.length_groups)
    prefetcher = BatchPrefetcher(sampler, *shape, enabled=config.prefetch, device=accelerator.device)

    def checkpoint_at(step: int) -> Path:  # with the schedule as a time budget has fitted it so far
        schedule = {"steps": config.steps, "schedule_anchor": config.schedule_anchor}
        args = (accelerator, model, tokenizer_folder, task_options, task_decoding, run_dir, step, prefetcher)
        return save_checkpoint(*args, keep=config.keep_last, schedule=schedule)

    per_step = config.batch_size * config.grad_accum * world
    bar = tqdm(
        total=config.steps, initial=start, disable=not (config.progress and accelerator.is_main_process), unit="step"
    )
    window = {"loss": 0.0, "targets": 0, "tokens": 0, "time": time.perf_counter(), "steps": 0}
    task_loss = torch.zeros(len(task_names), dtype=torch.float64)
    task_tokens = torch.zeros(len(task_names), dtype=torch.float64)
    model.train()
    probe_start, fit = None, None  # fit: the time budget's re-fit, once the probe has fitted `steps` first
    for step in itertools.count(start):
        if step >= config.steps:  # a time budget may lower config.steps on the way
            break
        if step == BUDGET_PROBE[0]:
            probe_start = time.perf_counter()
        batches = prefetcher.batches(step, last_step=config.steps - 1)
        batches = [[group.to(accelerator.device) for group in groups] for groups in batches]
        outputs, grad_norm = train_step(
            accelerator, model, optimizer, scheduler, batches, config.max_grad_norm, loss_length_power_at(config, step)
        )
        micro_batches = [group for groups in batches for group in groups]
        for batch, (_, token_loss) in zip(micro_batches, outputs, strict=True):
            with torch.no_grad():
                per_example = token_loss.float().sum(1).double().cpu()
                targets = batch["labels"].ne(-100).sum(1).double().cpu()
                task_loss.index_add_(0, batch["task_ids"].cpu(), per_example)
                task_tokens.index_add_(0, batch["task_ids"].cpu(), targets)
            window["loss"] += float(per_example.sum())
            window["targets"] += int(targets.sum())
            images = 0 if batch["image_mask"] is None else int(batch["image_mask"].sum()) * image_positions
            window["tokens"] += int(batch["attention_mask"].sum()) + images + int(targets.sum())
        window["steps"] += 1
        done = step + 1
        if config.time_budget_minutes and done == BUDGET_PROBE[1] and probe_start is not None:
            fit = functools.partial(fit_to_budget, config, accelerator, log, bar, most_steps=config.steps)
            fit(done, job_start, probe_start, done - BUDGET_PROBE[0], BUDGET_UPDATE_SLACK)

        if done % config.log_every == 0 or done == config.steps:
            stats = torch.tensor([window["loss"], window["targets"], window["tokens"]], dtype=torch.float64)
            stats = accelerator.reduce(stats.to(accelerator.device), "sum").cpu()
            per_task = accelerator.reduce(torch.stack([task_loss, task_tokens]).to(accelerator.device), "sum").cpu()
            elapsed = time.perf_counter() - window["time"]
            entry = {
                "step": done,
                "loss": float(stats[0] / stats[1]),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "samples_per_s": window["steps"] * per_step / elapsed,
                "tokens_per_s": float(stats[2]) / elapsed,
                "task_loss": {
                    n: float(per_task[0, i] / per_task[1, i]) for i, n in enumerate(task_names) if per_task[1, i]
                },
            }
            log.write(entry)
            bar.set_postfix(loss=f"{entry['loss']:.3f}", samples_s=f"{entry['samples_per_s']:.1f}")
            window = {"loss": 0.0, "targets": 0, "tokens": 0, "time": time.perf_counter(), "steps": 0}
            task_loss.zero_()
            task_tokens.zero_()
        bar.update(1)

        if val_batches and ((config.eval_every and done % config.eval_every == 0) or done == config.steps):
            val = validate(model, val_batches, accelerator.device)
            log.write({"step": done, "val_loss": val})
            accelerator.print(f"step {done}: val loss " + ", ".join(f"{k} {v:.3f}" for k, v in val.items()))
            window["time"] = time.perf_counter()  # validation time is not training throughput
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
            checkpoint_at(done)
            window["time"] = time.perf_counter()
        if fit is not None and done % BUDGET_REFIT_EVERY == 0 and done < config.steps:
            fit(done, job_start, probe_start, done - BUDGET_PROBE[0], BUDGET_REFIT_SLACK)

    bar.close()
    prefetcher.close()
    if config.checkpoint_every:
        checkpoint_at(config.steps)
    final = run_dir / "model"
    save_model_folder(accelerator, model, tokenizer_folder, final, task_options, task_decoding)
    skipped = {s.name: s.state["skipped"] for s in streams if s.state["skipped"]}
    if skipped or collate.unconstrained_targets:
        accelerator.print(
            f"skipped records: {skipped}; constrained targets outside their set: {collate.unconstrained_targets}"
        )
    log.close()
    timings["train_seconds"] = time.perf_counter() - timings.pop("train_start")
    if config.final_eval:
        final_report(config, final, run_dir, accelerator, timings)
    accelerator.end_training()
    return final


# ---------------------------------------------------------------------------------------------------------------------
# The main job's end: every task evaluated, the gallery, the results table
def final_report(config: TrainConfig, model_folder: Path, run_dir: Path, accelerator, timings: dict) -> dict:
    """Evaluate the saved model on every task of the mixture (records sharded over the processes), then, on the main
    process, write the gallery (shapes-world mixtures) and results.md, and print the results table.

    The model is read back from its folder, so what is scored is exactly what a user loads (under ZeRO-3 the
    training copy is partitioned anyway). Returns {task name: evaluate_task's summary}."""
    from unifier.evaluate import evaluate_mixture
    from unifier.predict import Unifier
    from unifier.tasks import load_mixture

    start = time.perf_counter()
    # A model trained under bf16 autocast is evaluated under it too (and its evaluation takes less of the budget).
    unifier = Unifier.from_pretrained(model_folder, device=accelerator.device, bf16=config.bf16)
    summaries = evaluate_mixture(
        unifier,
        config.mixture,
        out_dir=run_dir / "eval",
        split=config.eval_split,
        limit=config.eval_limit,
        batch_size=config.eval_batch_size,
        decoding=config.eval_decoding,
        progress=config.progress and accelerator.is_main_process,
    )
    timings["eval_seconds"] = time.perf_counter() - start
    gallery_index = None
    shapes_only = all(c.data["source"] == "shapes" for c, _ in load_mixture(config.mixture))
    if accelerator.is_main_process:
        if config.gallery and shapes_only:
            from unifier.gallery import write_gallery

            start = time.perf_counter()
            gallery_index = write_gallery(
                unifier,
                run_dir / "gallery",
                n=config.gallery_scenes,
                log_path=run_dir / "log.jsonl",
                model_name=str(run_dir / "model"),  # the folder it is written to next; the page said "Unifier"
            )
            timings["gallery_seconds"] = time.perf_counter() - start
        table = results_table(summaries, config.targets)
        engine = describe_engine(engine_stage(accelerator))
        report = render_report(config, table, timings, accelerator.num_processes, gallery_index, engine)
        tmp = run_dir / ".results.md.tmp"
        tmp.write_text(report)
        os.replace(tmp, run_dir / "results.md")
        print("\n" + table + "\n", flush=True)
        print(f"results: {run_dir / 'results.md'}; metrics and predictions: {run_dir / 'eval'}", flush=True)
        if gallery_index is not None:
            print(f"gallery: open file://{gallery_index.resolve()} in a browser", flush=True)
    accelerator.wait_for_everyone()
    return summaries


def _percent_like(metric: str) -> bool:
    """Fractions shown as percentages; CIDEr / BLEU / mean IoU keep their own scale."""
    return not metric.startswith(("CIDEr", "BLEU", "mean_iou"))


def _figure(metric: str, value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if _percent_like(metric) else f"{value:.3f}"


def results_table(summaries: dict[str, dict[str, Any]], targets: dict[str, dict[str, float]]) -> str:
    """A Markdown table: one row per (task, metric) with a target, then the task's other headline figures in one cell
    (the breakdowns by question type, label, ... are in each task's metrics file)."""
    lines = [
        "| task | examples | metric | value | target | met | other figures |",
        "| --- | ---: | --- | ---: | ---: | :-: | --- |",
    ]
    for name, summary in summaries.items():
        metrics = summary["metrics"]
        bars = targets.get(name, {})
        shown = list(bars) or list(metrics)[:1]
        others = ", ".join(f"{k} {_figure(k, v)}" for k, v in headline_figures(metrics).items() if k not in shown)
        for metric in shown:
            value = metrics.get(metric)
            if metric in bars:
                target = f">= {_figure(metric, bars[metric])}"
                met = "yes" if value is not None and value >= bars[metric] else "no"
            else:
                target, met = "", ""
            lines.append(
                f"| {name} | {summary['count']} | {metric} | {_figure(metric, value)} | {target} | {met} | {others} |"
            )
            others = ""
    return "\n".join(lines)


def describe_start(config: TrainConfig) -> str:
    """What a run's weights started from, for its report: its size, or the model folder it fine-tuned."""
    if config.init_from:
        return f"fine-tuned from `{config.init_from}`"
    return f"`{config.model}`" + (
        f" initialised from BART `{config.pretrained_bart}`" if config.pretrained_bart else ""
    )


def render_report(
    config: TrainConfig, table: str, timings: dict, processes: int, gallery: Path | None, engine: str
) -> str:
    """results.md: the table plus what produced it (command, machine, time per phase)."""
    import platform

    device = describe_device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        device += f", {os.cpu_count()} cores"
    precision = "bf16 autocast" if config.bf16 else "fp32"
    phases = ", ".join(f"{k.removesuffix('_seconds')} {v / 60:.1f} min" for k, v in timings.items())
    total = sum(timings.values())
    lines = [
        f"# Results of {config.output_dir}",
        "",
        table,
        "",
        # as a shell takes it back: an empty value (--tokenizer-recipe '') quoted
        f"- command: `{shlex.join(['python', *sys.argv]) if sys.argv else 'train()'}`",
        f"- model {describe_start(config)}, {config.steps} steps of {config.batch_size * config.grad_accum * processes} "
        f"examples, mixture `{config.mixture}`, evaluated on the `{config.eval_split}` split of each task file",
        f"- machine: {device}, {processes} process(es), {precision}, {engine}, torch {torch.__version__}, "
        f"Python {platform.python_version()}",
        f"- time: {total / 60:.1f} min ({phases})",
    ]
    budget = config.extra.get("time_budget")
    if budget:
        lines.append(
            f"- time budget {config.time_budget_minutes:g} min: {budget['seconds_per_update']:.2f} s per update on "
            f"this machine (the mean since update {BUDGET_PROBE[0]} at the last of {budget['fits']} fits), so "
            f"{budget['steps']} of the configured {budget['configured_steps']} updates"
        )
    for task, options in config.eval_decoding.items():
        lines.append(f"- {task} decoded with " + ", ".join(f"{k} {v}" for k, v in options.items()) + " (eval_decoding)")
    if gallery is not None:
        lines.append(f"- gallery: `{gallery}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    args.pop("local_rank")
    preset, config_path = args.pop("preset"), args.pop("config")
    if preset and config_path:
        raise SystemExit("train.py: give --preset or --config, not both")
    if preset:
        config_path = PRESETS_DIR / f"{preset}.yaml"
        if not config_path.is_file():
            known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
            raise SystemExit(f"train.py: unknown preset {preset!r}; known: {', '.join(known)}")
    config = load_config(config_path or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None), args)
    final = train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"model written to {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
