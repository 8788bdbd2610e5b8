"""The field's standard metrics for the six tasks, and per-task accumulators that sum over processes.

    caption          CIDEr (pycocoevalcap's `Cider`, which is CIDEr-D: clipped counts and a length
                     penalty) and BLEU-1..4 (pycocoevalcap's `Bleu`) over PTB-tokenized texts; on the
                     shapes world also object-set accuracy (the caption parsed back into its objects)
    vqa              VQA accuracy with the official answer normalization: for each of the ten human
                     answers, min(1, matches among the other nine / 3), averaged over the ten
    grounding        Acc@0.5: IoU of the predicted and the true box >= 0.5 (and the mean IoU)
    region_caption   exact match against any reference phrase
    entailment       accuracy
    text_to_image    on the shapes world: the pixel parser's exact-scene and attribute accuracies

Every accumulator keeps sums (and, for the corpus-level caption metrics, the tokenized texts), so
several processes can each score their shard, merge their states and only then divide:

    metric = build_metric("vqa")
    row = metric.add(record, output)          # per-example facts for the results file
    state = metric.state()                    # picklable; gather it from every process
    totals = merge_states("vqa", states)      # sums added, lists concatenated
    figures = compute_metrics("vqa", totals)  # {"vqa_accuracy": 0.71, "count": 1000, ...}
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------
# Caption metrics: CIDEr-D and BLEU through pycocoevalcap
# ---------------------------------------------------------------------------------------------

PTB_JAVA = "ptb-java (pycocoevalcap PTBTokenizer, Stanford CoreNLP 3.4.1)"
PTB_PYTHON = "ptb-python (lowercase, PTB-style splitting, punctuation removed; used when Java is absent)"

# The tokens pycocoevalcap drops after PTB tokenization (its -LRB- style entries never match: the
# tokenizer runs with -lowerCase, so brackets survive as -lrb-; the Python version keeps that quirk).
_PTB_DROPPED = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'}  # '"' is PTB's `` / ''
# Words whose final period PTB keeps (a small, common subset of CoreNLP's abbreviation list).
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "no", "etc", "vs", "jr", "sr", "prof", "inc", "ltd", "co", "mt"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SPLIT_WORDS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"], "wanna": ["wan", "na"]}
_CLITIC = re.compile(r"^([a-z]+?)(n't|'s|'m|'re|'ve|'ll|'d)$")
# Marks PTB always splits off; commas and colons only outside numbers ("1,000", "3:30").
_SPLIT_PUNCT = re.compile(r"(\.\.\.|--|[;?!\"()\[\]{}+=$%]|(?<!\d),|,(?!\d)|(?<!\d):|:(?!\d))")


def _ptb_word(chunk: str) -> list[str]:
    if chunk.endswith(".") and len(chunk) > 1:
        stem = chunk[:-1]
        # PTB keeps the period of abbreviations ("u.s.", "mr.") and splits it off plain words.
        if "." in stem or stem in _ABBREVIATIONS:
            return [chunk]
        return [*_ptb_word(stem), "."]
    if chunk in _SPLIT_WORDS:
        return _SPLIT_WORDS[chunk]
    match = _CLITIC.match(chunk)
    if match:
        return [match.group(1), match.group(2)]
    if len(chunk) > 1 and chunk.endswith("'"):
        return [chunk[:-1], "'"]  # a plural possessive: "cats'" -> cats '
    return [_BRACKETS.get(chunk, chunk)]


def _ptb_python_line(text: str) -> str:
    """One caption tokenized like Stanford's PTBTokenizer(-lowerCase) followed by pycocoevalcap's
    punctuation removal, closely enough for captions (hand-written because no PTB tokenizer ships
    in Python without a large NLP dependency; a test compares it with the Java one on typical captions)."""
    chunks = _SPLIT_PUNCT.sub(r" \1 ", " ".join(text.lower().split())).split()
    tokens: list[str] = []
    for chunk in chunks:
        if chunk in ("!", "?") and tokens and set(tokens[-1]) <= {"!", "?"}:
            tokens[-1] += chunk  # PTB keeps runs like "!!" as one token
            continue
        tokens += _ptb_word(chunk)
    return " ".join(t for t in tokens if t not in _PTB_DROPPED)


def java_available() -> bool:
    """Java on PATH and the Stanford CoreNLP jar that pycocoevalcap's PTBTokenizer runs (a trimmed install lacks it)."""
    if shutil.which("java") is None:
        return False
    try:
        from pycocoevalcap.tokenizer import ptbtokenizer
    except ImportError:
        return False
    return (Path(ptbtokenizer.__file__).parent / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR).is_file()


def tokenize_captions(captions: dict[Any, list[str]], use_java: bool | None = None) -> tuple[dict[Any, list[str]], str]:
    """PTB-tokenize {key: [caption, ...]} -> ({key: [tokenized, ...]}, tokenizer description).

    Java's PTBTokenizer (pycocoevalcap's own, the reference) when `java` is on PATH, else the
    pure-Python approximation; `use_java` forces one or the other."""
    use_java = java_available() if use_java is None else use_java
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        wrapped = {key: [{"caption": c} for c in texts] for key, texts in captions.items()}
        try:
            tokenized = PTBTokenizer().tokenize(wrapped)
        except (OSError, subprocess.SubprocessError):
            tokenized = {}
        # PTBTokenizer ignores Java's exit status: a Java that cannot run the jar leaves captions untokenized. Then
        # fall back, and the returned name says so.
        if all(len(tokenized.get(key, ())) == len(texts) for key, texts in captions.items()):
            return tokenized, PTB_JAVA
    return {key: [_ptb_python_line(c) for c in texts] for key, texts in captions.items()}, PTB_PYTHON


def caption_scores(
    predictions: dict[Any, str], references: dict[Any, Sequence[str]], use_java: bool | None = None
) -> dict[str, Any]:
    """Corpus CIDEr-D and BLEU-1..4 of one predicted caption per key against its references.

    Returns {"CIDEr", "BLEU-1", ..., "BLEU-4", "tokenizer"}; scores on pycocoevalcap's 0..10 (CIDEr)
    and 0..1 (BLEU) scales."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if set(predictions) != set(references):
        raise ValueError("caption_scores: predictions and references must have the same keys")
    if not predictions:
        return {"CIDEr": 0.0, "BLEU-1": 0.0, "BLEU-2": 0.0, "BLEU-3": 0.0, "BLEU-4": 0.0, "tokenizer": None}
    # One tokenizer call for both sides (one Java start); keys are made unique per side.
    joined = {("res", k): [v] for k, v in predictions.items()}
    joined.update({("gts", k): list(v) for k, v in references.items()})
    tokenized, tokenizer = tokenize_captions(joined, use_java)
    res = {k: tokenized[("res", k)] for k in predictions}
    gts = {k: tokenized[("gts", k)] for k in predictions}
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {
        "CIDEr": float(cider),
        **{f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)},
        "tokenizer": tokenizer,
    }


# ---------------------------------------------------------------------------------------------
# VQA accuracy with the official answer normalization (GT-Vision-Lab/VQA, vqaEval.py)
# ---------------------------------------------------------------------------------------------

# Characters the official evaluation deletes (next to a space, or in "1,000"-like answers) or
# otherwise turns into a space; the period has its own rule.
_VQA_PUNCT = (";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_", ">", "<", "@", "`", ",", "?")
_VQA_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_VQA_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("3.5" keeps its period)
_VQA_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_VQA_ARTICLES = {"a", "an", "the"}
# Common English contractions; an answer typed without its apostrophes ("dont") is mapped to the
# contracted form ("don't"), as the official evaluation does (and, like it, not "im", "lets" or "shes").
_CONTRACTED_FORMS = (  # noqa: SIM905 (a word list reads better as one string)
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've "
    "mustn't must've needn't not've o'clock oughtn't shan't she'd've should've shouldn't shouldn't've "
    "somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd "
    "something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll they're "
    "they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's "
    "where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've "
    "y'all you'd you'd've you'll you're you've"
).split()
_VQA_CONTRACTIONS = {form.replace("'", ""): form for form in _CONTRACTED_FORMS}


def _vqa_punctuation(text: str) -> str:
    out = text
    digit_comma = _VQA_DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _VQA_PUNCT:
        # The official rule looks at the original text to choose between deleting and spacing.
        delete = f"{mark} " in text or f" {mark}" in text or digit_comma
        out = out.replace(mark, "" if delete else " ")
    return _VQA_PERIOD.sub("", out)


def normalize_vqa_answer(answer: str) -> str:
    """The official VQA answer normalization: whitespace, punctuation, lowercase, number words to
    digits, articles removed, contractions restored. "Two." -> "2", "the dog" -> "dog", "dont" -> "don't"."""
    text = _vqa_punctuation(answer.replace("\n", " ").replace("\t", " ").strip())
    words = [_VQA_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [_VQA_CONTRACTIONS.get(w, w) for w in words if w not in _VQA_ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """One question's VQA accuracy: the mean over the human answers of min(1, #matches among the
    other answers / 3), with both sides normalized.

    The official tool normalizes only the prediction fully (VQAv2's answers were normalized when
    collected); normalizing both sides the same way gives the same figure there and also scores data
    whose answers are words ("two"). With a single reference answer the leave-one-out rule is
    undefined, so the score is plain exact match."""
    if not answers:
        raise ValueError("vqa_accuracy: a question needs at least one reference answer")
    predicted = normalize_vqa_answer(prediction)
    normalized = [normalize_vqa_answer(a) for a in answers]
    if len(normalized) == 1:
        return float(predicted == normalized[0])
    matches = sum(a == predicted for a in normalized)
    # Leaving out answer i removes one match exactly when answer i itself matches.
    scores = [min(1.0, (matches - (a == predicted)) / 3) for a in normalized]
    return sum(scores) / len(scores)


# ---------------------------------------------------------------------------------------------
# Boxes
# ---------------------------------------------------------------------------------------------


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x0, y0, x1, y1) pixel boxes, x1 / y1 exclusive (areas without COCO's old +1)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# Per-task accumulators
# ---------------------------------------------------------------------------------------------


def _shapes_objects(caption: str):
    from unifier.data.shapes_parser import parse_caption

    return parse_caption(caption)


# Metric keys holding `BREAKDOWN` are a headline figure split by some property of the examples ("vqa_accuracy/by_
# question_type/exist"): written to the metrics file, left out of one-line summaries.
BREAKDOWN = "/by_"


def headline_figures(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics without their breakdowns (VQAv2 has 65 question types): what a results table or a log line shows."""
    return {key: value for key, value in metrics.items() if BREAKDOWN not in key}


class Metric:
    """Sums of per-example scores; `add` returns the example's row for the public results file."""

    task: str = ""

    def __init__(self, **options: Any):
        self.options = options
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def _score(self, key: str, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.counts[key] = self.counts.get(key, 0) + 1

    def add(self, record: Any, output: Any) -> dict[str, Any]:
        raise TypeError(f"{type(self).__name__} is abstract: use build_metric(task)")

    def state(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}


def _merge_sums(states: Iterable[dict[str, Any]]) -> dict[str, Any]:
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    extra: dict[str, list] = {}
    for state in states:
        for key, value in state["sums"].items():
            sums[key] = sums.get(key, 0.0) + value
        for key, value in state["counts"].items():
            counts[key] = counts.get(key, 0) + value
        for key, value in state.items():
            if key not in ("sums", "counts"):
                extra.setdefault(key, []).extend(value)
    return {"sums": sums, "counts": counts, **extra}


def _means(state: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {key: state["sums"][key] / state["counts"][key] for key in sorted(state["sums"])}
    out["count"] = max(state["counts"].values(), default=0)
    return out


class CaptionMetric(Metric):
    """CIDEr-D / BLEU over the corpus (texts are kept, since CIDEr's idf needs every reference);
    object-set accuracy on the shapes world, where every reference parses into objects."""

    task = "caption"

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.pairs: list[tuple[Any, str, tuple[str, ...]]] = []

    def add(self, record, output) -> dict[str, Any]:
        caption = output.text
        self.pairs.append((record.image_id, caption, tuple(record.captions)))
        expected = _shapes_objects(record.captions[0]) if record.captions else None
        row: dict[str, Any] = {"image_id": record.image_id, "caption": caption}
        if expected is not None:
            correct = _shapes_objects(caption) == expected
            self._score("object_set_accuracy", correct)
            row["objects_correct"] = correct
        return row

    def state(self) -> dict[str, Any]:
        return {**super().state(), "pairs": list(self.pairs)}


def _caption_figures(state: dict[str, Any], use_java: bool | None = None) -> dict[str, Any]:
    # Several captions of one image id (duplicates across records) are scored once, as COCO does.
    predictions, references = {}, {}
    for image_id, caption, refs in state.get("pairs", []):
        predictions[image_id] = caption
        references[image_id] = refs
    figures = caption_scores(predictions, references, use_java)
    figures["count"] = len(predictions)
    if state["counts"].get("object_set_accuracy"):
        figures["object_set_accuracy"] = state["sums"]["object_set_accuracy"] / state["counts"]["object_set_accuracy"]
    return figures


class VqaMetric(Metric):
    task = "vqa"

    def add(self, record, output) -> dict[str, Any]:
        answers = record.answers or (record.answer,)
        score = vqa_accuracy(output.text, answers)
        self._score("vqa_accuracy", score)
        if record.answer_type:
            self._score(f"vqa_accuracy/{record.answer_type}", score)
        if record.question_type:
            self._score(f"vqa_accuracy{BREAKDOWN}question_type/{record.question_type}", score)
        return {"question_id": record.question_id, "answer": output.text}


class GroundingMetric(Metric):
    task = "grounding"

    def add(self, record, output) -> dict[str, Any]:
        iou = box_iou(output.box, record.box)
        self._score("acc@0.5", iou >= 0.5)
        self._score("mean_iou", iou)
        return {
            "ref_id": record.ref_id,
            "image_id": record.image_id,
            "expression": record.expression,
            "box": [round(float(v), 2) for v in output.box],
            "iou": round(iou, 4),
        }


class RegionCaptionMetric(Metric):
    task = "region_caption"

    def add(self, record, output) -> dict[str, Any]:
        text = " ".join(output.text.lower().split())
        correct = any(text == " ".join(p.lower().split()) for p in record.phrases)
        self._score("exact_match", correct)
        return {
            "ref_id": record.ref_id,
            "image_id": record.image_id,
            "box": [round(float(v), 2) for v in record.box],
            "caption": output.text,
            "references": list(record.phrases),
        }


class EntailmentMetric(Metric):
    task = "entailment"

    def add(self, record, output) -> dict[str, Any]:
        from unifier.data.records import SNLI_VE_LABEL_TO_ANSWER

        answer_to_label = {a: label for label, a in SNLI_VE_LABEL_TO_ANSWER.items()}
        gold = SNLI_VE_LABEL_TO_ANSWER.get(record.label, record.label)  # records may hold either form
        gold_label = answer_to_label.get(gold, gold)
        predicted = output.text.strip().lower()
        correct = predicted == gold
        self._score("accuracy", correct)
        # By gold label (SNLI-VE's names) and by template: a model that answers from the hypothesis's wording alone
        # (the shapes world's "maybe" predicates, or "no" to every existence claim) shows there and not in the mean.
        self._score(f"accuracy{BREAKDOWN}label/{gold_label}", correct)
        if record.hypothesis_type:
            self._score(f"accuracy{BREAKDOWN}hypothesis_type/{record.hypothesis_type}", correct)
        return {
            "pairID": record.pair_id,
            "image_id": record.image_id,
            "hypothesis": record.hypothesis,
            "answer": predicted,
            "predicted_label": answer_to_label.get(predicted, predicted),
            "gold_label": gold_label,
        }


class TextToImageMetric(Metric):
    """On the shapes world (the caption parses into objects): the pixel parser reads the generated
    image; exact-scene accuracy and attribute accuracy against the caption's objects."""

    task = "text_to_image"

    def add(self, record, output) -> dict[str, Any]:
        import numpy as np

        from unifier.data.shapes_parser import attribute_accuracy, parse_scene, scene_matches

        row: dict[str, Any] = {"uid": record.uid, "caption": record.caption, "codes": len(output.codes)}
        if output.rerank_score is not None:
            row["rerank_score"] = float(output.rerank_score)
        expected = _shapes_objects(record.caption)
        if expected is not None:
            # No image (nothing decodable) scores as an empty scene: every attribute missed.
            parsed = parse_scene(np.asarray(output.image.convert("RGB"))) if output.image is not None else []
            self._score("exact_scene_accuracy", scene_matches(parsed, expected))
            self._score("attribute_accuracy", attribute_accuracy(parsed, expected))
            row["parsed_scene"] = [" ".join(obj) for obj in parsed]
        return row


METRICS: dict[str, type[Metric]] = {
    cls.task: cls
    for cls in (CaptionMetric, VqaMetric, GroundingMetric, RegionCaptionMetric, EntailmentMetric, TextToImageMetric)
}


def build_metric(task: str, **options: Any) -> Metric:
    if task not in METRICS:
        raise KeyError(f"no metric for task '{task}'; known: {', '.join(METRICS)}")
    return METRICS[task](**options)


def merge_states(states: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Add the sums and concatenate the kept texts of several accumulators' states (one per process)."""
    return _merge_sums(states)


def compute_metrics(task: str, state: dict[str, Any], use_java: bool | None = None) -> dict[str, Any]:
    """Divide the merged sums: {metric name: value, "count": examples}; caption adds CIDEr / BLEU."""
    if task not in METRICS:
        raise KeyError(f"no metric for task '{task}'; known: {', '.join(METRICS)}")
    if task == "caption":
        return _caption_figures(state, use_java)
    figures = _means(state)
    return {k: (v if isinstance(v, int) or not math.isnan(v) else None) for k, v in figures.items()}
