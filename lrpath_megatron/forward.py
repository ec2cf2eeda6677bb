"""The (pipelined) forward/backward schedule and the loss reduction, shared by training and evaluation."""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from lrpath_megatron import distributed


def forward_backward(model, microbatches: list[dict], seq_length: int, micro_batch_size: int,
                     forward_only: bool) -> list[float]:
    """Runs megatron-core's schedule over ``microbatches``; returns this rank's per-microbatch losses
    (last pipeline stage) or []. ``model`` is the DDP-wrapped model or a bare GPTModel (evaluation), or the
    list of this stage's model chunks (interleaved schedule)."""
    chunks = model if isinstance(model, list) else [model]
    # The interleaved schedule calls each chunk's forward once per micro-batch, reading the chunk's own
    # iterator: every chunk sees every micro-batch (the first uses the tokens, the last the labels).
    iterators = [iter(microbatches) for _ in chunks]
    out = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks,
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    return [float(d["lm loss"]) for d in out] if parallel_state.is_pipeline_last_stage() else []


def global_mean(local_losses: list[float]) -> float:
    """Mean of the micro-batch losses of all DP replicas (counted once per replica: last stage, TP and CP
    rank 0)."""
    contributes = (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
                   and parallel_state.get_context_parallel_rank() == 0)
    value = torch.tensor([sum(local_losses), len(local_losses)] if contributes else [0.0, 0.0],
                         dtype=torch.float64)
    if distributed.use_cuda():
        value = value.cuda()
    torch.distributed.all_reduce(value)
    return float(value[0] / value[1])


@torch.no_grad()
def validation_losses(model, valid_data, num_batches: int, seq_length: int, micro_batch_size: int,
                      token_losses: Callable[[dict], torch.Tensor] | None = None) -> dict:
    """Loss per corpus on the first ``num_batches`` held-out micro-batches (the same set for every layout),
    and their mean: ``{"val_loss": x, "val_loss_per_corpus": {corpus: x}}``. Collective.
    ``token_losses(batch) -> [b, s]`` replaces the model's forward where the schedule cannot run it (inputs
    routed to adapters; pipeline_parallel=1)."""
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    chunks = model if isinstance(model, list) else [model]
    was_training = chunks[0].training
    for chunk in chunks:
        chunk.eval()
    per_corpus = {}
    for corpus in valid_data.corpora:
        batches = valid_data.batches(corpus, num_batches, dp_rank, dp_size)
        if token_losses is None:
            local = forward_backward(model, batches, seq_length, micro_batch_size, True)
        else:
            local = [float(_masked_mean_loss(b["loss_mask"], token_losses(b))[0]) for b in batches]
        per_corpus[corpus] = global_mean(local)
    for chunk in chunks:
        chunk.train(was_training)
    return {"val_loss": sum(per_corpus.values()) / len(per_corpus), "val_loss_per_corpus": per_corpus}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    device = next(model.parameters()).device
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    cp_size = parallel_state.get_context_parallel_world_size()
    if cp_size > 1:
        batch = context_parallel_part(batch, cp_size, parallel_state.get_context_parallel_rank())
        loss_func = partial(_context_parallel_loss, batch["loss_mask"], parallel_state.get_context_parallel_group())
    else:
        loss_func = partial(_masked_mean_loss, batch["loss_mask"])
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, loss_func


def context_parallel_part(batch: dict, cp_size: int, cp_rank: int) -> dict:
    """This context-parallel rank's part of every [b, s] tensor. Causal attention costs more for later
    tokens, so the sequence is cut into 2 * CP chunks and rank r takes chunks r and 2 * CP - 1 - r: the
    load balancing megatron-core's ring attention expects (Megatron-LM's get_batch_on_this_cp_rank)."""
    def part(t: torch.Tensor) -> torch.Tensor:
        chunks = t.view(t.shape[0], 2 * cp_size, t.shape[1] // (2 * cp_size), *t.shape[2:])
        return chunks[:, [cp_rank, 2 * cp_size - 1 - cp_rank]].reshape(t.shape[0], -1, *t.shape[2:])
    return {k: part(v) for k, v in batch.items()}


def context_parallel_loss(local_sum: torch.Tensor, total: torch.Tensor, cp_size: int) -> torch.Tensor:
    """The loss one CP rank back-propagates: its tokens' loss over the tokens of the whole sequence (the
    ``total`` [sum, count] of all CP ranks), times CP because megatron-core's DDP averages gradients over
    DP x CP ranks: the gradient summed over a CP group is then that of the whole sequence's mean loss."""
    return local_sum * cp_size / total[1].clamp(min=1.0)


def _context_parallel_loss(loss_mask: torch.Tensor, cp_group, per_token_loss: torch.Tensor):
    mask = loss_mask.float()
    local_sum = (per_token_loss.float() * mask).sum()
    total = torch.stack([local_sum.detach(), mask.sum()])
    torch.distributed.all_reduce(total, group=cp_group)
    loss = context_parallel_loss(local_sum, total, cp_group.size())
    # The reported loss is the sequence's mean on every CP rank (what one rank of a CP=1 run reports).
    return loss, {"lm loss": (total[0] / total[1].clamp(min=1.0)).clone()}


def _masked_mean_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    mask = loss_mask.float()
    loss = (per_token_loss.float() * mask).sum() / mask.sum().clamp(min=1.0)
    # clone: the schedule divides the returned loss in place by the number of micro-batches
    return loss, {"lm loss": loss.detach().clone()}
