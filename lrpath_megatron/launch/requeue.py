"""The bash of a training job that decides, after its srun step, whether and where the job runs again.

Two kinds of end come back (``scontrol requeue``; the job keeps its id, so jobs that depend on it wait):

- A signal-triggered save (USR1 before the time limit, preemption): every rank saved and exited
  ``EXIT_REQUEUE``. Not counted: a main path may cross hundreds of time limits.
- A fault: a rank hung or died, and the others left (``lrpath_megatron.hang_guard``), each writing a record
  ``rank-R@NODE.peer`` or ``rank-R@NODE.stall`` into this attempt's fault directory. At most
  ``max_restarts`` such requeues per job (the attempts that left records are counted, so preemptions in
  between do not use up the budget). A node holding a rank that wrote no record (it hung or died) or a
  ``.stall`` record (its own step stalled) is suspect: the requeued job excludes it (``ExcNodeList``, kept
  across requeues) when the partition still has enough usable nodes without it, else it runs again
  anywhere and the log says why.

SLURM refuses ``ExcNodeList`` on a running job; it accepts it once ``scontrol requeue`` has made the job
pending again. The requeue signals this script, which ignores the TERM to set the exclusion before SLURM
starts the job again (no sooner than the credential lifetime, tens of seconds, later).
"""
from __future__ import annotations

import shlex
from pathlib import Path

from lrpath_megatron.errors import EXIT_REQUEUE, FAULT_DIR_ENV

# Before the step: this attempt's fault directory, and the function that requeues after a fault. Node
# states (sinfo %t) a requeued job can be placed on: idle, alloc, mix, comp, plnd.
_FAULT_SETUP = r"""
# A rank that leaves for a hang or a lost peer writes rank-R@NODE.peer|.stall here (docs/launch.md).
export @FAULT_DIR_ENV@=@FAULTS@/"$SLURM_JOB_ID.${SLURM_RESTART_COUNT:-0}"
RANKS_PER_NODE=@RANKS_PER_NODE@
MAX_RESTARTS=@MAX_RESTARTS@

# A rank hung or died (the others left records): requeue without the suspect nodes, at most MAX_RESTARTS
# times per job.
requeue_after_fault() {
    local rc=$1 node records excluded usable suspects=() silent=()
    local nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
    records=$(ls "$@FAULT_DIR_ENV@")
    for node in "${nodes[@]}"; do  # a rank without a record, or one that stalled itself
        if (( $(grep -cF "@$node." <<< "$records") < RANKS_PER_NODE )) || grep -qF "@$node.stall" <<< "$records"; then
            suspects+=("$node")
        fi
    done
    for ((r = 0; r < ${#nodes[@]} * RANKS_PER_NODE; r++)); do
        grep -q "^rank-$r@" <<< "$records" || silent+=("$r")
    done
    local failures=$(ls -d @FAULTS@/"$SLURM_JOB_ID".* | wc -l)
    echo "lrpath: fault $failures of job $SLURM_JOB_ID (step exit $rc): records $(echo $records);" \
         "ranks without a record: ${silent[*]:-none}; suspect nodes: ${suspects[*]:-none}"
    if (( failures > MAX_RESTARTS )); then
        echo "lrpath: job $SLURM_JOB_ID ended for a fault $failures times, more than max_restarts=$MAX_RESTARTS:" \
             "not requeued; exiting $rc at $(date -Is)"
        exit $(( rc ? rc : 1 ))
    fi
    excluded=""
    if (( ${#suspects[@]} > 0 )); then  # the job's earlier exclusions stay
        excluded=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/.*ExcNodeList=\([^ ]*\).*/\1/p')
        [[ $excluded == "(null)" ]] && excluded=""
        excluded=$( (scontrol show hostnames "$excluded"; printf '%s\n' "${suspects[@]}") | sed '/^$/d' | sort -u)
        usable=$(sinfo -h -N -p "$SLURM_JOB_PARTITION" -o "%N %t" |
                 awk '$2 ~ /^(idle|alloc|mix|comp|plnd)$/ {print $1}' | sort -u | grep -cvxF -f <(echo "$excluded"))
        if (( usable < ${#nodes[@]} )); then
            echo "lrpath: the partition has $usable usable nodes besides $(echo $excluded), the job needs" \
                 "${#nodes[@]}: requeued without leaving nodes out"
            excluded=""
        fi
    fi
    trap '' TERM  # the requeue signals this script, which still has to set the exclusion
    scontrol requeue "$SLURM_JOB_ID" || exit $(( rc ? rc : 1 ))
    if [[ -n $excluded ]] && scontrol update JobId="$SLURM_JOB_ID" ExcNodeList="$(echo $excluded | tr ' ' ,)"; then
        echo "lrpath: requeued job $SLURM_JOB_ID without nodes $(echo $excluded) at $(date -Is)"
    else
        echo "lrpath: requeued job $SLURM_JOB_ID at $(date -Is)"
    fi
    exit 0
}"""


def fault_setup_lines(log_dir: Path, ranks_per_node: int, max_restarts: int) -> list[str]:
    """Before the step: this attempt's fault directory, and the function that requeues after a fault."""
    text = (_FAULT_SETUP.replace("@FAULT_DIR_ENV@", FAULT_DIR_ENV)
            .replace("@FAULTS@", shlex.quote(str(log_dir / "faults")))
            .replace("@RANKS_PER_NODE@", str(ranks_per_node)).replace("@MAX_RESTARTS@", str(max_restarts)))
    return text.splitlines()


def after_step_lines() -> list[str]:
    """After the step (its exit code in ``rc``): a fault requeues through the budget, a save on a signal
    always."""
    return [
        f'if [[ -n $(ls -A "${FAULT_DIR_ENV}" 2>/dev/null) ]]; then',
        "    requeue_after_fault $rc",
        "fi",
        f"if [[ $rc -eq {EXIT_REQUEUE} ]]; then",
        "    # The trainer saved a checkpoint on USR1/TERM: rerun this job; it resumes from that checkpoint.",
        '    echo "lrpath: saved on signal, requeueing job $SLURM_JOB_ID at $(date -Is)"',
        '    scontrol requeue "$SLURM_JOB_ID" && exit 0',
        "fi",
    ]
