"""The Unifier model: forward / loss, image masking, encode + generate, save / load, BART initialisation."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSeq2SeqLM, BartConfig, BartModel

from unifier.data.shapes import corpus
from unifier.modeling import (
    POSITION_INIT_STD,
    UnifierConfig,
    UnifierForConditionalGeneration,
    build_config,
    build_model,
    init_from_bart,
    label_smoothed_loss,
)
from unifier.tokenization.text import train_text_model
from unifier.tokenization.vocab import UnifierVocab

TINY = dict(
    d_model=32,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=96,
    image_size=32,
    patch_size=8,
    dropout=0.0,
)


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> UnifierVocab:
    sp = train_text_model(corpus(0, 10), tmp_path_factory.mktemp("sp") / "t.model", vocab_size=600)
    return UnifierVocab(sp, num_bins=50, num_codes=16)


@pytest.fixture(scope="module")
def model(vocab) -> UnifierForConditionalGeneration:
    torch.manual_seed(0)
    return build_model(TINY, vocab).eval()


def make_inputs(vocab, batch=3, prompt=7, target=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, vocab.text_size, (batch, prompt), generator=g)
    attention_mask = torch.ones(batch, prompt, dtype=torch.long)
    attention_mask[1, prompt - 2 :] = 0
    input_ids[1, prompt - 2 :] = vocab.pad_id
    labels = torch.randint(4, vocab.size, (batch, target), generator=g)
    labels[0, target - 2 :] = -100
    return dict(
        pixel_values=torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1,
        image_mask=torch.tensor([True, True, False][:batch]),
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
    )


def test_config_carries_the_vocabulary_and_sizes(vocab, model):
    config = model.config
    assert (config.vocab_size, config.text_size, config.num_bins, config.num_codes) == (
        vocab.size,
        vocab.text_size,
        50,
        16,
    )
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id, config.decoder_start_token_id) == (
        0,
        1,
        2,
        1,
    )
    assert config.num_patches == 16 and config.model_type == "unifier"
    assert model.lm_head.weight is model.model.shared.weight
    assert model.config._attn_implementation == "sdpa"
    tiny = build_config("tiny", vocab)
    assert (tiny.d_model, tiny.encoder_layers, tiny.decoder_layers, tiny.num_patches) == (256, 0, 6, 64)
    assert build_config("base", vocab).image_size == 384 and build_config("large", vocab).d_model == 1024
    with pytest.raises(ValueError, match="unknown model size 'huge'.*base, large, tiny"):
        build_config("huge", vocab)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        UnifierConfig(image_size=30, patch_size=8)


def test_forward_loss_is_label_smoothed_cross_entropy(vocab, model):
    inputs = make_inputs(vocab)
    out = model(**inputs)
    assert out.logits.shape == (3, 5, vocab.size)
    expected = F.cross_entropy(
        out.logits.reshape(-1, vocab.size), inputs["labels"].reshape(-1), ignore_index=-100, label_smoothing=0.1
    )
    torch.testing.assert_close(out.loss, expected)
    assert out.encoder_last_hidden_state.shape == (3, 16 + 7, 32)


def test_constrained_loss_smooths_over_the_allowed_tokens_only(vocab, model):
    inputs = make_inputs(vocab)
    allowed = torch.zeros(1, 3, vocab.size, dtype=torch.bool)
    labels = inputs["labels"]
    allowed[0, torch.arange(3), labels[2, :3]] = True
    allowed[0, :, 10:20] = True
    out = model(**inputs, allowed_tokens=allowed, allowed_rows=torch.tensor([2]))
    assert torch.isfinite(out.loss)
    logits = out.logits
    per_token = label_smoothed_loss(logits, labels, 0.1)
    row = logits[2, :3].masked_fill(~allowed[0], float("-inf")).log_softmax(-1)
    nll = -row[torch.arange(3), labels[2, :3]]
    smooth = -row.masked_fill(~allowed[0], 0).sum(-1) / allowed[0].sum(-1)
    per_token[2, :3] = 0.9 * nll + 0.1 * smooth
    torch.testing.assert_close(out.loss, per_token.sum() / labels.ne(-100).sum())
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad()


def test_masked_image_and_padding_do_not_leak(vocab, model):
    inputs = make_inputs(vocab)
    changed = {k: v.clone() for k, v in inputs.items()}
    changed["pixel_values"][2] = torch.rand(3, 32, 32)  # example 2 has image_mask False
    changed["input_ids"][1, -2:] = 7  # example 1's padding
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, model(**changed).logits)
        changed["pixel_values"][0] = torch.rand(3, 32, 32)  # a real image does matter
        assert not torch.allclose(model(**inputs).logits[0], model(**changed).logits[0])
    no_image = {**inputs, "pixel_values": None, "image_mask": None}
    with torch.no_grad():
        assert model(**no_image).encoder_last_hidden_state.shape[1] == 7


def test_a_prompt_without_image_encodes_the_same_in_a_text_only_batch(vocab):
    """Example 2 has no image: beside images it has P masked patch positions in front; alone (pixel_values None)
    they are left out, and its logits must not change (its tokens keep their positions P ..)."""
    torch.manual_seed(3)
    model = build_model({**TINY, "init_std": 0.2}, vocab).eval()
    inputs = make_inputs(vocab)
    alone = {k: v[2:] for k, v in inputs.items()}
    alone.update(pixel_values=None, image_mask=None)
    with torch.no_grad():
        mixed = model(**inputs)
        text_only = model(**alone)
    num_patches = (32 // 8) ** 2
    assert text_only.encoder_last_hidden_state.shape[1] == 7
    torch.testing.assert_close(
        text_only.encoder_last_hidden_state[0], mixed.encoder_last_hidden_state[2, num_patches:], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(text_only.logits[0], mixed.logits[2], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exceeds the encoder's 96 positions"):
        model(
            input_ids=torch.ones(1, 96 - num_patches + 1, dtype=torch.long), labels=torch.ones(1, 2, dtype=torch.long)
        )


def manual_greedy(model, encoder_outputs, full_mask, steps):
    ids = torch.full((full_mask.shape[0], 1), model.config.decoder_start_token_id)
    for _ in range(steps):
        logits = model(encoder_outputs=encoder_outputs, attention_mask=full_mask, decoder_input_ids=ids).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_generate_greedy_and_beam_through_both_encoder_paths(vocab):
    torch.manual_seed(1)
    model = build_model({**TINY, "init_std": 0.5}, vocab).eval()  # a wide init: non-degenerate argmaxes
    inputs = make_inputs(vocab)
    prompt = {k: inputs[k] for k in ("pixel_values", "image_mask", "input_ids", "attention_mask")}
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        encoder_outputs, full_mask = model.encode(**prompt)
        assert full_mask.shape == (3, 16 + 7) and full_mask[2, :16].eq(0).all() and full_mask[0].eq(1).all()
        expected = manual_greedy(model, encoder_outputs, full_mask, 6)
        assert len(set(expected[:, 1:].flatten().tolist())) > 1
        greedy = model.generate(
            encoder_outputs=encoder_outputs, attention_mask=full_mask, decoder_start_token_id=1, **settings
        )
        assert torch.equal(greedy, expected)
        assert torch.equal(model.generate(**prompt, **settings), expected)

        beam_kwargs = model.generate(**prompt, num_beams=3, num_return_sequences=2, **settings)
        encoder_outputs, full_mask = model.encode(**prompt)
        beam_encoded = model.generate(
            encoder_outputs=encoder_outputs, attention_mask=full_mask, num_beams=3, num_return_sequences=2, **settings
        )
        assert beam_kwargs.shape == (6, 7) and torch.equal(beam_kwargs, beam_encoded)


def test_decoding_step_by_step_through_the_returned_cache_matches_the_full_pass(vocab):
    torch.manual_seed(2)
    model = build_model({**TINY, "init_std": 0.5}, vocab).eval()
    inputs = make_inputs(vocab, target=6)
    prompt = {k: inputs[k] for k in ("pixel_values", "image_mask", "input_ids", "attention_mask")}
    targets = inputs["labels"].clamp(min=4)  # (3, 6) decoder inputs
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoder_outputs, full_mask = model.encode(**prompt)
        full = model(encoder_outputs=encoder_outputs, attention_mask=full_mask, decoder_input_ids=targets).logits
        step = model(
            encoder_outputs=encoder_outputs, attention_mask=full_mask, decoder_input_ids=targets[:, :3], use_cache=True
        )
        steps = [step.logits]
        for position in range(3, 6):
            step = model(
                encoder_outputs=encoder_outputs,
                attention_mask=full_mask,
                decoder_input_ids=targets[:, position : position + 1],
                cache=step.cache,
                use_cache=True,
            )
            steps.append(step.logits)
        model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert step.cache.get_seq_length() == 6
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    # transformers 5.24 renamed `past_key_values` to `cache` and drops the old name in 5.40.
    assert not [str(w.message) for w in caught if "past_key_values" in str(w.message)]


def test_image_positions_start_at_the_scale_of_the_patch_features(vocab):
    """Row / column embeddings start at POSITION_INIT_STD (BART's 0.02 elsewhere), beside layer-normed features,
    and a model without encoder layers (the tiny size) builds and runs."""
    torch.manual_seed(0)
    model = build_model({**TINY, "encoder_layers": 0, "decoder_layers": 2}, vocab)
    embeddings = model.model.encoder.image_embeddings
    for table in (embeddings.row_embeddings, embeddings.col_embeddings):
        assert table.weight.std().item() == pytest.approx(POSITION_INIT_STD, rel=0.2)
    assert model.model.shared.weight.std().item() == pytest.approx(0.02, rel=0.2)
    features = embeddings.norm(embeddings.stem(torch.rand(2, 3, 32, 32)).flatten(2).transpose(1, 2))
    assert features.std(-1).mean().item() == pytest.approx(1.0, rel=0.05)
    out = model(**make_inputs(vocab))
    assert torch.isfinite(out.loss) and out.encoder_last_hidden_state.shape[1] == 16 + 7


def test_sincos_positions_keep_rows_and_columns_apart_and_ordered(vocab, tmp_path):
    torch.manual_seed(0)
    model = build_model({**TINY, "position_init": "sincos"}, vocab)
    embeddings = model.model.encoder.image_embeddings
    rows, cols = embeddings.row_embeddings.weight.detach(), embeddings.col_embeddings.weight.detach()
    half = rows.shape[1] // 2
    assert rows[:, half:].eq(0).all() and cols[:, :half].eq(0).all()  # rows + cols: each recoverable
    quarter = rows.shape[1] // 4
    for table, lowest_sine in ((rows, quarter - 1), (cols, half + quarter - 1)):
        assert table.std().item() == pytest.approx(POSITION_INIT_STD, rel=1e-3)
        assert torch.linalg.matrix_rank(table) == table.shape[0]  # every position distinct
        assert (table[:, lowest_sine].diff() > 0).all()  # "further right / down" is one direction
    model.save_pretrained(tmp_path / "model")
    again = UnifierForConditionalGeneration.from_pretrained(tmp_path / "model")
    assert torch.equal(again.model.encoder.image_embeddings.col_embeddings.weight, embeddings.col_embeddings.weight)
    with pytest.raises(ValueError, match="position_init must be normal or sincos"):
        UnifierConfig(position_init="rope")


def test_save_and_from_pretrained_give_identical_logits(vocab, model, tmp_path):
    inputs = make_inputs(vocab)
    model.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert not list((tmp_path / "model").glob("*.bin"))
    assert json.loads((tmp_path / "model" / "config.json").read_text())["model_type"] == "unifier"
    loaded = UnifierForConditionalGeneration.from_pretrained(tmp_path / "model").eval()
    assert loaded.lm_head.weight is loaded.model.shared.weight
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
        auto = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "model").eval()
        assert torch.equal(model(**inputs).logits, auto(**inputs).logits)


def test_gradient_checkpointing_and_eager_attention_match(vocab, model):
    inputs = make_inputs(vocab)
    with torch.no_grad():
        reference = model(**inputs).loss
    config = UnifierConfig(**{**model.config.to_dict(), "attn_implementation": "eager"})
    eager = UnifierForConditionalGeneration(config).eval()
    eager.load_state_dict(model.state_dict())
    assert eager.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(eager(**inputs).loss, reference)
    eager.train()
    eager.activation_checkpointing_enable()  # transformers 5 name of gradient_checkpointing_enable
    loss = eager(**inputs).loss
    loss.backward()
    torch.testing.assert_close(loss.detach(), reference)
    assert eager.model.encoder.image_embeddings.stem[0].weight.grad is not None


def test_init_from_a_local_tiny_bart(vocab, tmp_path):
    torch.manual_seed(2)
    bart_config = BartConfig(
        vocab_size=60,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
    )
    bart = BartModel(bart_config)
    bart.save_pretrained(tmp_path / "bart")
    word = next(
        p for p in map(vocab.sp.id_to_piece, range(4, vocab.text_size)) if p.startswith("\u2581") and len(p) > 3
    )
    _write_bart_tokenizer(tmp_path / "bart", word.replace("\u2581", "\u0120"))

    model = build_model(TINY, vocab, pretrained_bart=tmp_path / "bart")
    ours, theirs = model.model.state_dict(), bart.state_dict()
    layer = "encoder.layers.0.self_attn.q_proj.weight"
    assert torch.equal(ours[layer], theirs[layer])
    assert torch.equal(ours["decoder.layers.0.fc1.weight"], theirs["decoder.layers.0.fc1.weight"])
    assert torch.equal(ours["encoder.embed_positions.weight"][:66], theirs["encoder.embed_positions.weight"])
    shared, source = model.model.shared.weight, theirs["shared.weight"]
    assert torch.equal(shared[vocab.eos_id], source[2]) and torch.equal(shared[vocab.pad_id], source[1])
    assert torch.equal(shared[vocab.sp.piece_to_id(word)], source[10])  # mapped by spelling via BART's tokenizer
    assert torch.equal(shared[vocab.unk_id], source[3])
    assert model.lm_head.weight is model.model.shared.weight
    assert not torch.equal(shared[vocab.bin_start], torch.zeros(32))
    with pytest.raises(ValueError, match="d_model 32, the model 64"):
        init_from_bart(build_model({**TINY, "d_model": 64}, vocab), tmp_path / "bart")


def _write_bart_tokenizer(folder, word):
    """A byte-level BPE tokenizer in BART's file layout whose piece 10 is `word`."""
    from transformers import BartTokenizer

    pieces = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    for i, piece in enumerate(["Ġ", "s", "h", "a", "p", word, "e"], start=5):
        pieces[piece] = i
    BartTokenizer(vocab=pieces, merges=[]).save_pretrained(folder)
