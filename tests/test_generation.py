"""Constrained decoding on a tiny randomly initialised BART: tries, spans, sampling, exhaustive scoring."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import BartConfig, BartForConditionalGeneration

from unifier.data.shapes import vocabulary_texts
from unifier.generation import (
    DecodingOptions,
    SpanLogitsProcessor,
    TrieLogitsProcessor,
    TrieTable,
    build_trie_table,
    decode_closed_sets,
    decoding_mapping,
    encode_batch,
    generate,
    rank_answers,
    score_candidates,
    task_decoding,
)
from unifier.tasks.base import AnswerSet, ExactBins, ExactCodes, FreeText
from unifier.tokenization.text import train_text_model
from unifier.tokenization.vocab import UnifierVocab


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models on a shared 2-core machine: torch's intra-op threads wait on each other far longer than
    # the math takes (measured 100x slower decoding under load), so these tests run single-threaded.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


EOS = 2


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    sp = train_text_model(vocabulary_texts(), tmp_path_factory.mktemp("text") / "text.model", vocab_size=400)
    return UnifierVocab(sp, num_bins=16, num_codes=24)


def tiny_bart(vocab_size: int, seed: int = 0) -> BartForConditionalGeneration:
    config = BartConfig(
        vocab_size=vocab_size,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=EOS,
        decoder_start_token_id=1,
        forced_eos_token_id=None,
        # Far from the default 0.02: peaked, input-dependent distributions, so a score computed from the
        # wrong example's encoder states or the wrong prefix shows.
        init_std=0.5,
    )
    torch.manual_seed(seed)
    return BartForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def model(vocab):
    return tiny_bart(vocab.size)


def encoded(model, batch_size: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, 300, (batch_size, 6), generator=generator)
    return encode_batch(model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)})


def allowed_by_brute_force(sequences, prefix):
    """The tokens that may follow `prefix` in a set of sequences (</s> only once off the trie)."""
    following = {s[len(prefix)] for s in sequences if len(s) > len(prefix) and list(s[: len(prefix)]) == prefix}
    return following or {EOS}


def test_trie_processor_masks_every_row_like_a_brute_force_trie():
    sets = [
        [(10, 11, EOS), (10, 12, EOS), (13, EOS)],
        [(10, EOS), (10, 11, 14, EOS)],
    ]
    table, example_sets = build_trie_table(sets, EOS, vocab_size=20)
    assert example_sets == [0, 1] and table.max_length == 4
    processor = TrieLogitsProcessor(table, table.roots[torch.tensor(example_sets)])
    prefixes = [[], [10], [10, 11], [13], [99 % 20], [10, 11, EOS]]
    rows = [(e, p) for e in range(2) for p in prefixes]
    # Rows in any order (beam search reorders them); 6 rows per example, as 6 beams would be.
    width = max(len(p) for _, p in rows)
    input_ids = torch.tensor([[1] + p + [0] * (width - len(p)) for _, p in rows])
    for cut in range(width + 1):
        scores = torch.zeros(len(rows), 20)
        masked = processor(input_ids[:, : 1 + cut], scores)
        for r, (example, prefix) in enumerate(rows):
            prefix = (prefix + [0] * width)[:cut]
            allowed = {int(t) for t in torch.nonzero(torch.isfinite(masked[r]))}
            assert allowed == allowed_by_brute_force(sets[example], prefix), (example, prefix)
            # Equal scores in, so the allowed tokens share the probability evenly.
            assert torch.allclose(masked[r][sorted(allowed)].exp(), torch.tensor(1 / len(allowed)))


def test_trie_table_rejects_bad_sets():
    with pytest.raises(ValueError, match="empty"):
        TrieTable([[]], EOS, 20)
    with pytest.raises(ValueError, match="end in </s>"):
        TrieTable([[(10, 11)]], EOS, 20)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        TrieTable([[(25, EOS)]], EOS, 20)


token_sequences = st.lists(st.integers(4, 40), min_size=1, max_size=3).map(lambda s: (*s, EOS))
answer_sets = st.lists(token_sequences, min_size=1, max_size=5, unique=True)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sets=st.lists(answer_sets, min_size=1, max_size=3), beams=st.integers(1, 6), data=st.data())
def test_constrained_beams_stay_in_their_sets_and_find_the_exhaustive_best(model, vocab, sets, beams, data):
    encoder_outputs, mask = encoded(model, len(sets), seed=data.draw(st.integers(0, 3)))
    options = DecodingOptions(beams=beams, num_return=beams)
    results = decode_closed_sets(model, encoder_outputs, mask, sets, (1, EOS, 0), vocab.size, options)
    table, example_sets = build_trie_table(sets, EOS, vocab.size)
    trie = (table, table.roots[torch.tensor(example_sets)])
    exhaustive = score_candidates(model, encoder_outputs, mask, sets, 1, 0, trie=trie)
    for sequences, hypotheses, scores in zip(sets, results, exhaustive, strict=True):
        # Renormalized within the set: the answers' probabilities sum to one.
        assert float(scores.logsumexp(0)) == pytest.approx(0.0, abs=1e-4)
        members = {tuple(s[:-1]) for s in sequences}
        assert hypotheses, "beam search always finds an answer of a non-empty set"
        assert all(tuple(h.ids) in members for h in hypotheses)
        assert len({tuple(h.ids) for h in hypotheses}) == len(hypotheses) <= beams
        # A beam's score is the sequence's teacher-forced log-likelihood.
        by_answer = {tuple(s[:-1]): float(v) for s, v in zip(sequences, scores, strict=True)}
        for h in hypotheses:
            assert h.score == pytest.approx(by_answer[tuple(h.ids)], abs=1e-3)
        if beams >= len(sequences):
            assert hypotheses[0].score == pytest.approx(max(by_answer.values()), abs=1e-3)
            assert len(hypotheses) == len(sequences)


def test_generate_with_answer_sets_and_rank_answers_agree(model, vocab):
    answers = ("yes", "no", "maybe", "small red circle", "two")
    encoder_outputs, mask = encoded(model, 3)
    constraints = [AnswerSet(answers), AnswerSet(answers[:2]), AnswerSet(answers)]
    best = generate(model, encoder_outputs, mask, constraints, vocab, DecodingOptions(beams=5, num_return=2))
    ranked = rank_answers(model, encoder_outputs, mask, [c.answers for c in constraints], vocab, top_k=2)
    for hypotheses, top, constraint in zip(best, ranked, constraints, strict=True):
        texts = [vocab.decode_text(h.ids) for h in hypotheses]
        assert set(texts) <= set(constraint.answers)
        assert texts[0] == top[0][0] and hypotheses[0].score == pytest.approx(top[0][1], abs=1e-3)
        assert len(top) == 2 and top[0][1] >= top[1][1]


def test_boxes_are_four_bins_and_images_exactly_g_codes(model, vocab):
    encoder_outputs, mask = encoded(model, 2)
    for options in (DecodingOptions(beams=3, num_return=3), DecodingOptions(beams=1), DecodingOptions(samples=3)):
        for hypotheses in generate(model, encoder_outputs, mask, [ExactBins(4)] * 2, vocab, options):
            assert hypotheses and all(len(h.ids) == 4 and all(vocab.is_bin(t) for t in h.ids) for h in hypotheses)
    # 70 codes: more steps than beam search keeps scores for, so the beams are rescored by teacher forcing.
    for options in (DecodingOptions(beams=2, num_return=2), DecodingOptions(samples=2, top_k=5, top_p=0.9)):
        results = generate(model, encoder_outputs, mask, [ExactCodes(70)] * 2, vocab, options)
        for hypotheses in results:
            assert len(hypotheses) == 2
            assert all(len(h.ids) == 70 and all(vocab.is_code(t) for t in h.ids) for h in hypotheses)
        candidates = [[[*h.ids, vocab.eos_id] for h in hypotheses] for hypotheses in results]
        rescored = score_candidates(model, encoder_outputs, mask, candidates, vocab.bos_id, vocab.pad_id)
        for hypotheses, scores in zip(results, rescored, strict=True):
            assert [h.score for h in hypotheses] == pytest.approx(scores.tolist(), abs=2e-3)


def test_sampling_is_repeatable_with_a_seed_and_leaves_the_global_rng_alone(model, vocab):
    encoder_outputs, mask = encoded(model, 2)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)

    def draw(seed, **kw):
        options = DecodingOptions(samples=4, seed=seed, **kw)
        results = generate(model, encoder_outputs, mask, [ExactCodes(6)] * 2, vocab, options)
        return [[tuple(h.ids) for h in hypotheses] for hypotheses in results]

    first = draw(7)
    assert torch.rand(1) == expected_next  # the global generator did not move
    assert draw(7) == first
    assert draw(8) != first
    # top_k = 1 sampling is greedy decoding.
    greedy = generate(model, encoder_outputs, mask, [ExactCodes(6)] * 2, vocab, DecodingOptions(beams=1))
    assert all(set(s) == {tuple(g[0].ids)} for s, g in zip(draw(0, top_k=1), greedy, strict=True))


def test_free_text_stays_in_the_text_range(model, vocab):
    encoder_outputs, mask = encoded(model, 2)
    for options in (DecodingOptions(beams=3), DecodingOptions(samples=2, temperature=2.0)):
        for hypotheses in generate(model, encoder_outputs, mask, [FreeText(7)] * 2, vocab, options):
            for h in hypotheses:
                assert len(h.ids) <= 7 and all(vocab.is_text(t) and t not in (0, 1, 2) for t in h.ids)


def test_span_processor_is_position_dependent():
    before = torch.zeros(10, dtype=torch.bool)
    before[5:8] = True
    after = torch.zeros(10, dtype=torch.bool)
    after[EOS] = True
    processor = SpanLogitsProcessor(before, after, count=2)
    scores = torch.zeros(3, 10)
    for length, expected in ((1, {5, 6, 7}), (2, {5, 6, 7}), (3, {EOS}), (4, {EOS})):
        masked = processor(torch.ones(3, length, dtype=torch.long), scores)
        assert all({int(t) for t in torch.nonzero(row == 0)} == expected for row in masked)


def test_generate_rejects_mixed_constraints_and_bad_options(model, vocab):
    encoder_outputs, mask = encoded(model, 2)
    with pytest.raises(ValueError, match="one constraint kind"):
        generate(model, encoder_outputs, mask, [ExactBins(4), FreeText(4)], vocab)
    with pytest.raises(ValueError, match="one span length"):
        generate(model, encoder_outputs, mask, [ExactCodes(4), ExactCodes(5)], vocab)
    with pytest.raises(ValueError, match="2 constraints for a batch of"):
        generate(model, encoder_outputs, mask[:1], [ExactBins(4)] * 2, vocab)
    for bad in ({"beams": 0}, {"samples": 0}, {"temperature": 0}, {"top_p": 1.5}, {"top_k": 0}):
        with pytest.raises(ValueError):
            DecodingOptions(**bad)


@pytest.mark.parametrize(
    "decoding",
    [
        {},
        {"num_beams": 3, "max_new_tokens": 40},
        {"do_sample": True, "top_k": 32, "num_candidates": 4},
        {"num_beams": 1, "closed_set": "score"},
        {"do_sample": True, "num_candidates": 16, "guidance_scale": 3.0, "temperature": 0.7, "seed": 3},
    ],
)
def test_a_decoding_mapping_reads_back_as_the_same_options(decoding):
    options, closed_set = task_decoding(decoding)
    assert closed_set == decoding.get("closed_set", "beam")
    assert options.samples == (decoding["num_candidates"] if decoding.get("do_sample") else None)
    assert task_decoding(decoding_mapping(options, closed_set)) == (options, closed_set)


def test_decoding_overrides_and_bad_mappings():
    options, closed_set = task_decoding({"do_sample": True, "top_k": 32, "num_candidates": 4}, samples=2, top_k=None)
    assert (options.samples, options.top_k, closed_set) == (2, 32, "beam")  # None: not given
    assert task_decoding({"closed_set": "score"}, closed_set="beam")[1] == "beam"
    with pytest.raises(ValueError, match="closed_set must be 'beam' or 'score', got 'all'"):
        task_decoding({"closed_set": "all"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['num_beam'\]"):
        task_decoding({"num_beam": 3})


def guided_greedy_by_brute_force(model, conditional, unconditional, scale, allowed, count):
    """Per row: `count` greedy steps, each from full teacher-forced passes of the prefix under both prompts."""
    (states, mask), (u_states, u_mask) = conditional, unconditional
    rows = states.last_hidden_state.shape[0]
    u_states = u_states.last_hidden_state.expand(rows, -1, -1)
    prefix = torch.full((rows, 1), 1)
    with torch.no_grad():
        for _ in range(count):
            c = model(encoder_outputs=(states.last_hidden_state,), attention_mask=mask, decoder_input_ids=prefix)
            u = model(encoder_outputs=(u_states,), attention_mask=u_mask.expand(rows, -1), decoder_input_ids=prefix)
            c, u = c.logits[:, -1].log_softmax(-1), u.logits[:, -1].log_softmax(-1)
            guided = u + scale * (c - u)
            guided[:, [t for t in range(guided.shape[1]) if t not in allowed]] = float("-inf")
            prefix = torch.cat([prefix, guided.argmax(-1, keepdim=True)], dim=1)
    return prefix[:, 1:].tolist()


def test_guided_decoding_mixes_the_two_prompts_distributions_at_every_step(model, vocab):
    conditional, unconditional = encoded(model, 3), encoded(model, 1, seed=5)
    greedy = DecodingOptions(beams=1, guidance_scale=3.0)
    results = generate(model, *conditional, [ExactCodes(12)] * 3, vocab, greedy, unconditional)
    expected = guided_greedy_by_brute_force(model, conditional, unconditional, 3.0, set(vocab.code_range), 12)
    assert [r[0].ids for r in results] == expected
    plain = generate(model, *conditional, [ExactCodes(12)] * 3, vocab, DecodingOptions(beams=1))
    assert [r[0].ids for r in results] != [r[0].ids for r in plain]  # guidance changed something
    # Scale 1 is the conditional model; scale 0 the unconditional one, for every example alike.
    same = generate(
        model, *conditional, [ExactCodes(12)] * 3, vocab, DecodingOptions(beams=1, guidance_scale=1.0), None
    )
    assert [r[0].ids for r in same] == [r[0].ids for r in plain]
    zero = generate(
        model, *conditional, [ExactCodes(12)] * 3, vocab, DecodingOptions(beams=1, guidance_scale=0.0), unconditional
    )
    alone = generate(model, *unconditional, [ExactCodes(12)], vocab, DecodingOptions(beams=1))
    assert [r[0].ids for r in zero] == [alone[0][0].ids] * 3


def test_guided_samples_are_scored_by_the_unguided_model(model, vocab):
    conditional, unconditional = encoded(model, 2), encoded(model, 2, seed=5)  # one unconditional row per example
    options = DecodingOptions(samples=3, seed=1, guidance_scale=2.5)
    results = generate(model, *conditional, [ExactCodes(9)] * 2, vocab, options, unconditional)
    again = generate(model, *conditional, [ExactCodes(9)] * 2, vocab, options, unconditional)
    assert [[h.ids for h in r] for r in results] == [[h.ids for h in r] for r in again]
    candidates = [[[*h.ids, vocab.eos_id] for h in hypotheses] for hypotheses in results]
    rescored = score_candidates(model, *conditional, candidates, vocab.bos_id, vocab.pad_id)
    for hypotheses, scores in zip(results, rescored, strict=True):
        assert len(hypotheses) == 3 and all(
            len(h.ids) == 9 and all(vocab.is_code(t) for t in h.ids) for h in hypotheses
        )
        assert sorted(h.score for h in hypotheses) == pytest.approx(sorted(scores.tolist()), abs=2e-3)


def test_guidance_is_refused_where_it_cannot_work(model, vocab):
    conditional, unconditional = encoded(model, 2), encoded(model, 1, seed=5)
    with pytest.raises(ValueError, match="not beam search"):
        DecodingOptions(beams=3, guidance_scale=2.0)
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        DecodingOptions(samples=2, guidance_scale=-1.0)
    guided = DecodingOptions(samples=2, guidance_scale=2.0)
    with pytest.raises(ValueError, match="unconditional prompt's encoder outputs"):
        generate(model, *conditional, [ExactCodes(4)] * 2, vocab, guided)
    with pytest.raises(ValueError, match="applies to spans"):
        generate(model, *conditional, [FreeText(4)] * 2, vocab, guided, unconditional)
    three = encoded(model, 3, seed=5)
    with pytest.raises(ValueError, match="3 unconditional prompts for 4 rows"):
        generate(model, *conditional, [ExactCodes(4)] * 2, vocab, guided, three)
