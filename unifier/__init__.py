"""Unifier: one encoder-decoder transformer for vision-language tasks, all as discrete tokens."""

__version__ = "0.1.0"
