"""Pipeline bubble on CPU: predicted (memory_model.bubble_fraction) vs measured idle fraction, PP=2 with and
without interleaving.

Two processes (one thread each). Each rank times its steps (forward + backward over m micro-batches, no
optimizer step) and, inside them, the time it waits on point-to-point transfers (every wait of a request
returned by torch.distributed.isend/irecv, which megatron-core's unbatched p2p uses): waiting for the other
stage is the bubble. Measured idle fraction = waiting / step time, mean of the two ranks, median of the
steps; the schedule predicts bubble / (1 + bubble) with bubble = (p - 1) / (v m). On a shared machine
other processes stretch waits and compute alike; the ratio is what is compared.
Writes benchmarks/results/pipeline_bubble.json.

    torchrun --nproc-per-node=2 benchmarks/pipeline_bubble.py
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "pipeline_bubble.json"
MODEL = dict(num_layers=8, hidden_size=256, num_attention_heads=4, seq_length=256, vocab_size=1000)
MICRO_BATCH, STEPS = 2, 9
WAITED = [0.0]  # seconds this rank spent in p2p waits


class _TimedWork:
    """A p2p request whose wait is timed."""

    def __init__(self, work):
        self.work = work

    def wait(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.work.wait(*args, **kwargs)
        finally:
            WAITED[0] += time.perf_counter() - start


def _timed(p2p):
    def call(*args, **kwargs):
        return _TimedWork(p2p(*args, **kwargs))
    return call


def idle_fraction(parallel, num_microbatches: int) -> float:
    """Median over steps of (p2p wait / step time) on this rank, forward + backward only."""
    from lrpath_megatron import forward
    from lrpath_megatron.config import ModelConfig, PrecisionConfig, TrainConfig
    from lrpath_megatron.model import build_model_chunks, transformer_config
    from lrpath_megatron.parallel_training import wrap_for_training

    cfg = TrainConfig(model=ModelConfig(**MODEL), parallel=parallel, precision=PrecisionConfig())
    tcfg = transformer_config(cfg.model, cfg.parallel, cfg.precision)
    tcfg.batch_p2p_comm = False  # the unbatched path for both schedules: its requests are the ones timed
    model, _ = wrap_for_training(cfg, tcfg, build_model_chunks(cfg.model, cfg.parallel, cfg.precision, tcfg),
                                 lambda m: None)
    s, b = cfg.model.seq_length, MICRO_BATCH
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(num_microbatches):
        t = torch.randint(0, cfg.model.vocab_size, (b, s + 1), generator=g)
        batches.append({"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(b, s),
                        "position_ids": torch.arange(s).expand(b, s)})
    fractions = []
    for i in range(STEPS + 1):  # the first is a warm-up
        torch.distributed.barrier()
        WAITED[0] = 0.0
        start = time.perf_counter()
        forward.forward_backward(model, batches, s, b, False)
        elapsed = time.perf_counter() - start
        if i:
            fractions.append(WAITED[0] / elapsed)
    return statistics.median(fractions)


def main() -> None:
    os.environ["LRPATH_DEVICE"] = "cpu"
    from megatron.core import parallel_state

    from lrpath_megatron import distributed, memory_model, ranks
    from lrpath_megatron.config import ParallelConfig

    torch.set_num_threads(1)
    torch.distributed.isend, torch.distributed.irecv = _timed(torch.distributed.isend), _timed(torch.distributed.irecv)
    results, load = [], os.getloadavg()[0]
    for m in (4, 8):
        for vpp in (None, 2):
            parallel = ParallelConfig(pipeline_parallel=2, virtual_pipeline=vpp, micro_batch_size=MICRO_BATCH,
                                      global_batch_size=MICRO_BATCH * m)
            distributed.initialize(parallel, 1234)
            try:
                mine = idle_fraction(parallel, m)
                measured = statistics.mean(ranks.gather(mine))
            finally:
                parallel_state.destroy_model_parallel()
            bubble = memory_model.bubble_fraction(memory_model.Layout(pipeline_parallel=2, virtual_pipeline=vpp,
                                                                      num_microbatches=m))
            results.append({"micro_batches": m, "virtual_pipeline": vpp, "predicted_bubble": bubble,
                            "predicted_idle_fraction": bubble / (1 + bubble), "measured_idle_fraction": measured})
    rank = torch.distributed.get_rank()
    distributed.shutdown()
    if rank == 0:
        # Waits stretch when the other stage's process is descheduled: the load says how far to trust them.
        RESULTS.write_text(json.dumps({"model": MODEL, "micro_batch_size": MICRO_BATCH, "cpus": os.cpu_count(),
                                       "load_average_1min": load, "results": results}, indent=1) + "\n")
        for r in results:
            print(f"m={r['micro_batches']} vpp={r['virtual_pipeline']}: predicted idle "
                  f"{r['predicted_idle_fraction']:.1%}, measured {r['measured_idle_fraction']:.1%}")


if __name__ == "__main__":
    main()
