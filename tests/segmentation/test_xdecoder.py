"""X-Decoder decoder, model, inference and the released-checkpoint loader (segmentation/xdecoder*.py).

tests/data/xdecoder_decoder_parity.npz holds a tiny official predictor (microsoft/X-Decoder v2.0
modeling/interface/xdecoder.py `XDecoder` with its vlpencoder `LanguageEncoder`, run unmodified with
detectron2/fvcore/transformers imports stubbed): its seeded weights, random inputs and its outputs
for a segmentation pass, a grounding pass (task 'grounding_eval'), a vlp pass (training, task 'vlp')
and greedy captioning (task 'captioning_infer'). The *_keys.json files pin the official Focal-T key
names and shapes (backbone + pixel decoder, language encoder, predictor).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from segmentation.xdecoder import XDecoder, XDecoderConfig, XDecoderPredictor, build_self_attn_mask
from segmentation.xdecoder_official import IGNORED_KEYS, config_from_state_dict, from_official, recognise_official
from vision.hub import HubError, resolve_model

DATA = Path(__file__).resolve().parent.parent / "data"

TINY = XDecoderConfig(embed_dim=8, depths=(1, 1, 1, 1), conv_dim=32, mask_dim=32, enc_layers=1, hidden_dim=16,
                      num_queries=5, nheads=2, dim_feedforward=32, dec_layers=3, dim_proj=16, context_length=8,
                      lang_width=16, lang_layers=1, lang_heads=2, backbone_dim=64, captioning_step=3)


@pytest.fixture(scope="module")
def tiny() -> XDecoder:
    torch.manual_seed(0)
    return XDecoder(TINY).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 40, 52, generator=torch.Generator().manual_seed(3))


def test_self_attn_mask_layout():
    # 3 object queries (o), the global query (g), 2 text tokens (t); True = may not attend
    expected = torch.tensor([
        # o  o  o  g  t  t
        [0, 0, 0, 1, 1, 1],
        [0, 0, 0, 1, 1, 1],
        [0, 0, 0, 1, 1, 1],
        [1, 1, 1, 0, 1, 1],
        [0, 0, 0, 0, 0, 1],  # text sees every latent query and itself
        [0, 0, 0, 0, 0, 0],  # ... and earlier text
    ], dtype=torch.bool)
    mask = build_self_attn_mask(4, 2)
    assert mask.shape == (1, 6, 6)
    assert torch.equal(mask[0], expected)


def _predictor_parity():
    d = np.load(DATA / "xdecoder_decoder_parity.npz")
    cfg = XDecoderConfig(hidden_dim=32, num_queries=6, context_length=5, nheads=4, dim_feedforward=64, dec_layers=4,
                         mask_dim=16, dim_proj=32, vocab_size=64, lang_width=32, lang_layers=1, lang_heads=4)
    model = XDecoderPredictor(cfg, in_channels=24).eval()
    model.load_state_dict({k[2:]: torch.from_numpy(d[k]) for k in d.files if k.startswith("w/")}, strict=True)
    feats = [torch.from_numpy(d[f"in/feat{i}"]) for i in range(3)]
    return d, model, feats, torch.from_numpy(d["in/mask_features"]), torch.from_numpy(d["in/text"])


def _close(ours: torch.Tensor, recorded: np.ndarray) -> None:
    assert ours.shape == recorded.shape
    assert float((ours - torch.from_numpy(recorded)).abs().max()) <= 1e-5


def test_decoder_matches_official_segmentation_and_grounding():
    d, model, feats, mask_features, text = _predictor_parity()
    with torch.no_grad():
        seg = model(feats, mask_features, text)
        grd = model(feats, mask_features, text, grounding_tokens=torch.from_numpy(d["in/ground"]))
    for key in ("pred_logits", "pred_masks", "pred_captions"):
        _close(seg[key], d[f"seg/{key}"])
        _close(seg["aux_outputs"][1][key], d[f"seg/aux1_{key}"])
        _close(grd[key], d[f"grd/{key}"])  # 2Q - 1 queries: object, global, the object copies
    assert len(seg["aux_outputs"]) == 4


def test_decoder_matches_official_vlp_and_captioning():
    d, model, feats, mask_features, _ = _predictor_parity()
    with torch.no_grad():
        vlp = model(feats, mask_features, caption_tokens=torch.from_numpy(d["in/caption"]))
        ids = model.generate_caption(feats, mask_features, int(d["cfg/steps"]), int(d["cfg/start"]))
    for key in ("pred_captionings", "pred_captions"):
        _close(vlp[key], d[f"vlp/{key}"])
        _close(vlp["aux_outputs"][0][key], d[f"vlp/aux0_{key}"])
    assert torch.equal(ids, torch.from_numpy(d["cap/ids"]))


def test_fully_blocked_rows_attend_everywhere():
    """Mask logits all negative block every pixel for every query: those rows are unblocked, so the
    first layer sees exactly what it sees when nothing is blocked (all logits positive)."""
    _, model, feats, mask_features, text = _predictor_parity()
    last = model.mask_embed.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(1.0)
        out = {}
        for name, mf in (("all_blocked", -torch.ones_like(mask_features)), ("none", torch.ones_like(mask_features)),
                         ("some", mask_features)):
            out[name] = model(feats, mf, text)["aux_outputs"][1]["pred_captions"]  # after layer 0
    assert torch.allclose(out["all_blocked"], out["none"], atol=1e-6)
    assert not torch.allclose(out["some"], out["none"], atol=1e-3)


def _official_keys() -> dict[str, list[int]]:
    image = json.loads((DATA / "xdecoder_focalt_image_keys.json").read_text())["keys"]
    language = dict(json.loads((DATA / "xdecoder_focalt_language_keys.json").read_text())["keys"])
    predictor = json.loads((DATA / "xdecoder_focalt_predictor_keys.json").read_text())
    return {**image, **language, **predictor["keys"], **predictor["model_keys"]}


def test_official_focalt_key_set_and_config():
    keys = _official_keys()
    with torch.device("meta"):
        model = XDecoder(XDecoderConfig())
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == keys
    state = {k: torch.empty(shape, device="meta") for k, shape in keys.items()}
    config = config_from_state_dict(state)
    assert config.class_names[:2] == ("person", "bicycle") and len(config.class_names) == 133
    assert sum(config.is_thing) == 80
    assert config == XDecoderConfig(class_names=config.class_names, is_thing=config.is_thing, test_min_size=800,
                                    test_max_size=1333, caption_size=224)
    assert recognise_official(state)


def test_released_file_resolves_to_xdecoder(tiny, tmp_path):
    state = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in tiny.state_dict().items()}
    state.update({k: torch.ones(134) for k in IGNORED_KEYS})
    path = tmp_path / "xdecoder_focalt_last.pt"
    torch.save(state, path)
    model = resolve_model(path, kind="segmenter")
    assert isinstance(model, XDecoder) and not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert model.config.depths == TINY.depths and model.config.dec_layers == TINY.dec_layers
    assert model.config.num_queries == TINY.num_queries and model.config.context_length == TINY.context_length

    state["sem_seg_head.predictor.extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(HubError, match="unexpected keys"):
        resolve_model(path)


def test_loader_refuses_missing_keys(tiny):
    state = dict(tiny.state_dict())
    del state["sem_seg_head.predictor.decoder_norm.weight"]
    with pytest.raises(HubError, match="missing"):
        from_official(state)


def test_training_outputs_layout(tiny, images):
    q, k = TINY.num_queries, 3
    text = torch.nn.functional.normalize(torch.randn(k + 1, TINY.dim_proj), dim=-1)
    tokens = torch.randn(2, 4, TINY.dim_proj)
    with torch.no_grad():
        seg = tiny.forward_seg(images, text, tokens)
        ids = tiny.predictor.lang_encoder.tokenize(["a cat", "two dogs on grass"])
        vlp = tiny.forward_vlp(images, ids["input_ids"], ids["attention_mask"])
    h, w = 64 // 4, 64 // 4  # 40 x 52 padded to 64 x 64
    assert seg["pred_logits"].shape == (2, q - 1, k + 1)
    for key in ("pred_masks", "pred_gmasks"):
        assert seg[key].shape == (2, q - 1, h, w)
    for key in ("pred_captions", "pred_gtexts"):
        assert seg[key].shape == (2, q - 1, TINY.dim_proj)
    assert len(seg["aux_outputs"]) == TINY.dec_layers and set(seg["aux_outputs"][0]) == set(seg) - {"aux_outputs"}
    assert vlp["pred_captionings"].shape == (2, TINY.context_length, TINY.dim_proj)
    assert vlp["pred_captions"].shape == (2, q, TINY.dim_proj)
    assert vlp["caption_proj"].shape == vlp["backbone_embeddings"].shape == (2, TINY.dim_proj)


def test_inference_outputs(tiny, images):
    names = ["cat", "dog", "sky"]
    sem = tiny.semantic(images, names)
    assert sem.shape == (2, 3, 40, 52) and bool((sem >= 0).all())
    seg, info = tiny.panoptic(images, names, is_thing=[True, True, False])
    assert seg.shape == (2, 40, 52) and seg.dtype == torch.int32 and len(info) == 2
    inst = tiny.instance(images, names)
    assert inst[0]["masks"].dtype == torch.bool and inst[0]["masks"].shape[1:] == (40, 52)
    assert inst[0]["scores"].shape == inst[0]["labels"].shape == inst[0]["masks"].shape[:1]
    ref = tiny.referring(images, ["the cat", "a dog on the left"])
    assert ref.shape == (2, 40, 52) and bool(((ref >= 0) & (ref <= 1)).all())
    captions = tiny.caption(images)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def test_semantic_is_the_official_sum(tiny, images, monkeypatch):
    g = torch.Generator().manual_seed(5)
    logits, masks = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 40, 52, generator=g)
    monkeypatch.setattr(tiny, "_evaluate", lambda images, names, output_size=None: (logits, masks))
    sem = tiny.semantic(images, ["a", "b"])
    expected = torch.zeros(2, 2, 40, 52)
    for b in range(2):
        for q in range(4):
            prob = logits[b, q].softmax(-1)
            for c in range(2):  # the background column is dropped after the softmax
                expected[b, c] += prob[c] * masks[b, q].sigmoid()
    assert torch.allclose(sem, expected, atol=1e-6)


def test_panoptic_thresholds_and_stuff_merging(tiny, images, monkeypatch):
    big = 10.0
    logits = torch.full((1, 5, 4), -big)
    logits[0, 0, 0] = big  # thing 0, left half
    logits[0, 1, 2] = big  # stuff 2, top right
    logits[0, 2, 2] = big  # stuff 2 again, bottom right: merged into the same segment
    logits[0, 3, 3] = big  # background: dropped
    logits[0, 4, 1] = 0.5  # class 1 with a low score: dropped by object_mask_threshold
    masks = torch.full((1, 5, 4, 6), -big)
    masks[0, 0, :, :3] = big
    masks[0, 1, :2, 3:] = big
    masks[0, 2, 2:, 3:] = big
    masks[0, 3] = big
    masks[0, 4] = big
    monkeypatch.setattr(tiny, "_evaluate", lambda images, names, output_size=None: (logits, masks))
    seg, info = tiny.panoptic(images[:1], ["a", "b", "c"], is_thing=[True, True, False])
    expected = torch.tensor([[1, 1, 1, 2, 2, 2]] * 4, dtype=torch.int32)
    assert torch.equal(seg[0], expected)
    assert info[0] == [{"id": 1, "isthing": True, "category_id": 0}, {"id": 2, "isthing": False, "category_id": 2}]
