"""Evaluation metrics, offline: FID/rFID, KID, IS on the TF Inception; PSNR, SSIM, LPIPS; digit scores.

Tensor-level metrics take NCHW RGB images: uint8 in [0, 255] or float in [0, 1]. The folder-level
protocols of `python -m apps.evaluate` (`fid_from_folders`, `rfid_of_tokenizer`, ...) read image
folders in batches, optionally split across torchrun processes (`Runner`). `score_digits` scores
generated digits (float in [-1, 1], as generators decode them) with the shipped `mnist-classifier`.
Nothing downloads; pretrained networks are found locally (see `vision.metrics.features` and
`image_quality.locate_lpips_backbone`).
"""
from vision.metrics.batches import Runner, map_dataset
from vision.metrics.digits import heldout_digits, reference_statistics, score_digits
from vision.metrics.errors import EvaluationInputError
from vision.metrics.extractors import Extractor, build_extractor, load_classifier, load_inception
from vision.metrics.features import (FeatureExtractor, InceptionFeatures, convert_inception, extract_features,
                                     locate_inception, read_inception_weights, tessera_home)
from vision.metrics.fid import FID, FeatureStatistics, fid_from_features, frechet_distance, load_statistics, rfid
from vision.metrics.fid_statistics import (FIDStatistics, fid_between, read_fid_statistics, statistics_of_features,
                                           write_fid_statistics)
from vision.metrics.folder_metrics import (classify_folder, fid_from_folders, inception_score_of_folder,
                                           kid_from_folders, paired_folder_metric, statistics_of_folder)
from vision.metrics.folders import image_files, paired_files
from vision.metrics.image_quality import load_lpips, locate_lpips_backbone, lpips_distance, psnr, rgb_to_y, ssim
from vision.metrics.inception import FIDInceptionV3
from vision.metrics.inception_score import InceptionScore, inception_score
from vision.metrics.kid import KID, kid_from_features, mmd2_unbiased, polynomial_kernel
from vision.metrics.reconstruction import rfid_of_tokenizer
from vision.metrics.resize import resize_for_inception, resize_tf1_bilinear, resize_torch_bilinear

__all__ = [
    "FeatureExtractor", "InceptionFeatures", "FIDInceptionV3", "convert_inception", "extract_features",
    "locate_inception", "read_inception_weights", "tessera_home",
    "FID", "FeatureStatistics", "fid_from_features", "frechet_distance", "load_statistics", "rfid",
    "KID", "kid_from_features", "mmd2_unbiased", "polynomial_kernel",
    "InceptionScore", "inception_score",
    "psnr", "ssim", "rgb_to_y", "load_lpips", "locate_lpips_backbone", "lpips_distance",
    "resize_for_inception", "resize_tf1_bilinear", "resize_torch_bilinear",
    # folder-level protocols (python -m apps.evaluate)
    "Runner", "map_dataset", "EvaluationInputError", "image_files", "paired_files",
    "Extractor", "build_extractor", "load_classifier", "load_inception",
    "FIDStatistics", "fid_between", "read_fid_statistics", "statistics_of_features", "write_fid_statistics",
    "fid_from_folders", "kid_from_folders", "inception_score_of_folder", "statistics_of_folder",
    "paired_folder_metric", "classify_folder", "rfid_of_tokenizer",
    # generated digits
    "score_digits", "reference_statistics", "heldout_digits",
]
