"""The one id space: ranges, box <-> bins (property test), mixed decoding, save / load."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unifier.data.shapes import vocabulary_texts
from unifier.tokenization.text import train_text_model
from unifier.tokenization.vocab import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    BinSegment,
    BoxError,
    CodeSegment,
    TextSegment,
    UnifierVocab,
    VocabError,
    clip_box,
)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return train_text_model(vocabulary_texts(), tmp_path_factory.mktemp("text") / "text.model", vocab_size=320)


@pytest.fixture(scope="module")
def vocab(text_model):
    return UnifierVocab(text_model, num_bins=1000, num_codes=64)


def test_ranges_are_contiguous_and_named(vocab, text_model):
    t = text_model.get_piece_size()
    assert (vocab.pad_id, vocab.bos_id, vocab.eos_id, vocab.unk_id) == (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    assert vocab.text_range == range(0, t)
    assert vocab.bin_range == range(t, t + 1000)
    assert vocab.code_range == range(t + 1000, t + 1064)
    assert len(vocab) == t + 1064
    assert vocab.token_name(vocab.bin_ids([7])[0]) == "<bin_7>"
    assert vocab.token_name(vocab.code_ids([63])[0]) == "<code_63>"
    assert vocab.token_name(BOS_ID) == "<s>" and vocab.token_name(EOS_ID) == "</s>"
    with pytest.raises(VocabError):
        vocab.token_name(len(vocab))


@settings(max_examples=300, deadline=None)
@given(
    width=st.integers(1, 4096),
    height=st.integers(1, 4096),
    fractions=st.tuples(*[st.floats(0.0, 1.0, allow_nan=False)] * 4),
)
def test_box_round_trip_within_half_a_bin(vocab, width, height, fractions):
    fx0, fy0, fx1, fy1 = fractions
    x0, x1 = sorted((fx0 * width, fx1 * width))
    y0, y1 = sorted((fy0 * height, fy1 * height))
    if x1 <= x0 or y1 <= y0:  # degenerate draws are the error case, tested below
        return
    ids = vocab.encode_box((x0, y0, x1, y1), width, height)
    assert len(ids) == 4 and all(vocab.is_bin(i) for i in ids)
    decoded = vocab.decode_box(ids, width, height)
    n = vocab.num_bins
    for value, back, size in zip((x0, y0, x1, y1), decoded, (width, height, width, height), strict=True):
        half_bin = 0.5 * size / n
        assert abs(value - back) <= half_bin * (1 + 1e-9) + 1e-9, (value, back, size)


def test_bin_rule_matches_design(vocab):
    # bin = min(N-1, floor(v * N)), decoded at (bin + 0.5) / N
    assert vocab.box_to_bins((0, 0, 640, 480), 640, 480) == [0, 0, 999, 999]
    assert vocab.box_to_bins((64, 48, 320, 240), 640, 480) == [100, 100, 500, 500]
    assert vocab.bins_to_box([0, 0, 999, 999], 1000, 1000) == (0.5, 0.5, 999.5, 999.5)


def test_box_partly_outside_the_image_is_clipped(vocab):
    assert clip_box((-10, -5, 50, 700), 640, 480) == (0.0, 0.0, 50.0, 480.0)
    assert vocab.box_to_bins((-10, -5, 700, 700), 640, 480) == [0, 0, 999, 999]


@pytest.mark.parametrize(
    "box, message",
    [
        ((10, 10, 5, 20), "inverted"),
        ((10, 10, 10, 20), "inverted"),
        ((float("nan"), 0, 5, 5), "non-finite"),
        ((0, 0, float("inf"), 5), "non-finite"),
        ((700, 10, 800, 20), "outside"),
        ((10, -50, 20, -10), "outside"),
        ((1, 2, 3), "4 numbers"),
        (("a", 0, 5, 5), "numbers"),
    ],
)
def test_invalid_boxes_fail_clearly(vocab, box, message):
    with pytest.raises(BoxError, match=message):
        vocab.encode_box(box, 640, 480)


def test_bad_bins_and_codes_fail(vocab):
    with pytest.raises(BoxError, match="in \\[0, 1000\\)"):
        vocab.bins_to_box([0, 0, 1000, 5], 640, 480)
    with pytest.raises(BoxError, match="4 bins"):
        vocab.bins_to_box([0, 0, 1], 640, 480)
    with pytest.raises(VocabError):
        vocab.bin_ids([1000])
    with pytest.raises(VocabError):
        vocab.code_ids([64])
    with pytest.raises(VocabError):
        vocab.bins_of([vocab.code_range.start])
    with pytest.raises(BoxError):
        vocab.encode_box((0, 0, 5, 5), 0, 10)


def test_mixed_sequence_decodes_to_typed_segments(vocab):
    prompt = vocab.encode_text("what does the region describe? region:")
    box = vocab.encode_box((8, 16, 40, 48), 64, 64)
    codes = vocab.code_ids([5, 0, 63])
    ids = [BOS_ID, *prompt, *box, *vocab.encode_text("a small red circle"), *codes, EOS_ID, PAD_ID]
    segments = vocab.decode(ids)
    assert segments == [
        TextSegment("what does the region describe? region:"),
        BinSegment(tuple(vocab.box_to_bins((8, 16, 40, 48), 64, 64))),
        TextSegment("a small red circle"),
        CodeSegment((5, 0, 63)),
    ]
    assert vocab.decode_text(ids) == "what does the region describe? region: a small red circle"
    with pytest.raises(VocabError, match="outside"):
        vocab.decode([len(vocab)])


def test_save_and_load_round_trip(vocab, tmp_path):
    vocab.save(tmp_path)
    loaded = UnifierVocab.load(tmp_path)
    assert (loaded.text_size, loaded.num_bins, loaded.num_codes, len(loaded)) == (
        vocab.text_size,
        vocab.num_bins,
        vocab.num_codes,
        len(vocab),
    )
    text = "is the small red circle to the left of the large blue square?"
    assert loaded.encode_text(text) == vocab.encode_text(text)
    meta = json.loads((tmp_path / "vocab.json").read_text())
    assert meta["ranges"]["bins"] == [vocab.bin_start, vocab.code_start]


def test_load_rejects_mismatched_or_foreign_folders(vocab, tmp_path):
    with pytest.raises(VocabError, match="not found"):
        UnifierVocab.load(tmp_path)
    vocab.save(tmp_path)
    meta = json.loads((tmp_path / "vocab.json").read_text())
    (tmp_path / "vocab.json").write_text(json.dumps({**meta, "text_size": meta["text_size"] + 1}))
    with pytest.raises(VocabError, match="different builds"):
        UnifierVocab.load(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(VocabError, match="format_version"):
        UnifierVocab.load(tmp_path)
    (tmp_path / "vocab.json").write_text("{not json")
    with pytest.raises(VocabError, match="not valid JSON"):
        UnifierVocab.load(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "num_bins"}))
    with pytest.raises(VocabError, match="num_bins"):
        UnifierVocab.load(tmp_path)


def test_bin_centre_error_is_at_most_half_a_bin_at_the_edges(vocab):
    # the right / bottom image edge is a valid coordinate and falls in the last bin
    x = vocab.decode_box(vocab.encode_box((0, 0, 640, 480), 640, 480), 640, 480)
    assert math.isclose(640 - x[2], 0.5 * 640 / 1000) and math.isclose(480 - x[3], 0.5 * 480 / 1000)
