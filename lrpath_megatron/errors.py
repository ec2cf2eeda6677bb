"""The one exception type users see: what went wrong, where, and how to fix it."""
from lrpath_megatron.config import ConfigError


class LrpathError(RuntimeError):
    """A user-facing failure (bad input, incompatible resume, missing file). Exits with code 2."""


USER_ERRORS = (ConfigError, LrpathError)

# Exit code of a trainer that saved on a signal (SLURM's USR1 before the time limit, preemption): the
# launcher's sbatch scripts requeue the job on it.
EXIT_REQUEUE = 3

# Environment variable naming the directory where a rank that leaves for a hang or a lost peer writes its
# fault record (lrpath_megatron.hang_guard); the sbatch scripts set it per job attempt and read the records
# to decide which nodes to leave out of the requeued job.
FAULT_DIR_ENV = "LRPATH_FAULT_DIR"
