"""Contrastive losses of the training stages: InfoNCE and GradCache (large batches in mini-batches).

Only torch is needed: nothing here imports the curation stack, Ray or polars.
"""

from assay.training.losses.gradcache import GradCache, MiniBatches, gradcache_step
from assay.training.losses.infonce import InfoNCELoss

__all__ = ["GradCache", "InfoNCELoss", "MiniBatches", "gradcache_step"]
