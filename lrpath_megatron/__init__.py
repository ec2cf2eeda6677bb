"""lrpath_megatron: version updates of GPT models on megatron-core."""

__version__ = "0.1.0"
