"""Compression: weight-only quantization (RTN, GPTQ, AWQ) with packed storage and CPU kernels.

``quantize(model, method, bits, ...) -> Model``; the result saves as a folder that
``pocketlm.load`` reads back with the quantized modules swapped in.
"""

from pocketlm.compress.quantize import quantize

__all__ = ["quantize"]
