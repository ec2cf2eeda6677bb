"""Every patch of megatron-core internals checks them against the installed megatron-core first."""
from __future__ import annotations

import re

import pytest

from lrpath_megatron import cpu_compat, mcore_patches
from lrpath_megatron.mcore_patches import McorePatchError, Patch

ALL = (*mcore_patches.PATCHES, cpu_compat.CPU_RNG)
L2_NORM = "megatron.core.utils:local_multi_tensor_l2_norm"


def test_every_patch_matches_the_installed_megatron_core():
    assert mcore_patches.installed_version() == mcore_patches.WRITTEN_FOR == "0.16.1"
    for patch in ALL:
        assert patch.written_for == "0.16.1"
        # Compared here even when an earlier check in this process has already passed.
        assert [mcore_patches._difference(path, digest) for path, digest in patch.internals.items()] == \
            [None] * len(patch.internals), patch.name
        patch.check()


def test_changed_internals_stop_with_what_to_reaudit():
    digest = mcore_patches.FOREACH_GRAD_NORM.internals[L2_NORM]
    changed = Patch("changed", {L2_NORM: "0" * 12}, "what local_multi_tensor_l2_norm returns", written_for="0.15.0")
    with pytest.raises(McorePatchError) as exc:
        changed.check()
    message = str(exc.value)
    assert message.startswith("megatron-core patch 'changed' was written against megatron-core 0.15.0; the "
                              "installed megatron-core 0.16.1 differs where it relies on it:")
    assert f"{L2_NORM} changed (source sha256 {digest}, written against 000000000000)" in message
    assert "Re-audit what local_multi_tensor_l2_norm returns in megatron-core 0.16.1" in message
    with pytest.raises(McorePatchError):  # a failed check is not remembered as passed
        changed.check()


@pytest.mark.parametrize("path", ["megatron.core.utils:no_such_function",
                                  "megatron.core.optimizer.clip_grads:l2_norm_impl.no_such_attribute",
                                  "megatron.core.no_such_module:anything"])
def test_missing_internals_stop_the_patch(path):
    with pytest.raises(McorePatchError, match=re.escape(f"{path} is missing")):
        Patch("missing", {path: None}, "the call site").check()
