"""Errors a user can cause. Each message says what was wrong and what to do about it.

The CLI prints these without a traceback (``--debug`` shows it); anything else that escapes
is a bug in pocketlm.
"""


class PocketError(Exception):
    """Base class for every error a user can cause and fix."""


class ModelNotFound(PocketError):
    """A model name or path that does not resolve to anything loadable."""


class FormatError(PocketError):
    """A model file that is truncated, corrupted, or of a kind we cannot read."""


class UnsupportedModel(PocketError):
    """An architecture, tokenizer or quantization type pocketlm does not (yet) run."""


class InvalidArgument(PocketError):
    """A setting outside its valid range (sampling values, lengths, ...)."""


class ContextOverflow(PocketError):
    """A prompt or conversation longer than the model's context window."""
