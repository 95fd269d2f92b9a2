"""Layers shared across Tessera's models."""
from vision.nn.distributed import all_reduce_sum, global_mean, world_size
from vision.nn.sync_batchnorm import GlobalBatchNorm, convert_sync_batchnorm

__all__ = ["GlobalBatchNorm", "convert_sync_batchnorm", "all_reduce_sum", "global_mean", "world_size"]
