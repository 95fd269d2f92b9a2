"""X-Decoder losses: point sampling, mask costs, Hungarian matching (vs brute force), the criterion
(vs values recorded from the official SetCriterion / HungarianMatcher) and the weight dict."""
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from segmentation.xdecoder_loss import (
    HungarianMatcher, SetCriterion, batch_dice_cost, batch_sigmoid_ce_cost, calculate_uncertainty, dice_loss,
    get_uncertain_point_coords_with_randomness, image_text_contrastive_loss, multi_positive_contrastive_loss,
    point_sample, sigmoid_ce_loss, total_loss, vlp_targets, weight_losses, xdecoder_weight_dict,
)

PARITY = json.loads((Path(__file__).resolve().parents[1] / "data" / "xdecoder_loss_parity.json").read_text())


# ----------------------------------------------------------------------------- shared cases
# (tests/data/xdecoder_loss_parity.json was recorded by running the official code on these exact inputs)

def make_seg_case(seed: int = 0, num_aux: int = 3):
    g = torch.Generator().manual_seed(seed)
    bs, nq, k, d, ng = 2, 6, 4, 8, 5
    n_obj, n_cap, n_grd = [3, 2], [3, 2], [2, 3]

    def layer():
        return {
            "pred_logits": (2 * torch.randn(bs, nq, k + 1, generator=g)).requires_grad_(),
            "pred_masks": (3 * torch.randn(bs, nq, 8, 8, generator=g)).requires_grad_(),
            "pred_captions": torch.randn(bs, nq, d, generator=g).requires_grad_(),
            "pred_gmasks": (3 * torch.randn(bs, ng, 8, 8, generator=g)).requires_grad_(),
            "pred_gtexts": torch.randn(bs, ng, d, generator=g).requires_grad_(),
        }

    def blobs(n):  # binary masks at 16x16 made of 4x4 blocks
        return (F.interpolate(torch.rand(n, 1, 4, 4, generator=g), size=(16, 16)) > 0.5).float()[:, 0]

    outputs = layer()
    outputs["aux_outputs"] = [layer() for _ in range(num_aux)]
    targets = []
    for b in range(bs):
        labels = torch.randint(0, k, (n_obj[b],), generator=g)
        targets.append({
            "labels": labels,
            "masks": blobs(n_obj[b]),
            "captions": F.normalize(torch.randn(n_cap[b], d, generator=g), dim=-1).requires_grad_(),
            "captions_hash": [11, 12, 11][: n_cap[b]] if b == 0 else [12, 13],
            "labels_hash": [100 + int(x) for x in labels],
            "grounding_masks": blobs(n_grd[b]),
            "grounding_class_embs": torch.randn(n_grd[b], d, generator=g).requires_grad_(),
            "grounding_hash": [5, 6] if b == 0 else [7, 7, 8],
            "grounding_task": "text" if b == 0 else "class",
        })
    extra = {"logit_scale": torch.tensor(math.log(1 / 0.07), requires_grad=True),
             "class_embeddings": F.normalize(torch.randn(k + 1, d, generator=g), dim=-1).requires_grad_()}
    return outputs, targets, extra


def make_vlp_case(seed: int = 1, num_aux: int = 2):
    g = torch.Generator().manual_seed(seed)
    bs, nq, length, d, vocab = 3, 7, 6, 8, 13

    def layer():
        return {"pred_captionings": torch.randn(bs, length, d, generator=g).requires_grad_(),
                "pred_captions": torch.randn(bs, nq, d, generator=g).requires_grad_()}

    outputs = layer()
    outputs["aux_outputs"] = [layer() for _ in range(num_aux)]
    targets = []
    for n_valid in (6, 4, 3):
        targets.append({"caption_tokens": torch.randn(1, length, d, generator=g).requires_grad_(),
                        "caption_proj": torch.randn(1, d, generator=g).requires_grad_(),
                        "caption_tokenids": torch.randint(0, vocab, (1, length), generator=g),
                        "caption_mask": (torch.arange(length) < n_valid).long()[None]})
    extra = {"logit_scale": torch.tensor(math.log(1 / 0.07), requires_grad=True),
             "token_embedding": torch.randn(vocab, d, generator=g).requires_grad_()}
    return outputs, targets, extra


def leaves(outputs, targets, extra):
    """Every tensor that needs a gradient: predictions of each layer, and the text side (language encoder)."""
    layers = [outputs, *outputs.get("aux_outputs", [])]
    found = {f"{i}.{k}": v for i, out in enumerate(layers) for k, v in out.items() if k != "aux_outputs"}
    found.update({f"target{b}.{k}": v for b, t in enumerate(targets) for k, v in t.items()
                  if isinstance(v, torch.Tensor) and v.requires_grad})
    found.update({f"extra.{k}": v for k, v in extra.items() if v.requires_grad})
    return found


def small_criterion(**kw):
    cfg = PARITY["config"]
    kw.setdefault("top_x_layers", cfg["top_x_layers"])
    return SetCriterion(cfg["num_classes"], HungarianMatcher(num_points=cfg["num_points"]), PARITY["weight_dict_small"],
                        num_points=cfg["num_points"], **kw)


# ----------------------------------------------------------------------------- points

def test_point_sample_is_bilinear_in_unit_square():
    torch.manual_seed(0)
    img = torch.randn(2, 3, 5, 7)
    coords = torch.rand(2, 11, 2)
    out = point_sample(img, coords, align_corners=False)
    assert out.shape == (2, 3, 11)
    # align_corners=False: x in [0, 1] maps to pixel coordinate x * W - 0.5; zero padding outside
    for n in range(2):
        for p in range(11):
            x, y = coords[n, p, 0] * 7 - 0.5, coords[n, p, 1] * 5 - 0.5
            x0, y0 = math.floor(x), math.floor(y)
            want = torch.zeros(3)
            for xi, yi in itertools.product((x0, x0 + 1), (y0, y0 + 1)):
                if 0 <= xi < 7 and 0 <= yi < 5:
                    want += (1 - abs(x - xi)) * (1 - abs(y - yi)) * img[n, :, yi, xi]
            torch.testing.assert_close(out[n, :, p], want, atol=1e-5, rtol=0)
    # a pixel centre returns the pixel: (x, y) order
    centre = torch.tensor([[[(4 + 0.5) / 7, (1 + 0.5) / 5]]]).expand(2, 1, 2)
    torch.testing.assert_close(point_sample(img, centre, align_corners=False)[:, :, 0], img[:, :, 1, 4])
    # a grid of coordinates keeps its layout
    assert point_sample(img, coords.view(2, 11, 1, 2), align_corners=False).shape == (2, 3, 11, 1)


def test_uncertain_points_keep_the_least_confident_candidates():
    logits = torch.linspace(-4, 4, 64).view(1, 1, 8, 8).repeat(3, 1, 1, 1)
    g = torch.Generator().manual_seed(3)
    coords = get_uncertain_point_coords_with_randomness(logits, calculate_uncertainty, 20, 3.0, 0.75, generator=g)
    assert coords.shape == (3, 20, 2) and coords.min() >= 0 and coords.max() <= 1
    # same draws by hand: 60 candidates, the 15 with smallest |logit| kept, then 5 fresh points
    g = torch.Generator().manual_seed(3)
    cand = torch.rand(3, 60, 2, generator=g)
    score = -point_sample(logits, cand, align_corners=False)[:, 0].abs()
    order = score.argsort(dim=1, descending=True)[:, :15]
    want = torch.cat([torch.gather(cand, 1, order[..., None].expand(-1, -1, 2)), torch.rand(3, 5, 2, generator=g)], 1)
    torch.testing.assert_close(coords, want)
    assert calculate_uncertainty(torch.tensor([[[-2.0, 0.5]]])).tolist() == [[[-2.0, -0.5]]]
    with pytest.raises(ValueError):
        calculate_uncertainty(torch.zeros(1, 2, 3))


def test_dice_and_bce_against_formulas():
    torch.manual_seed(1)
    x = torch.randn(4, 30) * 2
    t = (torch.rand(4, 30) > 0.5).float()
    p = x.sigmoid()
    dice = sum(1 - (2 * (p[i] * t[i]).sum() + 1) / (p[i].sum() + t[i].sum() + 1) for i in range(4)) / 2.5
    bce = sum(-(t[i] * p[i].log() + (1 - t[i]) * (1 - p[i]).log()).mean() for i in range(4)) / 2.5
    torch.testing.assert_close(dice_loss(x, t, 2.5), dice)
    torch.testing.assert_close(sigmoid_ce_loss(x, t, 2.5), bce)
    y = (torch.rand(3, 30) > 0.3).float()
    dice_matrix = torch.tensor([[dice_loss(x[i:i + 1], y[j:j + 1], 1.0) for j in range(3)] for i in range(4)])
    bce_matrix = torch.tensor([[sigmoid_ce_loss(x[i:i + 1], y[j:j + 1], 1.0) for j in range(3)] for i in range(4)])
    torch.testing.assert_close(batch_dice_cost(x, y), dice_matrix)
    torch.testing.assert_close(batch_sigmoid_ce_cost(x, y), bce_matrix)


# ----------------------------------------------------------------------------- matching

def _brute_force(cost):
    q, t = cost.shape
    return min(float(sum(cost[p[j], j] for j in range(t))) for p in itertools.permutations(range(q), t))


def _hand_cost(class_cost, out_mask, tgt_mask, coords, matcher):
    out = point_sample(out_mask[:, None], coords.expand(len(out_mask), -1, -1), align_corners=False)[:, 0]
    tgt = point_sample(tgt_mask[:, None], coords.expand(len(tgt_mask), -1, -1), align_corners=False)[:, 0]
    cost = torch.empty(len(out), len(tgt))
    for i, j in itertools.product(range(len(out)), range(len(tgt))):
        cost[i, j] = (matcher.cost_class * class_cost[i, j]
                      + matcher.cost_mask * sigmoid_ce_loss(out[i:i + 1], tgt[j:j + 1], 1.0)
                      + matcher.cost_dice * dice_loss(out[i:i + 1], tgt[j:j + 1], 1.0))
    return cost


@pytest.mark.parametrize("nq,nt", [(3, 3), (5, 2), (6, 4), (4, 1)])
def test_matcher_finds_the_brute_force_optimum(nq, nt):
    torch.manual_seed(nq * 10 + nt)
    matcher = HungarianMatcher(num_points=64)
    outputs = {"pred_logits": torch.randn(2, nq, 4) * 2, "pred_masks": torch.randn(2, nq, 6, 6) * 3}
    targets = [{"labels": torch.randint(0, 3, (nt,)), "masks": (torch.rand(nt, 12, 12) > 0.5).float()}
               for _ in range(2)]
    indices = matcher(outputs, targets, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # the matcher draws (1, P, 2) points per image, in image order
    for b, (src, tgt) in enumerate(indices):
        coords = torch.rand(1, 64, 2, generator=g)
        prob = outputs["pred_logits"][b].softmax(-1)
        cost = _hand_cost(-prob[:, targets[b]["labels"]], outputs["pred_masks"][b], targets[b]["masks"], coords,
                          matcher)
        assert len(src) == len(tgt) == nt and sorted(tgt.tolist()) == list(range(nt))
        assert src.tolist() == sorted(src.tolist()) and len(set(src.tolist())) == nt
        assert float(cost[src, tgt].sum()) == pytest.approx(_brute_force(cost), abs=1e-5)

    # grounding: class cost is the softmax over queries (dim 0) of the query-phrase similarity
    sims = [torch.randn(nq, nt) * 3 for _ in range(2)]
    gtargets = [{"grounding_masks": t["masks"]} for t in targets]
    indices = matcher.match_grounding(sims, outputs["pred_masks"], gtargets, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    for b, (src, tgt) in enumerate(indices):
        coords = torch.rand(1, 64, 2, generator=g)
        cost = _hand_cost(-sims[b].softmax(0), outputs["pred_masks"][b], targets[b]["masks"], coords, matcher)
        assert float(cost[src, tgt].sum()) == pytest.approx(_brute_force(cost), abs=1e-5)


# ----------------------------------------------------------------------------- criterion

def assert_matches_record(losses, rec, outputs, targets, extra) -> None:
    """The losses and the gradient of their weighted sum w.r.t. every input equal the official run's."""
    assert set(losses) == set(rec["losses"])
    for key, value in rec["losses"].items():
        assert losses[key].item() == pytest.approx(value, abs=1e-5), key
    total_loss(losses, PARITY["weight_dict_small"]).backward()
    for name, tensor in leaves(outputs, targets, extra).items():
        grad = torch.zeros_like(tensor) if tensor.grad is None else tensor.grad
        assert float(grad.abs().sum()) == pytest.approx(rec["grad_abs_sum"][name], abs=1e-5, rel=1e-5), name


def test_segmentation_losses_match_the_official_criterion():
    rec = PARITY["seg"]
    outputs, targets, extra = make_seg_case(rec["seed"])
    torch.manual_seed(rec["rng_seed"])  # the official code draws its points from the global generator
    assert_matches_record(small_criterion()(outputs, targets, extra), rec, outputs, targets, extra)

    # a private generator gives the same points as the global one seeded alike
    outputs, targets, extra = make_seg_case(rec["seed"])
    losses = small_criterion()(outputs, targets, extra, generator=torch.Generator().manual_seed(rec["rng_seed"]))
    assert losses["loss_mask_dice_0"].item() == pytest.approx(rec["losses"]["loss_mask_dice_0"], abs=1e-5)


def test_vlp_losses_match_the_official_criterion():
    rec = PARITY["vlp"]
    outputs, targets, extra = make_vlp_case(rec["seed"])
    assert_matches_record(small_criterion().forward_vlp(outputs, targets, extra), rec, outputs, targets, extra)


def test_vlp_targets_and_backbone_retrieval():
    outputs, targets, extra = make_vlp_case()
    batched = [torch.cat([t[k] for t in targets]) for k in ("caption_tokens", "caption_proj", "caption_tokenids",
                                                             "caption_mask")]
    split = vlp_targets(*batched)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(split, targets) for k in a) and len(split) == 3
    outputs["backbone_embeddings"] = torch.randn(3, 8)
    losses = small_criterion().forward_vlp(outputs, split, extra)
    v = F.normalize(outputs["backbone_embeddings"], dim=-1)
    t = F.normalize(batched[1], dim=-1)
    logits = (1 / 0.07) * v @ t.T
    want = (F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.T, torch.arange(3))) / 2
    torch.testing.assert_close(losses["loss_retrieval_backbone_0"], want, atol=1e-5, rtol=1e-5)
    assert "loss_retrieval_backbone_1" not in losses


def test_captioning_loss_is_next_token_ce_without_padding():
    outputs, targets, extra = make_vlp_case()
    crit = small_criterion()
    got = crit.loss_captionings(outputs, targets, extra)["loss_captioning"]
    total, count = 0.0, 0
    for b, t in enumerate(targets):
        n = int(t["caption_mask"].sum())
        logits = outputs["pred_captionings"][b] @ extra["token_embedding"].T
        for pos in range(n - 1):  # position pos predicts token pos + 1
            total += F.cross_entropy(logits[pos], t["caption_tokenids"][0, pos + 1])
            count += 1
    torch.testing.assert_close(got, total / (count + 1))


def test_no_object_weight_enters_the_class_loss():
    torch.manual_seed(4)
    logits = torch.randn(1, 4, 3)  # 2 classes + background
    targets = [{"labels": torch.tensor([1])}]
    indices = [(torch.tensor([2]), torch.tensor([0]))]
    values = {}
    for eos in (0.1, 1.0):
        crit = SetCriterion(2, HungarianMatcher(), {}, eos_coef=eos)
        values[eos] = float(crit.loss_labels({"pred_logits": logits}, targets, indices, 1.0, {}, None)["loss_mask_ce"])
        logp = logits[0].log_softmax(-1)
        nll = [-logp[q, 2] for q in (0, 1, 3)] + [-logp[2, 1]]  # unmatched -> background, query 2 -> class 1
        want = (eos * sum(nll[:3]) + nll[3]) / (3 * eos + 1)
        assert values[eos] == pytest.approx(float(want), abs=1e-6)
    assert values[0.1] != pytest.approx(values[1.0], abs=1e-3)


def _perfect_case():
    masks = torch.zeros(3, 32, 32)
    masks[0, 4:20, 6:26] = 1
    masks[1, 18:30, 2:12] = 1
    masks[2, 8:28, 20:30] = 1
    labels = torch.tensor([0, 2, 1])
    pred_masks = torch.full((1, 5, 32, 32), -30.0)
    pred_masks[0, [1, 3, 4]] = 30 * (2 * masks - 1)
    pred_logits = torch.full((1, 5, 4), -20.0)
    pred_logits[0, [1, 3, 4], labels] = 20.0
    pred_logits[0, [0, 2], 3] = 20.0  # the two other queries: background, confidently
    return pred_logits, pred_masks, [{"labels": labels, "masks": masks}]


def test_perfect_prediction_has_near_zero_losses():
    pred_logits, pred_masks, targets = _perfect_case()
    crit = SetCriterion(3, HungarianMatcher(num_points=500), {}, seg_losses=("labels", "masks"), num_points=500)
    losses = crit({"pred_logits": pred_logits, "pred_masks": pred_masks}, targets,
                  generator=torch.Generator().manual_seed(0))
    assert set(losses) == {"loss_mask_ce_0", "loss_mask_bce_0", "loss_mask_dice_0"}
    assert losses["loss_mask_ce_0"] < 1e-6
    # What is left sits on object boundaries, where bilinear sampling gives soft targets and the
    # importance sampling puts 3/4 of the points (0.49 / 0.11 measured; inverted masks: 16.9 / 0.70).
    assert losses["loss_mask_bce_0"] < 0.6 and losses["loss_mask_dice_0"] < 0.15
    wrong = crit({"pred_logits": pred_logits, "pred_masks": -pred_masks}, targets,
                 generator=torch.Generator().manual_seed(0))
    assert wrong["loss_mask_bce_0"] > 10 and wrong["loss_mask_dice_0"] > 0.5 and wrong["loss_mask_ce_0"] > 10

    # without boundaries (empty masks and very negative logits: grid_sample's zero padding halves the
    # logit at the image edge) all three vanish
    empty = [{"labels": torch.tensor([0, 1]), "masks": torch.zeros(2, 8, 8)}]
    logits = torch.tensor([[[20.0, -20.0, -20.0], [-20.0, 20.0, -20.0]]])
    crit = SetCriterion(2, HungarianMatcher(num_points=100), {}, seg_losses=("labels", "masks"), num_points=100)
    losses = crit({"pred_logits": logits, "pred_masks": torch.full((1, 2, 8, 8), -60.0)}, empty,
                  generator=torch.Generator().manual_seed(0))
    assert max(float(v) for v in losses.values()) < 1e-6
    # and on the points themselves, confident right logits give ~0 BCE and dice
    t = (torch.rand(4, 50, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    assert sigmoid_ce_loss(40 * t - 20, t, 4) < 1e-6 and dice_loss(40 * t - 20, t, 4) < 1e-6


def test_deep_supervision_suffixes_and_top_layers():
    outputs, targets, extra = make_seg_case(0, num_aux=4)
    crit = small_criterion(top_x_layers={"mask": 10, "caption": 2, "captioning": 2, "retrieval": 2, "grounding": 1})
    losses = crit(outputs, targets, extra, generator=torch.Generator().manual_seed(0))
    want = ({f"loss_mask_{k}_{i}" for k in ("ce", "bce", "dice") for i in range(5)}
            | {"loss_caption_0", "loss_caption_1"} | {f"loss_grounding_{k}_0" for k in ("ce", "bce", "dice")})
    assert set(losses) == want
    # `_1` is the layer before the last (the last aux output), `_4` the first prediction
    for suffix, layer in ((0, outputs), (1, outputs["aux_outputs"][-1]), (4, outputs["aux_outputs"][0])):
        grad = torch.autograd.grad(losses[f"loss_mask_ce_{suffix}"], [outputs["pred_logits"]]
                                   + [aux["pred_logits"] for aux in outputs["aux_outputs"]], allow_unused=True)
        used = [g is not None and bool(g.abs().sum() > 0) for g in grad]
        assert used == [x is layer for x in [outputs, *outputs["aux_outputs"]]]


def test_weight_dict_matches_the_official_builder():
    assert xdecoder_weight_dict(10) == PARITY["weight_dict_focalt"]
    assert list(xdecoder_weight_dict(10)) == list(PARITY["weight_dict_focalt"])
    weights = xdecoder_weight_dict(3, tasks=("mask",), deep_supervision=False)
    assert weights == {"loss_mask_ce_0": 2.0, "loss_mask_dice_0": 5.0, "loss_mask_bce_0": 5.0}
    losses = {"loss_mask_ce_0": torch.tensor(1.0), "loss_mask_dice_0": torch.tensor(2.0),
              "loss_other_0": torch.tensor(9.0)}
    assert {k: float(v) for k, v in weight_losses(losses, weights).items()} == {"loss_mask_ce_0": 2.0,
                                                                                 "loss_mask_dice_0": 10.0}
    assert float(total_loss(losses, weights)) == 12.0


def test_official_size_state_dict():
    crit = SetCriterion(133, HungarianMatcher(), xdecoder_weight_dict())
    assert {k: list(v.shape) for k, v in crit.state_dict().items()} == PARITY["state_dict_coco"]
    assert crit.empty_weight[-1] == 0.1 and crit.empty_weight[:-1].eq(1).all()


# ----------------------------------------------------------------------------- contrastive losses

def test_multi_positive_contrast_by_hand():
    torch.manual_seed(6)
    v, t = F.normalize(torch.randn(4, 5), dim=-1), F.normalize(torch.randn(4, 5), dim=-1)
    hashes = torch.tensor([9, 3, 9, 4])  # rows 0 and 2 are one concept, represented by t[0]
    scale = torch.tensor(math.log(10.0))
    concepts = t[[1, 3, 0]]  # sorted hashes 3, 4, 9
    logits = 10 * v @ concepts.T
    gt = torch.tensor([[0, 0, 1], [1, 0, 0], [0, 0, 1], [0, 1, 0]], dtype=torch.float)
    loss_i = -(gt * logits.log_softmax(-1)).sum(-1).mean()
    loss_t = -((gt / gt.sum(0)).T * logits.T.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(multi_positive_contrastive_loss(v, t, hashes, scale), 0.7 * loss_i + 0.3 * loss_t)


def _contrast_rank(rank, world):
    g = torch.Generator().manual_seed(0)
    v, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    hashes = torch.tensor([1, 2, 1, 3, 4, 2])
    parts = [slice(0, 4), slice(4, 6)]  # unequal shares
    local_v = v[parts[rank]].clone().requires_grad_()
    scale = torch.tensor(2.0)
    itc = image_text_contrastive_loss(v[[0, 1, 2] if rank == 0 else [3, 4, 5]].clone(), t[:3] if rank == 0 else t[3:],
                                      scale)
    multi = multi_positive_contrastive_loss(local_v, t[parts[rank]], hashes[parts[rank]], scale)
    multi.backward()
    return {"itc": itc.detach(), "multi": multi.detach(), "grad": local_v.grad}


def test_contrastive_losses_gather_across_processes(tmp_path):
    from tests.helpers.two_processes import run_two_processes

    ranks = run_two_processes(tmp_path, _contrast_rank)
    g = torch.Generator().manual_seed(0)
    v, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    hashes = torch.tensor([1, 2, 1, 3, 4, 2])
    scale = torch.tensor(2.0)
    itc = image_text_contrastive_loss(v[[0, 1, 2, 3, 4, 5]], t, scale)
    full_v = v.clone().requires_grad_()
    multi = multi_positive_contrastive_loss(full_v, t, hashes, scale)
    multi.backward()
    for rank, part in zip(ranks, (slice(0, 4), slice(4, 6))):
        torch.testing.assert_close(rank["itc"], itc)
        torch.testing.assert_close(rank["multi"], multi.detach())
        torch.testing.assert_close(rank["grad"], full_v.grad[part])  # the local rows keep their gradient
