"""Static ConPET's dynamic replay, expressed as the data blend of each step.

Every batch of an update takes ``new_ratio`` of its samples from the update's own corpora and the rest
from earlier updates: a past update is picked uniformly (equal shares), then a sample of its stored set
(its corpora, in their shares within that update). The trainer's sampler assigns samples to corpora so
that every batch is within one sample of these shares, and the batch budget per update is fixed, so the
cost of an update does not grow with the number of past updates.
"""
from __future__ import annotations

from lrpath_megatron.config import ConfigError


def replay_blend(new: dict[str, float], past: list[dict[str, float]], new_ratio: float,
                 where: str = "adapt.replay.new_ratio") -> dict[str, float]:
    """{corpus: weight} of one update's batches. ``new``/``past`` items map corpus -> share (sum 1)."""
    if not 0.0 < new_ratio <= 1.0:
        raise ConfigError(f"{where}={new_ratio} must be in (0, 1]: the share of new samples in each batch "
                          f"(0.5 = new:old 1:1)")
    if not past or new_ratio == 1.0:
        return dict(new)
    blend = {name: new_ratio * share for name, share in new.items()}
    per_update = (1.0 - new_ratio) / len(past)
    for update in past:
        for name, share in update.items():
            blend[name] = blend.get(name, 0.0) + per_update * share
    return {name: w for name, w in blend.items() if w > 0}
