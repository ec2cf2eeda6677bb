"""The held-out split megatron-core's dataset builder makes of a corpus: the split string lrpath hands it,
and the documents it holds out (the same for training, ``lrpath data inspect`` and ``split-versions``)."""
from __future__ import annotations

from lrpath_megatron.errors import LrpathError


def split_string(valid_fraction: float) -> str:
    """megatron-core split string "train,valid,test" holding out ``valid_fraction`` of the documents.

    Fixed-point digits: megatron-core parses the split with a digits-and-dots regex (no exponents).
    """
    return f"{1.0 - valid_fraction:.12f},{valid_fraction:.12f},0"


def held_out_range(num_docs: int, valid_fraction: float) -> tuple[int, int]:
    """Document range [begin, end) megatron-core's dataset builder uses as the validation split."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    if not 0 < valid_fraction < 1:
        raise LrpathError(f"--valid-fraction={valid_fraction} must be in (0, 1)")
    bookends = convert_split_vector_to_split_matrix(parse_and_normalize_split(split_string(valid_fraction)))[1]
    if bookends is None:
        return num_docs, num_docs
    # The rounding of BlendedMegatronDatasetBuilder._build_megatron_dataset_splits.
    return int(round(bookends[0] * num_docs)), int(round(bookends[1] * num_docs))
