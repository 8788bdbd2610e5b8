"""The text part of the vocabulary: a sentencepiece model trained from any iterator of texts.

    sp = train_text_model(shapes.corpus(), "runs/text.model", vocab_size=512)
    sp.encode("a small red circle")  ->  [ids]   (pad 0, bos <s> 1, eos </s> 2, unk 3)

The special ids are fixed because `UnifierVocab` (vocab.py) relies on them; byte fallback is
on by default so that any character, even one the corpus never showed, encodes to byte pieces
and decodes back exactly instead of becoming <unk>.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from unifier.tokenization.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID

# Options every Unifier text model has; they define the special ids vocab.py checks.
FIXED_OPTIONS = {
    "pad_id": PAD_ID,
    "bos_id": BOS_ID,
    "eos_id": EOS_ID,
    "unk_id": UNK_ID,
    "pad_piece": "<pad>",
    "bos_piece": "<s>",
    "eos_piece": "</s>",
    "unk_piece": "<unk>",
}
# Defaults a recipe may override.
DEFAULT_OPTIONS = {
    "model_type": "bpe",  # BPE fills the vocabulary with whole words; unigram stops early on a small corpus
    "character_coverage": 1.0,  # every character of the corpus gets a piece
    "byte_fallback": True,  # unseen characters become byte pieces, so decode(encode(s)) == s still holds
    "hard_vocab_limit": False,  # a small corpus (the shapes world) cannot fill a large vocabulary: use fewer pieces
    "split_digits": True,
    "minloglevel": 2,  # sentencepiece logs every EM step to stderr otherwise
}


class TextModelError(ValueError):
    """A corpus or a model file that cannot make a text model."""


def _clean_texts(texts: Iterable[str], counts: dict[str, int]) -> Iterator[str]:
    """Yield the non-empty texts, one line each; count what was skipped instead of failing the training."""
    for text in texts:
        if not isinstance(text, str):
            counts["not_text"] += 1
            continue
        # sentencepiece reads one sentence per item; an embedded newline would be a piece of its own.
        text = " ".join(text.split("\n")).strip()
        if not text:
            counts["empty"] += 1
            continue
        counts["used"] += 1
        yield text


def train_text_model(
    texts: Iterable[str], out_path: str | Path, vocab_size: int = 8000, **spm_options
) -> spm.SentencePieceProcessor:
    """Train a sentencepiece model on `texts` and write it to `out_path` (via a temporary name).

    Args:
        texts: any iterable of strings (streamed to sentencepiece; empty ones and non-strings are skipped).
        out_path: where the `.model` file goes.
        vocab_size: number of text pieces T, specials and byte pieces included (an upper bound, see
            `hard_vocab_limit` in DEFAULT_OPTIONS).
        **spm_options: any `sentencepiece.SentencePieceTrainer` option (model_type, character_coverage, ...);
            the special-id options are fixed and cannot be overridden.

    Returns:
        The trained `SentencePieceProcessor`: pad 0, bos <s> 1, eos </s> 2, unk 3.
    """
    clash = sorted(set(spm_options) & set(FIXED_OPTIONS))
    if clash:
        raise TextModelError(f"options {clash} are fixed by Unifier's vocabulary layout (pad 0, bos 1, eos 2, unk 3)")
    for key in ("model_prefix", "model_writer", "sentence_iterator", "input"):
        if key in spm_options:
            raise TextModelError(f"option '{key}' is set by train_text_model itself")
    options = {**DEFAULT_OPTIONS, **spm_options, **FIXED_OPTIONS}
    counts = {"used": 0, "empty": 0, "not_text": 0}
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_clean_texts(texts, counts), model_writer=model, vocab_size=int(vocab_size), **options
        )
    except RuntimeError as e:
        if counts["used"] == 0:
            raise TextModelError("the text corpus is empty: no non-empty string to train sentencepiece on") from e
        raise TextModelError(f"sentencepiece training failed on {counts['used']} texts: {e}") from e
    if counts["used"] == 0:
        raise TextModelError("the text corpus is empty: no non-empty string to train sentencepiece on")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, out_path)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def load_text_model(path: str | Path) -> spm.SentencePieceProcessor:
    """Load a `.model` file; it must put pad, bos, eos, unk at ids 0..3 (as train_text_model does)."""
    path = Path(path)
    if not path.is_file():
        raise TextModelError(f"sentencepiece model not found: {path}")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise TextModelError(f"{path} is not a sentencepiece model: {e}") from e
    specials = (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id())
    if specials != (PAD_ID, BOS_ID, EOS_ID, UNK_ID):
        raise TextModelError(
            f"{path} puts pad, bos, eos, unk at {specials}; Unifier needs 0, 1, 2, 3 (train it with train_text_model)"
        )
    return sp


def read_text_corpus(path: str | Path) -> Iterator[str]:
    """Lines of a UTF-8 text file, one text per line (blank lines are skipped by train_text_model)."""
    path = Path(path)
    if not path.is_file():
        raise TextModelError(f"text corpus not found: {path}")
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            yield line.rstrip("\n")
