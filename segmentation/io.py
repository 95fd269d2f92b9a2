"""Reading CT/MRI volumes (NIfTI, DICOM series) and writing label maps as NIfTI.

Conventions (the same as nibabel's):

- ``Volume.array`` is indexed ``[i, j, k]`` in the file's voxel order, ``i`` fastest on disk.
- ``Volume.affine`` maps ``(i, j, k, 1)`` to world millimetres in RAS+ (+x towards the patient's
  Right, +y Anterior, +z Superior). DICOM patient coordinates are LPS+ (+x Left, +y Posterior,
  +z Superior), so ``ras = diag(-1, -1, 1) @ lps``.

DICOM series are assembled by geometry, never by file name or InstanceNumber: slices are sorted
by their position along the slice normal ``n = row_cosine x column_cosine`` (``n . IPP``), the
in-plane axes follow the first slice's ImageOrientationPatient, and the third affine column is
the measured step between consecutive slice positions (so gantry tilt shows up as shear).
Problems a reader should not guess about (two series in one folder, missing slices, mixed
orientation, a lone 2-D image) raise ``ValueError`` with a one-line message.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vision.atomic import atomic_path

__all__ = ["Volume", "read_volume", "write_labels", "save_nifti", "LPS_TO_RAS"]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class Volume:
    """A 3-D image with its geometry.

    Attributes:
        array: voxel data, shape (X, Y, Z) in nibabel's canonical voxel order; integer data stays
            integer (e.g. int16 CT, uint8 labels), scaled data is float32.
        affine: (4, 4) float64 voxel-index -> RAS+ millimetre mapping.
        header: the NIfTI header read with the file (kept so that written labels carry the same
            qform/sform and codes), or None for volumes assembled from DICOM.
        source: the path the volume was read from.
        meta: extra facts from the source (DICOM: SeriesInstanceUID, Modality, the files in slice order).
    """

    array: np.ndarray
    affine: np.ndarray
    header: Any = None
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis (norms of the affine's first three columns)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(_NIFTI_SUFFIXES)


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a NIfTI file (``.nii``/``.nii.gz``) or a folder holding one DICOM series.

    4-D NIfTI files are refused (``ValueError``) unless the 4th axis has length 1: silently taking
    the first volume of a time series or a stacked multi-modal file would segment the wrong image.
    Split them first (``nibabel.four_to_three``) and pass one volume.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    if path.is_dir():
        return _read_dicom_series(path)
    if _is_nifti(path):
        return _read_nifti(path)
    if _looks_like_dicom(path):
        raise ValueError(f"{path}: a single DICOM file is a 2-D image, not a volume; "
                         "pass the folder holding the whole series")
    raise ValueError(f"{path}: not a NIfTI file (.nii/.nii.gz) or a DICOM folder")


# ----------------------------------------------------------------------------------------- NIfTI

def _read_nifti(path: Path) -> Volume:
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises several types for corrupt files
        raise _unreadable(path, err) from err
    shape = tuple(int(s) for s in img.shape)
    # Drop trailing singleton axes beyond the third (x, y, z, 1, 1 is still one volume).
    squeezed = list(shape)
    while len(squeezed) > 3 and squeezed[-1] == 1:
        squeezed.pop()
    if len(squeezed) > 3:
        raise ValueError(
            f"{path}: {len(shape)}-D NIfTI of shape {shape} holds {int(np.prod(squeezed[3:]))} volumes; "
            "read one 3-D volume at a time (split it with nibabel.four_to_three)"
        )
    if len(squeezed) < 3 or min(squeezed) < 2:
        raise ValueError(f"{path}: a 2-D image of shape {shape}, not a volume")
    try:  # nib.load reads only the header; a truncated file fails here (EOFError, zlib.error, OSError, ...)
        data = np.asanyarray(img.dataobj).reshape(squeezed)
    except Exception as err:
        raise _unreadable(path, err) from err
    if not data.dtype.isnative:  # e.g. big-endian Analyze-era files; torch cannot take them
        data = data.astype(data.dtype.newbyteorder("="))
    if data.dtype.kind == "f" and data.dtype != np.float32:
        data = data.astype(np.float32)
    elif data.dtype.kind not in "iuf":
        data = data.astype(np.float32)
    return Volume(array=data, affine=np.asarray(img.affine, dtype=np.float64), header=img.header.copy(),
                  source=str(path))


def _unreadable(path: Path, err: Exception) -> ValueError:
    return ValueError(f"{path}: unreadable NIfTI ({type(err).__name__}: {err})".splitlines()[0])


# ----------------------------------------------------------------------------------------- DICOM

def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


def _read_headers(folder: Path) -> list[Any]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    datasets = []
    for entry in sorted(folder.iterdir()):
        if not entry.is_file() or entry.name.startswith(".") or entry.name.upper() == "DICOMDIR":
            continue
        try:
            ds = pydicom.dcmread(entry)
        except (InvalidDicomError, OSError):
            continue  # not a DICOM file (a README, a thumbnail); ignore it
        if "PixelData" not in ds:
            continue  # structured reports, presentation states
        datasets.append(ds)
    return datasets


def _read_dicom_series(folder: Path) -> Volume:
    datasets = _read_headers(folder)
    if not datasets:
        raise ValueError(f"{folder}: no DICOM images in this folder")

    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) > 1:
        raise ValueError(f"{folder}: {len(series)} DICOM series in one folder (different SeriesInstanceUID); "
                         "put each series in its own folder")
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        raise ValueError(f"{folder}: multi-frame DICOM is not supported; convert the series to NIfTI first")
    if len(datasets) == 1:
        raise ValueError(f"{folder}: only one DICOM slice, a 2-D image, not a volume")
    for ds in datasets:
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if tag not in ds:
                raise ValueError(f"{folder}: slice {Path(ds.filename).name} has no {tag}; cannot place it in space")

    orient = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in datasets])
    if not np.allclose(orient, orient[0], atol=1e-4):
        raise ValueError(f"{folder}: slices have different ImageOrientationPatient (mixed orientations); "
                         "not one volume")
    row_cos, col_cos = orient[0, :3], orient[0, 3:]
    normal = np.cross(row_cos, col_cos)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise ValueError(f"{folder}: ImageOrientationPatient {orient[0].tolist()} is not two orthonormal vectors")

    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    spacings = np.array([[float(v) for v in ds.PixelSpacing] for ds in datasets])
    if len(sizes) > 1:
        raise ValueError(f"{folder}: slices have different sizes {sorted(sizes)}; not one volume")
    if not np.allclose(spacings, spacings[0], rtol=1e-4):
        raise ValueError(f"{folder}: slices have different PixelSpacing; not one volume")

    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    datasets = [datasets[i] for i in order]
    positions, along = positions[order], along[order]
    steps = np.diff(along)
    if np.min(steps) < 1e-3:
        raise ValueError(f"{folder}: two slices share the position {along[np.argmin(steps)]:.3f} mm along the slice "
                         "normal (several acquisitions or echoes in one series?)")
    median = float(np.median(steps))
    tol = max(1e-2, 1e-2 * median)
    step_vec = (positions[-1] - positions[0]) / (len(positions) - 1)
    expected = positions[0] + np.arange(len(positions))[:, None] * step_vec
    if np.max(np.abs(steps - median)) > tol or np.max(np.abs(positions - expected)) > tol:
        worst = int(np.argmax(np.abs(steps - median)))
        raise ValueError(
            f"{folder}: slice positions are not evenly spaced (steps {steps.min():.3f} to {steps.max():.3f} mm, "
            f"largest gap between {along[worst]:.3f} and {along[worst + 1]:.3f} mm): missing slices or a gap"
        )

    rows, cols = sizes.pop()
    row_spacing, col_spacing = spacings[0]
    # Array axis 0 runs along a row (increasing column index: direction row_cos, step = column spacing),
    # axis 1 down the columns (col_cos, row spacing), axis 2 along the sorted slice positions.
    lps = np.eye(4)
    lps[:3, 0] = row_cos * col_spacing
    lps[:3, 1] = col_cos * row_spacing
    lps[:3, 2] = step_vec
    lps[:3, 3] = positions[0]
    affine = LPS_TO_RAS @ lps

    slopes = [float(ds.get("RescaleSlope", 1) or 1) for ds in datasets]
    intercepts = [float(ds.get("RescaleIntercept", 0) or 0) for ds in datasets]
    integral = all(s.is_integer() for s in slopes) and all(i.is_integer() for i in intercepts)
    work_dtype = np.int64 if integral else np.float32
    volume = np.empty((cols, rows, len(datasets)), dtype=work_dtype)
    for k, (ds, slope, inter) in enumerate(zip(datasets, slopes, intercepts)):
        try:
            pixels = ds.pixel_array
        except Exception as err:  # compressed data without a decoder plugin, corrupt pixel data
            syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"{folder}: cannot decode the pixels of {Path(ds.filename).name} "
                             f"(transfer syntax {syntax}): {reason}") from err
        if pixels.ndim != 2:
            raise ValueError(f"{folder}: slice {Path(ds.filename).name} has pixel data of shape {pixels.shape}; "
                             "only single-channel 2-D slices are supported")
        if integral:
            volume[:, :, k] = pixels.T.astype(np.int64) * int(slope) + int(inter)
        else:
            volume[:, :, k] = pixels.T.astype(np.float32) * np.float32(slope) + np.float32(inter)
    if integral:
        lo, hi = int(volume.min()), int(volume.max())
        volume = volume.astype(np.int16 if -(2**15) <= lo and hi < 2**15 else np.int32)

    meta = {"SeriesInstanceUID": series.pop(), "Modality": str(datasets[0].get("Modality", "")),
            "files": [str(ds.filename) for ds in datasets]}
    return Volume(array=volume, affine=affine, header=None, source=str(folder), meta=meta)


# ----------------------------------------------------------------------------------------- write

def _label_dtype(labels: np.ndarray) -> np.dtype:
    if labels.size == 0:
        return np.dtype(np.uint8)
    lo, hi = int(labels.min()), int(labels.max())
    if lo >= 0 and hi <= 255:
        return np.dtype(np.uint8)
    if -(2**15) <= lo and hi < 2**15:
        return np.dtype(np.int16)
    raise ValueError(f"label values {lo}..{hi} do not fit int16")


def write_labels(path: str | os.PathLike, labels: Any, reference: Volume) -> Path:
    """Write a label map as NIfTI with ``reference``'s affine and header.

    The qform and sform (matrices and codes) of a NIfTI reference are kept as they were; a
    DICOM-derived reference gets both set to its affine with code 1 (scanner), or only the sform
    when the affine has shear (gantry tilt), which a quaternion qform cannot hold. The data type is
    uint8 (labels 0..255) or int16, scaling is off, the intent is NIFTI_INTENT_LABEL. The file is
    written under a temporary name in the same folder and renamed (``vision.atomic.atomic_path``), so
    readers never see half a file, and it gets the mode ``open()`` would give it (0666 & ~umask).
    """
    import nibabel as nib

    path = Path(path)
    if not _is_nifti(path):
        raise ValueError(f"{path}: labels are written as NIfTI; use a .nii or .nii.gz name")
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.shape != reference.array.shape[:3]:
        raise ValueError(f"labels of shape {labels.shape} do not match the reference volume's {reference.array.shape}")
    if labels.dtype.kind == "f":
        if not np.array_equal(labels, np.round(labels)):
            raise ValueError("labels must be integers (got non-integral floats)")
    elif labels.dtype.kind not in "iub":
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    dtype = _label_dtype(labels)
    data = labels.astype(dtype)
    affine = np.asarray(reference.affine, dtype=np.float64)

    header = reference.header
    if isinstance(header, nib.Nifti1Header):  # Nifti2Header is a subclass
        image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        hdr = header.copy()
        if hdr.endianness != "<":  # e.g. big-endian Analyze-era headers: same values, little-endian file
            hdr = hdr.as_byteswapped("<")
        if not np.allclose(hdr.get_best_affine(), affine, atol=1e-6):
            # The caller changed the geometry: store it under the codes the file already used.
            hdr.set_sform(affine, code=int(hdr["sform_code"]) or 1)
            hdr.set_qform(affine, code=int(hdr["qform_code"]) or 1)
    else:
        image_class = nib.Nifti1Image
        hdr = nib.Nifti1Header()
        hdr.set_sform(affine, code=1)
        rot = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
        if np.allclose(rot.T @ rot, np.eye(3), atol=1e-5):
            hdr.set_qform(affine, code=1)
        else:
            hdr.set_qform(affine, code=0)
        hdr.set_xyzt_units("mm")
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(data.shape)
    hdr.set_slope_inter(1.0, 0.0)
    hdr["cal_min"], hdr["cal_max"] = 0.0, float(data.max()) if data.size else 0.0
    hdr.set_intent("label")
    image = image_class(data, affine=None, header=hdr)

    path.parent.mkdir(parents=True, exist_ok=True)
    return save_nifti(image, path)


def save_nifti(image: Any, path: str | os.PathLike) -> Path:
    """``nibabel.save`` through ``vision.atomic.atomic_path``: a temporary name in the same folder, then
    ``os.replace``, mode 0666 & ~umask. ``path`` must end in .nii or .nii.gz (gzip follows the suffix)."""
    import nibabel as nib

    path = Path(path)
    if not _is_nifti(path):
        raise ValueError(f"{path}: a NIfTI file name ends in .nii or .nii.gz")
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"
    with atomic_path(path) as tmp:
        # nibabel picks the format (and gzip) from the suffix, so it writes to a sibling name with that suffix
        named = tmp.with_name(tmp.name + suffix)
        try:
            nib.save(image, named)
            os.replace(named, tmp)
        finally:
            named.unlink(missing_ok=True)
    return path
