"""The task registry and the task / mixture config files (tasks/*.yaml).

    task = build_task("vqa", tokenizer, answers=["yes", "no"])      # a UnifierTask
    config = load_task_config("tasks/shapes/vqa.yaml")             # TaskConfig: kind, data, options, ...
    task = build_task_from_config(config, tokenizer)
    records = open_records(config, "train")                        # an iterable of records
    mixture = load_mixture("tasks/shapes/mixture.yaml")            # [(TaskConfig, weight), ...]

A task file:

    kind: vqa                          # a registered task name
    name: shapes-vqa                   # optional (default: the file's stem)
    data:
      source: shapes                   # shapes | coco | vqav2 | refcoco | snli_ve | ofa_tsv
      seed: 0                          # source-wide reader arguments ...
      image_size: 64
      splits:                          # ... and per split ones; strings may use ${ENV_VARS}
        train: {split: train}
        val: {split: val, stop: 64}
    options: {answers: [yes, no]}      # task options (answers may be a file: one per line, or a JSON list)
    decoding: {num_beams: 5}           # for unifier.generation
    metric: vqa_accuracy               # optional: overrides the task's default metric
"""

from __future__ import annotations

import importlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from unifier.tasks.base import UnifierTask
from unifier.tasks.caption import CaptionTask
from unifier.tasks.entailment import EntailmentTask
from unifier.tasks.grounding import GroundingTask
from unifier.tasks.region_caption import RegionCaptionTask
from unifier.tasks.text_to_image import TextToImageTask
from unifier.tasks.vqa import VqaTask

TASKS: dict[str, type[UnifierTask]] = {}


def register_task(cls: type[UnifierTask]) -> type[UnifierTask]:
    """Add a task kind under `cls.name` (usable as a class decorator); a name already taken is an error."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} has no `name`: set the class attribute to its registry key")
    if name in TASKS:
        raise ValueError(f"task {name!r} is already registered (by {TASKS[name].__name__})")
    TASKS[name] = cls
    return cls


for _task in (CaptionTask, VqaTask, GroundingTask, RegionCaptionTask, EntailmentTask, TextToImageTask):
    register_task(_task)


def build_task(name: str, tokenizer: Any, **options: Any) -> UnifierTask:
    """An instance of the task kind `name` over `tokenizer` (a UnifierTokenizer, or a bare UnifierVocab)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    vocab = getattr(tokenizer, "vocab", tokenizer)
    cls = TASKS[name]
    if cls is TextToImageTask and "image_tokenizer" not in options:
        options["image_tokenizer"] = getattr(tokenizer, "image_tokenizer", None)
    return cls(vocab, **options)


# ---- config files -------------------------------------------------------------------------------------------------
# (data source, task kind) -> (module, reader function, fixed arguments); the file's data section gives the rest.
_PUBLIC, _OFA, _FOLDER = "unifier.data.readers_public", "unifier.data.readers_ofa", "unifier.data.shapes_writer"
READERS: dict[tuple[str, str], tuple[str, str, dict[str, Any]]] = {
    ("coco", "caption"): (_PUBLIC, "read_coco_captions", {}),
    ("coco", "text_to_image"): (_PUBLIC, "read_coco_text_to_image", {}),
    ("vqav2", "vqa"): (_PUBLIC, "read_vqav2", {}),
    ("refcoco", "grounding"): (_PUBLIC, "read_refs", {}),
    ("refcoco", "region_caption"): (_PUBLIC, "read_region_captions", {}),
    ("snli_ve", "entailment"): (_PUBLIC, "read_snli_ve", {}),
    ("ofa_tsv", "caption"): (_OFA, "read_ofa_tsv", {"kind": "caption"}),
    ("ofa_tsv", "vqa"): (_OFA, "read_ofa_tsv", {"kind": "vqa"}),
    ("ofa_tsv", "grounding"): (_OFA, "read_ofa_tsv", {"kind": "refcoco"}),
    ("ofa_tsv", "entailment"): (_OFA, "read_ofa_tsv", {"kind": "snli_ve"}),
    ("ofa_tsv", "text_to_image"): (_OFA, "read_ofa_tsv", {"kind": "text_to_image"}),
}
SOURCES = ("shapes", *sorted({source for source, _ in READERS}))


@dataclass
class TaskConfig:
    """One tasks/*.yaml file."""

    name: str
    kind: str
    data: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    decoding: dict[str, Any] = field(default_factory=dict)
    metric: str | None = None
    path: Path | None = None


class TaskConfigError(ValueError):
    """A task or mixture file that cannot be used; the message names the file and the field."""


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise TaskConfigError(f"task config not found: {path}")
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise TaskConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(content, dict):
        raise TaskConfigError(f"{path}: expected a mapping at the top level, got {type(content).__name__}")
    return content


def load_task_config(path: str | Path) -> TaskConfig:
    """Read and check one task file (environment variables are expanded later, when data is opened)."""
    path = Path(path)
    content = _read_yaml(path)
    unknown = sorted(set(content) - {"name", "kind", "data", "options", "decoding", "metric"})
    if unknown:
        raise TaskConfigError(f"{path}: unknown field(s) {unknown}")
    kind = content.get("kind")
    if kind not in TASKS:
        raise TaskConfigError(f"{path}: field 'kind' is {kind!r}; known tasks: {', '.join(TASKS)}")
    data = content.get("data")
    if not isinstance(data, dict) or data.get("source") not in SOURCES:
        source = data.get("source") if isinstance(data, dict) else None
        raise TaskConfigError(f"{path}: field 'data.source' is {source!r}; expected one of {', '.join(SOURCES)}")
    for key in ("options", "decoding", "data.splits"):
        value = content.get(key, {}) if key != "data.splits" else data.get("splits", {})
        if not isinstance(value, dict):
            raise TaskConfigError(f"{path}: field '{key}' must be a mapping, got {type(value).__name__}")
    return TaskConfig(
        name=str(content.get("name", path.stem)),
        kind=kind,
        data=data,
        options=dict(content.get("options") or {}),
        decoding=dict(content.get("decoding") or {}),
        metric=content.get("metric"),
        path=path,
    )


def load_mixture(path: str | Path) -> list[tuple[TaskConfig, float]]:
    """A mixture file: `tasks: [{config: vqa.yaml, weight: 1.0}, ...]` (paths relative to the file)."""
    path = Path(path)
    content = _read_yaml(path)
    entries = content.get("tasks")
    if not isinstance(entries, list) or not entries:
        raise TaskConfigError(f"{path}: field 'tasks' must be a non-empty list of {{config, weight}}")
    mixture = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "config" not in entry:
            raise TaskConfigError(f"{path}: tasks[{i}] needs a 'config' (a task file path)")
        weight = entry.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or weight <= 0:
            raise TaskConfigError(f"{path}: tasks[{i}].weight must be a positive number, got {weight!r}")
        mixture.append((load_task_config(path.parent / entry["config"]), float(weight)))
    names = [config.name for config, _ in mixture]
    if len(set(names)) != len(names):
        raise TaskConfigError(f"{path}: task names repeat: {names}")
    return mixture


_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(value: Any, where: str) -> Any:
    """${VAR} in strings (recursively in lists / dicts) replaced by the environment's value; unset is an error."""
    if isinstance(value, str):

        def substitute(match: re.Match) -> str:
            name = match.group(1)
            if name not in os.environ:
                raise TaskConfigError(f"{where} uses ${{{name}}}, which is not set: export {name}=<path>")
            return os.environ[name]

        return _ENV_VAR.sub(substitute, value)
    if isinstance(value, list):
        return [expand_env(v, where) for v in value]
    if isinstance(value, dict):
        return {k: expand_env(v, f"{where}.{k}") for k, v in value.items()}
    return value


def _read_answers(value: Any, where: str) -> list[str]:
    """An answer set given inline (a list) or as a file: a JSON list / dict (its keys), or one answer a line."""
    if isinstance(value, list):
        for i, answer in enumerate(value):
            if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
                hint = " (YAML reads bare yes / no as booleans: quote them)" if isinstance(answer, bool) else ""
                raise TaskConfigError(f"{where}[{i}] is {answer!r}, not a string{hint}")
        return [str(a) for a in value]
    path = Path(value)
    if not path.is_file():
        raise TaskConfigError(f"{where}: answer file not found: {path}")
    text = path.read_text()
    if path.suffix == ".json":
        loaded = json.loads(text)
        return [str(a) for a in (loaded if isinstance(loaded, list) else loaded.keys())]
    return [line.strip() for line in text.splitlines() if line.strip()]


def build_task_from_config(config: TaskConfig, tokenizer: Any) -> UnifierTask:
    """The task a config describes, its options (answers file, metric) resolved."""
    where = f"{config.path or config.name}: options"
    options = expand_env(dict(config.options), where)
    if "answers" in options:
        options["answers"] = _read_answers(options["answers"], f"{where}.answers")
    if config.metric:
        options["metric"] = config.metric
    task = build_task(config.kind, tokenizer, **options)
    if config.metric:
        task.metric = config.metric
    return task


def _split_arguments(config: TaskConfig, split: str) -> dict[str, Any]:
    """The data section's source-wide arguments updated by the split's own, ${ENV_VARS} expanded."""
    where = f"{config.path or config.name}: data"
    data = expand_env({k: v for k, v in config.data.items() if k not in ("source", "splits")}, where)
    splits = config.data.get("splits") or {}
    if split not in splits:
        raise TaskConfigError(f"{where}.splits has no {split!r} split; it has {', '.join(splits) or 'none'}")
    data.update(expand_env(dict(splits[split] or {}), f"{where}.splits.{split}"))
    return data


def shapes_world(config: TaskConfig, split: str):
    """The ShapesWorld of a `source: shapes` task's split (seed and image_size from its data section)."""
    from unifier.data.shapes import ShapesWorld

    if config.data["source"] != "shapes":
        raise TaskConfigError(f"{config.path or config.name}: data.source is {config.data['source']!r}, not shapes")
    data = _split_arguments(config, split)
    try:
        return ShapesWorld(
            split=data.get("split", split), seed=int(data.get("seed", 0)), image_size=int(data.get("image_size", 64))
        )
    except ValueError as e:
        raise TaskConfigError(f"{config.path or config.name}: data: {e}") from e


def open_records(config: TaskConfig, split: str) -> Iterable:
    """The records of one split of a task's data source (the shapes world streams; readers read files)."""
    data = _split_arguments(config, split)
    source = config.data["source"]
    where = f"{config.path or config.name}: data"
    if source == "shapes":
        start, stop = int(data.pop("start", 0)), data.pop("stop", None)
        return shapes_world(config, split).iter_records(config.kind, start, None if stop is None else int(stop))
    key = (source, config.kind)
    if key not in READERS:
        kinds = sorted(kind for src, kind in READERS if src == source)
        raise TaskConfigError(f"{where}.source {source!r} has no reader for task kind {config.kind!r} (it has {kinds})")
    module_name, function_name, fixed = READERS[key]
    reader = getattr(importlib.import_module(module_name), function_name)
    arguments = {**fixed, **data}
    try:
        return reader(**arguments)
    except TypeError as e:
        raise TaskConfigError(f"{where}: the arguments {sorted(arguments)} do not fit {function_name}: {e}") from e


def prompt_texts() -> list[str]:
    """The fixed text of every task's prompt, for tokenizer corpora (so prompts get whole-word pieces)."""
    return [
        CaptionTask.PROMPT,
        ' which region does the text " " describe?',
        RegionCaptionTask.PROMPT,
        ' does the image describe " "?',
        TextToImageTask.PROMPT,
    ]
