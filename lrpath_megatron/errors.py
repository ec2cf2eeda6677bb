"""The one exception type users see: what went wrong, where, and how to fix it."""
from lrpath_megatron.config import ConfigError


class LrpathError(RuntimeError):
    """A user-facing failure (bad input, incompatible resume, missing file). Exits with code 2."""


USER_ERRORS = (ConfigError, LrpathError)

# Exit code of a trainer that saved on a signal (SLURM's USR1 before the time limit, preemption): the
# launcher's sbatch scripts requeue the job on it.
EXIT_REQUEUE = 3
