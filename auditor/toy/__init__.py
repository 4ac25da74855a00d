"""Small, offline-built Stable Diffusion models: random tiny ones for tests, and a toy that truly memorizes.

Builds diffusers-format folders (safetensors) with a CLIP-format tokenizer trained here; never downloads.
"""
