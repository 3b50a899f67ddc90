"""assay.training: the compressed-token embedder, the three training stages, losses, evaluation."""
