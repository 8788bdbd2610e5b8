"""The training command: data streams, schedule, checkpoints / resume, and DeepSpeed ZeRO equivalence.

The multi-process and DeepSpeed runs launch `train.py` (or torchrun) as subprocesses on a tiny model
(d_model 32, 1 + 1 layers, 32 x 32 images) with a tiny tokenizer written by the test.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from unifier.data.shapes import QUESTION_FAMILIES, corpus
from unifier.precision import has_native_bf16
from unifier.tasks import build_task_from_config, load_mixture, prompt_texts
from unifier.tokenization import UnifierTokenizer
from unifier.tokenization.image_tokenizer import ImageTokenizer
from unifier.tokenization.text import train_text_model
from unifier.tokenization.vocab import UnifierVocab
from unifier.train import (
    BUDGET_MARGIN_SECONDS,
    DEFAULT_CONFIG,
    MixtureSampler,
    TaskStream,
    TrainConfig,
    build_optimizer,
    build_parser,
    build_training_model,
    deepspeed_config,
    deepspeed_stage,
    describe_start,
    list_checkpoints,
    load_config,
    loss_length_power_at,
    lr_factor,
    reschedule,
    results_table,
    split_by_length,
    steps_within_budget,
    train,
    zero_setting_of,
)

REPO = Path(__file__).resolve().parents[1]
MIXTURE = REPO / "tasks" / "shapes" / "mixture.yaml"
TINY_MODEL = """\
d_model: 32
encoder_layers: 1
decoder_layers: 1
encoder_attention_heads: 2
decoder_attention_heads: 2
encoder_ffn_dim: 64
decoder_ffn_dim: 64
max_position_embeddings: 160
image_size: 32
patch_size: 8
dropout: 0.0
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny tokenizer folder (400 text pieces, 64 bins, a 16 x 16 -> 4 x 4 VQ-GAN of 32 codes) and model size."""
    root = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    sp = train_text_model([*corpus(0, 30), *prompt_texts()], root / "text.model", vocab_size=400)
    ddconfig = dict(
        ch=32,
        out_ch=3,
        ch_mult=[1, 1, 1],
        num_res_blocks=1,
        attn_resolutions=[],
        in_channels=3,
        resolution=16,
        z_channels=4,
    )
    image_tokenizer = ImageTokenizer(ddconfig, n_embed=32, embed_dim=4).eval()
    UnifierTokenizer(UnifierVocab(sp, num_bins=64, num_codes=32), image_tokenizer).save(root / "tokenizer")
    (root / "tiny.yaml").write_text(TINY_MODEL)
    return root


def run_args(workdir: Path, out: Path, steps: int, **flags) -> list[str]:
    args = {
        "tokenizer": workdir / "tokenizer",
        "model": workdir / "tiny.yaml",
        "output-dir": out,
        "steps": steps,
        "batch-size": 8,
        "lr": 3e-3,
        "warmup-steps": 2,
        "log-every": 1,
        "eval-every": 0,
        "val-records": 4,
        "checkpoint-every": 0,
        "final-eval": False,
        **flags,
    }
    out_args = []
    for key, value in args.items():
        if value is True:
            out_args.append(f"--{key}")
        elif value is False:
            out_args.append(f"--no-{key}")
        else:
            out_args += [f"--{key}", str(value)]
    return [*out_args, "--no-progress", "--no-tensorboard"]


def losses(run_dir: Path) -> dict[int, float]:
    entries = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in entries if "loss" in e}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_subprocess(cmd: list[str], timeout: int = 400) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def mixture_examples(workdir: Path, count: int):
    """(tokenizer, tasks, the first `count` examples of the shapes mixture drawn with equal weights)."""
    from unifier.tokenization import load_tokenizer

    tokenizer = load_tokenizer(workdir / "tokenizer")
    mixture = load_mixture(MIXTURE)
    tasks = [build_task_from_config(c, tokenizer) for c, _ in mixture]
    streams = [TaskStream(c, t, 0, 0, 1) for (c, _), t in zip(mixture, tasks, strict=True)]
    sampler = MixtureSampler(streams, [1] * len(streams), lambda examples: examples, 0, 0, image_positions=16)
    return tokenizer, tasks, sampler.examples(0, 0, count)


# ---- pieces -------------------------------------------------------------------------------------------------------
def test_config_file_and_flags(tmp_path):
    parser = build_parser()
    args = vars(parser.parse_args(["--steps", "7", "--no-bf16", "--zero", "3", "--lr", "0.01", "--local_rank=1"]))
    assert (args["steps"], args["bf16"], args["zero"], args["lr"], args["batch_size"]) == (7, False, 3, 0.01, None)
    assert parser.parse_args(["--zero", "auto"]).zero == "auto"
    config = load_config(REPO / "configs/train/shapes.yaml", {"steps": 7, "batch_size": None})
    assert (config.steps, config.model, config.zero, config.batch_size) == (7, "tiny", "auto", 32)
    (tmp_path / "bad.yaml").write_text("stpes: 3\n")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['stpes'\]"):
        load_config(tmp_path / "bad.yaml")
    for bad in (4, "two", "Auto"):
        with pytest.raises(ValueError, match=f"zero must be auto, 0, 1, 2 or 3, got {bad!r}"):
            TrainConfig(zero=bad)


def test_zero_auto_partitions_across_processes_and_not_on_one():
    assert [deepspeed_stage("auto", world) for world in (1, 2, 8)] == [0, 2, 2]
    assert [deepspeed_stage(zero, 1) for zero in (0, 1, 2, 3)] == [None, 1, 2, 3]  # explicit stages are obeyed
    assert [deepspeed_stage(zero, 4) for zero in (0, 3)] == [None, 3]
    for world, stage in ((1, 0), (2, 2)):
        ds = deepspeed_config(TrainConfig(zero="auto", batch_size=8, grad_accum=2), world)
        assert ds["zero_optimization"]["stage"] == stage
        assert (ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"]) == (8, 16 * world)
    with pytest.raises(ValueError, match="plain torch loop"):
        deepspeed_config(TrainConfig(zero=0), 1)
    # The flag a resume error suggests brings back each engine on one process.
    parser = build_parser()
    for stage in (None, 0, 1, 2, 3):
        assert deepspeed_stage(parser.parse_args(["--zero", zero_setting_of(stage)]).zero, 1) == stage


def test_the_training_model_takes_the_run_s_attention_kernel_and_both_kernels_train_alike(workdir):
    from unifier.batching import Collator
    from unifier.tokenization import load_tokenizer

    assert load_config(DEFAULT_CONFIG).attn_implementation == "eager"  # the main job's, for its CPU speed
    with pytest.raises(ValueError, match="attn_implementation must be sdpa or eager, got 'flash'"):
        TrainConfig(attn_implementation="flash")
    tokenizer, tasks, examples = mixture_examples(workdir, 12)
    collate = Collator(tokenizer, 32, [t.name for t in tasks], drop_text_only_images=False)  # the model's image size
    batch = collate(examples)
    losses_by_kernel = {}
    for kernel in ("sdpa", "eager"):
        config = TrainConfig(model=str(workdir / "tiny.yaml"), dropout=0.0, attn_implementation=kernel, lr=1e-2)
        torch.manual_seed(0)
        model = build_training_model(config, load_tokenizer(workdir / "tokenizer"))
        assert model.config._attn_implementation == kernel
        optimizer = build_optimizer(model, config)
        assert all(group["fused"] for group in optimizer.param_groups)
        kernel_losses = []
        for _ in range(3):
            loss = model(**batch.model_inputs()).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            kernel_losses.append(loss.item())
        losses_by_kernel[kernel] = kernel_losses
    assert losses_by_kernel["sdpa"][-1] < losses_by_kernel["sdpa"][0]  # it trains
    assert losses_by_kernel["eager"] == pytest.approx(losses_by_kernel["sdpa"], rel=1e-4)


def test_eval_decoding_is_checked_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match=r"eval_decoding.text_to_image: samples must be >= 1, got 0"):
        TrainConfig(eval_decoding={"text_to_image": {"samples": 0}})
    with pytest.raises(ValueError, match=r"eval_decoding.vqa: .*unexpected keyword argument 'beam'"):
        TrainConfig(eval_decoding={"vqa": {"beam": 3}})
    config = TrainConfig(output_dir=str(tmp_path / "run"), eval_decoding={"text_to_img": {"samples": 2}})
    with pytest.raises(ValueError, match=r"eval_decoding names task\(s\) \['text_to_img'\] that the mixture"):
        train(config)
    assert not (tmp_path / "run").exists()  # failed before the run folder, the tokenizer and the training


def test_presets_start_from_a_base_file(tmp_path):
    from unifier.train import main

    full = load_config(REPO / "configs/train/full.yaml")
    default = load_config(REPO / "configs/train/shapes.yaml")
    assert full.steps == 12000 > 2 * default.steps and full.output_dir == "runs/shapes-full"
    # The default fits the 30-minute bar on any hour of the machine; the full preset runs all its updates.
    assert default.time_budget_minutes == 26.0 and full.time_budget_minutes == 0
    assert full.eval_decoding == {"text_to_image": {"samples": 16, "guidance_scale": 3.0}} and not default.eval_decoding
    assert (full.model, full.mixture, full.targets, full.bf16) == (
        default.model,
        default.mixture,
        default.targets,
        default.bf16,
    )
    # The full preset builds its own, longer-trained VQ-GAN rather than overwriting the default's tokenizer folder.
    assert full.tokenizer != default.tokenizer and full.tokenizer_recipe == "tokenizers/shapes-full.yaml"
    # The GPU preset: the full preset's samples in a quarter of its updates, the same tokenizer and evaluation.
    gpu = load_config(REPO / "configs/train/gpu.yaml")
    assert gpu.steps * gpu.batch_size == full.steps * full.batch_size and gpu.batch_size == 4 * full.batch_size
    assert (gpu.tokenizer, gpu.eval_decoding, gpu.time_budget_minutes) == (full.tokenizer, full.eval_decoding, 0)
    assert gpu.output_dir not in (full.output_dir, default.output_dir) and gpu.prefetch == "auto"
    (tmp_path / "a.yaml").write_text("base: b.yaml\nsteps: 5\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nlr: 0.1\n")
    with pytest.raises(ValueError, match="form a cycle"):
        load_config(tmp_path / "a.yaml")
    # The full preset's fine-tuning stages: each starts from the model of the one before, with the full preset's
    # tokenizer and evaluation, into a folder of its own.
    stage2 = load_config(REPO / "configs/train/full-stage2.yaml")
    stage3 = load_config(REPO / "configs/train/full-stage3.yaml")
    assert stage2.init_from == f"{full.output_dir}/model" and stage3.init_from == f"{stage2.output_dir}/model"
    for stage in (stage2, stage3):
        assert (stage.tokenizer, stage.eval_decoding, stage.targets) == (
            full.tokenizer,
            full.eval_decoding,
            full.targets,
        )
        assert stage.steps < full.steps and stage.lr < full.lr and stage.mixture != full.mixture
    assert len({full.output_dir, stage2.output_dir, stage3.output_dir}) == 3
    assert stage2.loss_length_power == stage3.loss_length_power == 0.0  # every example once
    every_task = [c.name for c, _ in load_mixture(MIXTURE)]
    assert stage2.mixture == stage3.mixture and [c.name for c, _ in load_mixture(REPO / stage2.mixture)] == every_task
    with pytest.raises(SystemExit, match="unknown preset 'nope'; known: full, full-stage2, full-stage3, gpu, shapes"):
        main(["--preset", "nope"])
    with pytest.raises(SystemExit, match="--preset or --config, not both"):
        main(["--preset", "shapes", "--config", "configs/train/shapes.yaml"])


def test_the_results_table_checks_targets_and_leaves_the_breakdowns_to_the_metrics_files():
    summaries = {
        "vqa": {
            "count": 7,
            "metrics": {"vqa_accuracy": 0.5, "vqa_accuracy/by_question_type/exist": 0.25, "vqa_accuracy/yes/no": 0.4},
        },
        "caption": {"count": 3, "metrics": {"CIDEr": 1.25, "accuracy/by_label/x": 1.0}},
    }
    table = results_table(summaries, {"vqa": {"vqa_accuracy": 0.5}}).splitlines()
    assert table[2] == "| vqa | 7 | vqa_accuracy | 50.0% | >= 50.0% | yes | vqa_accuracy/yes/no 40.0% |"
    assert table[3] == "| caption | 3 | CIDEr | 1.250 |  |  |  |"


def test_schedule_warms_up_then_decays_to_the_floor():
    config = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    factors = [lr_factor(s, config) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:], strict=False))
    assert lr_factor(100, config) == pytest.approx(0.1)
    linear = TrainConfig(steps=100, warmup_steps=10, decay="linear", min_lr_ratio=0.0)
    assert lr_factor(55, linear) == pytest.approx(0.5)


def test_a_changed_length_keeps_the_decay_continuous_and_falling():
    config = TrainConfig(steps=1000, warmup_steps=100, lr=1.0, min_lr_ratio=0.1)
    before = [lr_factor(s, config) for s in range(301)]
    reschedule(config, 300, 1400)  # longer: the rate at 300 stays, then falls more slowly to the same floor
    assert config.steps == 1400 and config.schedule_anchor[0] == 300
    longer = [lr_factor(s, config) for s in range(300, 1401)]
    assert longer[0] == pytest.approx(before[300])
    assert all(a >= b for a, b in zip(longer, longer[1:], strict=False))
    assert longer[-1] == pytest.approx(0.1) and lr_factor(800, config) > lr_factor(800, TrainConfig(steps=1000))
    reschedule(config, 600, 700)  # then shorter: the floor comes at 700 instead
    shorter = [lr_factor(s, config) for s in range(600, 701)]
    assert shorter[0] == pytest.approx(longer[300])
    assert all(a >= b for a, b in zip(shorter, shorter[1:], strict=False)) and shorter[-1] == pytest.approx(0.1)
    early = TrainConfig(steps=1000, warmup_steps=100)
    reschedule(early, 50, 600)  # inside the warm-up nothing has decayed yet: no anchor
    assert early.steps == 600 and early.schedule_anchor is None
    with pytest.raises(ValueError, match="schedule_anchor"):
        TrainConfig(schedule_anchor=[100, 1.5])


def test_a_budget_fits_the_updates_to_the_time_left():
    config = TrainConfig(steps=2000, time_budget_minutes=27.5, final_eval_updates=500)
    # 27.5 min less the margin, 10 min spent: 960 s left at 0.5 s an update is 1920, less 500 for the evaluation.
    left = 27.5 * 60 - BUDGET_MARGIN_SECONDS - 600
    assert steps_within_budget(config, 100, 600.0, 0.5) == 100 + int(left / 0.5) - 500
    assert steps_within_budget(config, 100, 600.0, 0.01) == 2000  # never more than configured
    assert steps_within_budget(config, 100, 600.0, 0.01, most_steps=3000) == 3000  # a re-fit's own cap
    assert steps_within_budget(config, 100, 1700.0, 0.5) == 100  # no time left: stop where it is
    no_eval = TrainConfig(steps=4000, time_budget_minutes=27.5, final_eval=False)
    assert steps_within_budget(no_eval, 100, 600.0, 0.5) == 100 + int(left / 0.5)


def test_a_run_out_of_time_stops_early_and_says_so(workdir, tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState

    import unifier.train as train_module

    monkeypatch.setattr(train_module, "BUDGET_PROBE", (1, 3))  # time updates 2-3 instead of 21-100
    out = tmp_path / "run"
    # A budget already spent when the probe ends: the run stops there, with its model and a checkpoint.
    args = run_args(workdir, out, 40, zero=0, **{"time-budget-minutes": 0.01, "checkpoint-every": 2})
    try:
        assert train_module.main(args) == 0
    finally:
        AcceleratorState._reset_state(True)
    entries = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries if "loss" in e] == [1, 2, 3]
    (budget,) = [e["time_budget"] for e in entries if "time_budget" in e]
    assert budget["configured_steps"] == 40 and budget["steps"] == 3 and budget["seconds_per_update"] > 0
    assert [p.name for p in list_checkpoints(out)] == ["step-2", "step-3"]
    assert json.loads((out / "checkpoints/step-3/data-rank0.json").read_text())["steps"] == 3
    assert (out / "model" / "model.safetensors").is_file()


def test_a_budget_refits_on_the_way_and_the_rate_stays_continuous(workdir, tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState

    import unifier.train as train_module

    monkeypatch.setattr(train_module, "BUDGET_PROBE", (1, 3))
    monkeypatch.setattr(train_module, "BUDGET_REFIT_EVERY", 2)
    # The machine's speed as the fits see it: the probe plans 6 updates, the fit at 4 finds room for 9 (more than
    # the probe allowed, under the configured 12) and the one at 6 for 8; at 8 the run is over, and fits no more.
    plans = iter([6, 9, 8])
    calls = []

    def scripted(config, done, elapsed, per_update, most_steps=None):
        calls.append((done, most_steps))
        return next(plans)

    monkeypatch.setattr(train_module, "steps_within_budget", scripted)
    out = tmp_path / "run"
    args = run_args(workdir, out, 12, zero=0, **{"time-budget-minutes": 30, "checkpoint-every": 5, "warmup-steps": 2})
    try:
        assert train_module.main(args) == 0
    finally:
        AcceleratorState._reset_state(True)
    assert calls == [(3, 12), (4, 12), (6, 12)]  # the cap is always the configured count
    entries = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries if "loss" in e] == list(range(1, 9))
    fits = [(e["step"], e["time_budget"]["steps"], e["time_budget"]["fits"]) for e in entries if "time_budget" in e]
    assert fits == [(3, 6, 1), (4, 9, 2), (6, 8, 3)]
    # The rate never jumps up at a re-fit: warm-up to update 2, then it only falls, to the floor at the last update.
    rates = [e["lr"] for e in entries if "loss" in e]
    assert rates[1] == pytest.approx(3e-3) and all(a >= b - 1e-12 for a, b in zip(rates[1:], rates[2:], strict=False))
    assert rates[-1] == pytest.approx(3e-3 * 0.1)
    position = json.loads((out / "checkpoints/step-5/data-rank0.json").read_text())
    assert position["steps"] == 9 and position["schedule_anchor"][0] == 4
    assert json.loads((out / "checkpoints/step-8/data-rank0.json").read_text())["steps"] == 8


def test_streams_resume_exactly_and_ranks_see_different_scenes(workdir):
    from unifier.tokenization import load_tokenizer

    tokenizer = load_tokenizer(workdir / "tokenizer")
    mixture = load_mixture(MIXTURE)
    config, _ = next(entry for entry in mixture if entry[0].kind == "grounding")
    task = build_task_from_config(config, tokenizer)
    stream = TaskStream(config, task, seed=0, rank=0, world_size=2)
    for _ in range(5):
        stream.next_example()
    state = stream.state_dict()
    expected = [stream.next_example().target_ids for _ in range(6)]
    resumed = TaskStream(config, task, seed=0, rank=0, world_size=2)
    resumed.load_state_dict(state)
    assert [resumed.next_example().target_ids for _ in range(6)] == expected
    other = TaskStream(config, task, seed=0, rank=1, world_size=2)
    assert {r.image_id for r in (other.next_example().record for _ in range(8))}.isdisjoint(
        {r.image_id for r in (TaskStream(config, task, 0, 0, 2).next_example().record for _ in range(8))}
    )


def test_streams_spread_the_records_of_a_scene_over_many_batches(workdir):
    from unifier.tokenization import load_tokenizer

    config, _ = next(entry for entry in load_mixture(MIXTURE) if entry[0].kind == "vqa")
    task = build_task_from_config(config, load_tokenizer(workdir / "tokenizer"))
    stream = TaskStream(config, task, seed=0, rank=0, world_size=1)
    block = [stream.world.records("vqa", scene) for scene in range(TaskStream.BLOCK)]
    assert max(map(len, block)) > 1  # scenes hold several questions
    served = [stream.next_example().record for _ in range(sum(map(len, block)))]
    # Every question of the block's scenes once, one of each scene before any scene's second.
    assert sorted(r.question_id for r in served) == sorted(r.question_id for records in block for r in records)
    assert [r.image_id for r in served[: TaskStream.BLOCK]] == [records[0].image_id for records in block]
    # A scene lists its questions by family; served in that order, a batch's questions would all be one family.
    first_round = [r.question_id for r in served[: TaskStream.BLOCK]]
    assert first_round != [records[0].question_id for records in block]
    assert len({r.question_id % 100 for r in served[: TaskStream.BLOCK]}) >= 4  # families (question_id's last digits)
    assert stream.next_example().record.image_id == stream.world.records("vqa", TaskStream.BLOCK)[0].image_id
    again = TaskStream(config, task, seed=0, rank=0, world_size=1)  # the order is the seed's
    assert [again.next_example().record.question_id for _ in served] == [r.question_id for r in served]


def test_streams_mix_the_answers_of_every_stretch_of_entailment_examples(workdir):
    """A scene lists its hypotheses "yes", "yes", "no", "no", "maybe", "maybe": the stream must not serve them so."""
    from unifier.tokenization import load_tokenizer

    config, _ = next(entry for entry in load_mixture(MIXTURE) if entry[0].kind == "entailment")
    task = build_task_from_config(config, load_tokenizer(workdir / "tokenizer"))
    stream = TaskStream(config, task, seed=0, rank=0, world_size=1)
    labels = [stream.next_example().record.label for _ in range(6 * TaskStream.BLOCK)]
    assert sorted(set(labels)) == ["maybe", "no", "yes"]
    for start in range(0, len(labels), 16):  # about three updates' entailment examples in the main job
        window = labels[start : start + 16]
        assert max(window.count(label) for label in set(window)) <= 12, (start, window)


def test_text_to_image_streams_drop_captions_at_the_configured_rate(workdir):
    from unifier.tokenization import load_tokenizer

    tokenizer = load_tokenizer(workdir / "tokenizer")
    config, _ = next(entry for entry in load_mixture(MIXTURE) if entry[0].kind == "text_to_image")

    def stream(dropout):
        task = build_task_from_config(dataclasses.replace(config, options={"caption_dropout": dropout}), tokenizer)
        return task, TaskStream(config, task, seed=0, rank=0, world_size=1)

    task, dropping = stream(0.25)
    _, keeping = stream(0.0)
    unconditional = task.unconditional_prompt_ids()
    assert tokenizer.vocab.decode_text(unconditional[1:-1]).strip() == "what is the complete image? caption:"
    dropped = 0
    for _ in range(160):
        example, full = dropping.next_example(), keeping.next_example()
        assert example.target_ids == full.target_ids  # the same scenes in the same order, captions or not
        if example.prompt_ids == unconditional:
            dropped += 1
        else:
            assert example.prompt_ids == full.prompt_ids and len(full.prompt_ids) > len(unconditional)
    assert 0.15 < dropped / 160 < 0.35
    state = dropping.state_dict()
    expected = [dropping.next_example().prompt_ids for _ in range(12)]
    resumed = stream(0.25)[1]
    resumed.load_state_dict(state)
    assert [resumed.next_example().prompt_ids for _ in range(12)] == expected
    with pytest.raises(ValueError, match=r"caption_dropout must be in \[0, 1\), got 1"):
        stream(1)


def test_finite_sources_cycle_in_per_epoch_orders(workdir, monkeypatch):
    import unifier.tasks as tasks_module
    from unifier.data.shapes import ShapesWorld
    from unifier.tokenization import load_tokenizer

    records = [r for i in range(4) for r in ShapesWorld("train", 0, 32).records("region_caption", i)]
    records = records[: len(records) // 2 * 2]
    config, _ = next(entry for entry in load_mixture(MIXTURE) if entry[0].kind == "region_caption")
    config.data = {"source": "refcoco", "splits": {"train": {}}}
    monkeypatch.setattr(tasks_module, "open_records", lambda cfg, split: records)
    task = build_task_from_config(config, load_tokenizer(workdir / "tokenizer"))
    ranks = [TaskStream(config, task, seed=0, rank=r, world_size=2) for r in range(2)]
    half = len(records) // 2
    seen = [[s.next_example().record for _ in range(half)] for s in ranks]
    assert sorted(map(id, seen[0] + seen[1])) == sorted(map(id, records))  # one epoch: every record once
    next_epoch = [ranks[0].next_example().record for _ in range(half)]
    assert {id(r) for r in next_epoch} <= {id(r) for r in records} and ranks[0].state["epoch"] == 1


def test_mixture_batches_follow_the_weights(workdir):
    from unifier.batching import Collator
    from unifier.tokenization import load_tokenizer

    tokenizer = load_tokenizer(workdir / "tokenizer")
    mixture = load_mixture(MIXTURE)
    tasks = [build_task_from_config(c, tokenizer) for c, _ in mixture]
    streams = [TaskStream(c, t, 0, 0, 1) for (c, _), t in zip(mixture, tasks, strict=True)]
    sampler = MixtureSampler(streams, [w for _, w in mixture], lambda examples: examples, seed=0, rank=0)
    counts = {}
    for step in range(40):
        for example in sampler.batch(step, 0, 16):
            counts[example.task] = counts.get(example.task, 0) + 1
    weights = {c.kind: w / sum(w for _, w in mixture) for c, w in mixture}
    for kind, share in weights.items():
        assert abs(counts[kind] / 640 - share) < 0.06, (kind, counts)
    first = [e.task for e in MixtureSampler(streams, [1] * 6, lambda e: e, 0, 0).batch(3, 0, 8)]
    again = [e.task for e in MixtureSampler(streams, [1] * 6, lambda e: e, 0, 0).batch(3, 0, 8)]
    assert first == again
    Collator(tokenizer, 32, [t.name for t in tasks])(sampler.batch(99, 0, 8))


def test_prefetched_batches_are_the_sampler_s_own_and_checkpoints_get_the_positions_of_the_last_taken(workdir):
    from unifier.tokenization import load_tokenizer
    from unifier.train import BatchPrefetcher

    tokenizer = load_tokenizer(workdir / "tokenizer")
    mixture = load_mixture(MIXTURE)
    tasks = [build_task_from_config(c, tokenizer) for c, _ in mixture]

    def sampler():
        streams = [TaskStream(c, t, 0, 0, 1) for (c, _), t in zip(mixture, tasks, strict=True)]
        return MixtureSampler(streams, [w for _, w in mixture], lambda examples: examples, 0, 0, image_positions=16)

    def ids(batches):  # every example of an update, by micro-batch: the task and the target
        return [[(e.task, tuple(e.target_ids)) for e in group] for groups in batches for group in groups]

    plain = sampler()
    expected, positions = [], []
    for step in range(5):
        expected.append(ids(plain.update_batches(step, 8, 1, 2)))
        positions.append(plain.state_dict())
    ahead = BatchPrefetcher(sampler(), 8, 1, 2, enabled=True)
    try:
        for step in range(4):
            assert ids(ahead.batches(step, last_step=4)) == expected[step]
            # The thread has made (or is making) update step + 1 already; a checkpoint after update step saves these.
            assert ahead.state_dict() == positions[step]
            assert ahead.pending is not None and ahead.pending[0] == step + 1
        assert ids(ahead.batches(4, last_step=4)) == expected[4] and ahead.pending is None  # nothing past the last
        with pytest.raises(RuntimeError, match="prefetched update 6's batches, but update 9 was asked for"):
            ahead.batches(5, last_step=10)
            ahead.batches(9, last_step=10)
    finally:
        ahead.close()
    inline = BatchPrefetcher(sampler(), 8, 1, 2, enabled=False)
    assert ids(inline.batches(0, last_step=4)) == expected[0] and inline.pending is None
    assert inline.state_dict() == positions[0]


def test_length_groups_cut_batches_and_keep_the_batch_loss(workdir):
    """A batch cut into length groups pads less, and the token-weighted sum of the groups' losses is the loss of
    the whole batch (what train_step minimises)."""
    from unifier.batching import Collator
    from unifier.modeling import build_model

    tokenizer, tasks, examples = mixture_examples(workdir, 24)
    groups = split_by_length(examples, 2, image_positions=16)
    assert len(groups) == 2 and sorted(map(id, groups[0] + groups[1])) == sorted(map(id, examples))
    # Where image positions dominate the cost, the image-less examples (text-to-image prompts) go together.
    by_images = split_by_length(examples, 2, image_positions=1000)
    assert {e.task for e in by_images[1]} == {"text_to_image"} and "text_to_image" not in {e.task for e in by_images[0]}
    assert split_by_length(examples, 1) == [
        sorted(examples, key=lambda e: (e.image is None, len(e.target_ids), len(e.prompt_ids)))
    ]
    with pytest.raises(ValueError, match="cannot cut 2 examples into 3"):
        split_by_length(examples[:2], 3)

    collate = Collator(tokenizer, 32, [t.name for t in tasks])
    whole = collate(examples)
    assert sum(collate(g)["labels"].numel() for g in groups) < whole["labels"].numel()
    assert collate(by_images[1])["pixel_values"] is None
    assert (
        Collator(tokenizer, 32, [t.name for t in tasks], drop_text_only_images=False)(by_images[1])["pixel_values"]
        .eq(0)
        .all()
    )
    torch.manual_seed(0)
    model = build_model(workdir / "tiny.yaml", tokenizer).eval()
    with torch.no_grad():
        expected = model(**whole.model_inputs()).loss
        for partition in (groups, by_images):
            parts = [collate(g) for g in partition]
            tokens = [int(p["labels"].ne(-100).sum()) for p in parts]
            part_losses = [model(**p.model_inputs()).loss for p in parts]
            combined = sum(loss * n for loss, n in zip(part_losses, tokens, strict=True)) / sum(tokens)
            torch.testing.assert_close(combined, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("power", [1.0, 0.0, 0.5])
@pytest.mark.parametrize("accumulate", [False, True])
def test_train_step_minimises_the_weighted_mean_over_its_micro_batches(workdir, power, accumulate):
    """One update over two length groups (of one batch: one backward pass; or two accumulated batches of one group
    each) moves the weights as one SGD step on the whole batch's loss would: the token-mean (power 1), the mean of
    each example's token-mean (power 0), or between."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from unifier.batching import Collator
    from unifier.modeling import build_model
    from unifier.train import train_step

    tokenizer, tasks, examples = mixture_examples(workdir, 12)
    collate = Collator(tokenizer, 32, [t.name for t in tasks], drop_text_only_images=False)
    groups = [collate(g) for g in split_by_length(examples, 2, image_positions=16)]
    whole = collate(examples)
    torch.manual_seed(0)
    model = build_model(workdir / "tiny.yaml", tokenizer)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}

    out = model(**whole.model_inputs())
    lengths = whole["labels"].ne(-100).sum(1).float()
    assert len(set(lengths.tolist())) > 2  # the weightings differ
    example_means = out.token_loss.sum(1) / lengths
    expected_loss = (example_means * lengths**power).sum() / (lengths**power).sum()
    if power == 1.0:
        torch.testing.assert_close(expected_loss, out.loss)
    gradients = torch.autograd.grad(expected_loss, list(model.parameters()), allow_unused=True)
    try:
        batches = [[group] for group in groups] if accumulate else [groups]
        accelerator = Accelerator(gradient_accumulation_steps=len(batches))
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        outputs, _ = train_step(
            accelerator, model, optimizer, scheduler, batches, max_grad_norm=1e9, length_power=power
        )
    finally:
        AcceleratorState._reset_state(True)
    assert [tuple(token_loss.shape) for _, token_loss in outputs] == [tuple(g["labels"].shape) for g in groups]
    for (name, param), grad in zip(model.named_parameters(), gradients, strict=True):
        step = reference[name] - param.detach()
        torch.testing.assert_close(step, torch.zeros_like(step) if grad is None else grad, rtol=1e-4, atol=1e-6)


def test_the_late_loss_weighting_starts_at_its_fraction_of_the_fitted_updates():
    config = TrainConfig(steps=1000, late_loss_length_power=0.0, late_loss_from=0.7)
    assert [loss_length_power_at(config, step) for step in (0, 699, 700, 999)] == [1.0, 1.0, 0.0, 0.0]
    config.steps = 2000  # a time budget's re-fit moves the switch with the run's end
    assert (loss_length_power_at(config, 700), loss_length_power_at(config, 1400)) == (1.0, 0.0)
    assert loss_length_power_at(TrainConfig(steps=1000, loss_length_power=0.5), 999) == 0.5  # no late weighting
    with pytest.raises(ValueError, match="late_loss_from must lie in \\[0, 1\\], got 1.5"):
        TrainConfig(late_loss_length_power=0.0, late_loss_from=1.5)
    assert build_parser().parse_args(["--late-loss-length-power", "0"]).late_loss_length_power == 0.0


# ---- runs ---------------------------------------------------------------------------------------------------------
def test_plain_loop_run_writes_logs_checkpoints_and_a_loadable_model(workdir, tmp_path):
    from accelerate.state import AcceleratorState

    from unifier.modeling import load_pretrained
    from unifier.train import main

    out = tmp_path / "run"
    args = run_args(workdir, out, 6, zero=0, **{"checkpoint-every": 2, "keep-last": 2, "eval-every": 3})
    try:
        assert main(args) == 0
    finally:
        AcceleratorState._reset_state(True)
    entries = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train_entries = [e for e in entries if "loss" in e]
    assert [e["step"] for e in train_entries] == [1, 2, 3, 4, 5, 6]
    # shapes.yaml's bf16: auto, resolved for this CPU: the run's config says what it did
    assert yaml.safe_load((out / "config.yaml").read_text())["bf16"] is has_native_bf16("cpu")
    assert yaml.safe_load((out / "config.yaml").read_text())["prefetch"] is False  # auto: off on a CPU
    assert all(e["samples_per_s"] > 0 and e["task_loss"] and e["grad_norm"] > 0 for e in train_entries)
    val = [e for e in entries if "val_loss" in e]
    assert [e["step"] for e in val] == [3, 6] and set(val[0]["val_loss"]) == {c.name for c, _ in load_mixture(MIXTURE)}
    assert [p.name for p in list_checkpoints(out)] == ["step-4", "step-6"]  # keep_last 2
    assert not list((out / "checkpoints").glob(".*"))  # no half-written checkpoint left
    assert (out / "checkpoints/step-6/data-rank0.json").is_file()
    model, tokenizer = load_pretrained(out / "model")
    again, _ = load_pretrained(out / "checkpoints/step-6/model")
    assert len(tokenizer.vocab) == model.config.vocab_size
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


def test_a_run_fine_tunes_a_trained_model_from_its_folder(workdir, tmp_path):
    """init_from: the trained weights with a fresh optimizer; at lr 0 the model written is the one it started from."""
    from accelerate.state import AcceleratorState

    from unifier.modeling import load_pretrained
    from unifier.train import main

    def run(out: Path, steps: int, **flags) -> None:
        try:
            assert main(run_args(workdir, out, steps, zero=0, **flags)) == 0
        finally:
            AcceleratorState._reset_state(True)

    base, fresh, tuned, frozen = (tmp_path / name for name in ("base", "fresh", "tuned", "frozen"))
    run(base, 30)
    run(fresh, 1, seed=1)
    # The same first batch as `fresh`; the run's tokenizer folder is not there, so it takes the model's own.
    run(tuned, 1, seed=1, tokenizer=tmp_path / "absent", **{"init-from": base / "model"})
    assert losses(tuned)[1] < 0.9 * losses(fresh)[1]  # it starts where the base run left off, not from scratch
    written = yaml.safe_load((tuned / "config.yaml").read_text())
    assert (written["init_from"], written["tokenizer"]) == (str(base / "model"), str(base / "model/tokenizer"))
    assert written["model"] is None  # the size came from the folder, not the default `tiny` it would otherwise name
    assert yaml.safe_load((base / "config.yaml").read_text())["model"] == str(workdir / "tiny.yaml")
    assert not (tmp_path / "absent").exists()  # no tokenizer built from the recipe
    assert describe_start(TrainConfig(init_from=str(base / "model"))) == f"fine-tuned from `{base / 'model'}`"
    assert describe_start(TrainConfig()) == "`tiny`"

    run(frozen, 2, seed=1, lr=0.0, **{"init-from": base / "model"})
    source, _ = load_pretrained(base / "model")
    written, _ = load_pretrained(frozen / "model")
    for name, tensor in source.state_dict().items():
        assert torch.equal(tensor, written.state_dict()[name]), name


def test_fine_tuning_needs_the_model_s_own_tokenizer(workdir, tmp_path):
    from unifier.tokenization import load_tokenizer
    from unifier.train import check_same_tokenizer, main

    model_folder = tmp_path / "model"
    tokenizer = load_tokenizer(workdir / "tokenizer")
    config = TrainConfig(model=str(workdir / "tiny.yaml"), tokenizer=str(workdir / "tokenizer"))
    build_training_model(config, tokenizer).save_pretrained(model_folder)
    with pytest.raises(FileNotFoundError, match="tokenizer/text.model is missing"):
        build_training_model(dataclasses.replace(config, init_from=str(model_folder)), tokenizer)
    shutil.copytree(workdir / "tokenizer", model_folder / "tokenizer")
    check_same_tokenizer(model_folder / "tokenizer", workdir / "tokenizer")  # the same files: no error
    model = build_training_model(dataclasses.replace(config, init_from=str(model_folder), dropout=0.25), tokenizer)
    assert model.config.dropout == 0.25  # the run's overrides apply to the loaded model

    other = tmp_path / "other-tokenizer"
    shutil.copytree(workdir / "tokenizer", other)
    vocab = json.loads((other / "vocab.json").read_text())
    (other / "vocab.json").write_text(json.dumps({**vocab, "num_bins": vocab["num_bins"] + 1}))
    message = f"differs from the run's ({other}) in vocab.json: give the run --tokenizer {model_folder / 'tokenizer'}"
    with pytest.raises(ValueError, match=re.escape(message)):
        build_training_model(dataclasses.replace(config, init_from=str(model_folder), tokenizer=str(other)), tokenizer)
    with pytest.raises(FileNotFoundError, match="no config.json, not a Unifier model folder"):
        build_training_model(dataclasses.replace(config, init_from=str(tmp_path)), tokenizer)
    missing, recipe = tmp_path / "runs/none/model", REPO / "tokenizers/shapes.yaml"
    args = ["--init-from", str(missing), "--tokenizer", str(tmp_path / "tok"), "--tokenizer-recipe", str(recipe)]
    with pytest.raises(FileNotFoundError, match=f"init_from {missing}: no such folder; train that model first"):
        main([*args, "--output-dir", str(tmp_path / "run"), "--no-progress"])
    assert not (tmp_path / "tok").exists() and not (tmp_path / "run").exists()  # it stopped before building anything
    with pytest.raises(ValueError, match="init_from and pretrained_bart both set"):
        build_training_model(dataclasses.replace(config, init_from=str(model_folder), pretrained_bart="x"), tokenizer)


def test_one_process_deepspeed_run_without_partitioning_resumes_exactly_under_its_own_engine(workdir, tmp_path):
    """zero auto on one process: DeepSpeed's engine at stage 0, which the checkpoint records and a resume checks."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_subprocess([sys.executable, "train.py", *run_args(workdir, full, 4, zero="auto", **{"checkpoint-every": 2})])
    position = json.loads((full / "checkpoints/step-2/data-rank0.json").read_text())
    assert (position["world_size"], position["zero_stage"]) == (1, 0)
    assert (full / "checkpoints/step-2/state/pytorch_model/mp_rank_00_model_states.pt").is_file()
    assert not list((full / "checkpoints/step-2/state").rglob("*optim_states.pt"))  # no ZeRO partitions

    shutil.copytree(full / "checkpoints/step-2", resumed / "checkpoints/step-2")
    flags = {"checkpoint-every": 2, "resume": "latest"}
    with pytest.raises(
        AssertionError,
        match=r"written under DeepSpeed without ZeRO partitioning \(stage 0\) and this "
        r"run trains under DeepSpeed ZeRO-2: resume it with --zero auto",
    ):
        run_subprocess([sys.executable, "train.py", *run_args(workdir, resumed, 4, zero=2, **flags)])
    run_subprocess([sys.executable, "train.py", *run_args(workdir, resumed, 4, zero="auto", **flags)])
    uninterrupted, again = losses(full), losses(resumed)
    assert list(again) == [3, 4]  # log_every 1: each step's own loss
    for step in (3, 4):  # the optimizer state came back: Adam's moments shape updates 3 and 4
        assert again[step] == pytest.approx(uninterrupted[step], rel=1e-6), (again, uninterrupted)


def test_a_run_that_prefetches_its_batches_trains_and_resumes_as_one_that_does_not(workdir, tmp_path):
    """prefetch (on by default only on a GPU) makes the next update's batches in a thread: the same batches, the
    same losses, and checkpoints that resume where the training was, not where the thread had got to."""
    from accelerate.state import AcceleratorState

    from unifier.train import main

    runs = {}
    for name, prefetch in (("inline", False), ("ahead", True), ("resumed", True)):
        out = tmp_path / name
        flags = {"checkpoint-every": 2, "keep-last": 3, "prefetch": prefetch}
        if name == "resumed":
            shutil.copytree(tmp_path / "ahead/checkpoints/step-2", out / "checkpoints/step-2")
            flags["resume"] = "latest"
        try:
            assert main(run_args(workdir, out, 5, zero=0, **flags)) == 0
        finally:
            AcceleratorState._reset_state(True)
        runs[name] = losses(out)
    assert yaml.safe_load((tmp_path / "ahead/config.yaml").read_text())["prefetch"] is True
    assert list(runs["inline"]) == list(runs["ahead"]) == [1, 2, 3, 4, 5] and list(runs["resumed"]) == [3, 4, 5]
    for step, loss in runs["inline"].items():
        assert runs["ahead"][step] == pytest.approx(loss, rel=1e-5), (runs["ahead"], runs["inline"])
    for step in (3, 4, 5):
        assert runs["resumed"][step] == pytest.approx(runs["ahead"][step], rel=1e-5), (runs["resumed"], runs["ahead"])
    for step in (2, 4, 5):
        position = f"checkpoints/step-{step}/data-rank0.json"
        inline, ahead = (json.loads((tmp_path / n / position).read_text()) for n in ("inline", "ahead"))
        assert ahead["streams"] == inline["streams"], step


@pytest.mark.slow
def test_zero_stages_match_the_plain_loop_in_fp32(workdir, tmp_path):
    """Single process: the plain torch loop, DeepSpeed without partitioning (zero auto) and ZeRO-1, -2, -3 give the
    same losses (dropout off, fp32)."""
    runs = {}
    for stage in (0, "auto", 1, 2, 3):
        out = tmp_path / f"zero{stage}"
        run_subprocess([sys.executable, "train.py", *run_args(workdir, out, 3, zero=stage, **{"val-records": 0})])
        runs[stage] = losses(out)
    assert list(runs[0]) == [1, 2, 3]
    for stage in ("auto", 1, 2, 3):
        for step, loss in runs[0].items():
            assert runs[stage][step] == pytest.approx(loss, rel=1e-4, abs=1e-5), (stage, runs)


@pytest.mark.slow
def test_two_process_zero2_run_learns_checkpoints_and_resumes_exactly(workdir, tmp_path):
    def torchrun() -> list[str]:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
        ]

    full = tmp_path / "full"
    # The whole main job: training, then every task evaluated (records sharded over the two processes), the
    # gallery and the results table; the preset's file decides how text-to-image is decoded.
    preset = tmp_path / "preset.yaml"
    preset.write_text(f"base: {DEFAULT_CONFIG}\neval_decoding:\n  text_to_image: {{samples: 2}}\n")
    main_job = {"config": preset, "checkpoint-every": 4, "final-eval": True, "eval-limit": 6, "gallery-scenes": 1}
    main_job["tokenizer-recipe"] = ""  # the folder is there; nothing to build it from
    run_subprocess([*torchrun(), "train.py", *run_args(workdir, full, 8, zero="auto", **main_job)])
    uninterrupted = losses(full)
    assert list(uninterrupted) == list(range(1, 9))
    assert sum(list(uninterrupted.values())[-2:]) / 2 < uninterrupted[1] - 0.3  # the loss falls
    checkpoint = full / "checkpoints" / "step-4"
    assert (checkpoint / "model" / "model.safetensors").is_file()
    assert {p.name for p in checkpoint.glob("data-rank*.json")} == {"data-rank0.json", "data-rank1.json"}
    assert json.loads((checkpoint / "data-rank1.json").read_text())["zero_stage"] == 2  # auto: ZeRO-2 across two

    names = [c.name for c, _ in load_mixture(MIXTURE)]
    metrics = json.loads((full / "eval" / "metrics.json").read_text())
    assert set(metrics) == set(names)
    for name in names:
        summary = json.loads((full / "eval" / f"{name}_metrics.json").read_text())
        assert summary["processes"] == 2 and summary["count"] == 6, summary
        assert (full / "eval" / f"{name}_results.json").is_file()
        assert summary["decoding"].get("samples") == {"text_to_image": 2}.get(name), summary["decoding"]
        # bf16: auto (shapes.yaml): the job trains under bf16 autocast where the CPU has it and evaluates so too
        assert summary["bf16"] is has_native_bf16("cpu")
    report = (full / "results.md").read_text()
    assert all(f"| {name} |" in report for name in names) and "2 process(es)" in report and "DeepSpeed ZeRO-2" in report
    assert f"2 process(es), {'bf16 autocast' if has_native_bf16('cpu') else 'fp32'}," in report
    assert "- text_to_image decoded with samples 2 (eval_decoding)" in report
    assert "--tokenizer-recipe '' " in report  # the command as a shell would take it back
    assert "/by_" not in report  # the breakdowns stay in the metrics files
    vqa = json.loads((full / "eval" / "vqa_metrics.json").read_text())["metrics"]
    families = {key.rsplit("/", 1)[1] for key in vqa if "/by_question_type/" in key}
    assert families and families <= set(QUESTION_FAMILIES)
    entailment = json.loads((full / "eval" / "entailment_metrics.json").read_text())["metrics"]
    assert {f"accuracy/by_label/{label}" for label in ("entailment", "contradiction", "neutral")} <= set(entailment)
    assert "accuracy/by_hypothesis_type/neutral" in entailment  # the first scene's six hypotheses, two of them neutral
    assert f"model {full / 'model'} &middot;" in (full / "gallery" / "index.html").read_text()
    assert json.loads((full / "model" / "tasks.json").read_text())["vqa"]["answers"][:2] == ["yes", "no"]
    decoding = json.loads((full / "model" / "decoding.json").read_text())  # as the evaluation decoded each task
    assert decoding["text_to_image"]["num_candidates"] == 2 and decoding["vqa"]["num_beams"] == 1

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints", resumed_dir / "checkpoints")
    shutil.rmtree(resumed_dir / "checkpoints" / "step-8")
    # The log of a run that went on past its last checkpoint (step 4), with losses after it that the resumed run
    # must replace: a resume that wrote nothing would leave them.
    stale = [json.loads(line) for line in (full / "log.jsonl").read_text().splitlines()]
    stale = [{**e, "loss": -1.0} if "loss" in e and e["step"] > 4 else e for e in stale]
    (resumed_dir / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in stale))
    with pytest.raises(FileExistsError, match=r"already holds a run \(log.jsonl, checkpoints\): continue it with"):
        train(TrainConfig(output_dir=str(resumed_dir)))
    run_subprocess([*torchrun(), "train.py", *run_args(workdir, resumed_dir, 8, zero="auto", resume="latest")])
    entries = [json.loads(line) for line in (resumed_dir / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries if "loss" in e] == list(range(1, 9))  # steps 5-8 redone, each logged once
    resumed = losses(resumed_dir)
    assert all(loss > 0 for loss in resumed.values())  # the stale steps 5-8 were replaced
    for step, loss in resumed.items():
        assert loss == pytest.approx(uninterrupted[step], rel=1e-5), (resumed, uninterrupted)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_main_job_trains_and_evaluates_every_task_on_a_gpu(workdir, tmp_path):
    """The default job's path on one GPU: bf16 autocast (auto), DeepSpeed's one-process engine, the text-to-image
    stream's VQ-GAN on the GPU, the evaluation of every task, a model folder that answers on the GPU."""
    from unifier.predict import Unifier

    run = tmp_path / "gpu"
    main_job = {"config": DEFAULT_CONFIG, "final-eval": True, "eval-limit": 4, "gallery-scenes": 1}
    run_subprocess([sys.executable, "train.py", *run_args(workdir, run, 12, **main_job)])
    trained = losses(run)
    assert list(trained) == list(range(1, 13))
    assert sum(list(trained.values())[-3:]) / 3 < trained[1] - 0.3  # the loss falls
    report = (run / "results.md").read_text()
    bf16 = has_native_bf16("cuda")  # bf16: auto takes it on GPUs with bf16 tensor cores (the H200 it ran on)
    precision = "bf16 autocast" if bf16 else "fp32"
    assert f"1 process(es), {precision}, DeepSpeed without ZeRO partitioning" in report, report
    names = [c.name for c, _ in load_mixture(MIXTURE)]
    for name in names:
        summary = json.loads((run / "eval" / f"{name}_metrics.json").read_text())
        assert summary["count"] == 4 and summary["bf16"] is bf16, summary

    unifier = Unifier.from_pretrained(run / "model", device="cuda")
    assert unifier.device.type == "cuda" and unifier.image_tokenizer.device.type == "cuda"
    answer = unifier.predict(prompt="a large red circle", task="text_to_image")
    assert answer.image.size == (unifier.image_tokenizer.image_size,) * 2
