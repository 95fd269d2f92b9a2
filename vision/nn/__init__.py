"""Layers shared across Tessera's models."""
from vision.nn.adaln import AdaLNModulation, modulate
from vision.nn.attention import Attention, KVCache, block_causal_mask, causal_mask
from vision.nn.distributed import all_reduce_sum, global_mean, world_size
from vision.nn.feedforward import MLP, SwiGLU, swiglu_hidden_dim
from vision.nn.norm import RMSNorm
from vision.nn.rotary import apply_rotary, rope_1d, rope_2d
from vision.nn.sync_batchnorm import GlobalBatchNorm, convert_sync_batchnorm

__all__ = [
    "GlobalBatchNorm", "convert_sync_batchnorm", "all_reduce_sum", "global_mean", "world_size",
    "Attention", "KVCache", "causal_mask", "block_causal_mask", "RMSNorm", "SwiGLU", "MLP",
    "swiglu_hidden_dim", "apply_rotary", "rope_1d", "rope_2d", "AdaLNModulation", "modulate",
]
