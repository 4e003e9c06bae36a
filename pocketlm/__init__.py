"""pocketlm: small language models, practical on ordinary hardware, on-premise."""

from pocketlm.api import Model, load, set_threads
from pocketlm.engine.sampling import SamplingParams
from pocketlm.errors import PocketError
from pocketlm.formats.registry import DEFAULT_MODEL, list_models, pull, remove

__version__ = "0.1.0"
__all__ = [
           "DEFAULT_MODEL",
           "Model",
           "PocketError",
           "SamplingParams",
           "list_models",
           "load",
           "pull",
           "remove",
           "set_threads",
]
