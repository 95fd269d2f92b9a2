"""Evaluation metrics, offline: FID/rFID, KID, IS on the TF Inception; PSNR, SSIM, LPIPS.

Images are NCHW RGB: uint8 in [0, 255] or float in [0, 1]. Nothing downloads; pretrained
networks are found locally (see `vision.metrics.features` and `image_quality.locate_lpips_backbone`).
"""
from vision.metrics.features import (FeatureExtractor, InceptionFeatures, convert_inception, extract_features,
                                     locate_inception, read_inception_weights, tessera_home)
from vision.metrics.fid import FID, FeatureStatistics, fid_from_features, frechet_distance, load_statistics, rfid
from vision.metrics.image_quality import load_lpips, locate_lpips_backbone, lpips_distance, psnr, rgb_to_y, ssim
from vision.metrics.inception import FIDInceptionV3
from vision.metrics.inception_score import InceptionScore, inception_score
from vision.metrics.kid import KID, kid_from_features, mmd2_unbiased, polynomial_kernel
from vision.metrics.resize import resize_for_inception, resize_tf1_bilinear, resize_torch_bilinear

__all__ = [
    "FeatureExtractor", "InceptionFeatures", "FIDInceptionV3", "convert_inception", "extract_features",
    "locate_inception", "read_inception_weights", "tessera_home",
    "FID", "FeatureStatistics", "fid_from_features", "frechet_distance", "load_statistics", "rfid",
    "KID", "kid_from_features", "mmd2_unbiased", "polynomial_kernel",
    "InceptionScore", "inception_score",
    "psnr", "ssim", "rgb_to_y", "load_lpips", "locate_lpips_backbone", "lpips_distance",
    "resize_for_inception", "resize_tf1_bilinear", "resize_torch_bilinear",
]
