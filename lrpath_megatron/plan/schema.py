"""The ``plan:`` section as written: typed sections read from YAML, the release settings' defaults, and the
rules that refuse a setting written where it does not apply. Nothing here resolves steps (see
:mod:`lrpath_megatron.plan.resolved`)."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from lrpath_megatron import schedules
from lrpath_megatron.config import ConfigError, MixConfig, register_list_item_type
from lrpath_megatron.plan.evaluation import EvaluateConfig

# auto: the release forecast chooses a decay length or a merge window when the release is made (plan.auto_decay).
RELEASE_METHODS = ("decay", "merge", "auto")
BRANCH_DATA = ("tail", "replay")
# Reference methods a plan can also train on the same data, as paths named "<method>/<version>".
BASELINES = ("ptfs", "cpt")
FORK_RULES = ("effective", "nominal")


@dataclass
class MainPathConfig:
    eta_max: Optional[float] = None  # None = optimizer.lr
    eta_min: Optional[float] = None  # None = optimizer.min_lr
    warmup_steps: Optional[int] = None  # give steps or tokens (neither = no warmup)
    warmup_tokens: Optional[int] = None
    replay: float = 0.0  # share of each main-path segment drawn from the older versions' corpora
    # Extra main-path checkpoints beyond those the releases need: places to fork or merge from later.
    save_steps: list = field(default_factory=list)
    # Extra main-path checkpoints of the weights only (no optimizer state): inputs of merges defined later.
    weights_only_steps: list = field(default_factory=list)
    # Continue these weights (an lrpath checkpoint, e.g. from `lrpath hf import`) instead of random ones:
    # the main path starts at step 0 with them, a fresh optimizer and its own data and LR path.
    init_from: Optional[str] = None


@dataclass
class ReleaseConfig:
    """A version's release as written. Settings default to None (= not written) so that one written where
    it does not apply (a decay setting on a merge, a multistep setting on a cosine) is refused rather than
    ignored; :data:`RELEASE_DEFAULTS` holds the defaults of those the plan reads."""

    method: str = "decay"  # decay | merge | auto
    methods: Optional[list] = None  # method: auto only: the methods it chooses among (default: decay, merge)
    shape: Optional[str] = None  # cosine (default) | linear | 1-sqrt | knee | multistep
    stable_fraction: Optional[float] = None  # not for multistep; None = 0.5 for knee, 0 otherwise
    drop_points: Optional[list] = None  # multistep only; None = schedules.MULTISTEP_POINTS
    drop_factors: Optional[list] = None  # multistep only; None = geometric drops ending at eta_min
    # Where the branch leaves the main path (at most one; default: tail -> end - decay, replay -> end).
    fork_step: Optional[int] = None  # global main-path step
    fork_tokens: Optional[int] = None  # global main-path token position
    fork_fraction: Optional[float] = None  # position inside the version's own main-path segment, 0..1
    # How long the branch decays (exactly one for method=decay). decay_steps: auto takes the length the release
    # forecast chooses (release_forecast.choose_decay) among candidates within decay_bounds: [min, max] steps
    # (default: the candidate fractions of the version's steps whose fork the forecast can see; plan.auto_decay).
    decay_steps: Any = None  # steps, or "auto"
    decay_bounds: Optional[list] = None
    decay_tokens: Optional[int] = None
    decay_fraction: Optional[float] = None  # of the version's own steps
    # tail (default): the rest of the version's segment (no extra data) | replay: D_1..D_v blend
    data: Optional[str] = None
    mix: Optional[MixConfig] = None  # LR-triggered blend on the branch (replaces the data blend)
    merge: Optional[dict] = None  # method=merge settings (WSM), read by the merge module


# What the plan reads for release settings left unwritten (None in ReleaseConfig).
RELEASE_DEFAULTS = {"shape": "cosine", "data": "tail", "drop_points": list(schedules.MULTISTEP_POINTS), "merge": {}}
# Settings of a decay release (all but method, merge and the fork position): a merge trains no branch.
DECAY_SETTINGS = ("shape", "stable_fraction", "drop_points", "drop_factors", "decay_steps", "decay_tokens",
                  "decay_fraction", "decay_bounds", "data", "mix")
FORK_SETTINGS = ("fork_step", "fork_tokens", "fork_fraction")


def with_defaults(release: ReleaseConfig) -> ReleaseConfig:
    """``release`` with its unwritten settings at their defaults."""
    return dataclasses.replace(release, **{k: copy.deepcopy(v) for k, v in RELEASE_DEFAULTS.items()
                                           if getattr(release, k) is None})


@dataclass
class VersionConfig:
    name: str = ""
    corpora: Any = None  # list of corpus names (equal weights) or {name: weight}
    # The segment's size, exactly one of: its tokens or steps (the replay share included), or the tokens of
    # the version's own data it must train (new_tokens; the segment is then larger by the replay share).
    tokens: Optional[int] = None
    steps: Optional[int] = None
    new_tokens: Optional[int] = None
    release: ReleaseConfig = field(default_factory=ReleaseConfig)


@dataclass
class ExportConfig:
    """What is written beside each release as soon as it is released."""

    hf: bool = False  # a Hugging Face model directory, RUN/<version>/hf (``lrpath hf export``)
    # The tokenizer the data was tokenized with, shipped with the model: a SentencePiece .model or a Hugging
    # Face tokenizer.json (or its directory). None:
    # an imported model's own tokenizer files (plan.main.init_from), else none.
    tokenizer: Optional[str] = None


VERSION_CURVES = ("restart", "continue")


@dataclass
class ForecastSettings:
    """How the release forecast reads this plan's losses (what its auto releases are chosen by)."""
    # The annealing law's momentum lambda: how many steps an LR drop keeps lowering the loss (about
    # 1 / (1 - lambda)). None: the paper's 0.999, fitted on runs of tens of thousands of steps; on versions of a
    # few hundred steps 0.98 forecast better (docs/forecast.md, "Annealing momentum").
    annealing_momentum: Optional[float] = None
    # Where each version's loss curve counts its areas from. "restart": its segment's start - a version that
    # brings a new domain starts a new power law there; "continue": step 0 - new documents of the same sources
    # continue one curve (each version keeps its own L0, A for its blend). docs/forecast.md, "A regime ...".
    version_curves: str = "restart"

    def validate(self) -> None:
        m = self.annealing_momentum
        if m is not None and not 0 < m < 1:
            raise ConfigError(f"plan.forecast.annealing_momentum={m}: give a number in (0, 1), e.g. 0.999 (the "
                              "default) or 0.98 for versions of a few hundred steps")
        if self.version_curves not in VERSION_CURVES:
            raise ConfigError(f"plan.forecast.version_curves={self.version_curves!r}: choose from "
                              f"{', '.join(VERSION_CURVES)} (restart: each version brings a new domain; continue: "
                              "new documents of the same sources)")


@dataclass
class PlanConfig:
    main: MainPathConfig = field(default_factory=MainPathConfig)
    versions: list = field(default_factory=list)  # list[VersionConfig]
    # Where a decay branch leaves the main path: "effective", the first step at which its LR or data differ
    # from the main path's (the steps before are the main path's own, bit for bit, so they are trained
    # once); "nominal", where its fork settings put it (each branch retrains those steps).
    fork: str = "effective"
    export: ExportConfig = field(default_factory=ExportConfig)
    evaluate: Optional[EvaluateConfig] = None  # downstream tasks per release and the release gate
    forecast: ForecastSettings = field(default_factory=ForecastSettings)


register_list_item_type(PlanConfig, "versions", VersionConfig)


def one_of(obj: Any, where: str, names: list[str], required: bool) -> Optional[tuple[str, Any]]:
    """The one setting of ``names`` written on ``obj`` as (name, value), None if none and not required."""
    given = [(n, getattr(obj, n)) for n in names if getattr(obj, n) is not None]
    if len(given) > 1:
        raise ConfigError(f"{where}: give only one of {', '.join(n for n, _ in given)}")
    if not given and required:
        raise ConfigError(f"{where}: give one of {', '.join(names)}")
    return given[0] if given else None


def corpus_names(value: Any, where: str) -> list:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise ConfigError(f"{where}.corpora must be a list of corpus names or a mapping name -> weight")
    return value


def refuse_unused_settings(written: ReleaseConfig, shape: str, where: str) -> None:
    """Refuse release settings written where they do not apply (``shape``: the decay's shape, default
    included): ignoring them would release something other than what the plan says."""
    if written.methods is not None and written.method != "auto":
        raise ConfigError(f"{where}.methods applies to method: auto only (the methods it chooses among); remove "
                          "it, or use method: auto")
    if written.method == "auto":
        fixed = [f"{where}.{k}" for k in ("decay_tokens", "decay_fraction", *FORK_SETTINGS)
                 if getattr(written, k) is not None]
        fixed += [f"{where}.decay_steps"] if written.decay_steps not in (None, "auto") else []
        fixed += [f"{where}.merge.{k}" for k in ("window_steps", "window_tokens") if k in (written.merge or {})]
        if fixed:
            raise ConfigError(
                f"{', '.join(fixed)}: method: auto chooses the decay length (within decay_bounds), the fork and "
                f"the merge window itself; remove {'them' if len(fixed) > 1 else 'it'}, or use method: decay or merge")
    if written.method == "merge":
        unused = [f"{where}.{k}" for k in DECAY_SETTINGS if getattr(written, k) is not None]
        if unused:
            raise ConfigError(
                f"{', '.join(unused)}: decay settings do not apply to method: merge (a merge averages main-path "
                f"checkpoints and trains no branch; its settings go under {where}.merge); remove "
                f"{'them' if len(unused) > 1 else 'it'}, or use method: decay"
            )
        return
    if written.merge is not None and written.method != "auto":
        raise ConfigError(
            f"{where}.merge: merge settings do not apply to method: decay (the release trains a decay branch); "
            "remove merge:, or use method: merge"
        )
    if shape == "multistep" and written.stable_fraction is not None:
        raise ConfigError(
            f"{where}.stable_fraction does not apply to shape: multistep (its LR steps down at drop_points); "
            "remove it, or use a shape that holds eta_max first: knee, cosine, linear or 1-sqrt"
        )
    unused = [f"{where}.{k}" for k in ("drop_points", "drop_factors") if getattr(written, k) is not None]
    if shape != "multistep" and unused:
        raise ConfigError(
            f"{', '.join(unused)}: drop settings apply to shape: multistep only, not {shape}; remove "
            f"{'them' if len(unused) > 1 else 'it'}, or use shape: multistep"
        )
