"""Sparse (pruned) models: masks drawn from public seeds or the DP global model, the schedule, and site-side enforcement."""

from fedseek.naming import canonical_name
from fedseek.sparsity.enforce import MaskEnforcer, enforce_mask
from fedseek.sparsity.masks import Mask, init_mask, magnitude_mask, maskable, prune_and_regrow, sparsity_of
from fedseek.sparsity.schedule import schedule_sparsity

__all__ = [
    "Mask", "MaskEnforcer", "canonical_name", "enforce_mask", "init_mask", "magnitude_mask", "maskable",
    "prune_and_regrow", "schedule_sparsity", "sparsity_of",
]
