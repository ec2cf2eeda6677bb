"""The one exception type users see: what went wrong, where, and how to fix it."""
from lrpath_megatron.config import ConfigError


class LrpathError(RuntimeError):
    """A user-facing failure (bad input, incompatible resume, missing file). Exits with code 2."""


USER_ERRORS = (ConfigError, LrpathError)
