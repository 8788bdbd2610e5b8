"""`unifier predict --model DIR --image IMG --prompt "..." [--task T] [--beams N] [--samples N] [--out PATH]`

Prompt-style inference for every task. The task is recognised from the prompt's template (OFA's prompts,
design.md), or named with `--task` / `task=`:

    " what does the image describe?"                                  caption        -> text
    " which region does the text \" X \" describe?"                   grounding      -> box (input pixels)
    " what does the region describe? region: x0,y0,x1,y1"             region_caption -> text (or box=...)
    " does the image describe \" X \"?"                               entailment     -> yes / no / maybe
    " what is the complete image? caption: X"                         text_to_image  -> image (no image input)
    any other prompt with an image                                    vqa when the model's vqa task has an
                                                                      answer set (trie-constrained), else free
    any other prompt without an image                                 free text

    from unifier import Unifier
    model = Unifier.from_pretrained("runs/shapes-tiny/model")
    model.predict(image="scene.png", prompt=" what color is the small circle?")     # TextOutput("red", score)
    model.predict(image=pil, prompt=' which region does the text " red circle " describe?')  # BoxOutput
    model.predict(prompt=" what is the complete image? caption: a small red circle", samples=4)  # [ImageOutput]

Options left unset decode each task as the model's run evaluated it (the model folder's decoding.json, written by
train.py from the task files' `decoding:`): greedy VQA, 3-beam captions, text-to-image's best of 4 samples at
top_k 32 for the shapes model. A list of prompts (and images) is a batch: the result is a list. Errors are
`PredictError`s (ValueError) with a one-line message; the CLI prints it and exits with code 2 before writing anything.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unifier.tasks.base import AnswerSet, BoxOutput, ExactCodes, Example, FreeText, ImageOutput, Output, TextOutput

TASK_NAMES = ("caption", "vqa", "grounding", "region_caption", "entailment", "text_to_image")
FREE = "free"  # a prompt of no task: decoded as unconstrained text
TASKS_FILE = "tasks.json"  # in a model folder: {task kind: options} the model was trained with
# In a model folder: {task kind: `decoding:` mapping} the run evaluated each task with (its task file's, with the
# run's eval_decoding over it), so that predict, the demo and the gallery decode as the reported figures were.
DECODING_FILE = "decoding.json"
DEFAULT_BATCH_SIZE = 16
FREE_TEXT_TOKENS = 32


class PredictError(ValueError):
    """A request predict cannot answer (bad image, prompt, task or option); the message is one line."""


# ---------------------------------------------------------------------------------------------------------------------
# Recognising a prompt
# ---------------------------------------------------------------------------------------------------------------------

_NUMBER = r"[-+]?\d+(?:\.\d*)?"
_PIXEL_BOX = re.compile(rf"^\(?\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)?$")
_BIN_BOX = re.compile(r"^<bin_(\d+)>\s*<bin_(\d+)>\s*<bin_(\d+)>\s*<bin_(\d+)>$")
# (task, pattern over the normalized prompt, name of the captured field); first match wins.
_TEMPLATES: tuple[tuple[str, re.Pattern, str | None], ...] = (
    ("caption", re.compile(r"^what does the image describe\s*\??$", re.I), None),
    ("grounding", re.compile(r'^which region does the text\s*"\s*(.+?)\s*"\s*describe\s*\??$', re.I), "expression"),
    ("region_caption", re.compile(r"^what does the region describe\s*\?\s*(?:region\s*:?\s*(.*))?$", re.I), "region"),
    ("entailment", re.compile(r'^does the image describe\s*"\s*(.+?)\s*"\s*\??$', re.I), "hypothesis"),
    ("text_to_image", re.compile(r"^what is the complete image\s*\?\s*caption\s*:\s*(.+)$", re.I), "caption"),
)
# The field a task takes from a prompt that does not follow its template (task named explicitly).
_PLAIN_FIELD = {
    "vqa": "question",
    "grounding": "expression",
    "entailment": "hypothesis",
    "text_to_image": "caption",
    "region_caption": "region",
}


def recognise_prompt(prompt: str) -> tuple[str | None, dict[str, str]]:
    """(task, fields) of a prompt that follows one of the task templates, else (None, {})."""
    text = " ".join(prompt.split())
    for task, pattern, name in _TEMPLATES:
        match = pattern.match(text)
        if match:
            value = (match.group(1) or "").strip() if name else None
            return task, ({name: value} if name else {})
    return None, {}


def prompt_fields(task: str, prompt: str) -> dict[str, str]:
    """The fields of `prompt` for a task named explicitly: its template's, or the whole prompt as the field."""
    recognised, fields = recognise_prompt(prompt)
    if recognised == task:
        return fields
    text = " ".join(prompt.split())
    return {_PLAIN_FIELD[task]: text} if task in _PLAIN_FIELD else {}


def parse_region(text: str, vocab: Any, width: int, height: int) -> tuple[float, float, float, float] | None:
    """A region written in a prompt: `x0,y0,x1,y1` pixels or 4 `<bin_i>` tokens -> a pixel box; "" -> None."""
    text = text.strip()
    if not text:
        return None
    match = _PIXEL_BOX.match(text)
    if match:
        return tuple(float(v) for v in match.groups())
    match = _BIN_BOX.match(text)
    if match:
        bins = [int(v) for v in match.groups()]
        if any(b >= vocab.num_bins for b in bins):
            raise PredictError(f"region {text!r}: the model has {vocab.num_bins} bins (0 .. {vocab.num_bins - 1})")
        return vocab.bins_to_box(bins, width, height)
    raise PredictError(f"region {text!r}: write it as x0,y0,x1,y1 in pixels (or as 4 <bin_i> tokens)")


# ---------------------------------------------------------------------------------------------------------------------
# The model wrapper
# ---------------------------------------------------------------------------------------------------------------------


def inference_example(task: Any, record: Any, image: Any = None) -> Example:
    """A record serialized for decoding: the task's own prompt_ids and meta (as in training, so the two cannot
    drift) without computing a target (text-to-image would encode the true image for nothing)."""
    return Example(
        task=task.name,
        prompt_ids=task.prompt_ids(record),
        image=(image if image is not None else getattr(record, "image", None)) if task.has_image_input else None,
        target_ids=[task.vocab.eos_id],
        record=record,
        meta=task.meta(record),
    )


@dataclass
class Request:
    """One prompt made ready for the model: its task, the task's record and the serialized example."""

    task: str
    example: Example
    fields: dict[str, Any] = field(default_factory=dict)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _read_per_task(path: Path) -> dict[str, dict[str, Any]]:
    """{task kind: {key: value}} from a model folder's JSON file ({} when the folder has none)."""
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PredictError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(content, dict) or not all(isinstance(v, dict) for v in content.values()):
        raise PredictError(f"{path}: expected {{task kind: {{key: value}}}}")
    unknown = sorted(set(content) - set(TASK_NAMES))
    if unknown:
        raise PredictError(f"{path}: unknown task kind(s) {unknown}; known: {', '.join(TASK_NAMES)}")
    return content


def _write_per_task(path: Path, content: dict[str, dict[str, Any]]) -> Path:
    """Write {task kind: {key: value}} as JSON via a temporary name, so a reader never sees half a file."""
    unknown = sorted(set(content) - set(TASK_NAMES))
    if unknown:
        raise ValueError(f"{path.name}: unknown task kind(s) {unknown}; known: {', '.join(TASK_NAMES)}")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_task_options(folder: str | Path) -> dict[str, dict[str, Any]]:
    """{task kind: options} from a model folder's tasks.json ({} when the folder has none)."""
    return _read_per_task(Path(folder) / TASKS_FILE)


def read_task_decoding(folder: str | Path) -> dict[str, dict[str, Any]]:
    """{task kind: `decoding:` mapping} from a model folder's decoding.json ({} when the folder has none)."""
    return _read_per_task(Path(folder) / DECODING_FILE)


def task_options_of(tasks: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """{task kind: its JSON-able options} of built task objects (answer sets as lists), for write_task_options."""
    out: dict[str, dict[str, Any]] = {}
    for task in tasks:
        options = {}
        for key, value in task.options.items():
            try:
                json.dumps(value)
            except TypeError:
                continue  # objects (an image tokenizer) are not options a folder can keep
            options[key] = value
        out[task.name] = options
    return out


def task_decoding_of(configs: Sequence[Any], overrides: dict[str, dict[str, Any]] | None = None) -> dict:
    """{task kind: `decoding:` mapping} of task configs, each with `overrides[config.name]` (DecodingOptions field
    names, as a train config's eval_decoding) over its file's decoding, for write_task_decoding."""
    from unifier.generation import decoding_mapping, task_decoding

    out = {}
    for config in configs:
        try:
            options, closed_set = task_decoding(config.decoding, **(overrides or {}).get(config.name, {}))
        except (TypeError, ValueError) as e:
            raise PredictError(f"{config.name}: decoding: {e}") from e
        out[config.kind] = decoding_mapping(options, closed_set)
    return out


def _configs_of_files(paths: Sequence[str | Path]) -> list[Any]:
    """The task configs of task files and / or mixture files (a mixture contributes each of its tasks)."""
    import yaml

    from unifier.tasks import load_mixture, load_task_config

    configs = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise PredictError(f"task file not found: {path}")
        content = yaml.safe_load(path.read_text())
        is_mixture = isinstance(content, dict) and "tasks" in content and "kind" not in content
        configs += [c for c, _ in load_mixture(path)] if is_mixture else [load_task_config(path)]
    return configs


def task_options_from_files(paths: Sequence[str | Path], tokenizer: Any) -> dict[str, dict[str, Any]]:
    """{task kind: options} of task files and / or mixture files (a mixture contributes each of its tasks)."""
    from unifier.tasks import build_task_from_config

    return task_options_of([build_task_from_config(config, tokenizer) for config in _configs_of_files(paths)])


def write_task_options(folder: str | Path, options: dict[str, dict[str, Any]]) -> Path:
    """Write {task kind: JSON-able options} (answer sets, max_new_tokens, ...) as the folder's tasks.json,
    so that predict and evaluate decode each task the way it was trained."""
    return _write_per_task(Path(folder) / TASKS_FILE, options)


def write_task_decoding(folder: str | Path, decoding: dict[str, dict[str, Any]]) -> Path:
    """Write {task kind: `decoding:` mapping} (task_decoding_of's) as the folder's decoding.json."""
    return _write_per_task(Path(folder) / DECODING_FILE, decoding)


class Unifier:
    """A model, its tokenizer and its six tasks, answering prompts (`predict`) and task examples (`run`).

    model: a UnifierForConditionalGeneration (anything with encode / generate / forward like it);
    tokenizer: a UnifierTokenizer (`.vocab`, `.image_tokenizer`) or a bare UnifierVocab (no images);
    task_options: {task kind: options} (e.g. {"vqa": {"answers": [...]}}), as in tasks/*.yaml `options`;
    task_decoding: {task kind: `decoding:` mapping} (e.g. {"vqa": {"num_beams": 1}}), as in tasks/*.yaml
    `decoding`: how `predict` decodes a task when the call does not say (DecodingOptions' defaults otherwise);
    bf16: run the model and the VQ-GAN decoder under bf16 autocast (weights stay fp32), as a bf16-trained model was
    trained: on CPUs with bf16 instructions and on GPUs it decodes 1.6-2.4x faster (bench/evaluation.py); "auto"
    takes it where the device has bf16 in hardware (unifier.precision), and true on one that emulates it warns.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        task_options: dict[str, dict[str, Any]] | None = None,
        device: Any = None,
        task_decoding: dict[str, dict[str, Any]] | None = None,
        bf16: bool | str = False,
    ):
        import torch

        from unifier.batching import Collator
        from unifier.precision import resolve_bf16

        self.device = torch.device(device or _default_device())
        self.bf16 = resolve_bf16(bf16, self.device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.vocab = getattr(tokenizer, "vocab", tokenizer)
        self.image_tokenizer = getattr(tokenizer, "image_tokenizer", None)
        if self.image_tokenizer is not None:
            self.image_tokenizer = self.image_tokenizer.to(self.device).eval()
        config = model.config
        if config.vocab_size != self.vocab.size:
            raise PredictError(
                f"the model's vocabulary has {config.vocab_size} ids, its tokenizer {self.vocab.size}: "
                "they come from different builds"
            )
        self.image_size = int(getattr(config, "image_size", 0) or 0)
        num_patches = (self.image_size // config.patch_size) ** 2 if self.image_size else 0
        # The encoder's learned positions cover image patches + prompt tokens.
        self.max_prompt_tokens = int(config.max_position_embeddings) - num_patches
        self.max_target_tokens = int(config.max_position_embeddings) - 1
        self.task_options = {name: dict(opts) for name, opts in (task_options or {}).items()}
        self.task_decoding = {name: dict(decoding) for name, decoding in (task_decoding or {}).items()}
        for name in self.task_decoding:
            self.decoding(name)  # a bad decoding.json fails when the model loads, naming the task
        self._tasks: dict[str, Any] = {}
        self.collator = Collator(self.vocab, self.image_size or 1, task_names=[*TASK_NAMES, FREE])

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: Any = None,
        task_options: dict[str, dict[str, Any]] | None = None,
        task_files: Sequence[str | Path] = (),
        bf16: bool | str = False,
    ) -> Unifier:
        """Load a model folder (config.json, model.safetensors, tokenizer/, optional tasks.json and decoding.json).

        Task options come from tasks.json, then `task_files` (task or mixture YAML files: their `options`,
        answer files resolved), then `task_options`; each task's decoding from decoding.json, replaced by the
        `decoding:` of a task file given for it."""
        from unifier.modeling import UnifierForConditionalGeneration
        from unifier.tasks import build_task_from_config
        from unifier.tokenization import load_tokenizer

        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise PredictError(f"{folder}: not a model folder (no config.json)")
        if not (folder / "tokenizer").is_dir():
            raise PredictError(f"{folder}: the model folder has no tokenizer/ folder")
        model = UnifierForConditionalGeneration.from_pretrained(str(folder))
        tokenizer = load_tokenizer(folder / "tokenizer")
        configs = _configs_of_files(task_files)
        options = read_task_options(folder)
        options.update(task_options_of([build_task_from_config(config, tokenizer) for config in configs]))
        options.update(task_options or {})
        decoding = read_task_decoding(folder)
        decoding.update(task_decoding_of(configs))
        return cls(model, tokenizer, options, device=device, task_decoding=decoding, bf16=bf16)

    # ---- tasks ----------------------------------------------------------------------------------------------------
    def task(self, name: str) -> Any:
        """The task object of a kind, built once with the model's task options."""
        if name not in TASK_NAMES:
            raise PredictError(f"unknown task {name!r}; known tasks: {', '.join(TASK_NAMES)}")
        if name not in self._tasks:
            from unifier.tasks import build_task

            options = dict(self.task_options.get(name, {}))
            if name == "text_to_image":
                options.setdefault("image_tokenizer", self.image_tokenizer)
            self._tasks[name] = build_task(name, self.vocab, **options)
        return self._tasks[name]

    def decoding(self, task: str, **overrides: Any) -> tuple[Any, str]:
        """(DecodingOptions, closed-set mode) for a task kind (or "free"): the call's `overrides` (DecodingOptions
        field names and closed_set; None: not given) over the model's decoding of that task."""
        from unifier.generation import task_decoding

        try:
            return task_decoding(self.task_decoding.get(task), **overrides)
        except (TypeError, ValueError) as e:
            raise PredictError(f"{task} decoding: {e}") from e

    @property
    def vqa_has_answer_set(self) -> bool:
        return getattr(self.task("vqa"), "answers", None) is not None

    # ---- prompts -> examples ----------------------------------------------------------------------------------------
    def _load(self, image: Any):
        from unifier.images import load_image

        return load_image(image)  # ImageLoadError (a ValueError) names the file

    def request(self, prompt: str | None, image: Any = None, task: str | None = None, box: Any = None) -> Request:
        """Recognise (or take) the task of one prompt and serialize it with that task's own prompt_ids."""
        from unifier.data.records import (
            CaptionRecord,
            EntailmentRecord,
            GroundingRecord,
            RegionCaptionRecord,
            TextToImageRecord,
            VqaRecord,
        )

        prompt = "" if prompt is None else str(prompt)
        if task is not None and task not in TASK_NAMES:
            raise PredictError(f"unknown task {task!r}; known tasks: {', '.join(TASK_NAMES)}")
        if not prompt.strip() and task not in ("caption", "region_caption"):
            raise PredictError("the prompt is empty")
        if task is None:
            task, fields = recognise_prompt(prompt)
            if task is None:
                task = "vqa" if image is not None and self.vqa_has_answer_set else FREE
                fields = {"question": " ".join(prompt.split())}
        else:
            fields = prompt_fields(task, prompt)
        if task == "text_to_image" and image is not None:
            raise PredictError("a text-to-image prompt takes no image: leave the image out")
        needs_image = task not in ("text_to_image", FREE)
        if needs_image and image is None:
            raise PredictError(f"the {task} prompt needs an image")
        if box is not None and task != "region_caption":
            raise PredictError(f"a box is only used by region_caption prompts, not by {task}")
        pil = self._load(image) if image is not None else None
        width, height = pil.size if pil is not None else (0, 0)

        if task == FREE:
            example = Example(FREE, self.task("caption").encode_prompt(prompt), pil, [self.vocab.eos_id])
            return self._checked(Request(FREE, example, fields))
        if task == "caption":
            record = CaptionRecord(image_id=0, image=pil, captions=())
        elif task == "vqa":
            question = fields.get("question") or prompt
            record = VqaRecord(question_id=0, image_id=0, image=pil, question=question, answer="", answers=())
        elif task == "grounding":
            record = GroundingRecord(
                0, 0, pil, fields["expression"], (0.0, 0.0, float(width), float(height)), width, height
            )
        elif task == "region_caption":
            written = parse_region(fields.get("region", ""), self.vocab, width, height)
            if written is not None and box is not None:
                raise PredictError("the region is given twice: in the prompt and as box=")
            region = written if written is not None else box
            if region is None:
                raise PredictError("region_caption needs a region: 'region: x0,y0,x1,y1' in the prompt or box=")
            region = _as_box(region)
            from unifier.tokenization.vocab import BoxError

            try:
                self.vocab.box_to_bins(region, width, height)
            except BoxError as e:
                raise PredictError(f"region {region}: {e}") from e
            fields["box"] = region
            record = RegionCaptionRecord(0, 0, pil, region, width, height, phrases=())
        elif task == "entailment":
            record = EntailmentRecord(pair_id=0, image_id=0, image=pil, hypothesis=fields["hypothesis"], label="yes")
        else:
            record = TextToImageRecord(uid=0, caption=fields["caption"])
        example = inference_example(self.task(task), record, pil)
        return self._checked(Request(task, example, fields))

    def _checked(self, request: Request) -> Request:
        length = len(request.example.prompt_ids)
        if length > self.max_prompt_tokens:
            raise PredictError(
                f"the prompt is {length} tokens long; this model reads at most {self.max_prompt_tokens} "
                "(besides its image)"
            )
        return request

    def constraint(self, request: Request):
        if request.task == FREE:
            return FreeText(FREE_TEXT_TOKENS)
        return self.task(request.task).constraint(request.example.record)

    # ---- running examples ---------------------------------------------------------------------------------------
    def run(
        self,
        task: Any,
        examples: Sequence[Example],
        options: Any = None,
        closed_set: str = "beam",
        rerank: bool = True,
    ) -> list[list[Output]]:
        """Decode examples of one task (a task object, a task kind, or "free"): one batch. Per example its
        outputs, best first (one unless samples or num_return ask for more); closed_set "score" ranks an answer
        set exhaustively instead of beam search."""
        import torch

        # Autocast runs the matrix products and convolutions in bf16; softmaxes, scores and sampling cast the
        # logits to fp32 first (transformers' generate and generation.py), so they only see them rounded.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self._run(task, examples, options, closed_set, rerank)

    def _run(
        self, task: Any, examples: Sequence[Example], options: Any, closed_set: str, rerank: bool
    ) -> list[list[Output]]:
        import torch

        from unifier.generation import DecodingOptions, encode_batch, generate, rank_answers

        options = options or DecodingOptions()
        if not examples:
            return []
        task = self.task(task) if isinstance(task, str) and task != FREE else task
        constraints = [FreeText(FREE_TEXT_TOKENS) if task == FREE else task.constraint(e.record) for e in examples]
        batch = self.collator(list(examples)).to(self.device)
        with torch.no_grad():
            encoder_outputs, attention_mask = encode_batch(self.model, batch)
            if closed_set == "score" and isinstance(constraints[0], AnswerSet):
                top = max(1, options.num_return)
                ranked = rank_answers(
                    self.model, encoder_outputs, attention_mask, [c.answers for c in constraints], self.vocab, top
                )
                return [[TextOutput(answer, score) for answer, score in answers] for answers in ranked]
            if isinstance(constraints[0], ExactCodes) and constraints[0].count + 1 > self.max_target_tokens:
                raise PredictError(f"{constraints[0].count} image codes exceed the decoder's {self.max_target_tokens}")
            unconditional = self._unconditional(task) if options.guided else None
            hypotheses = generate(
                self.model, encoder_outputs, attention_mask, constraints, self.vocab, options, unconditional
            )
        found = [(h, example.meta) for example, hs in zip(examples, hypotheses, strict=True) for h in hs]
        if task == FREE:
            decoded = [TextOutput(self.vocab.decode_text(h.ids).strip()) for h, _ in found]
        else:  # all of them at once: text-to-image batches its VQ-GAN decoder
            decoded = task.decode_many([h.ids for h, _ in found], [meta for _, meta in found])
        for out, (h, _) in zip(decoded, found, strict=True):
            out.score = h.score
        rest = iter(decoded)
        outputs = [list(itertools.islice(rest, len(hs))) for hs in hypotheses]  # one list per example again
        if task != FREE and task.name == "text_to_image" and rerank and options.samples and options.samples > 1:
            self._rerank(examples, outputs)
        return outputs

    def _unconditional(self, task: Any) -> tuple[Any, Any]:
        """The encoder outputs and mask of `task`'s unconditional prompt (one row), for guided decoding."""
        from unifier.generation import encode_batch

        prompt_ids = None if task == FREE else task.unconditional_prompt_ids()
        if prompt_ids is None:
            name = FREE if task == FREE else task.name
            raise PredictError(f"guidance_scale: task {name} has no unconditional prompt (text_to_image has)")
        example = Example(task=task.name, prompt_ids=prompt_ids, image=None, target_ids=[self.vocab.eos_id])
        return encode_batch(self.model, self.collator([example]).to(self.device))

    def _rerank(self, examples: Sequence[Example], outputs: list[list[Output]]) -> None:
        """Order each example's generated images by log p(caption | image) under the caption prompt."""
        from unifier.generation import rerank_images_by_caption

        pairs = [
            (i, out) for i, outs in enumerate(outputs) for out in outs if isinstance(out, ImageOutput) and out.image
        ]
        if not pairs:
            return  # no image tokenizer: codes only, nothing to caption
        for start in range(0, len(pairs), DEFAULT_BATCH_SIZE):
            chunk = pairs[start : start + DEFAULT_BATCH_SIZE]
            scores = rerank_images_by_caption(
                self.model,
                self.collator,
                self.task("caption"),
                [out.image for _, out in chunk],
                [examples[i].record.caption for i, _ in chunk],
                self.device,
            )
            for (_, out), score in zip(chunk, scores.tolist(), strict=True):
                out.rerank_score = float(score)
        for outs in outputs:
            outs.sort(key=lambda o: -(o.rerank_score if o.rerank_score is not None else float("-inf")))

    # ---- the public call ----------------------------------------------------------------------------------------
    def predict(
        self,
        image: Any = None,
        prompt: str | Sequence[str] | None = None,
        task: str | None = None,
        box: Any = None,
        beams: int | None = None,
        samples: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        num_return: int | None = None,
        max_new_tokens: int | None = None,
        closed_set: str | None = None,
        rerank: bool = True,
        batch_size: int = DEFAULT_BATCH_SIZE,
        guidance_scale: float | None = None,
    ) -> Output | list:
        """Answer one prompt (an image path, PIL image or array; a string) or a batch (lists of the same length;
        a single image is shared by every prompt). Returns TextOutput / BoxOutput (pixels of the input image) /
        ImageOutput (PIL image + codes), each with `score` (log-likelihood); a list of outputs for one prompt
        when samples > 1 or num_return > 1 (best first: text-to-image samples by their caption rerank score).

        Decoding options left None are the model's own for the prompt's task (decoding.json: how the run
        evaluated it; e.g. text-to-image drawing 4 candidates at top_k 32 and returning the best by its caption
        rerank score), else DecodingOptions' defaults (beam search, 5 beams). guidance_scale: classifier-free
        guidance of text-to-image sampling (None or 1: none); closed_set "score" ranks an answer set exhaustively."""
        single = prompt is None or isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        if not prompts:
            raise PredictError("no prompt given")
        if single or not isinstance(image, (list, tuple)):
            images = [image] * len(prompts)
        else:
            images = list(image)
            if len(images) != len(prompts):
                raise PredictError(f"{len(images)} images for {len(prompts)} prompts")
        asked = dict(
            beams=beams,
            samples=samples,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            num_return=num_return,
            max_new_tokens=max_new_tokens,
            guidance_scale=guidance_scale,
            closed_set=closed_set,
        )
        # A list per prompt only when the call asks for several; a task's own candidates are reranked to one.
        several = (samples or 1) > 1 or (num_return or 1) > 1
        requests = [self.request(p, i, task, box) for p, i in zip(prompts, images, strict=True)]
        results: list[Any] = [None] * len(requests)
        # One generate call per (task, constraint kind) group, in chunks of batch_size.
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            constraint = self.constraint(request)
            key = (request.task, type(constraint).__name__, getattr(constraint, "count", None))
            groups.setdefault(key, []).append(index)
        decodings = {key: self.decoding(key[0], **asked) for key in groups}  # every option checked before decoding
        for key, indexes in groups.items():
            task_name, (options, mode) = key[0], decodings[key]
            for start in range(0, len(indexes), batch_size):
                chunk = indexes[start : start + batch_size]
                outputs = self.run(task_name, [requests[i].example for i in chunk], options, mode, rerank)
                for i, outs in zip(chunk, outputs, strict=True):
                    if not outs:
                        raise PredictError(f"no answer could be decoded for prompt {prompts[i]!r}")
                    results[i] = outs if several else outs[0]
        return results[0] if single else results


def _as_box(box: Any) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError) as e:
        raise PredictError(f"box {box!r}: expected 4 numbers x0, y0, x1, y1") from e
    if len(values) != 4:
        raise PredictError(f"box {box!r}: expected 4 numbers x0, y0, x1, y1, got {len(values)}")
    return values


# ---------------------------------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unifier predict",
        description="Answer a prompt about an image with a trained Unifier model (the task is recognised from "
        "the prompt's template, or named with --task).",
    )
    parser.add_argument("--model", required=True, help="model folder (config.json, model.safetensors, tokenizer/)")
    parser.add_argument("--image", help="image file (not for text-to-image prompts)")
    parser.add_argument("--prompt", required=True, help='e.g. " what does the image describe?"')
    parser.add_argument("--task", help=f"one of {', '.join(TASK_NAMES)} (default: recognised from the prompt)")
    parser.add_argument("--box", help="region_caption: the region as x0,y0,x1,y1 in pixels")
    # Decoding flags not given are the model's own for the task (its decoding.json), else beam search of 5.
    parser.add_argument("--beams", type=int, help="beam width (default: the model's for the task, else 5)")
    parser.add_argument("--samples", type=int, help="sample this many answers / images instead of beam search")
    parser.add_argument("--temperature", type=float, help="sampling temperature (default: the model's, else 1.0)")
    parser.add_argument("--top-k", type=int, help="sampling: keep the k most likely tokens")
    parser.add_argument("--top-p", type=float, help="sampling: nucleus probability mass")
    parser.add_argument("--seed", type=int, help="sampling seed")
    parser.add_argument("--guidance-scale", type=float, help="text-to-image: classifier-free guidance (1: none)")
    parser.add_argument("--closed-set", choices=("beam", "score"), help="answer sets: beam search or exhaustive score")
    parser.add_argument("--out", help="where to save a box drawn on the image, or the generated image(s) (PNG)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument(
        "--tasks", nargs="+", default=(), help="task or mixture files whose options (answer sets) to use"
    )
    return parser


class _Usage(Exception):
    """A CLI error found before the model is loaded."""


def _check_arguments(args: argparse.Namespace) -> None:
    from unifier.images import load_image

    if not args.prompt.strip():
        raise _Usage("the prompt is empty")
    if args.task is not None and args.task not in TASK_NAMES:
        raise _Usage(f"unknown task {args.task!r}; known tasks: {', '.join(TASK_NAMES)}")
    if not Path(args.model).is_dir():
        raise _Usage(f"model folder not found: {args.model}")
    if args.image is not None:
        load_image(args.image)  # a missing or unreadable image fails here, naming the file
    if args.box is not None:
        parts = args.box.split(",")
        try:
            args.box = _as_box(parts)
        except PredictError as e:
            raise _Usage(str(e)) from e
    if args.out is not None and Path(args.out).suffix.lower() != ".png":
        raise _Usage(f"--out {args.out}: write a .png file")
    if args.out is not None and not Path(args.out).resolve().parent.is_dir():
        raise _Usage(f"--out {args.out}: the folder {Path(args.out).resolve().parent} does not exist")


def _save_png(image: Any, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def draw_box(image: Any, box: Sequence[float], color: tuple[int, int, int] = (255, 0, 0)) -> Any:
    """A copy of `image` with `box` (x0, y0, x1, y1 pixels, x1 / y1 exclusive) outlined."""
    from PIL import ImageDraw

    drawn = image.convert("RGB").copy()
    width = max(1, round(min(drawn.size) / 100))
    x0, y0, x1, y1 = box
    # An untrained model may give an empty or inverted box: draw what it spans, at least one pixel.
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    ImageDraw.Draw(drawn).rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=color, width=width)
    return drawn


def quiet_libraries() -> None:
    """Keep library chatter off a CLI's output: stdout carries the answer, stderr our one-line errors."""
    import torch
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" bars
    # Loading weights imports accelerate, which imports DeepSpeed when it is installed; DeepSpeed then warns
    # on stdout that it found no GPU, unless told the accelerator.
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_arguments(args)
        quiet_libraries()
        unifier = Unifier.from_pretrained(args.model, device=args.device, task_files=args.tasks)
        result = unifier.predict(
            image=args.image,
            prompt=args.prompt,
            task=args.task,
            box=args.box,
            beams=args.beams,
            samples=args.samples,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            closed_set=args.closed_set,
            guidance_scale=args.guidance_scale,
        )
    except (_Usage, ValueError, OSError) as e:
        print(f"unifier predict: error: {e}", file=sys.stderr)
        return 2
    outputs = result if isinstance(result, list) else [result]
    first = outputs[0]
    if isinstance(first, TextOutput):
        for out in outputs:
            print(out.text if len(outputs) == 1 else f"{out.text}\t(score {out.score:.3f})")
    elif isinstance(first, BoxOutput):
        print("box: " + ", ".join(f"{v:.1f}" for v in first.box) + " (x0, y0, x1, y1 in pixels)")
        image = unifier._load(args.image)
        out_path = Path(args.out) if args.out else Path(f"{Path(args.image).stem}-box.png")
        _save_png(draw_box(image, first.box), out_path)
        print(f"drew the box on a copy of the image: {out_path}" + ("" if args.out else " (default name; set --out)"))
    elif isinstance(first, ImageOutput):
        base = Path(args.out) if args.out else Path("generated.png")
        written = []
        for k, out in enumerate(outputs):
            if out.image is None:
                print("unifier predict: error: the model has no image tokenizer to draw its codes", file=sys.stderr)
                return 2
            path = base if len(outputs) == 1 else base.with_name(f"{base.stem}-{k}{base.suffix}")
            written.append(str(_save_png(out.image, path)))
        note = "" if args.out else " (default name; set --out)"
        print(f"wrote {len(written)} generated image(s): {', '.join(written)}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
