"""Weight preparation: `python -m minigpt4.weights {apply-delta, inspect, bundle, export-hf}`.

    delta.py     Vicuna v0 = LLaMA + delta (FastChat 0.1.10's method), streamed tensor by tensor
    identify.py  what a file/directory is, and whether it fits a model config
    bundle.py    a configured model -> this project's own fast-loading format
    export.py    a Vicuna MiniGPT-4 -> transformers' Blip2ForConditionalGeneration
They read and write through minigpt4/checkpoints/ (one reader, one format detector, one key map,
one bundle writer, one atomic writer). See docs/WEIGHTS.md for the whole preparation path.
"""
