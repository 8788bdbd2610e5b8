"""The one id space the model reads and writes, and the only place that knows its offsets.

Layout (design.md, Vocabulary):

    [0, T)            sentencepiece text pieces; pad 0, bos <s> 1, eos </s> 2, unk 3
    [T, T + N)        location bins <bin_0> .. <bin_{N-1}>
    [T + N, T + N + K) image codes <code_0> .. <code_{K-1}>

Every other module asks this object for ids (`bin_ids`, `code_ids`, `encode_text`, ...) and
for the meaning of ids (`decode`), so no offset arithmetic lives anywhere else.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
VOCAB_FILE = "vocab.json"
TEXT_MODEL_FILE = "text.model"
FORMAT_VERSION = 1


class VocabError(ValueError):
    """A vocabulary folder or an id sequence that does not fit this vocabulary."""


class BoxError(ValueError):
    """A box that cannot be turned into location bins."""


@dataclass(frozen=True)
class TextSegment:
    text: str


@dataclass(frozen=True)
class BinSegment:
    bins: tuple[int, ...]  # bin indices in [0, N)


@dataclass(frozen=True)
class CodeSegment:
    codes: tuple[int, ...]  # image code indices in [0, K)


Segment = TextSegment | BinSegment | CodeSegment


def clip_box(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """Validate a pixel box (x0, y0, x1, y1) and clip it to the image.

    Clipping is the rule for a box that sticks out of the image (annotation tools produce
    those); a box that is not finite, inverted, empty, or wholly outside the image has no
    sensible repair and raises BoxError.
    """
    if len(box) != 4:
        raise BoxError(f"a box needs 4 numbers (x0, y0, x1, y1), got {len(box)}: {box!r}")
    if width <= 0 or height <= 0:
        raise BoxError(f"image size must be positive, got {width} x {height}")
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError) as e:
        raise BoxError(f"box coordinates must be numbers, got {box!r}") from e
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise BoxError(f"box has a non-finite coordinate: {box!r}")
    if x1 <= x0 or y1 <= y0:
        raise BoxError(f"box is empty or inverted (needs x1 > x0 and y1 > y0): {box!r}")
    cx0, cy0 = max(0.0, x0), max(0.0, y0)
    cx1, cy1 = min(float(width), x1), min(float(height), y1)
    if cx1 <= cx0 or cy1 <= cy0:
        raise BoxError(f"box {box!r} lies outside the {width} x {height} image")
    return cx0, cy0, cx1, cy1


class UnifierVocab:
    """Text pieces, then `num_bins` location bins, then `num_codes` image codes, in one id space."""

    def __init__(self, text_model: spm.SentencePieceProcessor | str | Path, num_bins: int = 1000, num_codes: int = 0):
        if not isinstance(text_model, spm.SentencePieceProcessor):
            path = Path(text_model)
            if not path.is_file():
                raise VocabError(f"sentencepiece model not found: {path}")
            text_model = spm.SentencePieceProcessor(model_file=str(path))
        self.sp = text_model
        specials = (self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id())
        if specials != (PAD_ID, BOS_ID, EOS_ID, UNK_ID):
            raise VocabError(
                f"the sentencepiece model must put pad, bos, eos, unk at ids 0..3, it has {specials}; "
                "train it with unifier.tokenization.text.train_text_model"
            )
        if num_bins < 2 or num_codes < 0:
            raise VocabError(f"need at least 2 bins and no negative code count, got {num_bins} bins, {num_codes} codes")
        self.text_size = self.sp.get_piece_size()
        self.num_bins = num_bins
        self.num_codes = num_codes
        self.bin_start = self.text_size
        self.code_start = self.text_size + num_bins
        self.size = self.code_start + num_codes
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"UnifierVocab(text={self.text_size}, bins={self.num_bins}, codes={self.num_codes}, size={self.size})"

    # ---- ranges -----------------------------------------------------------------------
    @property
    def text_range(self) -> range:
        return range(0, self.text_size)

    @property
    def bin_range(self) -> range:
        return range(self.bin_start, self.code_start)

    @property
    def code_range(self) -> range:
        return range(self.code_start, self.size)

    def is_text(self, token_id: int) -> bool:
        return 0 <= token_id < self.text_size

    def is_bin(self, token_id: int) -> bool:
        return self.bin_start <= token_id < self.code_start

    def is_code(self, token_id: int) -> bool:
        return self.code_start <= token_id < self.size

    def bin_ids(self, bins: Iterable[int]) -> list[int]:
        out = []
        for b in bins:
            if not 0 <= b < self.num_bins:
                raise VocabError(f"bin index {b} outside [0, {self.num_bins})")
            out.append(self.bin_start + int(b))
        return out

    def code_ids(self, codes: Iterable[int]) -> list[int]:
        out = []
        for c in codes:
            if not 0 <= c < self.num_codes:
                raise VocabError(f"image code {c} outside [0, {self.num_codes})")
            out.append(self.code_start + int(c))
        return out

    def bins_of(self, ids: Iterable[int]) -> list[int]:
        """Bin indices of bin token ids (raises on any other id)."""
        out = []
        for i in ids:
            if not self.is_bin(i):
                raise VocabError(f"id {i} is not a location bin")
            out.append(int(i) - self.bin_start)
        return out

    def codes_of(self, ids: Iterable[int]) -> list[int]:
        """Image code indices of code token ids (raises on any other id)."""
        out = []
        for i in ids:
            if not self.is_code(i):
                raise VocabError(f"id {i} is not an image code")
            out.append(int(i) - self.code_start)
        return out

    # ---- text -------------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        """Sentencepiece ids of `text`, no bos / eos."""
        return list(self.sp.encode(text))

    def decode_text(self, ids: Iterable[int]) -> str:
        """The text of the text ids among `ids`; specials and non-text ids are dropped."""
        return self.sp.decode([int(i) for i in ids if self.is_text(i) and i > UNK_ID])

    # ---- boxes ------------------------------------------------------------------------
    def box_to_bins(self, box: Sequence[float], width: int, height: int) -> list[int]:
        """(x0, y0, x1, y1) in pixels -> 4 bin indices: bin = min(N-1, floor(v / size * N))."""
        x0, y0, x1, y1 = clip_box(box, width, height)
        n = self.num_bins
        return [
            min(n - 1, int(math.floor(v / s * n))) for v, s in ((x0, width), (y0, height), (x1, width), (y1, height))
        ]

    def bins_to_box(self, bins: Sequence[int], width: int, height: int) -> tuple[float, float, float, float]:
        """4 bin indices -> (x0, y0, x1, y1) in pixels at the bin centres (bin + 0.5) / N."""
        if len(bins) != 4:
            raise BoxError(f"a box is 4 bins, got {len(bins)}")
        n = self.num_bins
        if not all(0 <= b < n for b in bins):
            raise BoxError(f"bin indices must lie in [0, {n}), got {list(bins)}")
        x0, y0, x1, y1 = ((b + 0.5) / n for b in bins)
        return x0 * width, y0 * height, x1 * width, y1 * height

    def encode_box(self, box: Sequence[float], width: int, height: int) -> list[int]:
        """A pixel box as 4 bin token ids."""
        return self.bin_ids(self.box_to_bins(box, width, height))

    def decode_box(self, ids: Sequence[int], width: int, height: int) -> tuple[float, float, float, float]:
        """4 bin token ids as a pixel box."""
        return self.bins_to_box(self.bins_of(ids), width, height)

    # ---- mixed sequences --------------------------------------------------------------
    def decode(self, ids: Iterable[int]) -> list[Segment]:
        """Split an id sequence into typed runs: text, bins and codes (bos / eos / pad dropped)."""
        segments: list[Segment] = []
        kind, run = None, []

        def flush():
            if not run:
                return
            if kind == "text":
                segments.append(TextSegment(self.sp.decode(run)))
            elif kind == "bin":
                segments.append(BinSegment(tuple(self.bins_of(run))))
            else:
                segments.append(CodeSegment(tuple(self.codes_of(run))))

        for i in ids:
            i = int(i)
            if i in (PAD_ID, BOS_ID, EOS_ID):
                continue
            if not 0 <= i < self.size:
                raise VocabError(f"id {i} outside the vocabulary of size {self.size}")
            k = "text" if self.is_text(i) else "bin" if self.is_bin(i) else "code"
            if k != kind:
                flush()
                kind, run = k, []
            run.append(i)
        flush()
        return segments

    def token_name(self, token_id: int) -> str:
        """A readable name for one id: the sentencepiece piece, <bin_i> or <code_j>."""
        if self.is_text(token_id):
            return self.sp.id_to_piece(int(token_id))
        if self.is_bin(token_id):
            return f"<bin_{token_id - self.bin_start}>"
        if self.is_code(token_id):
            return f"<code_{token_id - self.code_start}>"
        raise VocabError(f"id {token_id} outside the vocabulary of size {self.size}")

    # ---- persistence ------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "text_model": TEXT_MODEL_FILE,
            "text_size": self.text_size,
            "num_bins": self.num_bins,
            "num_codes": self.num_codes,
            "size": self.size,
            "ranges": {
                "text": [0, self.text_size],
                "bins": [self.bin_start, self.code_start],
                "codes": [self.code_start, self.size],
            },
            "special_ids": {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID, "unk": UNK_ID},
        }

    def save(self, folder: str | Path) -> None:
        """Write `text.model` and `vocab.json` into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / TEXT_MODEL_FILE).write_bytes(self.sp.serialized_model_proto())
        (folder / VOCAB_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> UnifierVocab:
        """Read a folder written by `save`; sizes that disagree with the text model fail clearly."""
        folder = Path(folder)
        meta_path = folder / VOCAB_FILE
        if not meta_path.is_file():
            raise VocabError(f"{meta_path} not found: not a Unifier tokenizer folder")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise VocabError(f"{meta_path} is not valid JSON: {e}") from e
        for key in ("format_version", "text_size", "num_bins", "num_codes", "size"):
            if key not in meta:
                raise VocabError(f"{meta_path} lacks the field '{key}'")
        if meta["format_version"] != FORMAT_VERSION:
            raise VocabError(
                f"{meta_path} has format_version {meta['format_version']}, this Unifier reads {FORMAT_VERSION}: "
                "rebuild the tokenizer folder with `unifier tokenizer build`"
            )
        vocab = cls(folder / meta.get("text_model", TEXT_MODEL_FILE), meta["num_bins"], meta["num_codes"])
        if vocab.text_size != meta["text_size"] or vocab.size != meta["size"]:
            raise VocabError(
                f"{meta_path} says text_size={meta['text_size']}, size={meta['size']}, but its text model has "
                f"{vocab.text_size} pieces (size {vocab.size}): the folder mixes files of different builds; rebuild it"
            )
        return vocab
