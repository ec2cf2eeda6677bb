"""Hugging Face checkpoints in and out: Llama, Mistral, Qwen2 and Qwen3 causal LMs as lrpath checkpoints
(:mod:`importer`) and back (:mod:`exporter`), exactly: same weights, same logits."""
