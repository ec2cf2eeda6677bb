"""Audited patches: what a patch of megatron-core internals relies on, checked against the installed release.

Each :class:`Patch` was audited for the megatron-core releases in :data:`AUDITED` and names, per release,
the megatron-core objects it replaces or whose behaviour it compensates, with the sha256 of their source in
that release; before a patch is first applied in a process, :meth:`Patch.check` compares them with the
installed megatron-core. A patch on internals it was not audited for would corrupt checkpoints or training
without a word, so sources that match no audited release stop the run with an error naming the patch, the
audited releases and what to re-audit. A name listed without a digest (a module global the patch replaces)
only has to exist. The patches themselves are in :mod:`lrpath_megatron.mcore_patches` and, for the CPU-only
workarounds, :mod:`lrpath_megatron.cpu_compat`.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
from dataclasses import dataclass
from typing import Optional

from lrpath_megatron.errors import LrpathError
from lrpath_megatron.mcore_api import versions

AUDITED = ("0.16.1", "0.19.2")  # the megatron-core releases every patch was read against
_checked: set[str] = set()  # names of the patches whose internals matched in this process


class McorePatchError(LrpathError):
    """The installed megatron-core differs where a patch relies on it."""


def installed_version() -> str:
    # The installed distribution's version: megatron-core's own __version__ appends the commit of whatever
    # git checkout its files lie in (a venv inside this repository gets this repository's commit).
    return versions()["megatron_core"]


def source_digest(obj) -> str:
    """The digest a :class:`Patch` records for ``obj`` (after a re-audit, the new value to write there)."""
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:12]


def _difference(path: str, digest: Optional[str]) -> Optional[str]:
    """What differs about ``module:qualified.name`` from the source ``digest`` it had (None: nothing)."""
    module, _, qualname = path.partition(":")
    try:
        obj = importlib.import_module(module)
        for attr in qualname.split("."):
            obj = getattr(obj, attr)
    except (ImportError, AttributeError):
        return f"{path} is missing"
    if digest is None:
        return None
    try:
        found = source_digest(obj)
    except (OSError, TypeError):  # no source file to compare: nothing says it is the same
        return f"{path} has no readable source"
    return None if found == digest else f"{path} changed (source sha256 {found}, audited {digest})"


Internals = dict[str, Optional[str]]  # "module:qualified.name" -> sha256[:12] of its source, or None (exists)


@dataclass(frozen=True)
class Patch:
    name: str
    audited: dict[str, Internals]  # megatron-core release -> the internals the patch relies on there
    reaudit: str  # what to read again in a new megatron-core before adding its digests

    def differences(self) -> list[str]:
        """What differs from the audit of the installed release, or (a release not audited, e.g. a patch
        release) from the closest audited one; empty when the sources match one audited release."""
        installed = installed_version()
        candidates = [self.audited[installed]] if installed in self.audited else list(self.audited.values())
        found = [[d for path, digest in internals.items() if (d := _difference(path, digest))]
                 for internals in candidates]
        return min(found, key=len)

    def check(self) -> None:
        """Raise :class:`McorePatchError` unless the internals match an audited megatron-core release."""
        if self.name in _checked:
            return
        differences = self.differences()
        if differences:
            installed = installed_version()
            releases = ", ".join(self.audited)
            raise McorePatchError(
                f"megatron-core patch {self.name!r} was audited for megatron-core {releases}; the installed "
                f"megatron-core {installed} differs where it relies on it: {'; '.join(differences)}. Re-audit "
                f"{self.reaudit} in megatron-core {installed}, then update the patch and add its digests to the "
                f"Patch definition (lrpath_megatron/mcore_patches.py; cpu_compat.py for the CPU workarounds), "
                f"or install one of megatron-core {releases}")
        _checked.add(self.name)
