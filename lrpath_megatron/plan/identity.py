"""A plan's identity: what determines what trains, and its hash (recorded in every manifest of its run).
Settings added after plans were first hashed count only when set, so an existing plan keeps its hash and its
run directory resumes."""
from __future__ import annotations

import dataclasses
import hashlib
import json

from lrpath_megatron.config import hashed_model, to_dict
from lrpath_megatron.plan.schema import ForecastSettings, PlanConfig


def resolved(plan, versions: list) -> dict:
    """The base config and the resolved plan of ``plan`` (``versions``: the written versions with their
    unwritten release settings at the defaults, so that writing a default out keeps the hash)."""
    return {
        "train_config": _hashed_train_config(plan.train_config),
        "plan": _hashed_plan(to_dict(dataclasses.replace(plan.config, versions=versions))),
        "resolved": {
            "tokens_per_step": plan.tokens_per_step, "warmup_steps": plan.warmup_steps,
            "eta_max": plan.eta_max, "eta_min": plan.eta_min, "main_end": plan.main_end,
            "versions": [{"name": v.name, "segment": [v.start_step, v.end_step], "fork": v.release.step,
                          "decay_steps": v.release.decay_steps} for v in plan.versions],
        },
    }


def digest(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _hashed_train_config(train_config) -> dict:
    # Performance levers and logging change how fast and what is reported, not what trains.
    cfg = {k: v for k, v in to_dict(train_config).items() if k not in ("performance", "logging")}
    del cfg["checkpoint"]["init_from"]  # plans start from plan.main.init_from
    # How and when checkpoints are written does not change what trains.
    for key in ("async_save", "save_interval_minutes"):
        del cfg["checkpoint"][key]
    del cfg["parallel"]["distributed_timeout_minutes"]  # how long a hung rank is waited for changes no step
    # Layout levers added later hash only when set, so plans written before them keep their hash.
    for key, default in (("virtual_pipeline", None), ("sequence_parallel", False), ("context_parallel", 1)):
        if cfg["parallel"][key] == default:
            del cfg["parallel"][key]
    cfg["model"] = hashed_model(train_config.model)
    return cfg


def _hashed_plan(data: dict) -> dict:
    """The plan section as hashed (the resolved forks and sizes are hashed beside it)."""
    del data["export"]  # what is written beside the releases changes nothing that trains
    del data["evaluate"]  # nor how they are scored
    if data["fork"] == PlanConfig.fork:
        del data["fork"]
    if data["main"]["init_from"] is None:
        del data["main"]["init_from"]
    # what auto releases are chosen by: hashed when set
    if data["forecast"]["annealing_momentum"] is None:
        del data["forecast"]["annealing_momentum"]
    if data["forecast"]["version_curves"] == ForecastSettings.version_curves:
        del data["forecast"]["version_curves"]
    if not data["forecast"]:
        del data["forecast"]
    for v in data["versions"]:
        if v["new_tokens"] is None:
            del v["new_tokens"]
        for key in ("decay_bounds", "methods"):  # hashed only when set
            if v["release"][key] is None:
                del v["release"][key]
        for stage in (v["release"].get("mix") or {}).get("stages", []):
            stage.pop("name", None)  # a stage's name is for logs; it changes nothing that trains
    return data
