"""The ``--tokenizer-type`` values of Megatron-LM's ``tools/preprocess_data.py`` that preprocessing accepts, so
its command lines run unchanged, and the kind of tokenizer file each one names."""
from __future__ import annotations

import os

from lrpath_megatron.config import ConfigError

# Megatron-LM's tools/preprocess_data.py (core_v0.16.1, default tokenizer system) builds one and the same
# SentencePiece tokenizer for these types: ids of the model as is, EOD = its eos id. That is what preprocess
# does, so the flag only keeps Megatron-LM command lines working; other types are not SentencePiece models.
SENTENCEPIECE_TYPES = ("GPTSentencePieceTokenizer", "SentencePieceTokenizer", "Llama2Tokenizer")
# Its HuggingFaceTokenizer: a tokenizer.json (or a directory holding one), EOD = the tokenizer's eos.
HF_TYPE = "HuggingFaceTokenizer"
TOKENIZER_TYPES = (*SENTENCEPIECE_TYPES, HF_TYPE)


def check_tokenizer_type(tokenizer_type: str | None, model: str) -> None:
    """The type must name the kind of file --tokenizer-model is (a Megatron-LM command line that mixes them
    would tokenize differently there)."""
    is_hf = os.path.isdir(model) or model.endswith(".json")
    if tokenizer_type and (tokenizer_type == HF_TYPE) != is_hf:
        raise ConfigError(f"--tokenizer-type {tokenizer_type} does not match --tokenizer-model {model}: use "
                          f"{HF_TYPE} with a tokenizer.json (or its directory), a SentencePiece type with a .model")
