"""The `unifier` command: `unifier <command> [options]`; `unifier --help` lists the commands.

Each command lives in its own module and is imported only when run, so `unifier data ...`
does not pay for importing the model code.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module with a `main(argv)` function, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("unifier.data.cli", "write the shapes world to disk in the public layouts"),
    "tokenizer": ("unifier.tokenization.build", "build a tokenizer folder from a recipe in tokenizers/"),
    "train": ("unifier.train", "train the generalist model (same as python train.py)"),
    "evaluate": ("unifier.evaluate", "evaluate a model on a task (same as python evaluate.py)"),
    "predict": ("unifier.predict", "answer a prompt about an image"),
    "demo": ("unifier.demo", "serve the Gradio web demo"),
    "gallery": ("unifier.gallery", "write a static HTML gallery of a model's outputs"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: unifier <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "`unifier <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unifier: unknown command '{name}'; known: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
