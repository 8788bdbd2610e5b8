"""Train a VQ-GAN image tokenizer on local images: the shapes world by default, or any folder of images.

    python -m unifier.tokenization.vqgan_train --out runs/vqgan-shapes
    python -m unifier.tokenization.vqgan_train --out runs/vqgan-photos --images path/to/images --steps 20000

Model and schedule come from the `image` section of a tokenizer recipe (default `tokenizers/shapes.yaml`);
`unifier tokenizer build` calls `train_vqgan` the same way. The loop (nanoGPT-style, one function):

    loss = l1 * |x - x'| + l2 * (x - x')^2 + perceptual * LPIPS(x, x')     reconstruction
         + codebook_weight * (|sg[z] - e|^2 + beta |z - sg[e]|^2)           VectorQuantizer2
         + adaptive_weight * -D(x')          after disc_start               taming's NLayerDiscriminator, hinge
    discriminator: hinge(D(x), D(sg[x']))    after disc_start

Two cures for the codebook collapse that plain VQ suffers in a short run, both optional:
an autoencoder warm-up (the quantizer is bypassed for the first steps, then the codebook is set by
k-means over encoder outputs) and dead-code reset (codes unused for a while are moved onto random
encoder outputs). The run folder holds checkpoints (safetensors weights + a JSON state; the optimizer
state as a torch file, read back only by this loop with weights_only=True) so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from unifier.precision import bf16_setting_problem, resolve_bf16
from unifier.tokenization.image_tokenizer import ImageTokenizer

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
CHECKPOINT_PREFIX = "checkpoint-"
RUN_CONFIG_FILE = "run_config.json"


class VQGANTrainError(ValueError):
    """A bad training configuration, data source or run folder."""


@dataclass
class VQGANTrainConfig:
    """The training schedule; every field can be set from a recipe's `image.train` mapping."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.9)  # taming's Adam betas
    warmup_steps: int = 50  # linear learning-rate warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    codebook_weight: float = 1.0
    autoencoder_warmup_steps: int = 0  # steps with the quantizer bypassed, then k-means codebook init
    kmeans_images: int = 512  # images whose encoder outputs the k-means runs on
    kmeans_iterations: int = 15
    dead_code_reset_every: int = 50  # 0 disables; codes unused over this many steps move onto encoder outputs
    # Which encoder outputs dead codes move onto: "random" (uniformly) or "far" (drawn in proportion to their squared
    # distance from the nearest code, as k-means++ seeds). On images that are mostly flat background, "random"
    # fills the codebook with copies of the background, which then codes the same pixels with hundreds of codes.
    dead_code_reset_to: str = "random"
    disc_start: int = -1  # step at which the adversarial loss starts; < 0 disables the discriminator
    disc_weight: float = 0.1  # taming's discriminator_weight: scales the adaptive weight
    disc_ndf: int = 32
    disc_layers: int = 2
    perceptual_weight: float = 1.0  # used only when lpips_weights is given
    lpips_weights: str | None = None  # taming / LPIPS `vgg.pth` (lin0..lin4 layers), by path
    vgg16_weights: str | None = None  # torchvision `vgg16-397923af.pth`, by path (not needed if lpips has net.*)
    save_every: int = 250
    log_every: int = 10
    seed: int = 0
    torch_threads: int | None = None  # torch.set_num_threads; None keeps torch's default
    # bf16 autocast for the convolutions (the quantizer's nearest-code search stays fp32): measured 1.7x faster
    # per step on this project's AMX CPU (bench/tokenizer_throughput.py), on GPUs the usual gain; 35x slower on a
    # CPU that emulates bf16 (AVX2 only). "auto": bf16 where the device has it in hardware (unifier.precision).
    bf16: bool | str = False

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None, where: str = "image.train") -> VQGANTrainConfig:
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise VQGANTrainError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
        if "betas" in values:
            values["betas"] = tuple(float(b) for b in values["betas"])
        config = cls(**values)
        if config.steps < 1 or config.batch_size < 1:
            raise VQGANTrainError(f"{where}: steps and batch_size must be >= 1")
        if config.dead_code_reset_to not in ("random", "far"):
            raise VQGANTrainError(
                f"{where}: dead_code_reset_to must be random or far, got {config.dead_code_reset_to!r}"
            )
        if bf16_setting_problem(config.bf16):
            raise VQGANTrainError(f"{where}: {bf16_setting_problem(config.bf16)}")
        if config.autoencoder_warmup_steps >= config.steps:
            raise VQGANTrainError(f"{where}: autoencoder_warmup_steps must be below steps")
        return config


# ---- data ------------------------------------------------------------------------------------
class ShapesImages:
    """Shapes-world scenes of one split as training images; batch k is scenes k*B .. k*B + B - 1."""

    def __init__(self, image_size: int, seed: int = 0, split: str = "train"):
        from unifier.data.shapes import ShapesWorld

        self.world = ShapesWorld(split, seed, image_size)
        self.image_size = image_size

    def __repr__(self) -> str:
        return f"ShapesImages({self.world!r})"

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        """(batch_size, 3, S, S) in [-1, 1]; a pure function of (step, batch_size), so resuming is exact."""
        from unifier.images import image_to_tensor

        start = step * batch_size
        return torch.stack(
            [image_to_tensor(self.world.scene(i).render(), self.image_size) for i in range(start, start + batch_size)]
        )


class FolderImages:
    """Every image file under a folder (recursively), reshuffled each epoch; unreadable files are skipped and counted."""

    def __init__(self, folder: str | Path, image_size: int, seed: int = 0):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise VQGANTrainError(f"image folder not found: {self.folder}")
        self.files = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise VQGANTrainError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {self.folder}")
        self.image_size, self.seed = image_size, seed
        self.bad_files: set[Path] = set()

    def __repr__(self) -> str:
        return f"FolderImages({str(self.folder)!r}, {len(self.files)} files)"

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.files))

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        """(batch_size, 3, S, S) in [-1, 1]; a pure function of (step, batch_size), so resuming is exact."""
        from unifier.images import ImageLoadError, image_to_tensor, load_image

        images: list[torch.Tensor] = []
        position = step * batch_size
        tried = 0
        while len(images) < batch_size:
            if tried > 10 * batch_size + len(self.files):
                raise VQGANTrainError(f"{self.folder}: too many unreadable images ({len(self.bad_files)} so far)")
            epoch, offset = divmod(position, len(self.files))
            path = self.files[self._order(epoch)[offset]]
            position += 1
            tried += 1
            if path in self.bad_files:
                continue
            try:
                images.append(image_to_tensor(load_image(path), self.image_size))
            except ImageLoadError as e:
                self.bad_files.add(path)
                warnings.warn(f"skipping unreadable image: {e}", stacklevel=2)
        return torch.stack(images)


def build_image_source(data: str | Path, image_size: int, seed: int = 0) -> ShapesImages | FolderImages:
    """`shapes` -> the shapes world's train split; anything else -> a folder of images."""
    if str(data) == "shapes":
        return ShapesImages(image_size, seed)
    return FolderImages(data, image_size, seed)


# ---- losses ----------------------------------------------------------------------------------
def build_lpips(lpips_weights: str | Path, vgg16_weights: str | Path | None = None) -> torch.nn.Module:
    """taming's LPIPS with weights read from local files; nothing is downloaded.

    taming's own constructor downloads both the VGG-16 and the LPIPS weights, so the same modules
    are assembled here and filled from `lpips_weights` (keys lin0..lin4, optionally net.* too) and
    `vgg16_weights` (torchvision's VGG-16 state dict, keys features.*).
    """
    from taming.modules.losses.lpips import LPIPS, NetLinLayer, ScalingLayer, vgg16

    class OfflineLPIPS(LPIPS):
        def __init__(self):  # skips LPIPS.__init__, which downloads; the same submodules, random until loaded
            torch.nn.Module.__init__(self)
            self.scaling_layer = ScalingLayer()
            self.chns = [64, 128, 256, 512, 512]
            # On the meta device: torchvision builds (and would randomly initialise) all of VGG-16, classifier
            # included, only for the weights to be replaced by the file's.
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore", UserWarning)  # torchvision's `pretrained` deprecation notice
                self.net = vgg16(pretrained=False, requires_grad=False)
            for k, channels in enumerate(self.chns):
                setattr(self, f"lin{k}", NetLinLayer(channels, use_dropout=True))

    model = OfflineLPIPS()
    state = _load_tensor_file(lpips_weights, "lpips_weights")
    if vgg16_weights is not None:
        # torchvision names VGG-16's conv layers features.<i>; taming's vgg16 keeps <i> inside five slices.
        slice_of = {i: 1 + sum(i >= b for b in (4, 9, 16, 23)) for i in range(30)}
        for key, value in _load_tensor_file(vgg16_weights, "vgg16_weights").items():
            parts = key.split(".")
            if parts[0] == "features" and int(parts[1]) in slice_of:
                state[f"net.slice{slice_of[int(parts[1])]}.{parts[1]}.{parts[2]}"] = value
    own = model.state_dict()
    state.update({name: own[name] for name, _ in model.named_buffers()})  # ScalingLayer's fixed constants
    missing = sorted(k for k in own if k not in state)
    if missing:
        raise VQGANTrainError(
            f"LPIPS weights incomplete: {len(missing)} tensors missing (first: {missing[:3]}); give lpips_weights "
            "(lin0..lin4) and vgg16_weights (torchvision VGG-16 features)"
        )
    model.load_state_dict({k: state[k] for k in own}, assign=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _load_tensor_file(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise VQGANTrainError(f"{what} not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise VQGANTrainError(f"{what}: {path} is not a torch state dict readable with weights_only=True: {e}") from e
    if not isinstance(state, dict):
        raise VQGANTrainError(f"{what}: {path} does not hold a state dict")
    return dict(state)


def adaptive_weight(
    nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, scale: float
) -> torch.Tensor:
    """taming's adaptive GAN weight: |grad nll| / |grad g| at the decoder's last layer, times `scale`.

    taming has it only as a method of VQLPIPSWithDiscriminator, whose constructor downloads LPIPS,
    hence this copy of the formula.
    """
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(weight, 0.0, 1e4).detach() * scale


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """taming's hinge discriminator loss: (mean relu(1 - D(x)) + mean relu(1 + D(x'))) / 2.

    Importing taming's own (taming.modules.losses.vqperceptual) imports LPIPS and with it torchvision's
    model zoo, seconds of start-up for a two-term formula.
    """
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def learning_rate(step: int, config: VQGANTrainConfig) -> float:
    """Linear warm-up to config.lr, then cosine decay to min_lr_ratio * lr at the last step (step counts from 0)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


@torch.no_grad()
def kmeans_codebook(latents: torch.Tensor, n_codes: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """k-means centres of `latents` (N, D) -> (n_codes, D); empty clusters restart on random latents.

    Hand-written: a dozen lines of Lloyd iterations, where scikit-learn would be a new dependency for one call.
    """
    n = latents.shape[0]
    centres = latents[torch.randint(n, (n_codes,), generator=generator)].clone()  # (K, D)
    for _ in range(iterations):
        assignment = torch.cdist(latents, centres).argmin(1)  # (N,)
        sums = torch.zeros_like(centres).index_add_(0, assignment, latents)  # (K, D)
        counts = torch.bincount(assignment, minlength=n_codes).to(latents.dtype)  # (K,)
        restart = latents[torch.randint(n, (n_codes,), generator=generator)]
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], restart)
    return centres


# ---- evaluation ------------------------------------------------------------------------------
@torch.no_grad()
def shapes_parse_accuracy(
    tokenizer: ImageTokenizer, n_scenes: int = 500, split: str = "val", seed: int = 0, batch_size: int = 100
) -> dict[str, float]:
    """Reconstruct shapes-world scenes (encode -> decode) and read them with the spec's pixel parser.

    Returns {"parse_accuracy": fraction of scenes read back exactly, "clean_parse_accuracy": the same on the
    original pixels (1.0 by the parser's own contract), "codes_used": distinct codes over the scenes, "n_scenes"}.
    """
    from unifier.data.shapes import ShapesWorld
    from unifier.data.shapes_parser import parse_scene
    from unifier.images import image_to_tensor

    world = ShapesWorld(split, seed, tokenizer.image_size)
    was_training = tokenizer.training
    tokenizer.eval()
    exact = clean = 0
    used: set[int] = set()
    for start in range(0, n_scenes, batch_size):
        scenes = [world.scene(i) for i in range(start, min(n_scenes, start + batch_size))]
        pixels = [scene.render() for scene in scenes]
        codes = tokenizer.encode(torch.stack([image_to_tensor(p, tokenizer.image_size) for p in pixels]))
        used.update(codes.flatten().tolist())
        reconstructions = ((tokenizer.decode(codes) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
        for scene, original, rec in zip(scenes, pixels, reconstructions.cpu().numpy(), strict=True):
            truth = [(obj.size, obj.color, obj.shape) for obj in scene.objects]
            exact += parse_scene(rec) == truth
            clean += parse_scene(original) == truth
    tokenizer.train(was_training)
    return {
        "parse_accuracy": exact / n_scenes,
        "clean_parse_accuracy": clean / n_scenes,
        "codes_used": len(used),
        "n_scenes": n_scenes,
    }


# ---- checkpoints -----------------------------------------------------------------------------
@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    elapsed_seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


def _checkpoints(run_dir: Path) -> list[Path]:
    found = [p for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def save_checkpoint(
    run_dir: Path, tokenizer, discriminator, optimizers: dict, code_usage, generator, state: TrainState
) -> Path:
    """Write checkpoint-<step>/ through a temporary folder, then drop older checkpoints."""
    final = run_dir / f"{CHECKPOINT_PREFIX}{state.step:07d}"
    tmp = run_dir / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in tokenizer.state_dict().items()},
        str(tmp / "tokenizer.safetensors"),
    )
    extra = {"code_usage": code_usage.cpu(), "generator_state": generator.get_state()}
    if tokenizer.flat_cells and tokenizer._flat_means:
        keys = sorted(tokenizer._flat_means)
        extra["flat_keys"] = torch.tensor(keys, dtype=torch.long)
        extra["flat_means"] = torch.stack([tokenizer._flat_means[k].cpu() for k in keys])
        extra["flat_codes"] = torch.tensor([tokenizer.flat_codes[k] for k in keys], dtype=torch.long)
    if discriminator is not None:
        extra.update(
            {f"discriminator.{k}": v.detach().cpu().contiguous() for k, v in discriminator.state_dict().items()}
        )
    save_file(extra, str(tmp / "train_tensors.safetensors"))
    # Optimizer state (nested dicts of tensors) only ever feeds this loop's resume, read with weights_only=True.
    torch.save({name: opt.state_dict() for name, opt in optimizers.items()}, tmp / "optimizers.pt")
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=1) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in _checkpoints(run_dir)[:-1]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, tokenizer, discriminator, optimizers: dict, code_usage, generator) -> TrainState:
    tokenizer._load_model_state(load_file(str(ckpt / "tokenizer.safetensors")), str(ckpt))
    extra = load_file(str(ckpt / "train_tensors.safetensors"))
    code_usage.copy_(extra["code_usage"])
    if "flat_keys" in extra:
        keys = extra["flat_keys"].tolist()
        tokenizer._flat_means = dict(zip(keys, extra["flat_means"].to(code_usage.device), strict=True))
        tokenizer.flat_codes = dict(zip(keys, extra["flat_codes"].tolist(), strict=True))
    generator.set_state(extra["generator_state"])
    if discriminator is not None:
        discriminator.load_state_dict(
            {k.split(".", 1)[1]: v for k, v in extra.items() if k.startswith("discriminator.")}
        )
    saved = torch.load(ckpt / "optimizers.pt", map_location="cpu", weights_only=True)
    for name, opt in optimizers.items():
        opt.load_state_dict(saved[name])
    return TrainState(**json.loads((ckpt / "state.json").read_text()))


# ---- the loop --------------------------------------------------------------------------------
def train_vqgan(
    tokenizer: ImageTokenizer,
    images,
    run_dir: str | Path,
    config: VQGANTrainConfig,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Train `tokenizer` in place on `images` (anything with `.batch(step, batch_size) -> (B, 3, S, S)`).

    Resumes from the newest checkpoint in `run_dir` when one exists (its run_config.json must match).
    Returns {"steps", "seconds", "bf16": whether it ran under bf16 autocast, "final": last logged losses,
    "resumed_from": step or None}.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_config = {"train": asdict(config), "tokenizer": tokenizer.config(), "images": repr(images)}
    config_path = run_dir / RUN_CONFIG_FILE
    if config_path.is_file():
        previous = json.loads(config_path.read_text())
        if previous != json.loads(json.dumps(run_config)):
            raise VQGANTrainError(f"{run_dir} holds a run with another configuration; use a new run folder")
    else:
        config_path.write_text(json.dumps(run_config, indent=2) + "\n")
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    bf16 = resolve_bf16(config.bf16, device)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)

    tokenizer.to(device).train()
    optimizer = torch.optim.Adam(tokenizer.parameters(), lr=config.lr, betas=config.betas)
    optimizers = {"tokenizer": optimizer}
    discriminator = None
    if config.disc_start >= 0:
        from taming.modules.discriminator.model import NLayerDiscriminator, weights_init

        discriminator = NLayerDiscriminator(input_nc=3, ndf=config.disc_ndf, n_layers=config.disc_layers)
        discriminator.apply(weights_init).to(device).train()
        optimizers["discriminator"] = torch.optim.Adam(discriminator.parameters(), lr=config.lr, betas=config.betas)
    perceptual = None
    if config.lpips_weights:
        perceptual = build_lpips(config.lpips_weights, config.vgg16_weights).to(device)
    code_usage = torch.zeros(tokenizer.n_embed, device=device)  # code counts since the last dead-code check

    state = TrainState()
    resumed_from = None
    checkpoints = _checkpoints(run_dir)
    if checkpoints:
        state = load_checkpoint(checkpoints[-1], tokenizer, discriminator, optimizers, code_usage, generator)
        resumed_from = state.step
        tokenizer.to(device)

    last_layer = tokenizer.decoder.conv_out.weight
    bar = tqdm(total=config.steps, initial=state.step, disable=not progress, desc="vq-gan", dynamic_ncols=True)
    t0 = time.time() - state.elapsed_seconds
    logged: dict[str, float] = {}
    while state.step < config.steps:
        step = state.step
        lr = learning_rate(step, config)
        for opt in optimizers.values():
            for group in opt.param_groups:
                group["lr"] = lr
        x = images.batch(step, config.batch_size).to(device)  # (B, 3, S, S)

        if step == config.autoencoder_warmup_steps and config.autoencoder_warmup_steps > 0:
            _init_codebook_by_kmeans(tokenizer, images, config, generator, device)
        autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)
        with autocast:
            if step < config.autoencoder_warmup_steps:
                latents = tokenizer.encode_latents(x)  # (B, D, h, w)
                x_rec = tokenizer.decode_latents(latents)
                codebook_loss = torch.zeros((), device=device)
                codes = None
            else:
                x_rec, codebook_loss, codes, latents = tokenizer(x)
        x_rec = x_rec.float()

        l1 = (x_rec - x).abs().mean()
        l2 = (x_rec - x).pow(2).mean()
        rec_loss = config.l1_weight * l1 + config.l2_weight * l2
        if perceptual is not None:
            rec_loss = rec_loss + config.perceptual_weight * perceptual(x, x_rec).mean()
        loss = rec_loss + config.codebook_weight * codebook_loss
        gan_on = discriminator is not None and step >= config.disc_start
        g_loss = d_weight = torch.zeros((), device=device)
        if gan_on:
            with autocast:
                g_loss = -discriminator(x_rec).float().mean()
            d_weight = adaptive_weight(rec_loss, g_loss, last_layer, config.disc_weight)
            loss = loss + d_weight * g_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        d_loss = torch.zeros(())
        if gan_on:
            with autocast:
                logits_real, logits_fake = discriminator(x).float(), discriminator(x_rec.detach()).float()
            d_loss = hinge_d_loss(logits_real, logits_fake)
            optimizers["discriminator"].zero_grad(set_to_none=True)
            d_loss.backward()
            optimizers["discriminator"].step()

        dead = 0
        if codes is not None:
            code_usage += torch.bincount(codes.flatten(), minlength=tokenizer.n_embed)
            every = config.dead_code_reset_every
            if every and (step + 1 - config.autoencoder_warmup_steps) % every == 0:
                dead = _reset_dead_codes(
                    tokenizer, latents.detach(), code_usage, generator, far=config.dead_code_reset_to == "far"
                )
                code_usage.zero_()

        state.step += 1
        if state.step % config.log_every == 0 or state.step == config.steps:
            logged = {
                "step": state.step,
                "lr": lr,
                "l1": l1.item(),
                "l2": l2.item(),
                "codebook": codebook_loss.item(),
                "g_loss": g_loss.item(),
                "d_weight": d_weight.item(),
                "d_loss": d_loss.item(),
                "codes_in_batch": int(codes.unique().numel()) if codes is not None else 0,
                "dead_codes_reset": dead,
                "seconds": round(time.time() - t0, 1),
            }
            state.history.append(logged)
            bar.set_postfix(l1=f"{logged['l1']:.4f}", q=f"{logged['codebook']:.4f}", codes=logged["codes_in_batch"])
        bar.update(1)
        if state.step % config.save_every == 0 and state.step < config.steps:
            state.elapsed_seconds = time.time() - t0
            save_checkpoint(run_dir, tokenizer, discriminator, optimizers, code_usage, generator, state)
    bar.close()
    state.elapsed_seconds = time.time() - t0
    save_checkpoint(run_dir, tokenizer, discriminator, optimizers, code_usage, generator, state)
    tokenizer.eval()
    return {
        "steps": state.step,
        "seconds": round(state.elapsed_seconds, 1),
        "bf16": bf16,
        "final": logged,
        "resumed_from": resumed_from,
    }


@torch.no_grad()
def _init_codebook_by_kmeans(tokenizer: ImageTokenizer, images, config: VQGANTrainConfig, generator, device) -> None:
    """Set the codebook to k-means centres of encoder outputs on `kmeans_images` training images."""
    latents = []
    batches = math.ceil(config.kmeans_images / config.batch_size)
    for k in range(batches):
        # Batches far past the training steps, so k-means sees images the warm-up did not.
        x = images.batch(config.steps + k, config.batch_size).to(device)
        z = tokenizer.encode_latents(x)  # (B, D, h, w)
        latents.append(z.permute(0, 2, 3, 1).reshape(-1, tokenizer.embed_dim))
    centres = kmeans_codebook(torch.cat(latents).float().cpu(), tokenizer.n_embed, config.kmeans_iterations, generator)
    tokenizer.quantize.embedding.weight.copy_(centres.to(device))


@torch.no_grad()
def _reset_dead_codes(
    tokenizer: ImageTokenizer, latents: torch.Tensor, usage: torch.Tensor, generator, far: bool = False
) -> int:
    """Move codes that no latent chose since the last check onto latents of this batch (plus a little noise): random
    ones, or with `far` ones drawn in proportion to their squared distance from the nearest live code.

    taming's quantizer has no such mechanism; without it a short run leaves most of the codebook unused.
    """
    dead = (usage == 0).nonzero().flatten()
    if dead.numel() == 0:
        return 0
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).float()  # (B*h*w, D)
    if far and dead.numel() < usage.numel():
        live = tokenizer.quantize.embedding.weight[usage > 0].float()  # (K_live, D)
        weights = torch.cdist(flat, live).min(1).values.pow(2).cpu()  # (B*h*w,)
        rows = torch.multinomial(weights + 1e-12, dead.numel(), replacement=True, generator=generator)
    else:
        rows = torch.randint(flat.shape[0], (dead.numel(),), generator=generator)
    picks = flat[rows.to(flat.device)]
    noise = torch.randn(picks.shape, generator=generator).to(flat.device) * 0.01 * flat.std()
    tokenizer.quantize.embedding.weight[dead] = picks + noise
    return int(dead.numel())


# ---- command line ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m unifier.tokenization.vqgan_train",
        description="Train a VQ-GAN image tokenizer (taming modules) on the shapes world or a folder of images.",
    )
    parser.add_argument(
        "--out", required=True, help="folder for the trained tokenizer (config.json, model.safetensors)"
    )
    parser.add_argument(
        "--recipe", default="tokenizers/shapes.yaml", help="tokenizer recipe whose `image` section to use"
    )
    parser.add_argument("--images", default=None, help="folder of images (default: the recipe's image.data)")
    parser.add_argument("--steps", type=int, default=None, help="override image.train.steps")
    parser.add_argument("--batch-size", type=int, default=None, help="override image.train.batch_size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--eval-scenes", type=int, default=500, help="shapes val scenes to parse after training (0: skip)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from unifier.tokenization.build import RecipeError, load_recipe, untrained_image_tokenizer

    try:
        recipe = load_recipe(args.recipe)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    image = recipe.get("image")
    if not image or "ddconfig" not in image:
        print(f"error: {args.recipe} has no trainable `image` section (ddconfig, n_embed, embed_dim)", file=sys.stderr)
        return 2
    train_values = dict(image.get("train", {}))
    if args.steps is not None:
        train_values["steps"] = args.steps
    if args.batch_size is not None:
        train_values["batch_size"] = args.batch_size
    config = VQGANTrainConfig.from_dict(train_values)
    tokenizer = untrained_image_tokenizer(image, recipe["seed"])
    data = args.images or image.get("data", "shapes")
    images = build_image_source(data, tokenizer.image_size, seed=recipe["seed"])
    out = Path(args.out)
    summary = train_vqgan(tokenizer, images, out / "run", config, progress=not args.quiet, device=args.device)
    tokenizer.cpu().save(out)
    if data == "shapes" and args.eval_scenes:
        summary["eval"] = shapes_parse_accuracy(tokenizer, args.eval_scenes)
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
