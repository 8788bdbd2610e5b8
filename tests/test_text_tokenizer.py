"""The sentencepiece text model: training from an iterator, exact round trips, special ids, errors."""

import pytest
import sentencepiece as spm

from unifier.data.shapes import corpus, vocabulary_texts, world_words
from unifier.tokenization.text import TextModelError, load_text_model, read_text_corpus, train_text_model
from unifier.tokenization.vocab import UnifierVocab


@pytest.fixture(scope="module")
def shapes_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.model"
    sp = train_text_model(corpus(seed=0, n_scenes=100), path, vocab_size=512)
    return sp, path


def test_special_ids_are_fixed(shapes_model):
    sp, _ = shapes_model
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]


def test_whole_shapes_vocabulary_round_trips_exactly(shapes_model):
    sp, _ = shapes_model
    texts = list(vocabulary_texts()) + list(corpus(seed=0, n_scenes=30)) + sorted(world_words())
    for text in texts:
        ids = sp.encode(text)
        assert sp.unk_id() not in ids, text
        assert sp.decode(ids) == text


def test_shapes_words_are_whole_pieces(shapes_model):
    # BPE fills the small vocabulary with whole words, which keeps the model's sequences short
    sp, _ = shapes_model
    assert len(sp.encode("a small red circle and a large blue square")) == 9


def test_unseen_characters_round_trip_through_byte_fallback(shapes_model):
    sp, _ = shapes_model
    for text in ["Ünïcode ✓ 123", "a ZEBRA, 42 kg; (ok)!", "日本語のテキスト"]:
        assert sp.decode(sp.encode(text)) == text


def test_written_model_loads_into_the_vocabulary(shapes_model):
    sp, path = shapes_model
    loaded = load_text_model(path)
    assert loaded.serialized_model_proto() == sp.serialized_model_proto()
    vocab = UnifierVocab(path, num_bins=10)
    assert vocab.text_size == sp.get_piece_size()
    assert not list(path.parent.glob(".*tmp"))  # written through a temporary name


def test_any_iterator_and_skipped_texts(tmp_path):
    texts = (t for t in ["hello world", "", "  ", None, "hello there\nworld", "a red thing"] * 20)
    sp = train_text_model(texts, tmp_path / "t.model", vocab_size=300)
    assert sp.decode(sp.encode("hello there world")) == "hello there world"


def test_text_file_corpus(tmp_path):
    corpus_path = tmp_path / "captions.txt"
    corpus_path.write_text("a man riding a horse\n\nTwo dogs play in the snow.\n" * 10, encoding="utf-8")
    texts = list(read_text_corpus(corpus_path))
    assert texts[:3] == ["a man riding a horse", "", "Two dogs play in the snow."]
    sp = train_text_model(texts, tmp_path / "t.model", vocab_size=300)
    assert sp.decode(sp.encode("Two dogs play in the snow.")) == "Two dogs play in the snow."
    with pytest.raises(TextModelError, match="not found"):
        list(read_text_corpus(tmp_path / "missing.txt"))


def test_errors_are_clear(tmp_path):
    with pytest.raises(TextModelError, match="empty"):
        train_text_model(["", "   "], tmp_path / "t.model", vocab_size=300)
    with pytest.raises(TextModelError, match="fixed"):
        train_text_model(["some text"], tmp_path / "t.model", unk_id=0)
    with pytest.raises(TextModelError, match="set by train_text_model"):
        train_text_model(["some text"], tmp_path / "t.model", model_prefix="x")
    with pytest.raises(TextModelError, match="not found"):
        load_text_model(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TextModelError, match="not a sentencepiece model"):
        load_text_model(tmp_path / "junk.model")


def test_foreign_special_ids_are_rejected(tmp_path):
    # sentencepiece's own defaults put unk at 0 and have no pad: not Unifier's layout
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["a small red circle", "a large blue square"] * 50),
        model_prefix=str(tmp_path / "foreign"),
        vocab_size=20,
        minloglevel=2,
    )
    with pytest.raises(TextModelError, match="0, 1, 2, 3"):
        load_text_model(tmp_path / "foreign.model")
