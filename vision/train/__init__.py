"""The one training toolkit: torchrun/DDP, resumable data order, accumulation, AMP, EMA,
atomic checkpoints with every RNG state, JSONL metrics + PNG curves, tqdm on rank 0, and run
folders that are never clobbered (--resume / --overwrite)."""
from vision.train.distributed import DistInfo, setup_distributed, teardown_distributed
from vision.train.sampler import ResumableSampler, SeededDataset
from vision.train.ema import EMA
from vision.train.checkpoint import load_checkpoint, save_checkpoint
from vision.train.run_folder import RunFolder, check_run_folder
from vision.train.trainer import Phase, TrainConfig, Trainer, TrainingDiverged, add_train_args, train_config_from_args

__all__ = [
    "DistInfo", "setup_distributed", "teardown_distributed", "ResumableSampler", "SeededDataset", "EMA",
    "load_checkpoint", "save_checkpoint", "Phase", "TrainConfig", "Trainer", "TrainingDiverged",
    "add_train_args", "train_config_from_args", "RunFolder", "check_run_folder",
]
