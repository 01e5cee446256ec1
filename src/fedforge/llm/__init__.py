"""Federated fine-tuning of language models with LoRA, offline (the ``fedforge[llm]`` extra).

- ``aggregation``: the per-matrix math of the aggregation modes (pure NumPy);
- ``modes``: the modes at model level: what travels, what the server computes;
- ``layout``: adapter arrays in ``Params``, named by role (``lora_A/``, ``lora_B/``, ``head/``);
- ``models``: the packaged MiniLM encoder, a small GPT-2, any local checkpoint;
- ``adapters``: peft LoRA on a base loaded once per process; adapters in and out; fingerprint;
- ``stdlib_text`` and ``tokens``: Python's own docstrings as federated text, tokenized once;
- ``batched``: a cohort's adapters trained as one program over the shared base;
- ``memory``: the peak-memory estimate and the refusal.

Only ``models`` imports ``transformers`` and ``peft``, lazily: every module here imports
without the extra.
"""
