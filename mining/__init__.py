"""assay.mining: encoders, the embedding cache, kNN indexes and negative-selection rules."""
