"""Decoding engines: one Decoder interface (decoder.py), a static-cache CUDA-graph decoder
(static.py) running a fused Llama step (fused.py, kernels.py), and the correctness gate that
holds every path to an eager reference (gate.py)."""

from minigpt4.decoding.decoder import (CACHE_BUCKET, GROWABLE_START, Decoder, DynamicDecoder, cache_keys,
                                       make_decoder, reusable_prefix)
from minigpt4.decoding.static import StaticDecoder

__all__ = ["CACHE_BUCKET", "GROWABLE_START", "Decoder", "DynamicDecoder", "StaticDecoder", "cache_keys", "make_decoder",
           "reusable_prefix"]
