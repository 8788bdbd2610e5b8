"""VQ-GAN image tokenizer: an S x S RGB image <-> an (S/f) x (S/f) grid of codebook indices.

Built from taming-transformers' own modules (`Encoder`, `Decoder`, `VectorQuantizer2`) with the
attribute names of taming's `VQModel`, so the state dict of an official taming checkpoint loads
as is. taming's Lightning `VQModel` itself is never imported: it needs pytorch-lightning and a
working torchvision at import time (design.md).

    encode: (B, 3, S, S) in [-1, 1] -> encoder -> quant_conv -> nearest code -> (B, h, w) long
    decode: (B, h, w) long -> codebook -> post_quant_conv -> decoder -> (B, 3, S, S) in [-1, 1]

Codes come out in raster order (row by row) when flattened, which is the order the model reads
and writes them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from taming.modules.diffusionmodules.model import Decoder, Encoder
from taming.modules.vqvae.quantize import VectorQuantizer2

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FORMAT = "unifier-vqgan"
CONFIG_VERSION = 1

# The fields taming's Encoder / Decoder need; the rest of a taming ddconfig has defaults.
REQUIRED_DDCONFIG = (
    "ch",
    "out_ch",
    "ch_mult",
    "num_res_blocks",
    "attn_resolutions",
    "in_channels",
    "resolution",
    "z_channels",
)
# Keys of taming's VQModel state dict that belong to the tokenizer; `loss.*` (LPIPS, discriminator) is training-only.
MODEL_KEY_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")
# On a CPU the encoder and decoder run fastest on a few images at a time, whose activations stay in the caches:
# on the 2-core AVX2 EPYC (64 x 64 images, the shapes recipe) the decoder made 123-139 images/s in chunks of 8-16
# against 60-70 in batches of 64-512, the encoder 322 in chunks of 8 against 118-146. A GPU takes the whole batch.
CPU_CHUNK_PIXELS = 8 * 64 * 64


class ImageTokenizerError(ValueError):
    """A bad image-tokenizer config, checkpoint, folder or input."""


def check_ddconfig(ddconfig: dict, where: str = "ddconfig") -> dict:
    """Validate a taming ddconfig and return a plain-typed copy; errors name the field."""
    if not isinstance(ddconfig, dict):
        raise ImageTokenizerError(f"{where} must be a mapping, got {type(ddconfig).__name__}")
    missing = [k for k in REQUIRED_DDCONFIG if k not in ddconfig]
    if missing:
        raise ImageTokenizerError(f"{where} lacks the field(s) {', '.join(missing)}")
    cfg = dict(ddconfig)
    cfg["ch_mult"] = [int(m) for m in cfg["ch_mult"]]
    cfg["attn_resolutions"] = [int(r) for r in cfg["attn_resolutions"]]
    for key in ("ch", "out_ch", "num_res_blocks", "in_channels", "resolution", "z_channels"):
        cfg[key] = int(cfg[key])
    if cfg.get("double_z", False):
        raise ImageTokenizerError(f"{where}.double_z must be false for a VQ-GAN (true is for KL autoencoders)")
    cfg["double_z"] = False
    if cfg["num_res_blocks"] < 1:
        raise ImageTokenizerError(f"{where}.num_res_blocks must be >= 1 (taming's Encoder breaks at 0)")
    # taming's Normalize is GroupNorm with 32 groups: every width must be a multiple of 32.
    widths = [cfg["ch"] * m for m in cfg["ch_mult"]]
    if any(w % 32 for w in widths):
        raise ImageTokenizerError(f"{where}: ch * ch_mult must be multiples of 32 (GroupNorm 32), got widths {widths}")
    factor = 2 ** (len(cfg["ch_mult"]) - 1)
    if cfg["resolution"] % factor:
        raise ImageTokenizerError(
            f"{where}.resolution {cfg['resolution']} is not a multiple of the downsampling {factor}"
        )
    if cfg["in_channels"] != 3 or cfg["out_ch"] != 3:
        raise ImageTokenizerError(
            f"{where}: in_channels and out_ch must be 3 (RGB), got {cfg['in_channels']}, {cfg['out_ch']}"
        )
    return cfg


class ImageTokenizer(torch.nn.Module):
    """taming's VQ-GAN (encoder, quantizer, decoder) as an image <-> code-grid tokenizer.

    Args:
        ddconfig: taming's `ddconfig` (ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, ...).
        n_embed: codebook size K.
        embed_dim: codebook vector size.
        beta: commitment weight of VectorQuantizer2 (taming uses 0.25).
        legacy: VectorQuantizer2's `legacy` flag: True puts beta on the codebook term (taming's released
            models were trained that way); False is the corrected loss. Only training is affected.
        flat_cells: give every f x f cell of one flat colour the one code of that colour (`flat_codes`, learnt in
            training), whatever surrounds it. taming's encoder sees the whole image (its GroupNorm statistics and
            mid-block attention are global), so equal pixels get codes that differ by what lies around them: on
            the shapes world the flat background took 584 codes, and the codes carried 4.5 nats per cell beyond
            their pixels, noise that a model generating codes must learn. With canonical flat cells the decoder
            learns to read a scene from the other cells' codes.
    """

    def __init__(
        self,
        ddconfig: dict,
        n_embed: int,
        embed_dim: int,
        beta: float = 0.25,
        legacy: bool = True,
        flat_cells: bool = False,
        flat_codes: dict[int, int] | None = None,
    ):
        super().__init__()
        self.ddconfig = check_ddconfig(ddconfig)
        if n_embed < 2 or embed_dim < 1:
            raise ImageTokenizerError(f"need n_embed >= 2 and embed_dim >= 1, got {n_embed}, {embed_dim}")
        self.n_embed, self.embed_dim, self.beta, self.legacy = int(n_embed), int(embed_dim), float(beta), bool(legacy)
        # taming's Decoder prints the latent shape on construction; keep library output quiet.
        with contextlib.redirect_stdout(io.StringIO()):
            self.encoder = Encoder(**self.ddconfig)
            self.decoder = Decoder(**self.ddconfig)
        self.quantize = VectorQuantizer2(self.n_embed, self.embed_dim, beta=self.beta, legacy=self.legacy)
        z_channels = self.ddconfig["z_channels"]
        self.quant_conv = torch.nn.Conv2d(z_channels, self.embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(self.embed_dim, z_channels, 1)
        self.flat_cells = bool(flat_cells)
        # colour key (r << 16 | g << 8 | b of the uint8 pixel) -> code; training sets it to the code nearest to a
        # running mean of that colour's flat-cell latents.
        self.flat_codes: dict[int, int] = {int(k): int(v) for k, v in (flat_codes or {}).items()}
        self._flat_means: dict[int, torch.Tensor] = {}

    # ---- geometry ---------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.ddconfig["resolution"]

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ddconfig["ch_mult"]) - 1)

    @property
    def code_grid(self) -> tuple[int, int]:
        side = self.image_size // self.downsample_factor
        return side, side

    @property
    def num_codes_per_image(self) -> int:
        h, w = self.code_grid
        return h * w

    @property
    def device(self) -> torch.device:
        return self.quantize.embedding.weight.device

    @property
    def cpu_chunk_images(self) -> int:
        """How many images the encoder / decoder take at a time on a CPU (CPU_CHUNK_PIXELS' worth)."""
        return max(1, CPU_CHUNK_PIXELS // self.image_size**2)

    def _in_chunks(self, module: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        """`module` over `inputs` (B, ...): on a CPU `cpu_chunk_images` at a time, elsewhere the whole batch."""
        size = self.cpu_chunk_images
        if self.device.type != "cpu" or len(inputs) <= size:
            return module(inputs)
        return torch.cat([module(chunk) for chunk in inputs.split(size)])

    def config(self) -> dict:
        return {
            "format": CONFIG_FORMAT,
            "version": CONFIG_VERSION,
            "ddconfig": self.ddconfig,
            "n_embed": self.n_embed,
            "embed_dim": self.embed_dim,
            "beta": self.beta,
            "legacy": self.legacy,
            "flat_cells": self.flat_cells,
            "flat_codes": {f"{k >> 16},{(k >> 8) & 255},{k & 255}": v for k, v in sorted(self.flat_codes.items())},
            "image_size": self.image_size,
            "code_grid": list(self.code_grid),
        }

    def __repr__(self) -> str:
        h, w = self.code_grid
        return f"ImageTokenizer(image_size={self.image_size}, code_grid={h}x{w}, n_embed={self.n_embed}, embed_dim={self.embed_dim})"

    # ---- training-time pieces ---------------------------------------------------------
    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> pre-quantization latents (B, embed_dim, h, w)."""
        return self.quant_conv(self.encoder(images))

    def decode_latents(self, quantized: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim, h, w) codebook vectors -> (B, 3, S, S) images, unclamped."""
        return self.decoder(self.post_quant_conv(quantized))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct with a straight-through quantizer, for training.

        Returns:
            reconstructions (B, 3, S, S) unclamped, codebook_loss (scalar: codebook + beta * commitment),
            codes (B, h, w) long, latents (B, embed_dim, h, w) before quantization.
        """
        latents = self.encode_latents(images).float()
        # Nearest-code search in fp32 even under autocast: bf16 distances would pick wrong codes.
        with torch.autocast(latents.device.type, enabled=False):
            quantized, codebook_loss, (_, _, codes) = self.quantize(latents)
            b, _, h, w = latents.shape
            codes = codes.view(b, h, w)
            if self.flat_cells:
                codes = self._canonical_flat_codes(images, latents, codes, learn=True)
                quantized, codebook_loss = self._quantized_from_codes(latents, codes)
        return self.decode_latents(quantized), codebook_loss, codes, latents

    # ---- flat cells ----------------------------------------------------------------------
    def flat_cell_keys(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, h, w) long: each cell's colour key where all its pixels are equal, else -1."""
        f = self.downsample_factor
        b, c, height, width = images.shape
        cells = images.reshape(b, c, height // f, f, width // f, f)
        flat = (cells == cells[:, :, :, :1, :, :1]).all(dim=5).all(dim=3).all(dim=1)  # (B, h, w)
        rgb = ((cells[:, :, :, 0, :, 0] + 1.0) * 127.5).round().clamp(0, 255).long()  # (B, 3, h, w)
        keys = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]
        return torch.where(flat, keys, torch.full_like(keys, -1))

    def _canonical_flat_codes(
        self, images: torch.Tensor, latents: torch.Tensor, codes: torch.Tensor, learn: bool
    ) -> torch.Tensor:
        """`codes` (B, h, w) with each flat cell's code replaced by its colour's; with `learn`, each colour's code
        first moves to the one nearest the running mean (momentum 0.9) of its flat cells' latents."""
        keys = self.flat_cell_keys(images)
        codes = codes.clone()
        vectors = latents.detach().float().permute(0, 2, 3, 1)  # (B, h, w, D)
        codebook = self.quantize.embedding.weight.detach().float()
        for key in keys[keys >= 0].unique().tolist():
            cells = keys == key
            if learn:
                mean = vectors[cells].mean(0)
                previous = self._flat_means.get(key)
                mean = mean if previous is None else 0.9 * previous.to(mean.device) + 0.1 * mean
                self._flat_means[key] = mean
                self.flat_codes[key] = int(torch.cdist(mean[None], codebook).argmin())
            if key in self.flat_codes:
                codes[cells] = self.flat_codes[key]
        return codes

    def _quantized_from_codes(self, latents: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VectorQuantizer2's straight-through output and loss for latents (B, D, h, w) given their codes (B, h, w)."""
        chosen = self.quantize.embedding(codes).permute(0, 3, 1, 2)  # (B, D, h, w)
        commitment = torch.mean((chosen.detach() - latents) ** 2)
        codebook = torch.mean((chosen - latents.detach()) ** 2)
        loss = commitment + self.beta * codebook if self.legacy else self.beta * commitment + codebook
        return latents + (chosen - latents).detach(), loss

    # ---- tokenizer API ----------------------------------------------------------------
    def _check_images(self, images: torch.Tensor) -> None:
        s = self.image_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != s or images.shape[3] != s:
            raise ImageTokenizerError(f"expected images of shape (B, 3, {s}, {s}), got {tuple(images.shape)}")

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float in [-1, 1] -> (B, h, w) long codes in [0, n_embed)."""
        self._check_images(images)
        images = images.to(self.device, torch.float32)
        latents = self._in_chunks(self.encode_latents, images)
        _, _, (_, _, codes) = self.quantize(latents)
        b, _, h, w = latents.shape
        codes = codes.view(b, h, w)
        if self.flat_cells and self.flat_codes:
            codes = self._canonical_flat_codes(images, latents, codes, learn=False)
        return codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) or (B, h*w) long codes (raster order) -> (B, 3, S, S) float in [-1, 1]."""
        h, w = self.code_grid
        codes = torch.as_tensor(codes, dtype=torch.long, device=self.device)
        if codes.dim() == 2 and codes.shape[1] == h * w:
            codes = codes.view(-1, h, w)
        if codes.dim() != 3 or tuple(codes.shape[1:]) != (h, w):
            raise ImageTokenizerError(
                f"expected codes of shape (B, {h}, {w}) or (B, {h * w}), got {tuple(codes.shape)}"
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.n_embed):
            raise ImageTokenizerError(
                f"codes must lie in [0, {self.n_embed}), got {int(codes.min())}..{int(codes.max())}"
            )
        b = codes.shape[0]
        quantized = self.quantize.get_codebook_entry(codes.reshape(-1), (b, h, w, self.embed_dim))
        return self._in_chunks(self.decode_latents, quantized).clamp(-1.0, 1.0)

    def images_to_tensor(self, images: Sequence[Any]) -> torch.Tensor:
        """Image sources (PIL images, uint8 arrays, paths, bytes) -> (B, 3, S, S) in [-1, 1], resized to S x S."""
        from unifier.images import image_to_tensor

        if len(images) == 0:
            return torch.zeros(0, 3, self.image_size, self.image_size)
        return torch.stack([image_to_tensor(image, self.image_size) for image in images])

    def encode_images(self, images: Sequence[Any], batch_size: int = 64) -> list[list[int]]:
        """Image sources (PIL images, (H, W, 3) uint8 arrays, ...) -> one list of h*w codes per image, raster order."""
        out: list[list[int]] = []
        for start in range(0, len(images), batch_size):
            codes = self.encode(self.images_to_tensor(images[start : start + batch_size]))
            out.extend(codes.flatten(1).tolist())
        return out

    def decode_codes(self, codes: Sequence[Sequence[int]] | torch.Tensor, batch_size: int = 64) -> list:
        """Code lists (h*w each, raster order) or a (B, h, w) / (B, h*w) tensor -> PIL RGB images of S x S."""
        from unifier.images import tensor_to_image

        h, w = self.code_grid
        if not isinstance(codes, torch.Tensor):
            for i, c in enumerate(codes):
                if len(c) != h * w:
                    raise ImageTokenizerError(f"code list {i} has {len(c)} codes, a {h}x{w} grid needs {h * w}")
            codes = torch.tensor([list(c) for c in codes], dtype=torch.long).view(-1, h * w)
        images = []
        for start in range(0, codes.shape[0], batch_size):
            images.extend(tensor_to_image(t) for t in self.decode(codes[start : start + batch_size]).cpu())
        return images

    # ---- persistence ------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        """Write `config.json` and `model.safetensors` into `folder` (each via a temporary name)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp_weights = folder / f".{WEIGHTS_FILE}.tmp"
        save_file(state, str(tmp_weights), metadata={"format": CONFIG_FORMAT})
        os.replace(tmp_weights, folder / WEIGHTS_FILE)
        tmp_config = folder / f".{CONFIG_FILE}.tmp"
        tmp_config.write_text(json.dumps(self.config(), indent=2) + "\n")
        os.replace(tmp_config, folder / CONFIG_FILE)

    @classmethod
    def from_config(cls, config: dict, where: str = "config") -> ImageTokenizer:
        for key in ("ddconfig", "n_embed", "embed_dim"):
            if key not in config:
                raise ImageTokenizerError(f"{where} lacks the field '{key}'")
        return cls(
            check_ddconfig(config["ddconfig"], f"{where}: ddconfig"),
            int(config["n_embed"]),
            int(config["embed_dim"]),
            beta=float(config.get("beta", 0.25)),
            legacy=bool(config.get("legacy", True)),
            flat_cells=bool(config.get("flat_cells", False)),
            flat_codes=_flat_codes_from_config(config.get("flat_codes") or {}, where),
        )

    @classmethod
    def load(cls, folder: str | Path, map_location: str | torch.device = "cpu") -> ImageTokenizer:
        """Read a folder written by `save`."""
        folder = Path(folder)
        config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise ImageTokenizerError(f"{path} not found: not an image tokenizer folder (or an unfinished one)")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ImageTokenizerError(f"{config_path} is not valid JSON: {e}") from e
        if config.get("format") != CONFIG_FORMAT or config.get("version") != CONFIG_VERSION:
            raise ImageTokenizerError(
                f"{config_path} has format {config.get('format')!r} version {config.get('version')!r}; "
                f"this Unifier reads {CONFIG_FORMAT!r} version {CONFIG_VERSION}"
            )
        model = cls.from_config(config, str(config_path))
        state = load_file(str(weights_path), device=str(map_location))
        model._load_model_state(state, str(weights_path))
        return model.to(map_location).eval()

    def _load_model_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load a state dict strictly, with an error that names missing / unexpected / mis-shaped keys."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            details = []
            if missing:
                details.append(f"missing {len(missing)} keys (first: {missing[:3]})")
            if unexpected:
                details.append(f"unexpected {len(unexpected)} keys (first: {unexpected[:3]})")
            if wrong:
                k = wrong[0]
                details.append(
                    f"{len(wrong)} shape mismatches (first: {k} {tuple(state[k].shape)} vs {tuple(own[k].shape)})"
                )
            raise ImageTokenizerError(
                f"{source} does not fit this ddconfig / n_embed / embed_dim: " + "; ".join(details)
            )
        self.load_state_dict(state)

    @classmethod
    def from_taming_checkpoint(
        cls, ckpt_path: str | Path, config_yaml_or_ddconfig: str | Path | dict
    ) -> ImageTokenizer:
        """Load an official taming VQ-GAN (`VQModel`) checkpoint.

        Args:
            ckpt_path: a taming `.ckpt` (Lightning checkpoint with the model under "state_dict", or a bare state dict).
            config_yaml_or_ddconfig: taming's YAML (model.params.ddconfig / n_embed / embed_dim), the parsed YAML,
                a {ddconfig, n_embed, embed_dim} mapping, or a bare ddconfig (sizes then come from the weights).
        """
        ckpt_path = Path(ckpt_path)
        if not ckpt_path.is_file():
            raise ImageTokenizerError(f"taming checkpoint not found: {ckpt_path}")
        params = _taming_params(config_yaml_or_ddconfig)
        state = _taming_state_dict(ckpt_path)
        if "quantize.embedding.weight" not in state:
            raise ImageTokenizerError(
                f"{ckpt_path} has no 'quantize.embedding.weight': not a taming VQModel checkpoint "
                "(Gumbel / EMA quantizer variants are not supported)"
            )
        k, d = state["quantize.embedding.weight"].shape
        n_embed, embed_dim = int(params.get("n_embed", k)), int(params.get("embed_dim", d))
        if (n_embed, embed_dim) != (k, d):
            raise ImageTokenizerError(
                f"config says n_embed={n_embed}, embed_dim={embed_dim} but {ckpt_path} has a {k} x {d} codebook"
            )
        model = cls(check_ddconfig(params["ddconfig"], "taming config: model.params.ddconfig"), n_embed, embed_dim)
        model._load_model_state(state, str(ckpt_path))
        return model.eval()


def _flat_codes_from_config(entries: dict, where: str) -> dict[int, int]:
    """{"r,g,b": code} as written by `config()` -> {colour key: code}."""
    codes = {}
    for colour, code in entries.items():
        try:
            r, g, b = (int(v) for v in str(colour).split(","))
        except ValueError as e:
            raise ImageTokenizerError(f"{where}: flat_codes key {colour!r} is not 'r,g,b'") from e
        if not all(0 <= v <= 255 for v in (r, g, b)):
            raise ImageTokenizerError(f"{where}: flat_codes colour {colour!r} is not 8-bit RGB")
        codes[(r << 16) | (g << 8) | b] = int(code)
    return codes


def _taming_params(config: str | Path | dict) -> dict:
    """taming's model params {ddconfig, n_embed?, embed_dim?} from a YAML path or a parsed mapping."""
    if isinstance(config, (str, Path)):
        path = Path(config)
        if not path.is_file():
            raise ImageTokenizerError(f"taming config not found: {path}")
        try:
            config = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ImageTokenizerError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(config, dict):
        raise ImageTokenizerError(f"taming config must be a mapping, got {type(config).__name__}")
    if "model" in config:
        target = config["model"].get("target", "taming.models.vqgan.VQModel")
        if target != "taming.models.vqgan.VQModel":
            raise ImageTokenizerError(f"taming config model.target is {target}; only taming.models.vqgan.VQModel loads")
        config = config["model"].get("params", {})
    if "ddconfig" in config:
        if config.get("remap") is not None:
            raise ImageTokenizerError("taming configs with a codebook `remap` are not supported")
        return config
    return {"ddconfig": config}


class _InertMetadata:
    """Stand-in for a class pickled into a checkpoint's training metadata (Lightning callbacks, hyper-parameters).

    Loading with weights_only=True refuses unknown classes; those classes only describe the training
    run, so each is replaced by this inert type that accepts any arguments and state and runs no code.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _taming_state_dict(ckpt_path: Path) -> dict[str, torch.Tensor]:
    """The tokenizer part of a taming checkpoint's state dict, loaded with weights_only=True."""
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(ckpt_path))
        except Exception as e:
            raise ImageTokenizerError(f"{ckpt_path} is not a readable torch checkpoint: {e}") from e
        stubs = [(type(name.rsplit(".", 1)[-1], (_InertMetadata,), {}), name) for name in names]
        try:
            with torch.serialization.safe_globals(stubs):
                ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ImageTokenizerError(f"{ckpt_path} could not be loaded with weights_only=True: {e}") from e
    except Exception as e:
        raise ImageTokenizerError(f"{ckpt_path} is not a readable torch checkpoint: {e}") from e
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ImageTokenizerError(
            f"{ckpt_path} holds no state dict (expected a mapping, optionally under 'state_dict')"
        )
    kept = {k: v for k, v in state.items() if k.startswith(MODEL_KEY_PREFIXES)}
    not_tensors = [k for k, v in kept.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ImageTokenizerError(f"{ckpt_path}: state-dict entries that are not tensors: {not_tensors[:3]}")
    return kept
