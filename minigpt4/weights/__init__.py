"""Weight preparation: `python -m minigpt4.weights {apply-delta, inspect, bundle, export-hf}`.

    delta.py     Vicuna v0 = LLaMA + delta (FastChat 0.1.10's method), streamed tensor by tensor
    identify.py  what a file/directory is, and whether it fits a model config
    bundle.py    a configured model -> this project's own fast-loading format
    export.py    a Vicuna MiniGPT-4 -> transformers' Blip2ForConditionalGeneration
    tensors.py   lazy, one-tensor-at-a-time reading of .safetensors/.bin/.pth
    output.py    output directories that are complete or absent (temp dir, rename at the end)
See docs/WEIGHTS.md for the whole preparation path.
"""
