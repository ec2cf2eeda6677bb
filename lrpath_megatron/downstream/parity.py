"""The harness's log-likelihoods of a release through its Hugging Face export (``HFLM`` on the exported
model and tokenizer) against lrpath's own forward on the same requests: every (context, choice) of the
shipped tasks' first documents."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from lrpath_megatron.config import TrainConfig
from lrpath_megatron.downstream.run import lrpath_logits, offline, require_harness
from lrpath_megatron.task_dirs import SHIPPED, SHIPPED_DIR


def task_pairs(docs_per_task: int, tasks: Sequence[str] = tuple(SHIPPED)) -> list[tuple[str, str]]:
    """(context, choice) of every choice of the first ``docs_per_task`` documents of each shipped task."""
    pairs = []
    for task in tasks:
        lines = (SHIPPED_DIR / f"{task}.jsonl").read_text().splitlines()[:docs_per_task]
        pairs += [(doc["context"], choice) for doc in map(json.loads, lines) for choice in doc["choices"]]
    return pairs


def hf_loglikelihoods(hf_dir: Path, pairs: Sequence[tuple[str, str]], batch_size: int = 16,
                      texts: Sequence[str] = ()) -> list:
    """(log-likelihood, is greedy) per pair, then (log-likelihood, None) per whole text, from the harness's
    own HFLM on a Hugging Face export (fp32), prefixed like lrpath's data: no BOS, the end-of-document token
    before an empty context."""
    require_harness()
    offline()
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lrpath_megatron.downstream.harness_model import score_pairs, score_texts

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=False,
              prefix_token_id=tokenizer.eos_token_id, device="cpu")
    return score_pairs(lm, pairs) + score_texts(lm, texts)


def lrpath_loglikelihoods(cfg: TrainConfig, checkpoint: Path, tokenizer: Path, pairs: Sequence[tuple[str, str]],
                          batch_size: int = 16, texts: Sequence[str] = ()) -> list:
    """As :func:`hf_loglikelihoods`, from lrpath's harness model on the checkpoint."""
    require_harness()
    offline()
    from lrpath_megatron.checkpoint.tensors import load_model
    from lrpath_megatron.data_tools.tokenizer import Tokenizer
    from lrpath_megatron.downstream.harness_model import LrpathLM, score_pairs, score_texts

    with lrpath_logits(cfg) as (model, logits):
        load_model(Path(checkpoint), model[0])
        lm = LrpathLM(logits, Tokenizer(tokenizer), cfg.model.seq_length, batch_size)
        return score_pairs(lm, pairs) + score_texts(lm, texts)


def compare(ours: Sequence, theirs: Sequence) -> dict:
    """Largest absolute difference of the log-likelihoods, and whether every greedy flag agrees."""
    return {"requests": len(ours), "max_abs_loglik_diff": max(abs(a[0] - b[0]) for a, b in zip(ours, theirs)),
            "greedy_flags_equal": all(a[1] == b[1] for a, b in zip(ours, theirs))}
