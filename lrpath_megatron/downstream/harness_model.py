"""lm-evaluation-harness's model interface over lrpath's own forward: log-likelihoods of continuations
(multiple-choice tasks) and of whole texts (perplexity tasks), tokenized with the plan's SentencePiece model.

The harness's TemplateLM splits each (context, continuation) into token ids exactly as its Hugging Face
model does (trailing spaces move to the continuation; an empty context starts from the end-of-document
token, which is what precedes every document in the training data), so a release scores the same here as
its Hugging Face export through ``HFLM``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from lrpath_megatron.data_tools.tokenizer import Tokenizer
from lrpath_megatron.errors import LrpathError

# tokens [b, s] (int64) -> logits [b, s, vocab] (fp32) of the next token at every position
Logits = Callable[[torch.Tensor], torch.Tensor]


class LrpathLM(TemplateLM):
    def __init__(self, logits: Logits, tokenizer: Tokenizer, max_length: int, batch_size: int = 16):
        super().__init__()
        self.logits = logits
        self.sp = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size

    @property
    def eot_token_id(self) -> int:
        return self.sp.eod_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.sp.path)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.sp.encode(string).tolist()

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.sp.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether it is the greedy continuation) per request
        ``(key, context ids, continuation ids)``; the context is cut from the left to the model's length."""
        rows = []
        for _, context, continuation in requests:
            rows.append(((list(context) + list(continuation))[-(self.max_length + 1):], len(continuation)))
        # Longest first, so a batch pads little, ties by the tokens: the batches HFLM forms, so that a batch's
        # shape (and with it the float rounding of its matmuls) is the same. Results go back in request order.
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i][0]), tuple(rows[i][0])))
        results: list = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            tokens = torch.zeros(len(batch), len(rows[batch[0]][0]) - 1, dtype=torch.long)
            for b, i in enumerate(batch):
                tokens[b, :len(rows[i][0]) - 1] = torch.tensor(rows[i][0][:-1])
            logits = self.logits(tokens)  # causal: padding on the right changes no earlier position
            for b, i in enumerate(batch):
                whole, n = rows[i]  # the positions before the last n tokens predict them
                targets = torch.tensor(whole[-n:])
                # log-softmax of the continuation's positions only: a [batch, seq, vocab] copy is what runs out
                # of memory at large vocabularies (each position's log-softmax is its own)
                scores = torch.log_softmax(logits[b, len(whole) - 1 - n:len(whole) - 1].float(), dim=-1)
                picked = scores.gather(1, targets.to(scores.device)[:, None])[:, 0]
                greedy = bool((scores.argmax(-1).cpu() == targets).all())
                results[i] = (float(picked.sum()), greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, in windows of the model's length (each token scored once). The
        windows of all texts are scored batch_size at a time in text order, as HFLM does."""
        windows = [(n, make_disjoint_window(w)) for n, request in enumerate(requests)
                   for w in get_rolling_token_windows(self.tok_encode(request.args[0]), prefix_token=self.prefix_token_id,
                                                      max_seq_len=self.max_length, context_len=1)]
        scores = []
        for start in range(0, len(windows), self.batch_size):
            chunk = windows[start:start + self.batch_size]
            scores += self._loglikelihood_tokens([(None, a, b) for _, (a, b) in chunk])
        totals = [0.0] * len(requests)
        for (n, _), (ll, _) in zip(windows, scores):
            totals[n] += ll
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise LrpathError("generation tasks (output_type: generate_until) are not evaluated by lrpath's harness "
                          "model; use multiple-choice or perplexity tasks, or run the harness's HFLM on the "
                          "release's Hugging Face export (docs/evaluation.md)")


def score_pairs(lm, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
    """(log-likelihood, is greedy) of each (context, continuation) through any harness model's loglikelihood."""
    return lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                            disable_tqdm=True)


def score_texts(lm, texts: Sequence[str]) -> list[tuple[float, None]]:
    """(log-likelihood of the whole text, None) of each text through any harness model's loglikelihood_rolling."""
    requests = [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate(texts)]
    return [(ll, None) for ll in lm.loglikelihood_rolling(requests, disable_tqdm=True)] if texts else []
