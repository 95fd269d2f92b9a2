"""Data: image files <-> tensors, ImageNet-layout folders, real photos from installed wheels, MNIST-5k."""
from vision.data.images import ImageReadError, read_image, read_image_uint8, save_image, to_uint8
from vision.data.folder import ImageFolder
from vision.data.transforms import center_crop_resize
from vision.data.samples import sample_photos
from vision.data.mnist import load_mnist5k

__all__ = [
    "ImageReadError", "read_image", "read_image_uint8", "save_image", "to_uint8",
    "ImageFolder", "center_crop_resize", "sample_photos", "load_mnist5k",
]
