"""Reading NIfTI/DICOM volumes and writing label maps, on real files carried by the nibabel and pydicom wheels."""
from __future__ import annotations

import gzip
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files

from segmentation.io import LPS_TO_RAS, Volume, read_volume, write_labels

NIB_DATA = Path(nib.__file__).parent / "tests" / "data"
CT5N = sorted(get_testdata_files("dicomdirtests/98892001/CT5N/*"))


def _copy_series(folder: Path, files=CT5N, renumber: bool = True, edit=None) -> Path:
    """Copy the CT5N slices under shuffled names (and scrambled InstanceNumbers) so only geometry orders them."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [f"IMG{n:04d}" for n in rng.permutation(len(files))]
    numbers = rng.permutation(len(files)) + 1
    for i, (src, name) in enumerate(zip(files, names)):
        ds = pydicom.dcmread(src)
        if renumber:
            ds.InstanceNumber = int(numbers[i])
        if edit is not None:
            edit(i, ds)
        ds.save_as(folder / name)
    return folder


def test_anatomical_nii_reads_like_nibabel():
    path = NIB_DATA / "anatomical.nii"
    vol = read_volume(path)
    ref = nib.load(str(path))
    assert vol.shape == (33, 41, 25) and vol.spacing == (2.0, 2.0, 2.0)
    assert nib.aff2axcodes(vol.affine) == ("L", "A", "S")
    assert np.array_equal(vol.affine, ref.affine)
    assert np.array_equal(vol.array, np.asanyarray(ref.dataobj)) and vol.array.dtype.isnative


def test_write_labels_keeps_affine_and_codes(tmp_path):
    vol = read_volume(NIB_DATA / "anatomical.nii")
    labels = (vol.array > np.percentile(vol.array, 70)).astype(np.int64) + (vol.array > np.percentile(vol.array, 95))
    out = write_labels(tmp_path / "seg.nii.gz", labels, vol)
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.uint8
    assert np.array_equal(img.affine, vol.affine)
    for key in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "xyzt_units"):
        assert np.array_equal(img.header[key], vol.header[key]), key
    assert np.array_equal(img.header["pixdim"][:4], vol.header["pixdim"][:4])  # qfac and voxel sizes
    assert np.array_equal(np.asanyarray(img.dataobj), labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.nii.gz"]  # no temporary left behind


def test_oblique_affine_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.linalg.det(q))  # a proper rotation
    affine = np.eye(4)
    affine[:3, :3] = q @ np.diag([0.8, 1.1, 2.5])
    affine[:3, 3] = [-91.5, 12.25, 40.0]
    img = nib.Nifti1Image(rng.normal(size=(12, 10, 7)).astype(np.float32), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=4)
    nib.save(img, tmp_path / "oblique.nii")
    vol = read_volume(tmp_path / "oblique.nii")
    np.testing.assert_allclose(vol.affine, affine, atol=1e-5)
    out = nib.load(str(write_labels(tmp_path / "lab.nii", (vol.array > 0).astype(np.uint8), vol)))
    assert np.array_equal(out.affine, vol.affine)
    assert int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 4
    assert np.array_equal(out.header.get_qform(), vol.header.get_qform())
    assert np.array_equal(out.header.get_sform(), vol.header.get_sform())


def test_int16_labels_and_bad_labels(tmp_path):
    vol = read_volume(NIB_DATA / "anatomical.nii")
    labels = np.zeros(vol.shape, dtype=np.int64)
    labels[3, 4, 5] = 300
    img = nib.load(str(write_labels(tmp_path / "big.nii", labels, vol)))
    assert img.get_data_dtype() == np.int16 and int(np.asanyarray(img.dataobj)[3, 4, 5]) == 300
    with pytest.raises(ValueError, match="do not match"):
        write_labels(tmp_path / "bad.nii", labels[:-1], vol)
    with pytest.raises(ValueError, match=".nii"):
        write_labels(tmp_path / "bad.png", labels, vol)


def test_4d_and_2d_nifti_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"4-D NIfTI .* 2 volumes") as err:
        read_volume(NIB_DATA / "example4d.nii.gz")
    assert "\n" not in str(err.value)
    nib.save(nib.Nifti1Image(np.zeros((20, 30), np.float32), np.eye(4)), tmp_path / "flat.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((20, 30, 1), np.float32), np.eye(4)), tmp_path / "slice.nii.gz")
    for name in ("flat.nii.gz", "slice.nii.gz"):
        with pytest.raises(ValueError, match="2-D image"):
            read_volume(tmp_path / name)


@pytest.mark.parametrize("name", ["anatomical.nii", "example4d.nii.gz"])
def test_truncated_nifti_is_one_line_naming_the_file(tmp_path, name):
    """nibabel reads only the header on load; the cut-off data must not escape as EOFError/zlib.error."""
    if name.endswith(".gz"):  # a 3-D .nii.gz: the 4-D example's first volume
        image = nib.load(NIB_DATA / name)
        image = nib.Nifti1Image(np.asanyarray(image.dataobj)[..., 0], image.affine)
        data = gzip.compress(image.to_bytes())
    else:
        data = (NIB_DATA / name).read_bytes()
    cut = tmp_path / name
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"unreadable NIfTI") as err:
        read_volume(cut)
    assert str(err.value).startswith(f"{cut}: ") and "\n" not in str(err.value)


def test_dicom_series_order_and_affine_from_geometry(tmp_path):
    folder = _copy_series(tmp_path / "ct")
    vol = read_volume(folder)
    assert vol.shape == (16, 16, 5) and vol.array.dtype == np.int16
    np.testing.assert_allclose(vol.spacing, (0.488281, 0.488281, 2.5), rtol=1e-6)
    # Expected order: ascending position along the normal (z here), whatever the names and InstanceNumbers say.
    refs = sorted((pydicom.dcmread(f) for f in CT5N), key=lambda d: float(d.ImagePositionPatient[2]))
    for k, ds in enumerate(refs):
        expected = ds.pixel_array.T.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        assert np.array_equal(vol.array[:, :, k], expected), k
    # In-plane axes and origin: nibabel's per-slice DICOM affine (LPS, axes = row index, column index)
    # with the two columns swapped (our axis 0 runs along a row) and converted to RAS. (Its third
    # column is a per-slice convention, not the series' slice step, so it is checked below instead.)
    with warnings.catch_warnings():  # nibabel warns that its DICOM readers are experimental
        warnings.simplefilter("ignore")
        from nibabel.nicom.dicomwrappers import wrapper_from_data
    lps = wrapper_from_data(refs[0]).affine[:, [1, 0, 3]]
    np.testing.assert_allclose(vol.affine[:, [0, 1, 3]], LPS_TO_RAS @ lps, atol=1e-6)
    np.testing.assert_allclose(vol.affine[:3, 2], [0.0, 0.0, 2.5], atol=1e-6)
    # Every slice centre maps to its ImagePositionPatient.
    for k, ds in enumerate(refs):
        ras = vol.affine @ np.array([0, 0, k, 1.0])
        np.testing.assert_allclose(LPS_TO_RAS[:3, :3] @ ras[:3], [float(v) for v in ds.ImagePositionPatient], atol=1e-5)


def test_dicom_rescale_slope_applied(tmp_path):
    def edit(i, ds):
        ds.RescaleSlope, ds.RescaleIntercept = 0.5, -1000.25
    vol = read_volume(_copy_series(tmp_path / "ct", edit=edit))
    refs = sorted((pydicom.dcmread(f) for f in CT5N), key=lambda d: float(d.ImagePositionPatient[2]))
    assert vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array[:, :, 2], refs[2].pixel_array.T.astype(np.float32) * 0.5 - 1000.25)


def test_dicom_labels_written_in_dicom_geometry(tmp_path):
    vol = read_volume(_copy_series(tmp_path / "ct"))
    out = nib.load(str(write_labels(tmp_path / "seg.nii.gz", (vol.array > 0).astype(np.uint8), vol)))
    np.testing.assert_allclose(out.affine, vol.affine, atol=1e-4)  # float32 storage in the header
    assert int(out.header["sform_code"]) == 1 and int(out.header["qform_code"]) == 1


def test_dicom_two_series_refused(tmp_path):
    folder = _copy_series(tmp_path / "ct")
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "other")
    with pytest.raises(ValueError, match="2 DICOM series") as err:
        read_volume(folder)
    assert "\n" not in str(err.value)


def test_dicom_missing_slice_refused(tmp_path):
    folder = _copy_series(tmp_path / "ct", files=CT5N[:2] + CT5N[3:])
    with pytest.raises(ValueError, match="missing slices") as err:
        read_volume(folder)
    assert "\n" not in str(err.value)


def test_dicom_mixed_orientation_refused(tmp_path):
    def edit(i, ds):
        if i == 1:
            c, s = np.cos(0.2), np.sin(0.2)
            ds.ImageOrientationPatient = [c, s, 0.0, -s, c, 0.0]
    with pytest.raises(ValueError, match="ImageOrientationPatient"):
        read_volume(_copy_series(tmp_path / "ct", edit=edit))


def test_single_dicom_image_refused(tmp_path):
    with pytest.raises(ValueError, match="2-D image"):
        read_volume(get_testdata_file("CT_small.dcm"))
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "x")
    with pytest.raises(ValueError, match="2-D image"):
        read_volume(folder)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not DICOM")
    with pytest.raises(ValueError, match="no DICOM images"):
        read_volume(tmp_path / "empty")


def test_volume_spacing_from_affine():
    vol = Volume(array=np.zeros((2, 2, 2)), affine=np.diag([-0.7, 0.7, 3.0, 1.0]))
    assert vol.spacing == pytest.approx((0.7, 0.7, 3.0))


def test_save_nifti_is_atomic_and_follows_the_suffix(tmp_path, monkeypatch):
    from segmentation.io import save_nifti

    image = nib.Nifti1Image(np.arange(24, dtype=np.uint8).reshape(2, 3, 4), np.diag([2.0, 2.0, 3.0, 1.0]))
    for name, gzipped in (("a.nii.gz", True), ("b.nii", False)):
        save_nifti(image, tmp_path / name)
        assert ((tmp_path / name).read_bytes()[:2] == b"\x1f\x8b") == gzipped
        back = nib.load(str(tmp_path / name))
        assert np.array_equal(np.asarray(back.dataobj), image.get_fdata().astype(np.uint8))
        assert np.array_equal(back.affine, image.affine)
    with pytest.raises(ValueError, match=".nii or .nii.gz"):
        save_nifti(image, tmp_path / "c.img")

    # a write that fails halfway keeps the old file and leaves no temporary file behind
    before = (tmp_path / "a.nii.gz").read_bytes()

    def torn(img, filename):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", torn)
    with pytest.raises(OSError, match="disk full"):
        save_nifti(image, tmp_path / "a.nii.gz")
    assert (tmp_path / "a.nii.gz").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "b.nii"]
