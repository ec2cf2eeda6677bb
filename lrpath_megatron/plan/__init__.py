"""The version plan: corpora per version, the main path, one release per version; resolved to paths.

A plan YAML holds the sections of :class:`config.TrainConfig` (without ``schedule:``) plus ``plan:``::

    plan:
      main: {eta_max: 3e-4, eta_min: 3e-5, warmup_steps: 20, replay: 0.2}
      versions:
        - name: v1
          corpora: [docs]          # names from data.corpora (or {name: weight})
          tokens: 65536            # the increment's main-path training budget (or steps:)
          release: {method: decay, shape: cosine, decay_fraction: 0.6, data: tail}

Token quantities become steps of ``parallel.global_batch_size * model.seq_length`` tokens, rounded UP
(no data is left unseen and a decay is never shorter than asked); the resolved steps are what runs and
what ``lrpath plan`` prints. Validation never touches the data files.

The stages, each looking only down: :mod:`.schema` (the section as written; :mod:`.evaluation`: its evaluate section) -> :mod:`.releases` and
:mod:`.auto_decay` (a release on main-path steps; the lengths decay_steps: auto may take) -> :mod:`.resolved`
(the immutable :class:`Plan`: versions, releases, paths) with :mod:`.costs` and :mod:`.identity` (the hash).
A run directory's state and decisions sit above the plan: :mod:`lrpath_megatron.plan_decisions` (recorded
choices), :mod:`lrpath_megatron.release_forecast` (making them), :mod:`lrpath_megatron.plan_runs` (a path
of the plan as the trainer runs it).
"""
from lrpath_megatron.plan.auto_decay import AutoDecay, MainPause
from lrpath_megatron.plan.releases import ReleaseInfo, ResolvedVersion
from lrpath_megatron.plan.resolved import Plan, load_plan
from lrpath_megatron.plan.schema import ExportConfig, PlanConfig, ReleaseConfig, VersionConfig

__all__ = ["AutoDecay", "ExportConfig", "MainPause", "Plan", "PlanConfig", "ReleaseConfig", "ReleaseInfo",
           "ResolvedVersion", "VersionConfig", "load_plan"]
