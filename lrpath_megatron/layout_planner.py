"""Which TP / PP / VPP / DP / micro-batch layouts of a model fit a cluster's GPUs, and which is best.

Every layout megatron-core can run on ``gpus`` GPUs (TP inside a node and dividing heads, query groups,
FFN and vocabulary; PP dividing the layers; VPP dividing each stage's layers with micro-batches a
multiple of PP; the global batch split evenly over DP) is sized by :mod:`memory_model`. A layout fits when
its most loaded rank's prediction stays under the GPU's memory less a headroom (CUDA context, allocator
fragmentation, communication buffers). Among those that fit, the best has the least predicted time per
step relative to ideal: ``(1 + bubble) * recompute cost``, ties going to fewer model-parallel ranks (less
communication), then to larger micro-batches. Each parallel layout is listed once, with the least
recompute that fits; with DP > 1 the distributed optimizer is on (megatron-core's default on GPU), the
plain optimizer's state shown beside it. GPU jobs run Transformer Engine's layers: activations are sized for
them, with sequence parallelism wherever TP > 1 (Megatron-LM's recommendation: it only splits what TP
would otherwise replicate).
"""
from __future__ import annotations

from dataclasses import dataclass

from lrpath_megatron.config import ConfigError, ModelConfig
from lrpath_megatron.memory_model import GIB, Layout, Memory, chunk_parameters, peak_memory
from lrpath_megatron.units import human

# Compute per step relative to none: full recompute re-runs every forward (4/3 of forward + backward);
# selective recomputes core attention, a few percent (Korthikanti et al. 2022 measured 2-4%).
RECOMPUTE_COST = {"none": 1.0, "selective": 1.03, "full": 4 / 3}
DEFAULT_HEADROOM = 0.1  # of the GPU's memory, kept free


@dataclass(frozen=True)
class Candidate:
    layout: Layout
    memory: Memory

    @property
    def cost(self) -> float:
        return (1 + self.memory.bubble) * RECOMPUTE_COST[self.layout.recompute]

    def sort_key(self) -> tuple:
        lay = self.layout
        return (round(self.cost, 6), lay.tensor_parallel * lay.pipeline_parallel, -lay.micro_batch_size,
                lay.chunks, self.memory.total)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tensor_parallel_sizes(model: ModelConfig, gpus_per_node: int) -> list[int]:
    groups = model.num_query_groups or model.num_attention_heads
    return [t for t in _divisors(gpus_per_node)
            if not (model.num_attention_heads % t or groups % t or model.ffn_size % t or model.padded_vocab_size % t)]


def layouts(model: ModelConfig, gpus: int, gpus_per_node: int, global_batch_size: int, dtype: str,
            micro_batch_sizes=(1, 2, 4, 8), max_virtual: int = 8):
    """Every layout megatron-core can run (see the module docstring); optimizer and recompute variants."""
    for tp in tensor_parallel_sizes(model, gpus_per_node):
        for pp in _divisors(model.num_layers):
            if gpus % (tp * pp) or (gpus_per_node % (tp * pp) and (tp * pp) % gpus_per_node):
                continue
            dp = gpus // (tp * pp)
            for mbs in micro_batch_sizes:
                if global_batch_size % (mbs * dp):
                    continue
                m = global_batch_size // (mbs * dp)
                vpps = [None] + [v for v in _divisors(model.num_layers // pp) if 1 < v <= max_virtual
                                 and pp > 1 and m % pp == 0]
                for vpp in vpps:
                    for recompute in ("none", "selective", "full"):
                        yield Layout(tensor_parallel=tp, pipeline_parallel=pp, virtual_pipeline=vpp,
                                     data_parallel=dp, micro_batch_size=mbs, num_microbatches=m,
                                     distributed_optimizer=dp > 1, recompute=recompute, dtype=dtype,
                                     sequence_parallel=tp > 1, transformer_engine=True)

def plan_layouts(model: ModelConfig, gpus: int, gpus_per_node: int, global_batch_size: int, dtype: str,
                 gpu_memory_gib: float, headroom: float = DEFAULT_HEADROOM) -> tuple[list[Candidate], int]:
    """(the layouts that fit, best first; how many were sized)."""
    budget = gpu_memory_gib * GIB * (1 - headroom)
    fitting, sized, placed = [], 0, set()
    for lay in layouts(model, gpus, gpus_per_node, global_batch_size, dtype):  # recompute none first
        sized += 1
        key = (lay.tensor_parallel, lay.pipeline_parallel, lay.virtual_pipeline, lay.micro_batch_size)
        if key in placed:
            continue
        candidate = Candidate(lay, peak_memory(model, lay))
        if candidate.memory.total <= budget:
            fitting.append(candidate)
            placed.add(key)
    return sorted(fitting, key=Candidate.sort_key), sized

def describe(layout: Layout) -> str:
    vpp = f" VPP{layout.virtual_pipeline}" if layout.virtual_pipeline else ""
    return (f"TP{layout.tensor_parallel} PP{layout.pipeline_parallel}{vpp} DP{layout.data_parallel} "
            f"mb{layout.micro_batch_size}x{layout.num_microbatches}")


def format_table(candidates: list[Candidate], limit: int = 12) -> str:
    """The best ``limit`` layouts, one row each, GiB per GPU; the best marked with ``*``."""
    header = ["", "layout", "dist.opt", "recompute", "weights", "grads", "optim (plain/dist)", "act/mb (full rc)",
              "in flight", "activations", "total", "bubble"]
    rows = []
    for i, c in enumerate(candidates[:limit]):
        m, lay = c.memory, c.layout
        g = lambda b: f"{b / GIB:.1f}"  # noqa: E731
        rows.append(["*" if i == 0 else "", describe(lay), "yes" if lay.distributed_optimizer else "no",
                     lay.recompute, g(m.weights), g(m.gradients),
                     f"{g(m.optimizer_plain)}/{g(m.optimizer_distributed)}",
                     f"{g(m.activations_per_microbatch)} ({g(m.activations_per_microbatch_recompute)})",
                     f"{m.in_flight:g}", g(m.activations), g(m.total), f"{m.bubble:.1%}"])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def layout_of(train, gpus: int) -> Layout:
    """The layout a train config runs at on ``gpus`` GPUs of a cluster (``train``: a validated TrainConfig;
    Transformer Engine's layers, as a GPU job builds them)."""
    p = train.parallel
    dp = gpus // p.model_parallel
    dist = p.use_distributed_optimizer
    return Layout(tensor_parallel=p.tensor_parallel, pipeline_parallel=p.pipeline_parallel,
                  virtual_pipeline=p.virtual_pipeline, data_parallel=dp, context_parallel=p.context_parallel,
                  micro_batch_size=p.micro_batch_size, num_microbatches=p.global_batch_size // (p.micro_batch_size * dp),
                  distributed_optimizer=True if dist is None else dist,  # on GPU the default is on
                  recompute=train.performance.recompute, sequence_parallel=p.sequence_parallel,
                  dtype=train.precision.dtype, transformer_engine=True)


def layout_report(train, profile, profile_file: str, top: int) -> str:
    """The layouts of ``train``'s model that fit the cluster ``profile`` (launch.profile.ClusterProfile),
    best first, as ``lrpath plan --layout`` prints them."""
    if profile.gpu_memory_gib is None:
        raise ConfigError(f"{profile_file}: gpu_memory_gib is not set; give the memory of one GPU (e.g. 80 for an "
                          f"H100 80GB), in the profile or with --cluster-set gpu_memory_gib=80")
    nodes, _ = profile.resources("main")
    gpus, model = nodes * profile.gpus_per_node, train.model
    fitting, sized = plan_layouts(model, gpus, profile.gpus_per_node, train.parallel.global_batch_size,
                                  train.precision.dtype, profile.gpu_memory_gib, profile.memory_headroom)
    head = (f"{model.num_layers} layers, hidden {model.hidden_size}, {human(model_parameters(model))} parameters, "
            f"seq {model.seq_length}, global batch {train.parallel.global_batch_size}, {train.precision.dtype}; "
            f"{nodes} nodes x {profile.gpus_per_node} GPUs of {profile.gpu_memory_gib:g} GiB "
            f"({profile.memory_headroom:.0%} kept free)")
    if not fitting:
        return (f"{head}\nnone of {sized} layouts fits, even with full recompute: add nodes, lower "
                f"micro-batch or sequence length, or use GPUs with more memory")
    return (f"{head}\n{len(fitting)} of {sized} layouts fit; GiB per GPU on the most loaded pipeline stage, best "
            f"(*) = least bubble and recompute, then fewest model-parallel ranks\n\n{format_table(fitting, top)}")


def model_parameters(model) -> int:
    return sum(p.numel for p in chunk_parameters(model, Layout(), 0))

