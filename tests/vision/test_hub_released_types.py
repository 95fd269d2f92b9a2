"""Released checkpoints pickle a few plain-data types beside their tensors (nnU-Net: numpy scalars and dtypes in
`logging` and `_best_ema`; MAR and LlamaGen: an argparse.Namespace). Those load; anything that runs code does not."""
import argparse
import zipfile

import numpy as np
import pytest
import torch

from vision.hub import HubError, load_official_state_dict


def nnunet_like(path):
    torch.save({"network_weights": {"w": torch.ones(2)}, "init_args": {"plans": {"spacing": [1.0, 1.0]}},
                "logging": {"train_losses": [np.float32(0.5), np.float64(0.25)], "lrs": [np.float64(1e-2)]},
                "_best_ema": np.float64(0.7), "dtype": np.dtype("float32"),
                "args": argparse.Namespace(model="mar_base", blr=1e-4)}, path)


def test_numpy_scalars_dtypes_and_namespace_load(tmp_path):
    nnunet_like(tmp_path / "checkpoint_final.pth")
    out = load_official_state_dict(tmp_path / "checkpoint_final.pth")
    assert out["_best_ema"] == 0.7 and out["logging"]["train_losses"][1] == 0.25
    assert out["dtype"] == np.dtype("float32") and out["args"].model == "mar_base"
    assert torch.equal(out["network_weights"]["w"], torch.ones(2))


def test_numpy_1x_names_load(tmp_path):
    """A file written under numpy 1.x names its scalars numpy.core.multiarray.scalar."""
    nnunet_like(tmp_path / "new.pth")
    with zipfile.ZipFile(tmp_path / "new.pth") as src, zipfile.ZipFile(tmp_path / "old.pth", "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
                assert b"numpy.core.multiarray" in data
            dst.writestr(info, data)
    assert load_official_state_dict(tmp_path / "old.pth")["_best_ema"] == 0.7


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_code_is_still_refused(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"x": RunsCode(str(marker)), "y": np.float64(1.0)}, tmp_path / "evil.pth")
    with pytest.raises(HubError, match="refusing to unpickle"):
        load_official_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()
