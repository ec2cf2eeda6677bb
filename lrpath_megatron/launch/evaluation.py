"""plan.evaluate as jobs: each release's downstream evaluation runs after the job that releases it and after
the previous release's evaluation (the gate compares with it); the release's Hugging Face export then waits
for its evaluation and exports nothing if the gate held the release."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from lrpath_megatron.plan.evaluation import EvaluateConfig
from lrpath_megatron.launch.jobs import EvalSpec, Job
from lrpath_megatron.plan import ReleaseInfo


def with_evaluation(jobs: Sequence[Job], releases: Sequence[ReleaseInfo],
                    evaluate: Optional[EvaluateConfig]) -> list[Job]:
    """``jobs`` (in dependency order, from :func:`~lrpath_megatron.launch.jobs.build_jobs`) with one
    evaluation job per release, in release order, before the exports; unchanged without ``evaluate``."""
    if evaluate is None:
        return list(jobs)
    by_key = {j.key: j for j in jobs}
    evals, previous = [], None
    for r in releases:
        job = by_key[r.version]
        key = f"{r.version}-eval"
        evals.append(Job(key, r.version, job.end_step, job.end_step, None, r.version,
                         evaluate=EvalSpec(evaluate.gate is not None, evaluate.device == "gpu"),
                         reads=(previous,) if previous else ()))
        previous = key
    exports = [dataclasses.replace(j, after=f"{j.path}-eval", export=dataclasses.replace(j.export, unless_held=True))
               for j in jobs if j.kind == "export"]
    return [j for j in jobs if j.kind != "export"] + evals + exports
