"""Every modality as ids of one vocabulary: text pieces, location bins, VQ-GAN image codes.

    tokenizer = load_tokenizer("runs/tokenizer-shapes")    # built by `unifier tokenizer build`
    tokenizer.vocab.encode_text("a small red circle")      # text ids
    tokenizer.vocab.encode_box((8, 8, 30, 30), 64, 64)      # 4 bin ids
    tokenizer.image_ids([image])                           # h*w code ids per image, raster order
    tokenizer.images_from_ids([ids])                       # PIL images back

A tokenizer folder holds vocab.json + text.model (UnifierVocab), image_tokenizer/config.json +
model.safetensors (ImageTokenizer) when the vocabulary has image codes, and recipe.yaml +
build_info.json when `unifier tokenizer build` made it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unifier.tokenization.image_tokenizer import ImageTokenizer, ImageTokenizerError
from unifier.tokenization.vocab import TEXT_MODEL_FILE, VOCAB_FILE, UnifierVocab, VocabError

IMAGE_TOKENIZER_DIR = "image_tokenizer"
PARTIAL_MARK = ".partial-"  # unfinished builds live in sibling folders named .<name>.partial-<recipe hash>

__all__ = ["ImageTokenizer", "TokenizerFolderError", "UnifierTokenizer", "UnifierVocab", "load_tokenizer"]


class TokenizerFolderError(ValueError):
    """A tokenizer folder that is missing, unfinished, or whose parts disagree."""


class UnifierTokenizer:
    """The vocabulary plus the image tokenizer that gives its image codes their meaning."""

    def __init__(
        self, vocab: UnifierVocab, image_tokenizer: ImageTokenizer | None = None, folder: str | Path | None = None
    ):
        check_sizes(vocab, image_tokenizer, str(folder or "tokenizer"))
        self.vocab = vocab
        self.image_tokenizer = image_tokenizer
        self.folder = Path(folder) if folder is not None else None

    def __repr__(self) -> str:
        return f"UnifierTokenizer({self.vocab!r}, {self.image_tokenizer!r}, folder={str(self.folder)!r})"

    def _need_images(self) -> ImageTokenizer:
        if self.image_tokenizer is None:
            raise TokenizerFolderError(
                f"the tokenizer at {self.folder} has no image tokenizer (its vocabulary has no codes)"
            )
        return self.image_tokenizer

    @property
    def code_grid(self) -> tuple[int, int]:
        """(h, w) of an image's code grid."""
        return self._need_images().code_grid

    @property
    def num_image_tokens(self) -> int:
        """h * w: the number of code tokens of one image."""
        h, w = self.code_grid
        return h * w

    def image_ids(self, images: Sequence[Any], batch_size: int = 64) -> list[list[int]]:
        """Image sources -> vocabulary ids of their codes (h*w each, raster order)."""
        codes = self._need_images().encode_images(images, batch_size=batch_size)
        return [self.vocab.code_ids(c) for c in codes]

    def images_from_ids(self, ids: Sequence[Sequence[int]], batch_size: int = 64) -> list:
        """Vocabulary ids of image codes (h*w each) -> PIL images."""
        return self._need_images().decode_codes([self.vocab.codes_of(i) for i in ids], batch_size=batch_size)

    def save(self, folder: str | Path) -> Path:
        """Write the tokenizer folder (via a temporary sibling renamed into place); refuses to overwrite."""
        folder = Path(folder)
        if folder.exists():
            raise TokenizerFolderError(f"{folder} already exists; remove it or save elsewhere")
        tmp = folder.parent / f".{folder.name}.saving-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        self.write_into(tmp)
        os.replace(tmp, folder)
        self.folder = folder
        return folder

    def write_into(self, folder: str | Path) -> None:
        """Write the parts into `folder` as they are (no temporary folder; the build renames the whole folder)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.vocab.save(folder)
        if self.image_tokenizer is not None:
            self.image_tokenizer.save(folder / IMAGE_TOKENIZER_DIR)


def check_sizes(vocab: UnifierVocab, image_tokenizer: ImageTokenizer | None, where: str) -> None:
    """The vocabulary's code range must be exactly the image tokenizer's codebook."""
    if image_tokenizer is None and vocab.num_codes:
        raise TokenizerFolderError(
            f"{where}: the vocabulary has {vocab.num_codes} image codes but there is no image tokenizer "
            f"({IMAGE_TOKENIZER_DIR}/ missing: an unfinished or damaged build; rebuild it)"
        )
    if image_tokenizer is not None and vocab.num_codes != image_tokenizer.n_embed:
        raise TokenizerFolderError(
            f"{where}: {VOCAB_FILE} has num_codes={vocab.num_codes} but the image tokenizer's codebook has "
            f"n_embed={image_tokenizer.n_embed}: the folder mixes parts of different builds; rebuild it"
        )


def load_tokenizer(folder: str | Path, map_location: str = "cpu") -> UnifierTokenizer:
    """Load a tokenizer folder; a missing, unfinished or mismatched folder fails with a message that says which."""
    folder = Path(folder)
    if not folder.is_dir():
        partial = sorted(folder.parent.glob(f".{folder.name}{PARTIAL_MARK}*")) if folder.parent.is_dir() else []
        if partial:
            raise TokenizerFolderError(
                f"tokenizer folder {folder} not found; an unfinished build is at {partial[0]}: "
                "rerun `unifier tokenizer build` with the same recipe to finish it"
            )
        raise TokenizerFolderError(f"tokenizer folder {folder} not found; build one with `unifier tokenizer build`")
    for name in (VOCAB_FILE, TEXT_MODEL_FILE):
        if not (folder / name).is_file():
            raise TokenizerFolderError(f"{folder} has no {name}: not a tokenizer folder, or an unfinished one")
    try:
        vocab = UnifierVocab.load(folder)
    except VocabError as e:
        raise TokenizerFolderError(str(e)) from e
    image_tokenizer = None
    image_dir = folder / IMAGE_TOKENIZER_DIR
    if image_dir.exists():
        try:
            image_tokenizer = ImageTokenizer.load(image_dir, map_location=map_location)
        except ImageTokenizerError as e:
            raise TokenizerFolderError(str(e)) from e
    return UnifierTokenizer(vocab, image_tokenizer, folder)
