"""Unifier: one encoder-decoder transformer for vision-language tasks, all as discrete tokens."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from unifier import Unifier` without importing torch when the package itself is imported.
    if name == "Unifier":
        from unifier.predict import Unifier

        return Unifier
    raise AttributeError(f"module 'unifier' has no attribute {name!r}")
