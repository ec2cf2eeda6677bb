"""Draw a plan's LR paths against tokens: main path, branches, forks, blend switches, releases, and
PTFS / CPT faintly for comparison."""
from __future__ import annotations

from pathlib import Path

from lrpath_megatron import schedules
from lrpath_megatron.plan import Plan
from lrpath_megatron.plan.costs import span

_POINTS_PER_PATH = 1500


def _sample(start: int, end: int) -> list[int]:
    """Steps start..end-1, thinned to about _POINTS_PER_PATH, always keeping both ends."""
    stride = max(1, (end - start) // _POINTS_PER_PATH)
    steps = list(range(start, end, stride))
    if steps[-1] != end - 1:
        steps.append(end - 1)
    return steps


def _token_scale(max_tokens: float) -> tuple[float, str]:
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if max_tokens >= 10 * scale:
            return scale, unit
    return 1.0, ""


def draw_plan(plan: Plan, out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    tps = plan.tokens_per_step
    paths = plan.paths()
    last = max([p.end_step for p in paths] + [plan.data_end])
    scale, unit = _token_scale(last * tps)
    x = lambda steps: [s * tps / scale for s in steps]  # noqa: E731

    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=120)
    # Baselines, faint: PTFS restarts from scratch on D_1..D_v; CPT re-warms and decays on each D_v.
    for i, v in enumerate(plan.versions):
        # Warmups are shortened where a (tiny) run is shorter than the plan's warmup.
        if v.end_step >= 3:
            lr = schedules.ptfs(plan.eta_max, plan.eta_min, min(plan.warmup_steps, v.end_step - 2), v.end_step)
            steps = _sample(0, v.end_step)
            ax.plot(x(steps), [lr(s) for s in steps], color="tab:gray", lw=0.9, ls="--", alpha=0.35,
                    label="PTFS (per version)" if i == 0 else None)
        if v.steps >= 3:
            cpt = schedules.cpt(plan.eta_max, plan.eta_min, min(plan.warmup_steps, v.steps - 2), v.start_step,
                                v.steps)
            steps = _sample(v.start_step, v.end_step)
            ax.plot(x(steps), [cpt(s) for s in steps], color="tab:brown", lw=0.9, ls=":", alpha=0.45,
                    label="CPT (per version)" if i == 0 else None)
        ax.axvline(v.end_step * tps / scale, color="0.85", lw=0.8, zorder=0)
        ax.text((v.start_step + v.end_step) / 2 * tps / scale, plan.eta_max * 1.11, f"data {v.name}",
                ha="center", va="bottom", fontsize=8, color="0.35")

    main = paths[0]
    steps = _sample(0, main.end_step)
    ax.plot(x(steps), [main.lr_at_step(s) for s in steps], color="black", lw=2.2, label="main path", zorder=3)
    colors = matplotlib.colormaps["tab10"]
    for i, v in enumerate(plan.versions):
        color = colors((i + 1) % 10)
        fork_x = v.release.step * tps / scale
        if v.release.method == "merge":
            ax.plot([fork_x], [plan.eta_max], marker="D", ms=8, color=color, zorder=5,
                    label=f"{v.name}: merge release")
            continue
        branch = plan.path(v.name)
        steps = _sample(branch.fork_step, branch.end_step)
        ax.plot(x(steps), [branch.lr_at_step(s) for s in steps], color=color, lw=1.8, zorder=4,
                label=f"{v.name}: {v.release.shape} branch ({v.release.data})")
        ax.plot([fork_x], [branch.lr_at_step(branch.fork_step)], marker="o", ms=7, mfc="white", mec=color,
                mew=2, zorder=6)
        end = branch.end_step - 1
        ax.plot([end * tps / scale], [branch.lr_at_step(end)], marker="*", ms=13, color=color, mec="black",
                mew=0.6, zorder=6)
        ax.annotate(f"release {v.name}", (end * tps / scale, branch.lr_at_step(end)), xytext=(0, -16),
                    textcoords="offset points", ha="center", fontsize=8, color=color)
        for step, label in branch.switch_steps:
            ax.plot([step * tps / scale], [branch.lr_at_step(step)], marker="X", ms=9, color=color,
                    mec="black", mew=0.6, zorder=7)
            ax.annotate(f"mix -> {label}", (step * tps / scale, branch.lr_at_step(step)), xytext=(6, 6),
                        textcoords="offset points", fontsize=7, color=color)
    # Legend entries for the markers.
    ax.plot([], [], marker="o", ls="", mfc="white", mec="black", label="fork point")
    ax.plot([], [], marker="*", ls="", ms=11, color="0.5", mec="black", label="release (eta_min)")
    if any(p.switch_steps for p in paths):
        ax.plot([], [], marker="X", ls="", color="0.5", mec="black", label="data-mix switch")

    costs = plan.costs()
    ax.set_title(f"{Path(plan.source).name or 'plan'}: {len(plan.versions)} versions, "
                 f"cost {span(costs['cost_ratio_vs_ptfs'], '{:.2f}'.format)} x PTFS, "
                 f"{span(costs['cost_ratio_vs_cpt'], '{:.2f}'.format)} x CPT",
                 fontsize=11)
    ax.set_xlabel(f"tokens{f' ({unit})' if unit else ''}  [{tps:,} tokens per step]")
    ax.set_ylabel("learning rate")
    ax.set_xlim(0, last * tps / scale * 1.01)
    ax.set_ylim(0, plan.eta_max * 1.22)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.25)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
