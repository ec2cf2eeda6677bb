"""Data tools: SentencePiece training, parallel preprocessing to megatron-core .bin/.idx, inspection,
per-version splits, and the small real corpora shipped with the project (``lrpath data ...``)."""
