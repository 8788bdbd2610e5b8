"""Constrained decoding on Hugging Face `generate`: answer tries, exact box / image spans, exhaustive scoring.

Every task's `constraint()` (unifier.tasks.base) becomes one vectorized `LogitsProcessor`:

    AnswerSet    a prefix trie over the answers' token sequences (each + </s>). All tries of a batch are
                 merged into one `TrieTable`: per node, the allowed-token mask (over the tokens any answer
                 uses) and the child of each (node, token) edge, precomputed once. A step walks every row's
                 generated prefix through the table (a few tensor ops per position, all rows at once) and
                 gathers the rows' masks by node index: no Python call per hypothesis. The walk is redone
                 from the prefix each step, so beam search may reorder rows freely.
    ExactBins    exactly `count` location-bin tokens, then </s>          } a position-dependent allowed
    ExactCodes   exactly `count` image-code tokens, then </s>            } range (`SpanLogitsProcessor`)
    FreeText     text tokens (no bins, codes, pad or <s>) until </s>, at most `max_new_tokens`

    encoder_outputs, mask = encode_batch(model, batch)           # the encoder runs once
    hypotheses = generate(model, encoder_outputs, mask, [task.constraint(r) for r in records], vocab,
                          DecodingOptions(beams=5))             # [[Hypothesis(ids, score), ...] per example]
    ranked = rank_answers(model, encoder_outputs, mask, [answers] * B, vocab, top_k=3)   # exhaustive scoring

A hypothesis's score is its log-likelihood under the model (natural log, summed over the generated tokens
and </s>), divided by length ** length_penalty in beam search: the penalty is 0 for closed sets and spans
(plain log-likelihoods) and 1.0 for free text unless set. A closed set's log-likelihood is renormalized over
the tokens its trie allows at each step, p(answer | answer in the set): that is what constrained training
(OFA's, `constrain_training`) teaches, and the raw distribution of such a model is untrained outside the set
(a finished answer's </s>, the only token its trie allows, never gets a gradient). Spans are trained over the
whole vocabulary and keep the raw log-likelihood. Either way a constrained beam's score equals the same
sequence's score in a teacher-forced pass (`score_candidates`, given the trie for closed sets).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutput

from unifier.tasks.base import AnswerSet, Constraint, ExactBins, ExactCodes, FreeText

NEG_INF = float("-inf")
# Beam search reports its scores only with output_scores, which keeps a (rows, vocab) tensor per step; past
# this many steps (images: G codes) the few best sequences are rescored in one teacher-forced pass instead.
_MAX_STEPS_WITH_SCORES = 64
# Beam search gives unfilled final slots this score (transformers' placeholder); anything below is not a result.
_UNREACHED = -1.0e8


@dataclass
class DecodingOptions:
    """How to search. `samples` switches from beam search to sampling (`samples` draws per example)."""

    beams: int = 5
    samples: int | None = None
    temperature: float = 1.0
    top_k: int | None = None  # sampling: keep the k most likely tokens (None: all)
    top_p: float | None = None  # sampling: nucleus mass (None: 1.0)
    seed: int | None = None  # sampling: a seed makes the draws repeatable without touching the global RNG
    num_return: int = 1  # beam search: hypotheses returned per example (at most `beams`)
    max_new_tokens: int | None = None  # free text: overrides the constraint's budget
    length_penalty: float | None = None  # beam search; None: 1.0 for free text, 0.0 for closed sets and spans
    # Classifier-free guidance: log p_u + scale * (log p_c - log p_u), p_u given the task's unconditional prompt
    # (text-to-image trained with caption_dropout). None or 1: none; > 1 follows the prompt more closely.
    guidance_scale: float | None = None

    def __post_init__(self):
        if self.beams < 1:
            raise ValueError(f"beams must be >= 1, got {self.beams}")
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_return < 1:
            raise ValueError(f"num_return must be >= 1, got {self.num_return}")
        if self.guidance_scale is not None and not self.guidance_scale >= 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.guided and self.samples is None and self.beams > 1:
            # Beam search reorders rows between steps; the unconditional pass's cache would not follow them.
            raise ValueError("guidance_scale needs sampling (samples) or greedy search (beams 1), not beam search")

    @property
    def guided(self) -> bool:
        return self.guidance_scale is not None and self.guidance_scale != 1.0


# A task file's `decoding:` keys (Hugging Face's names) -> DecodingOptions fields.
_CONFIG_KEYS = {
    "num_beams": "beams",
    "num_return_sequences": "num_return",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "seed": "seed",
    "max_new_tokens": "max_new_tokens",
    "length_penalty": "length_penalty",
    "guidance_scale": "guidance_scale",
}


def decoding_options(decoding: dict[str, Any] | None = None, **overrides: Any) -> DecodingOptions:
    """DecodingOptions from a task file's `decoding:` mapping (num_beams, do_sample, num_candidates, top_k,
    top_p, temperature, seed, max_new_tokens, length_penalty, num_return_sequences, guidance_scale), then `overrides`
    (DecodingOptions field names; None values are ignored). Unknown keys are an error naming them."""
    decoding = dict(decoding or {})
    unknown = sorted(set(decoding) - set(_CONFIG_KEYS) - {"do_sample", "num_candidates"})
    if unknown:
        raise ValueError(
            f"decoding: unknown key(s) {unknown}; known: {sorted({*_CONFIG_KEYS, 'do_sample', 'num_candidates'})}"
        )
    fields = {_CONFIG_KEYS[key]: value for key, value in decoding.items() if key in _CONFIG_KEYS}
    if decoding.get("do_sample"):
        # Sampling draws num_candidates per example (text-to-image reranks them), one by default.
        fields["samples"] = int(decoding.get("num_candidates", 1))
    fields.update({key: value for key, value in overrides.items() if value is not None})
    return DecodingOptions(**fields)


CLOSED_SET_MODES = ("beam", "score")


def task_decoding(decoding: dict[str, Any] | None = None, **overrides: Any) -> tuple[DecodingOptions, str]:
    """(DecodingOptions, closed-set mode) of a `decoding:` mapping (a task file's, or a model folder's
    decoding.json entry), with its `closed_set` ("beam": trie-constrained beam search; "score": exhaustive scoring
    of the answer set); `overrides` are DecodingOptions field names and `closed_set` (None values are ignored)."""
    decoding = dict(decoding or {})
    closed_set = overrides.pop("closed_set", None) or decoding.pop("closed_set", None) or "beam"
    decoding.pop("closed_set", None)
    if closed_set not in CLOSED_SET_MODES:
        raise ValueError(f"closed_set must be 'beam' or 'score', got {closed_set!r}")
    return decoding_options(decoding, **overrides), closed_set


def decoding_mapping(options: DecodingOptions, closed_set: str = "beam") -> dict[str, Any]:
    """The `decoding:` mapping (task files' keys) that `task_decoding` reads back as (options, closed_set); fields at
    their defaults are left out."""
    names = {field: key for key, field in _CONFIG_KEYS.items()}
    defaults = vars(DecodingOptions())
    mapping: dict[str, Any] = {names[k]: v for k, v in vars(options).items() if k in names and v != defaults[k]}
    if options.samples is not None:
        mapping.update(do_sample=True, num_candidates=options.samples)
    mapping["closed_set"] = closed_set
    return mapping


@dataclass
class Hypothesis:
    """One generated sequence: `ids` without the decoder start token and without </s>."""

    ids: list[int]
    score: float


# ---------------------------------------------------------------------------------------------------------------------
# Answer tries
# ---------------------------------------------------------------------------------------------------------------------


class TrieTable:
    """Several prefix tries over token sequences, merged into one node table.

    Node 0 is the dead node (reached by leaving a trie, or after </s>): it allows only </s>, so a row that
    beam search keeps as a filler never gets an all -inf distribution. `roots[i]` is the root of set i.

        columns     (C,) long: the token ids any sequence uses (</s> included), ascending
        allowed     (N, C) bool: allowed[n, c] = token columns[c] may follow node n
        edge_keys   (E,) long: node * vocab_size + token of every edge, ascending
        edge_child  (E,) long: the child node of each edge
        roots       (S,) long: one root per sequence set
    """

    DEAD = 0

    def __init__(self, sequence_sets: Sequence[Sequence[Sequence[int]]], eos_id: int, vocab_size: int):
        children: dict[tuple[int, int], int] = {}
        roots, num_nodes, max_length = [], 1, 0
        for s, sequences in enumerate(sequence_sets):
            if not sequences:
                raise ValueError(f"answer set {s} is empty: a closed set needs at least one answer")
            root, num_nodes = num_nodes, num_nodes + 1
            roots.append(root)
            for sequence in sequences:
                sequence = [int(t) for t in sequence]
                if not sequence or sequence[-1] != eos_id or eos_id in sequence[:-1]:
                    raise ValueError(f"answer set {s}: every sequence must end in </s> ({eos_id}) once: {sequence}")
                if any(not 0 <= t < vocab_size for t in sequence):
                    raise ValueError(f"answer set {s}: token outside the vocabulary of size {vocab_size}: {sequence}")
                max_length = max(max_length, len(sequence))
                node = root
                for token in sequence[:-1]:
                    if (node, token) not in children:
                        children[(node, token)] = num_nodes
                        num_nodes += 1
                    node = children[(node, token)]
                children[(node, eos_id)] = self.DEAD  # a finished answer: nothing but </s> may follow
        tokens = sorted({token for _, token in children} | {eos_id})
        column = {token: c for c, token in enumerate(tokens)}
        allowed = torch.zeros((num_nodes, len(tokens)), dtype=torch.bool)
        allowed[self.DEAD, column[eos_id]] = True
        for node, token in children:
            allowed[node, column[token]] = True
        keys = torch.tensor([node * vocab_size + token for node, token in children], dtype=torch.long)
        child = torch.tensor(list(children.values()), dtype=torch.long)
        order = keys.argsort()
        self.columns = torch.tensor(tokens, dtype=torch.long)
        self.allowed = allowed
        self.edge_keys, self.edge_child = keys[order], child[order]
        self.roots = torch.tensor(roots, dtype=torch.long)
        self.vocab_size, self.eos_id = vocab_size, eos_id
        self.max_length = max_length  # longest sequence, </s> included: the generation budget
        self.num_nodes = num_nodes

    def to(self, device: torch.device | str) -> TrieTable:
        """A copy whose tensors live on `device` (the original is left where it is: it may be cached)."""
        moved = object.__new__(TrieTable)
        moved.__dict__.update(self.__dict__)
        for name in ("columns", "allowed", "edge_keys", "edge_child", "roots"):
            setattr(moved, name, getattr(self, name).to(device))
        return moved

    def step(self, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(R,) nodes, (R,) tokens -> (R,) children; a token with no edge leads to the dead node."""
        keys = nodes * self.vocab_size + tokens
        position = torch.searchsorted(self.edge_keys, keys).clamp(max=len(self.edge_keys) - 1)
        found = self.edge_keys[position] == keys
        return torch.where(found, self.edge_child[position], torch.full_like(nodes, self.DEAD))

    def log_probs(self, nodes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """(...) nodes, (..., V) scores -> (..., C) log-probabilities over `columns`, renormalized over what
        each node allows (-inf elsewhere; every node allows a token: the dead node allows </s>)."""
        allowed = self.allowed.index_select(0, nodes.flatten()).view(*nodes.shape, -1)
        return scores.index_select(-1, self.columns).float().masked_fill(~allowed, NEG_INF).log_softmax(-1)

    def walk(self, roots: torch.Tensor, prefixes: torch.Tensor) -> torch.Tensor:
        """(R,) start nodes, (R, T) generated tokens -> (R,) nodes after reading them."""
        nodes = roots
        for t in range(prefixes.shape[1]):
            nodes = self.step(nodes, prefixes[:, t])
        return nodes


@functools.lru_cache(maxsize=32)
def _cached_table(
    sequence_sets: tuple[tuple[tuple[int, ...], ...], ...], eos_id: int, vocab_size: int, device: str
) -> TrieTable:
    # Evaluation asks for the same answer sets batch after batch: build (and move) each table once.
    return TrieTable(sequence_sets, eos_id, vocab_size).to(device)


def build_trie_table(
    sequence_sets: Sequence[Sequence[Sequence[int]]], eos_id: int, vocab_size: int, device: torch.device | str = "cpu"
) -> tuple[TrieTable, list[int]]:
    """One table for a batch's sets (equal sets share a trie) and the index of each example's set in it."""
    unique: dict[tuple[tuple[int, ...], ...], int] = {}
    example_sets = []
    for sequences in sequence_sets:
        key = tuple(tuple(int(t) for t in s) for s in sequences)
        example_sets.append(unique.setdefault(key, len(unique)))
    return _cached_table(tuple(unique), eos_id, vocab_size, str(device)), example_sets


class TrieLogitsProcessor(LogitsProcessor):
    """Masks every row's scores to the tokens its trie allows after the row's generated prefix, as
    log-probabilities renormalized over those tokens (see the module docstring for why).

    `example_roots` (B,) are the root nodes of the B examples; generate's rows come example by example,
    rows // B of them each (beams or samples). `prefix_length` decoder tokens (the start token) are not
    part of the answer.
    """

    def __init__(self, table: TrieTable, example_roots: torch.Tensor, prefix_length: int = 1):
        self.table = table
        self.example_roots = example_roots
        self.prefix_length = prefix_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows_per_example = input_ids.shape[0] // self.example_roots.shape[0]
        roots = self.example_roots.repeat_interleave(rows_per_example)  # (R,)
        nodes = self.table.walk(roots, input_ids[:, self.prefix_length :])  # (R,)
        kept = self.table.log_probs(nodes, scores).to(scores.dtype)  # (R, C)
        # index_select / index_copy_ rather than advanced indexing: the latter's gather / scatter is ~10x slower.
        return torch.full_like(scores, NEG_INF).index_copy_(1, self.table.columns, kept)


class SpanLogitsProcessor(LogitsProcessor):
    """A position-dependent allowed set, the same for every row: `before` (V,) bool for the first `count`
    generated tokens, then `after` (V,) bool. Boxes and images: before = the bin / code range, after = </s>;
    free text: count 0, after = the text tokens and </s>."""

    def __init__(self, before: torch.Tensor, after: torch.Tensor, count: int, prefix_length: int = 1):
        self.count, self.prefix_length = count, prefix_length
        self._masks = {"before": before, "after": after}
        self._additive: dict[tuple, torch.Tensor] = {}

    def _mask(self, which: str, scores: torch.Tensor) -> torch.Tensor:
        key = (which, scores.device, scores.dtype)
        if key not in self._additive:
            allowed = self._masks[which].to(scores.device)
            zeros = torch.zeros(allowed.shape, dtype=scores.dtype, device=scores.device)
            self._additive[key] = zeros.masked_fill(~allowed, NEG_INF)  # (V,) 0 or -inf
        return self._additive[key]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prefix_length
        return scores + self._mask("before" if step < self.count else "after", scores)


class LogLikelihoodRecorder(LogitsProcessor):
    """Sums each row's log-probability (unmodified model distribution) of the tokens sampling picks.

    Placed first in the processor list: it sees raw logits, and at the next step learns which token the
    previous one chose (the last column of input_ids). Sampling and greedy search keep rows in place,
    which this relies on; beam search reports its own scores.
    """

    def __init__(self, eos_id: int):
        self.eos_id = eos_id
        self.previous: torch.Tensor | None = None  # (R, V) log-probs of the last step
        self.total: torch.Tensor | None = None  # (R,)
        self.alive: torch.Tensor | None = None  # (R,) bool: no </s> yet

    def _account(self, chosen: torch.Tensor) -> None:
        picked = self.previous.gather(1, chosen[:, None])[:, 0]
        self.total += torch.where(self.alive, picked, torch.zeros_like(picked))
        self.alive &= chosen != self.eos_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is None:
            self.total = torch.zeros(scores.shape[0], device=scores.device)
            self.alive = torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)
        else:
            self._account(input_ids[:, -1])
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """The (R,) totals once generation returned `sequences` (its last token is not accounted yet)."""
        self._account(sequences[:, -1])
        return self.total


class ClassifierFreeGuidanceProcessor(LogitsProcessor):
    """Classifier-free guidance (Ho & Salimans 2022) for an encoder-decoder: each step's scores become
    log p_u + scale * (log p_c - log p_u), p_c the model's distribution (the scores it is given) and p_u the
    model's next-token distribution for the same decoded prefix given the unconditional prompt's encoder states.

    Written here because transformers' UnbatchedClassifierFreeGuidanceLogitsProcessor calls a decoder-only model
    on prompt ids; an encoder-decoder needs the second decoder pass over other encoder states, with its own cache.
    The states are (1 or B, S_u, d): one unconditional prompt for all rows, or one per example (each example's
    rows are adjacent in generate). Rows stay in place in sampling and greedy search, which the cache relies on.
    """

    def __init__(self, model: Any, encoder_outputs: Any, attention_mask: torch.Tensor, scale: float):
        self.model, self.scale = model, scale
        self.states = encoder_states(encoder_outputs)  # (1 or B, S_u, d)
        self.mask = attention_mask  # (1 or B, S_u)
        self.cache: Any = None
        self.seen = 0  # decoder positions already in the cache

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = input_ids.shape[0]
        if self.states.shape[0] != rows:
            if rows % self.states.shape[0]:
                raise ValueError(f"guidance: {self.states.shape[0]} unconditional prompts for {rows} rows")
            repeat = rows // self.states.shape[0]
            self.states = self.states.repeat_interleave(repeat, dim=0)
            self.mask = self.mask.repeat_interleave(repeat, dim=0)
        out = self.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=self.states),
            attention_mask=self.mask,
            decoder_input_ids=input_ids[:, self.seen :],
            cache=self.cache,
            use_cache=True,
        )
        self.cache, self.seen = out.cache, input_ids.shape[1]
        conditional = torch.log_softmax(scores.float(), dim=-1)  # (R, V)
        unconditional = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (R, V)
        return (unconditional + self.scale * (conditional - unconditional)).to(scores.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Running generate
# ---------------------------------------------------------------------------------------------------------------------


def encode_batch(model: Any, batch: dict[str, torch.Tensor]) -> tuple[BaseModelOutput, torch.Tensor]:
    """Run the encoder once: (encoder outputs with last_hidden_state (B, S, d), attention mask (B, S)).

    A Unifier model encodes image + prompt (`model.encode`); a plain seq2seq model (tests, benchmarks)
    its input_ids."""
    if hasattr(model, "encode"):
        return model.encode(
            batch.get("pixel_values"), batch.get("image_mask"), batch["input_ids"], batch["attention_mask"]
        )
    return model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), batch[
        "attention_mask"
    ]


def _generation_config(max_new_tokens: int, options: DecodingOptions, length_penalty: float, ids) -> GenerationConfig:
    bos, eos, pad = ids
    sampling = options.samples is not None
    num_return = options.samples if sampling else min(options.num_return, options.beams)
    beam_search = not sampling and options.beams > 1
    # Only the flags of the chosen search are set: generate warns about the others.
    search = dict(num_beams=options.beams, length_penalty=length_penalty, early_stopping=False) if beam_search else {}
    if sampling:
        search = dict(temperature=options.temperature, top_k=options.top_k or 0, top_p=options.top_p or 1.0)
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        num_return_sequences=num_return,
        **search,
        decoder_start_token_id=bos,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        return_dict_in_generate=True,
        output_scores=beam_search and max_new_tokens <= _MAX_STEPS_WITH_SCORES,
        use_cache=True,
    )


def encoder_states(encoder_outputs: Any) -> torch.Tensor:
    """(B, S, d) last hidden states of an encoder output (a ModelOutput or a tuple)."""
    return encoder_outputs.last_hidden_state if hasattr(encoder_outputs, "last_hidden_state") else encoder_outputs[0]


def fresh_encoder_outputs(encoder_outputs: Any) -> BaseModelOutput:
    """A new BaseModelOutput for one generate call: generate expands the tensors of the encoder output it is
    given per beam IN PLACE, so the caller's object must not be handed over (it is reused afterwards); a mask
    carried inside Unifier's encoder output is left out, since the same mask is passed as attention_mask."""
    return BaseModelOutput(last_hidden_state=encoder_states(encoder_outputs))


def run_generate(
    model: Any,
    encoder_outputs: Any,
    attention_mask: torch.Tensor,
    processor: LogitsProcessor,
    max_new_tokens: int,
    options: DecodingOptions,
    ids: tuple[int, int, int],
    length_penalty: float,
    keep: Callable[[int, list[int]], bool] | None = None,
    unconditional: tuple[Any, torch.Tensor] | None = None,
) -> list[list[Hypothesis]]:
    """One `generate` call with `processor`; per example its hypotheses, best first.

    ids = (decoder start, eos, pad); keep(example, ids) filters results (beam search fills missing slots
    with unreachable sequences when a closed set is smaller than the beam); unconditional = (encoder outputs,
    mask) of the unconditional prompt when `options` guide. A sampled hypothesis's score is its log-likelihood
    under the unguided model."""
    bos, eos, pad = ids
    batch_size = attention_mask.shape[0]
    config = _generation_config(max_new_tokens, options, length_penalty, ids)
    sampling_like = options.samples is not None or options.beams == 1
    recorder = LogLikelihoodRecorder(eos) if sampling_like else None
    # A trie's renormalized scores are the likelihood to record; a span's masking is not.
    trie = (processor.table, processor.example_roots) if isinstance(processor, TrieLogitsProcessor) else None
    guidance = None
    if options.guided:
        if unconditional is None:
            raise ValueError("guidance_scale needs the unconditional prompt's encoder outputs")
        guidance = ClassifierFreeGuidanceProcessor(model, *unconditional, options.guidance_scale)
    # The recorder sees the model's own scores; guidance comes before the constraint so that masked tokens stay out.
    order = (processor, recorder) if trie is not None else (recorder, guidance, processor)
    processors = LogitsProcessorList([p for p in order if p is not None])
    device = attention_mask.device
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if options.seed is not None:
            torch.manual_seed(options.seed)
        out = model.generate(
            encoder_outputs=fresh_encoder_outputs(encoder_outputs),
            attention_mask=attention_mask,
            generation_config=config,
            logits_processor=processors,
        )
    sequences = out.sequences  # (B * n, 1 + T)
    per_example = sequences.shape[0] // batch_size
    if recorder is not None:
        scores = recorder.finish(sequences)
    elif config.output_scores:
        scores = out.sequences_scores
    else:
        scores = _rescore(model, encoder_outputs, attention_mask, sequences, per_example, ids, length_penalty, trie)
    results: list[list[Hypothesis]] = [[] for _ in range(batch_size)]
    for row, (sequence, score) in enumerate(zip(sequences.tolist(), scores.tolist(), strict=True)):
        example = row // per_example
        generated = sequence[1:]
        if eos in generated:
            generated = generated[: generated.index(eos)]
        if not score > _UNREACHED or (keep is not None and not keep(example, generated)):
            continue
        results[example].append(Hypothesis(generated, float(score)))
    for hypotheses in results:
        hypotheses.sort(key=lambda h: -h.score)
    return results


def _rescore(
    model, encoder_outputs, attention_mask, sequences, per_example, ids, length_penalty, trie=None
) -> torch.Tensor:
    """(R,) beam scores of long outputs: sum of log-probs / length ** length_penalty, by teacher forcing."""
    bos, eos, pad = ids
    candidates = []
    for example in range(attention_mask.shape[0]):
        rows = sequences[example * per_example : (example + 1) * per_example, 1:].tolist()
        candidates.append([row[: row.index(eos) + 1] if eos in row else row for row in rows])
    totals = torch.cat(score_candidates(model, encoder_outputs, attention_mask, candidates, bos, pad, trie=trie))
    lengths = torch.tensor([len(c) for cands in candidates for c in cands], device=totals.device, dtype=totals.dtype)
    return totals / lengths**length_penalty


def decode_closed_sets(
    model: Any,
    encoder_outputs: Any,
    attention_mask: torch.Tensor,
    sequence_sets: Sequence[Sequence[Sequence[int]]],
    ids: tuple[int, int, int],
    vocab_size: int,
    options: DecodingOptions,
) -> list[list[Hypothesis]]:
    """Generate within per-example closed sets of token sequences (each ending in </s>)."""
    bos, eos, pad = ids
    table, example_sets = build_trie_table(sequence_sets, eos, vocab_size, attention_mask.device)
    processor = TrieLogitsProcessor(table, table.roots[torch.tensor(example_sets, device=attention_mask.device)])
    members = [{tuple(s[:-1]) for s in sequences} for sequences in sequence_sets]
    length_penalty = 0.0 if options.length_penalty is None else options.length_penalty
    return run_generate(
        model,
        encoder_outputs,
        attention_mask,
        processor,
        table.max_length,
        options,
        ids,
        length_penalty,
        keep=lambda example, generated: tuple(generated) in members[example],
    )


def _range_mask(size: int, allowed: range | Sequence[int]) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    if isinstance(allowed, range):
        mask[allowed.start : allowed.stop] = True
    else:
        mask[list(allowed)] = True
    return mask


def decode_span(
    model: Any,
    encoder_outputs: Any,
    attention_mask: torch.Tensor,
    allowed: range,
    count: int,
    ids: tuple[int, int, int],
    vocab_size: int,
    options: DecodingOptions,
    unconditional: tuple[Any, torch.Tensor] | None = None,
) -> list[list[Hypothesis]]:
    """Generate exactly `count` tokens from `allowed`, then </s> (boxes: the bin range; images: the codes)."""
    bos, eos, pad = ids
    processor = SpanLogitsProcessor(_range_mask(vocab_size, allowed), _range_mask(vocab_size, [eos]), count)
    length_penalty = 0.0 if options.length_penalty is None else options.length_penalty
    return run_generate(
        model,
        encoder_outputs,
        attention_mask,
        processor,
        count + 1,
        options,
        ids,
        length_penalty,
        keep=lambda example, generated: len(generated) == count and all(t in allowed for t in generated),
        unconditional=unconditional,
    )


def decode_free_text(
    model: Any,
    encoder_outputs: Any,
    attention_mask: torch.Tensor,
    text_ids: range,
    max_new_tokens: int,
    ids: tuple[int, int, int],
    vocab_size: int,
    options: DecodingOptions,
) -> list[list[Hypothesis]]:
    """Text tokens (pad and the start token excluded) until </s> or `max_new_tokens` tokens."""
    bos, eos, pad = ids
    text = _range_mask(vocab_size, text_ids)
    text[[bos, pad]] = False
    text[eos] = True
    processor = SpanLogitsProcessor(text, text, 0)
    length_penalty = 1.0 if options.length_penalty is None else options.length_penalty
    return run_generate(model, encoder_outputs, attention_mask, processor, max_new_tokens, options, ids, length_penalty)


def answer_sequences(answers: Sequence[str], vocab: Any) -> tuple[tuple[int, ...], ...]:
    """Answers as token sequences + </s>, encoded as the tasks encode targets (`encode_text(answer) + [eos]`)."""
    return _answer_sequences(tuple(answers), vocab)


@functools.lru_cache(maxsize=32)
def _answer_sequences(answers: tuple[str, ...], vocab: Any) -> tuple[tuple[int, ...], ...]:
    return tuple((*vocab.encode_text(a), vocab.eos_id) for a in answers)


def generate(
    model: Any,
    encoder_outputs: Any,
    attention_mask: torch.Tensor,
    constraints: Sequence[Constraint],
    vocab: Any,
    options: DecodingOptions | None = None,
    unconditional: tuple[Any, torch.Tensor] | None = None,
) -> list[list[Hypothesis]]:
    """Decode a batch whose examples share one constraint kind (answer sets may differ per example).

    encoder_outputs / attention_mask: from `encode_batch` (B examples). Returns, per example, up to
    `options.num_return` (beam search) or `options.samples` (sampling) hypotheses, best first. Guided
    decoding (`options.guidance_scale`) takes `unconditional`, the `encode_batch` output of the unconditional
    prompt (1 or B rows), and applies to spans (text-to-image codes)."""
    options = options or DecodingOptions()
    kinds = {type(c) for c in constraints}
    if len(kinds) != 1:
        raise ValueError(f"generate: one constraint kind per call, got {sorted(k.__name__ for k in kinds)}")
    if len(constraints) != attention_mask.shape[0]:
        raise ValueError(f"generate: {len(constraints)} constraints for a batch of {attention_mask.shape[0]}")
    ids = (vocab.bos_id, vocab.eos_id, vocab.pad_id)
    first = constraints[0]
    if options.guided and not isinstance(first, (ExactBins, ExactCodes)):
        raise ValueError(f"generate: guidance_scale applies to spans (text-to-image codes), not {type(first).__name__}")
    if isinstance(first, AnswerSet):
        sets = [answer_sequences(c.answers, vocab) for c in constraints]
        return decode_closed_sets(model, encoder_outputs, attention_mask, sets, ids, vocab.size, options)
    if isinstance(first, (ExactBins, ExactCodes)):
        counts = {c.count for c in constraints}
        if len(counts) != 1:
            raise ValueError(f"generate: one span length per call, got {sorted(counts)}")
        allowed = vocab.bin_range if isinstance(first, ExactBins) else vocab.code_range
        if len(allowed) == 0:
            raise ValueError(f"generate: the vocabulary has no tokens for {type(first).__name__} ({vocab!r})")
        return decode_span(
            model, encoder_outputs, attention_mask, allowed, first.count, ids, vocab.size, options, unconditional
        )
    if isinstance(first, FreeText):
        budget = options.max_new_tokens or max(c.max_new_tokens for c in constraints)
        return decode_free_text(
            model, encoder_outputs, attention_mask, vocab.text_range, budget, ids, vocab.size, options
        )
    raise TypeError(f"generate: unknown constraint {first!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Exhaustive scoring
# ---------------------------------------------------------------------------------------------------------------------


def score_candidates(
    model: Any,
    encoder_outputs: Any,
    attention_mask: torch.Tensor,
    candidates: Sequence[Sequence[Sequence[int]]],
    decoder_start_id: int,
    pad_id: int,
    chunk_tokens: int = 8192,
    trie: tuple[TrieTable, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Teacher-forced log-likelihood of every candidate (token ids ending in </s>) of every example.

    The encoder states are reused: each (example, candidate) pair selects its example's states, and the
    pairs run through the decoder in chunks of about `chunk_tokens` target tokens (the (n, T, V) logits of
    a chunk are the memory peak). With `trie` = (table, (B,) root per example) each step's log-probabilities
    are renormalized over the tokens the example's trie allows after the candidate's prefix, as
    TrieLogitsProcessor scores them. Returns per example a (n_i,) float tensor."""
    hidden = encoder_states(encoder_outputs)
    device = hidden.device
    pairs = [(example, list(c)) for example, cands in enumerate(candidates) for c in cands]
    scores = torch.empty(len(pairs), device=device)
    if not pairs:
        return list(scores.split([len(c) for c in candidates]))
    chunk_size = max(1, chunk_tokens // max(len(c) for _, c in pairs))
    for start in range(0, len(pairs), chunk_size):
        chunk = pairs[start : start + chunk_size]
        length = max(len(c) for _, c in chunk)
        labels = torch.full((len(chunk), length), -100, dtype=torch.long)
        for row, (_, c) in enumerate(chunk):
            labels[row, : len(c)] = torch.tensor(c)
        labels = labels.to(device)
        decoder_input_ids = torch.cat([labels.new_full((len(chunk), 1), decoder_start_id), labels[:, :-1]], dim=1)
        decoder_input_ids = decoder_input_ids.masked_fill(decoder_input_ids.eq(-100), pad_id)
        rows = torch.tensor([example for example, _ in chunk], device=device)
        with torch.no_grad():
            logits = model(
                encoder_outputs=BaseModelOutput(last_hidden_state=hidden.index_select(0, rows)),
                attention_mask=attention_mask.index_select(0, rows),
                decoder_input_ids=decoder_input_ids,
                use_cache=False,
            ).logits.float()  # (n, T, V)
        valid = labels.ne(-100)
        if trie is None:
            picked = logits.gather(-1, labels.clamp(min=0)[..., None])[..., 0] - logits.logsumexp(-1)  # (n, T)
        else:
            picked = _trie_log_probs(trie[0], trie[1].index_select(0, rows), logits, labels.clamp(min=0))
        scores[start : start + len(chunk)] = torch.where(valid, picked, torch.zeros_like(picked)).sum(-1)
    return list(scores.split([len(c) for c in candidates]))


def _trie_log_probs(table: TrieTable, roots: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(n, T) log-probability of each label renormalized over what the trie allows after the labels before it
    (-inf for a label the trie does not allow); roots (n,), logits (n, T, V), labels (n, T)."""
    n, length = labels.shape
    nodes = [roots]
    for t in range(1, length):
        nodes.append(table.step(nodes[-1], labels[:, t - 1]))
    log_probs = table.log_probs(torch.stack(nodes, 1), logits)  # (n, T, C)
    column = torch.full((logits.shape[-1],), -1, dtype=torch.long, device=logits.device)
    column[table.columns] = torch.arange(len(table.columns), device=logits.device)
    label_columns = column[labels]  # (n, T), -1 for a token no sequence of the table uses
    picked = log_probs.gather(-1, label_columns.clamp(min=0)[..., None])[..., 0]
    return torch.where(label_columns.ge(0), picked, torch.full_like(picked, NEG_INF))


def rank_answers(
    model: Any,
    encoder_outputs: Any,
    attention_mask: torch.Tensor,
    answer_sets: Sequence[Sequence[str]],
    vocab: Any,
    top_k: int = 1,
) -> list[list[tuple[str, float]]]:
    """Exhaustive scoring of closed answer sets (OFA's most accurate VQA mode): per example the `top_k`
    answers with their log-likelihoods within the set, best first."""
    sequences = [answer_sequences(answers, vocab) for answers in answer_sets]
    table, example_sets = build_trie_table(sequences, vocab.eos_id, vocab.size, attention_mask.device)
    roots = table.roots[torch.tensor(example_sets, device=attention_mask.device)]
    scores = score_candidates(
        model, encoder_outputs, attention_mask, sequences, vocab.bos_id, vocab.pad_id, trie=(table, roots)
    )
    ranked = []
    for answers, example_scores in zip(answer_sets, scores, strict=True):
        values, order = example_scores.topk(min(top_k, len(answers)))
        ranked.append([(answers[i], float(v)) for v, i in zip(values.tolist(), order.tolist(), strict=True)])
    return ranked


def target_log_likelihoods(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) teacher-forced log-likelihood of each example's `labels` (a collated batch)."""
    encoder_outputs, attention_mask = encode_batch(model, batch)
    labels = batch["labels"]
    candidates = [[row[row.ne(-100)].tolist()] for row in labels]
    decoder_start = int(batch["decoder_input_ids"][0, 0])
    pad = int(getattr(model.config, "pad_token_id", None) or 0)
    scores = score_candidates(model, encoder_outputs, attention_mask, candidates, decoder_start, pad)
    return torch.stack([s[0] for s in scores])


def rerank_images_by_caption(
    model: Any, collator: Any, caption_task: Any, images: Sequence[Any], captions: Sequence[str], device: Any = None
) -> torch.Tensor:
    """Text-to-image reranking in the captioning direction: (N,) log p(caption | generated image) under the
    model's own caption prompt, one per (image, caption) pair (CLIP-free, as OFA reranks with its own model)."""
    from unifier.data.records import CaptionRecord

    examples = [
        caption_task.example(CaptionRecord(image_id=i, image=image, captions=(caption,)))
        for i, (image, caption) in enumerate(zip(images, captions, strict=True))
    ]
    batch = collator(examples)
    batch = batch.to(device) if device is not None else batch
    with torch.no_grad():
        return target_log_likelihoods(model, batch)
