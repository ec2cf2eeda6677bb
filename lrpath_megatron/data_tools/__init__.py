"""Data tools: SentencePiece training, parallel preprocessing to megatron-core .bin/.idx, per-version splits,
and the small real corpora shipped with the project (``lrpath data ...``; ``lrpath data inspect`` reads a
corpus as training does, in :mod:`lrpath_megatron.inspect_data`)."""
