"""Every patch of megatron-core internals checks them against the installed megatron-core first."""
from __future__ import annotations

import re

import pytest

from lrpath_megatron import cpu_compat, mcore_audit, mcore_patches
from lrpath_megatron.mcore_audit import McorePatchError, Patch

pytestmark = pytest.mark.compat  # the megatron-core compatibility lane runs it too

ALL = (*mcore_patches.PATCHES, cpu_compat.CPU_RNG)
L2_NORM = "megatron.core.utils:local_multi_tensor_l2_norm"


INSTALLED = mcore_audit.installed_version()


def test_every_patch_was_audited_for_the_installed_megatron_core():
    assert INSTALLED in mcore_audit.AUDITED
    for patch in ALL:
        assert set(patch.audited) == set(mcore_audit.AUDITED), patch.name
        # Compared against this release's own digests, even when an earlier check in this process passed.
        internals = patch.audited[INSTALLED]
        assert [mcore_audit._difference(path, digest) for path, digest in internals.items()] == \
            [None] * len(internals), patch.name
        assert patch.differences() == []
        patch.check()


def test_changed_internals_stop_with_what_to_reaudit():
    digest = mcore_patches.FOREACH_GRAD_NORM.audited[INSTALLED][L2_NORM]
    changed = Patch("changed", {"0.15.0": {L2_NORM: "0" * 12}, "0.15.1": {L2_NORM: "1" * 12}},
                    "what local_multi_tensor_l2_norm returns")
    with pytest.raises(McorePatchError) as exc:
        changed.check()
    message = str(exc.value)
    assert message.startswith("megatron-core patch 'changed' was audited for megatron-core 0.15.0, 0.15.1; the "
                              f"installed megatron-core {INSTALLED} differs where it relies on it:")
    assert f"{L2_NORM} changed (source sha256 {digest}, audited 000000000000)" in message
    assert f"Re-audit what local_multi_tensor_l2_norm returns in megatron-core {INSTALLED}" in message
    with pytest.raises(McorePatchError):  # a failed check is not remembered as passed
        changed.check()


@pytest.mark.parametrize("path", ["megatron.core.utils:no_such_function",
                                  "megatron.core.optimizer.clip_grads:l2_norm_impl.no_such_attribute",
                                  "megatron.core.no_such_module:anything"])
def test_missing_internals_stop_the_patch(path):
    with pytest.raises(McorePatchError, match=re.escape(f"{path} is missing")):
        Patch("missing", {INSTALLED: {path: None}}, "the call site").check()


def test_an_audited_release_is_held_to_its_own_digests():
    """The installed release's digests are the ones compared, not any audited release's: sources equal to
    another release's audit do not pass for this one."""
    other = "9.9.9"
    internals = mcore_patches.FOREACH_GRAD_NORM.audited[INSTALLED]
    patch = Patch("pinned", {INSTALLED: {L2_NORM: "0" * 12}, other: internals}, "the call site")
    assert patch.differences() and Patch("any", {other: internals}, "the call site").differences() == []
