"""Build a tokenizer folder from a recipe: text model + location bins + image tokenizer, in one vocabulary.

    unifier tokenizer build tokenizers/shapes.yaml --out runs/tokenizer-shapes

The build works in a hidden sibling folder `.<out>.partial-<recipe hash>` and renames it to `out`
only when everything is written, so an interrupted build never leaves a folder that looks
finished (and a rerun of the same recipe resumes its VQ-GAN training from the last checkpoint).
A finished folder built from the same recipe is reused; one built from another recipe is kept
unless --force. tokenizers/README.md describes the recipe fields.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from unifier.config_files import load_yaml_with_base
from unifier.tokenization import (
    IMAGE_TOKENIZER_DIR,
    PARTIAL_MARK,
    TokenizerFolderError,
    UnifierTokenizer,
    load_tokenizer,
)
from unifier.tokenization.vocab import UnifierVocab

RECIPE_FILE = "recipe.yaml"
BUILD_INFO_FILE = "build_info.json"
VQGAN_RUN_DIR = "vqgan_run"
RECIPE_FIELDS = ("name", "seed", "text", "bins", "image")
TEXT_FIELDS = ("corpus", "shapes_scenes", "task_prompts", "extra_texts", "vocab_size", "options", "model_file")
IMAGE_FIELDS = (
    "data",
    "ddconfig",
    "n_embed",
    "embed_dim",
    "quantizer",
    "flat_cells",
    "train",
    "eval_scenes",
    "taming_checkpoint",
    "taming_config",
)


class RecipeError(ValueError):
    """A recipe that cannot be built; the message names the file and the field."""


class BuildError(RuntimeError):
    """A build that must not go ahead (an existing folder from another recipe, a busy build)."""


# ---- recipes ---------------------------------------------------------------------------------
def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read and validate a recipe YAML; returns it with defaults filled in (the form stored as recipe.yaml).

    A recipe may start from another with `base: other.yaml` (a path relative to it) and set only what differs:
    mappings merge key by key at every depth, anything else (a list, a number) replaces the base's value."""
    return normalize_recipe(load_yaml_with_base(path, "recipe", RecipeError), str(path))


def normalize_recipe(raw: Any, where: str = "recipe") -> dict[str, Any]:
    """Validate a parsed recipe and fill in the defaults."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: a recipe is a mapping with the fields {RECIPE_FIELDS}")
    _no_unknown(raw, RECIPE_FIELDS, where)
    recipe = copy.deepcopy(raw)
    recipe.setdefault("name", Path(where).stem)
    recipe["seed"] = int(recipe.get("seed", 0))

    text = recipe.get("text")
    if not isinstance(text, dict):
        raise RecipeError(f"{where}: field 'text' (corpus, vocab_size, options, or model_file) is required")
    _no_unknown(text, TEXT_FIELDS, f"{where}: text")
    if "model_file" in text:
        text["model_file"] = str(text["model_file"])
    else:
        if "corpus" not in text:
            raise RecipeError(f"{where}: text.corpus is required (`shapes` or a text file path), or text.model_file")
        text["corpus"] = str(text["corpus"])
        text["vocab_size"] = int(text.get("vocab_size", 8000))
        text.setdefault("options", {})
        text.setdefault("extra_texts", [])
        text["task_prompts"] = bool(text.get("task_prompts", True))
        if not isinstance(text["options"], dict):
            raise RecipeError(f"{where}: text.options must be a mapping of sentencepiece options")
        if not isinstance(text["extra_texts"], list) or not all(isinstance(t, str) for t in text["extra_texts"]):
            raise RecipeError(f"{where}: text.extra_texts must be a list of strings")
        if text["corpus"] == "shapes":
            text["shapes_scenes"] = int(text.get("shapes_scenes", 2000))

    recipe["bins"] = int(recipe.get("bins", 1000))
    if recipe["bins"] < 2:
        raise RecipeError(f"{where}: bins must be >= 2, got {recipe['bins']}")

    image = recipe.get("image")
    if image is not None:
        if not isinstance(image, dict):
            raise RecipeError(f"{where}: image must be a mapping (or absent for a vocabulary without image codes)")
        _no_unknown(image, IMAGE_FIELDS, f"{where}: image")
        if "taming_checkpoint" in image:
            if "taming_config" not in image:
                raise RecipeError(f"{where}: image.taming_checkpoint needs image.taming_config (taming's YAML)")
            image["taming_checkpoint"] = str(image["taming_checkpoint"])
            image["taming_config"] = str(image["taming_config"])
        else:
            for key in ("ddconfig", "n_embed", "embed_dim"):
                if key not in image:
                    raise RecipeError(
                        f"{where}: image.{key} is required to train a VQ-GAN (or give image.taming_checkpoint)"
                    )
            from unifier.tokenization.image_tokenizer import ImageTokenizerError, check_ddconfig
            from unifier.tokenization.vqgan_train import VQGANTrainConfig, VQGANTrainError

            try:
                image["ddconfig"] = check_ddconfig(image["ddconfig"], f"{where}: image.ddconfig")
                image["train"] = _plain(VQGANTrainConfig.from_dict(image.get("train"), f"{where}: image.train"))
            except (ImageTokenizerError, VQGANTrainError) as e:
                raise RecipeError(str(e)) from e
            image["n_embed"], image["embed_dim"] = int(image["n_embed"]), int(image["embed_dim"])
            image.setdefault("quantizer", {})
            _no_unknown(image["quantizer"], ("beta", "legacy"), f"{where}: image.quantizer")
            image["data"] = str(image.get("data", "shapes"))
            if not isinstance(image.get("flat_cells", False), bool):
                raise RecipeError(f"{where}: image.flat_cells must be true or false, got {image['flat_cells']!r}")
        image["eval_scenes"] = int(image.get("eval_scenes", 500))
        recipe["image"] = image
    return recipe


def _no_unknown(mapping: dict, known: Sequence[str], where: str) -> None:
    unknown = sorted(set(mapping) - set(known))
    if unknown:
        raise RecipeError(f"{where}: unknown field(s) {unknown}; known: {list(known)}")


def _plain(config) -> dict:
    from dataclasses import asdict

    values = asdict(config)
    values["betas"] = list(values["betas"])
    return values


def recipe_hash(recipe: dict[str, Any]) -> str:
    """SHA-256 of the normalized recipe plus the bytes of every file it names (corpus, model, checkpoint).

    Image folders are named, not read: hashing a photo collection would cost more than it protects.
    """
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    for path in _referenced_files(recipe):
        digest.update(path.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _referenced_files(recipe: dict[str, Any]) -> list[str]:
    files = []
    text = recipe["text"]
    if "model_file" in text:
        files.append(text["model_file"])
    elif text["corpus"] != "shapes":
        files.append(text["corpus"])
    image = recipe.get("image") or {}
    files += [image[k] for k in ("taming_checkpoint", "taming_config") if k in image]
    train = image.get("train") or {}
    files += [train[k] for k in ("lpips_weights", "vgg16_weights") if train.get(k)]
    for f in files:
        if not Path(f).is_file():
            raise RecipeError(f"file named by the recipe not found: {f}")
    data = image.get("data", "shapes")
    if data != "shapes" and not Path(data).is_dir():
        raise RecipeError(f"image.data: image folder not found: {data}")
    return files


# ---- the build -------------------------------------------------------------------------------
def text_corpus(recipe: dict[str, Any]) -> Iterator[str]:
    """The recipe's texts: the shapes world's corpus or a text file's lines, the task prompts, text.extra_texts."""
    from unifier.tokenization.text import read_text_corpus

    text = recipe["text"]
    if text["corpus"] == "shapes":
        from unifier.data.shapes import corpus

        yield from corpus(seed=recipe["seed"], n_scenes=text["shapes_scenes"])
    else:
        yield from read_text_corpus(text["corpus"])
    if text["task_prompts"]:
        from unifier.tasks import prompt_texts

        yield from prompt_texts()
    yield from text["extra_texts"]


@contextlib.contextmanager
def _build_lock(out: Path):
    """One build per output folder at a time (an advisory lock file beside it)."""
    lock_path = out.parent / f".{out.name}.lock"
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise BuildError(f"another build of {out} is running (lock {lock_path})") from e
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _finished_hash(out: Path) -> str | None:
    info = out / BUILD_INFO_FILE
    if not info.is_file():
        return None
    try:
        return json.loads(info.read_text()).get("recipe_hash")
    except json.JSONDecodeError:
        return None


def build_tokenizer(
    recipe_path: str | Path, out: str | Path, force: bool = False, progress: bool = True, device: str = "cpu"
) -> Path:
    """Build (or reuse) the tokenizer folder `out` from the recipe at `recipe_path`; returns `out`."""
    recipe = load_recipe(recipe_path)
    digest = recipe_hash(recipe)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = _logger(progress)
    with _build_lock(out):
        if out.exists():
            built_from = _finished_hash(out)
            if built_from == digest and not force:
                try:
                    load_tokenizer(out)  # a reusable folder must also load
                except TokenizerFolderError as e:
                    raise BuildError(
                        f"{out} was built from this recipe but does not load ({e}); rebuild with --force"
                    ) from e
                log(f"{out} was built from this recipe ({digest[:12]}): reusing it")
                return out
            if not force:
                what = f"recipe {built_from[:12]}" if built_from else "an unknown recipe"
                raise BuildError(
                    f"{out} exists and was built from {what}, not {recipe_path} ({digest[:12]}); "
                    "pass --force to replace it, or choose another --out"
                )
        work = out.parent / f".{out.name}{PARTIAL_MARK}{digest[:12]}"
        for stale in out.parent.glob(f".{out.name}{PARTIAL_MARK}*"):
            if stale != work:
                shutil.rmtree(stale, ignore_errors=True)  # leftovers of other recipes cannot be resumed
        work.mkdir(exist_ok=True)
        info = {"recipe_hash": digest, "recipe": str(recipe_path), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        t0 = time.time()
        vocab_text = _build_text(recipe, work, log)
        info["text_seconds"] = round(time.time() - t0, 1)
        image_tokenizer = None
        if recipe.get("image"):
            t1 = time.time()
            image_tokenizer, image_info = _build_image(recipe, work, log, progress, device)
            info["image_seconds"] = round(time.time() - t1, 1)
            info["image"] = image_info
        vocab = UnifierVocab(vocab_text, recipe["bins"], image_tokenizer.n_embed if image_tokenizer else 0)
        tokenizer = UnifierTokenizer(vocab, image_tokenizer, work)
        tokenizer.write_into(work)
        shutil.rmtree(work / VQGAN_RUN_DIR, ignore_errors=True)  # checkpoints + optimizer state: resume only
        info["total_seconds"] = round(time.time() - t0, 1)
        info["vocab"] = {"text": vocab.text_size, "bins": vocab.num_bins, "codes": vocab.num_codes, "size": len(vocab)}
        (work / RECIPE_FILE).write_text(yaml.safe_dump(recipe, sort_keys=False))
        (work / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        _move_into_place(work, out)
        log(f"built {out} in {info['total_seconds']} s: {vocab!r}")
        return out


def _build_text(recipe: dict[str, Any], work: Path, log):
    from unifier.tokenization.text import load_text_model, train_text_model

    text = recipe["text"]
    if "model_file" in text:
        log(f"text: loading {text['model_file']}")
        return load_text_model(text["model_file"])
    log(f"text: training sentencepiece on the {text['corpus']} corpus (vocab_size {text['vocab_size']})")
    return train_text_model(text_corpus(recipe), work / "text.model", vocab_size=text["vocab_size"], **text["options"])


def untrained_image_tokenizer(image: dict[str, Any], seed: int):
    """The freshly initialised VQ-GAN of a normalized recipe's trainable `image` section, its weights drawn from
    `seed` (the recipe's) and not from torch's global generator: torch seeds that differently in every process, and
    two builds of the shapes recipe that differed only there parsed 56.8% and 75.4% of the val scenes. (flat_cells
    stays out of the section unless given, so that recipes without it keep their hash.)"""
    import torch

    from unifier.tokenization.image_tokenizer import ImageTokenizer

    with torch.random.fork_rng(devices=[]):  # the caller's generator state is left as it was
        torch.manual_seed(seed)
        return ImageTokenizer(
            image["ddconfig"],
            image["n_embed"],
            image["embed_dim"],
            flat_cells=image.get("flat_cells", False),
            **image["quantizer"],
        )


def _build_image(recipe: dict[str, Any], work: Path, log, progress: bool, device: str):
    from unifier.tokenization.image_tokenizer import ImageTokenizer
    from unifier.tokenization.vqgan_train import (
        VQGANTrainConfig,
        build_image_source,
        shapes_parse_accuracy,
        train_vqgan,
    )

    image = recipe["image"]
    info: dict[str, Any] = {}
    if "taming_checkpoint" in image:
        log(f"image: loading the taming checkpoint {image['taming_checkpoint']}")
        tokenizer = ImageTokenizer.from_taming_checkpoint(image["taming_checkpoint"], image["taming_config"])
    else:
        tokenizer = untrained_image_tokenizer(image, recipe["seed"])
        config = VQGANTrainConfig.from_dict(image["train"])
        source = build_image_source(image["data"], tokenizer.image_size, seed=recipe["seed"])
        h, w = tokenizer.code_grid
        log(
            f"image: training a VQ-GAN on {source!r}: {h}x{w} codes, codebook {tokenizer.n_embed}, {config.steps} steps"
        )
        info["train"] = train_vqgan(tokenizer, source, work / VQGAN_RUN_DIR, config, progress=progress, device=device)
        tokenizer.cpu()
    data = image.get("data")
    if data == "shapes" and image["eval_scenes"] > 0:
        t = time.time()
        info["eval"] = shapes_parse_accuracy(tokenizer, n_scenes=image["eval_scenes"], seed=recipe["seed"])
        info["eval"]["seconds"] = round(time.time() - t, 1)
        log(
            f"image: the pixel parser reads {info['eval']['parse_accuracy']:.1%} of {image['eval_scenes']} "
            f"reconstructed val scenes exactly ({info['eval']['codes_used']} codes used)"
        )
    return tokenizer, info


def _move_into_place(work: Path, out: Path) -> None:
    """Rename the finished work folder to `out`; an existing `out` (--force) is swapped out first."""
    if out.exists():
        trash = out.parent / f".{out.name}.replaced-{os.getpid()}"
        os.replace(out, trash)
        os.replace(work, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(work, out)


def _logger(enabled: bool):
    def log(message: str) -> None:
        if enabled:
            print(f"[tokenizer] {message}", file=sys.stderr, flush=True)

    return log


# ---- command line ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unifier tokenizer", description="Tokenizer folders: text + bins + image codes."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser(
        "build",
        help="build a tokenizer folder from a recipe",
        description="Build a tokenizer folder (vocab.json, text.model, image_tokenizer/, recipe.yaml) from a recipe "
        "YAML in tokenizers/. A finished folder from the same recipe is reused.",
    )
    build.add_argument("recipe", help="recipe YAML, e.g. tokenizers/shapes.yaml")
    build.add_argument("--out", required=True, help="output folder, e.g. runs/tokenizer-shapes")
    build.add_argument("--force", action="store_true", help="rebuild even if --out holds a finished build")
    build.add_argument("--device", default="cpu", help="device for VQ-GAN training (cpu, cuda)")
    build.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from unifier.tokenization.image_tokenizer import ImageTokenizerError
    from unifier.tokenization.text import TextModelError
    from unifier.tokenization.vqgan_train import VQGANTrainError

    try:
        out = build_tokenizer(args.recipe, args.out, force=args.force, progress=not args.quiet, device=args.device)
    except (RecipeError, BuildError, TextModelError, ImageTokenizerError, VQGANTrainError) as e:
        print(f"unifier tokenizer: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


__all__ = ["BuildError", "RecipeError", "build_tokenizer", "load_recipe", "main", "recipe_hash", IMAGE_TOKENIZER_DIR]
