"""vision.hub.resolve_model: the one rule every app uses for --model / --tokenizer / --vae."""
import pytest
import torch

from tests.helpers.tiny_generator import TinyConfig, TinyGenerator
from vision.hub import HubError, load_official, register_official, resolve_model, save_pretrained


def test_shipped_name_folder_and_kind(tmp_path):
    tok = resolve_model("vq-mnist", kind="tokenizer")
    assert tok.spec.vocab_size == 256
    with pytest.raises(HubError, match="is a tokenizer, not a generator"):
        resolve_model("vq-mnist", kind="generator")
    model = TinyGenerator(TinyConfig())
    save_pretrained(model, tmp_path / "m")
    again = resolve_model(tmp_path / "m", kind="generator")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_official_files_go_to_the_family_that_recognises_them(tmp_path):
    state = {"tiny.marker": torch.zeros(3)}
    register_official("tiny-test-family", kind="generator", recognise=lambda obj: "tiny.marker" in obj,
                      load=lambda obj, path: TinyGenerator(TinyConfig(num_classes=int(obj["tiny.marker"].numel()))))
    torch.save(state, tmp_path / "ours.pth")
    assert resolve_model(tmp_path / "ours.pth", kind="generator").num_classes == 3
    torch.save({"something.else": torch.zeros(1)}, tmp_path / "foreign.pth")
    with pytest.raises(HubError, match=r"not a generator checkpoint of any family .*tiny-test-family"):
        load_official(tmp_path / "foreign.pth", kind="generator")


def test_missing_and_unknown(tmp_path):
    with pytest.raises(HubError, match="does not exist"):
        resolve_model(tmp_path / "nope.pth")
    with pytest.raises(HubError, match="no model named 'nope'.*shipped models"):
        resolve_model("nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(HubError, match="expected a save_pretrained folder"):
        resolve_model(tmp_path / "notes.txt")


def test_result_folders_go_to_the_folder_importer_with_options(tmp_path):
    from vision.hub import register_official_folder

    seen = {}

    def load(path, **options):
        seen.update(options)
        return TinyGenerator(TinyConfig(num_classes=int((path / "tiny-results.txt").read_text())))

    register_official_folder("tiny-test-results", kind="generator",
                             recognise=lambda path: (path / "tiny-results.txt").is_file(), load=load)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tiny-results.txt").write_text("4")
    assert resolve_model(tmp_path / "run", kind="generator", folds=["1"]).num_classes == 4 and seen == {"folds": ["1"]}
    # a save_pretrained folder is still read as one, and options are refused for anything but a result folder
    save_pretrained(TinyGenerator(TinyConfig()), tmp_path / "saved")
    with pytest.raises(HubError, match="folds only apply to a released result folder"):
        resolve_model(tmp_path / "saved", folds=["0"])
    with pytest.raises(HubError, match="folds only apply to a released result folder"):
        resolve_model("vq-mnist", folds=["0"])
    (tmp_path / "other").mkdir()
    with pytest.raises(HubError, match=r"not a save_pretrained folder \(no config.json\) and not a result folder of "
                                       r"any family Tessera imports \(tried: .*tiny-test-results"):
        resolve_model(tmp_path / "other", kind="generator")


def _wetok_ckpt(path):
    """A WeTok Lightning checkpoint with the official key layout (pinned names and shapes), random weights."""
    import json
    from pathlib import Path

    keys = json.loads((Path(__file__).resolve().parent.parent / "data" / "wetok_official_keys.json").read_text())
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.tensor(3) if k.endswith("num_batches_tracked") or k == "model_ema.num_updates"
                 else torch.randn(shape, generator=g)) for k, shape in keys["checkpoint_tiny"]["keys"].items()}
    torch.save({"state_dict": state, "epoch": 1, "global_step": 10}, path)
    return state


def _liif_pth(path):
    from vision.decoders.liif import LIIF, LIIFConfig

    model = LIIF(LIIFConfig(encoder_args=dict(n_resblocks=1, n_feats=8), hidden_list=[16]))
    args = {"encoder_spec": {"name": "edsr-baseline", "args": {"n_resblocks": 1, "n_feats": 8, "no_upsampling": True}},
            "imnet_spec": {"name": "mlp", "args": {"out_dim": 3, "hidden_list": [16]}}}
    torch.save({"model": {"name": "liif", "args": args, "sd": model.state_dict()}, "epoch": 1000}, path)
    return model.state_dict()


def test_each_family_recognises_its_released_files_and_no_other(tmp_path):
    """WeTok.ckpt -> tokenizer, edsr-baseline-liif.pth -> decoder, HBFormer and neU-Net state dicts -> segmenter;
    asking for another kind names the importers tried."""
    from segmentation.hbformer import HBFormer, HBFormerConfig
    from segmentation.neunet import NeUNet, NeUNetConfig
    from tokenizers.wetok import WeTok
    from vision.decoders.liif import LIIF

    state = _wetok_ckpt(tmp_path / "WeTok.ckpt")
    tok = resolve_model(tmp_path / "WeTok.ckpt", kind="tokenizer")
    assert isinstance(tok, WeTok) and torch.equal(tok.decoder.conv_out.weight, state["model_ema.decoderconv_outweight"])
    liif = _liif_pth(tmp_path / "edsr-baseline-liif.pth")
    up = resolve_model(tmp_path / "edsr-baseline-liif.pth", kind="decoder")
    assert isinstance(up, LIIF) and all(torch.equal(v, up.state_dict()[k]) for k, v in liif.items())
    hb = HBFormer(HBFormerConfig(img_size=224, feature_size=8, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)))
    torch.save(hb.state_dict(), tmp_path / "best_dice.pth")  # what train_synapse.py saves
    torch.save({"epoch": 3, "model_state_dict": {f"module.{k}": v for k, v in hb.state_dict().items()}},
               tmp_path / "latest.pth")  # a DataParallel resume file
    for name in ("best_dice.pth", "latest.pth"):
        seg = resolve_model(tmp_path / name, kind="segmenter")
        assert isinstance(seg, HBFormer) and seg.config.embed_dim == 16 and seg.config.img_size == 224
        assert torch.equal(seg.out[1].weight, hb.out[1].weight)
    net = NeUNet(NeUNetConfig(features=(4, 8, 8), strides=((1, 1, 1), (1, 2, 2), (2, 2, 2)), kernel_sizes=None))
    torch.save({"network_weights": net.state_dict()}, tmp_path / "checkpoint_final.pth")
    assert isinstance(resolve_model(tmp_path / "checkpoint_final.pth", kind="segmenter"), NeUNet)
    for file, kind, tried in [("WeTok.ckpt", "segmenter", "hbformer"), ("best_dice.pth", "tokenizer", "wetok"),
                              ("edsr-baseline-liif.pth", "tokenizer", "wetok"), ("checkpoint_final.pth", "decoder", "liif")]:
        with pytest.raises(HubError, match=rf"not a {kind} checkpoint of any family .*{tried}"):
            resolve_model(tmp_path / file, kind=kind)
