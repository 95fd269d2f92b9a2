"""X-Decoder around the model: shape scenes, the scene folder, the open-vocabulary evaluation, the
training step (targets, a loss that falls) and the one-pass multi-task inference."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from segmentation.xdecoder import XDecoder, XDecoderConfig
from segmentation.xdecoder_eval import IoUAccumulator, evaluate_open_vocabulary, label_map
from segmentation.xdecoder_train import XDecoderLoss, training_text_embeddings
from vision.data.scene_folder import SceneFolder, write_shape_scenes
from vision.data.shapes import (COLOURS, GROUND, SHAPES, ShapeScenes, all_classes, caption_of, collate_scenes,
                                held_out_classes, make_scene, seen_classes)

TINY = dict(embed_dim=16, depths=(1, 1, 1, 1), focal_levels=(2, 2, 2, 2), focal_windows=(3, 3, 3, 3),
            drop_path_rate=0.0, conv_dim=32, mask_dim=32, enc_layers=1, hidden_dim=32, num_queries=9, nheads=2,
            dim_feedforward=64, dec_layers=3, dim_proj=32, context_length=16, lang_width=32, lang_layers=1,
            lang_heads=2, backbone_dim=128, captioning_step=6)


@pytest.fixture(scope="module")
def tiny() -> XDecoder:
    torch.manual_seed(0)
    return XDecoder(XDecoderConfig(**TINY)).eval()


# ----------------------------------------------------------------------------- shape scenes


def test_held_out_classes_never_train_but_every_word_does():
    seen, held = set(seen_classes()), set(held_out_classes())
    assert not seen & held and seen | held == set(all_classes()) and len(held) == 6
    for word in list(COLOURS) + list(SHAPES):  # each colour and shape is seen with other partners
        assert any(word in c.split() for c in seen)
    train = ShapeScenes(200, split="train")
    for i in range(200):
        assert not set(train.scene(i).classes) & held
    test = ShapeScenes(50, split="test")
    assert all(set(test.scene(i).classes) & held for i in range(50))


def test_scenes_are_seeded_disjoint_and_listed_left_to_right():
    a, b = make_scene(7), make_scene(7)
    assert np.array_equal(a.image, b.image) and a.classes == b.classes
    assert not np.array_equal(make_scene(8).image, a.image)
    for seed in range(30):
        s = make_scene(seed, max_objects=3)
        assert s.masks.sum(0).max() <= 1  # objects do not overlap
        assert np.array_equal(s.ground, ~s.masks.any(0))
        centres = [np.nonzero(m)[1].mean() for m in s.masks]
        assert centres == sorted(centres)
        assert len(set(s.classes)) == len(s.classes)
    assert caption_of(["red circle"]) == "a red circle"
    assert caption_of(["red circle", "orange cross", "blue square"]) == \
        "a red circle, an orange cross and a blue square"
    # train / test seed streams differ, so a test scene is not a training scene
    assert not torch.equal(ShapeScenes(1, split="train")[0]["image"], ShapeScenes(1, split="seen-test")[0]["image"])


def test_dataset_items_carry_ground_last_and_phrases_per_object():
    ds = ShapeScenes(5, split="train", size=48)
    for i in range(5):
        it = ds[i]
        n = it["objects"]
        assert it["image"].shape == (3, 48, 48) and 0 <= float(it["image"].min()) <= float(it["image"].max()) <= 1
        assert ds.classes[int(it["labels"][-1])] == GROUND and len(it["labels"]) == n + 1
        assert it["phrases"] == [f"the {ds.classes[int(k)]}" for k in it["labels"][:n]]
        assert it["phrase_index"] == list(range(n))
        assert int(it["masks"].sum()) == 48 * 48  # objects + ground tile the image


def test_scene_folder_round_trip(tmp_path):
    write_shape_scenes(tmp_path / "scenes", 4, size=32)
    folder, direct = SceneFolder(tmp_path / "scenes", size=32), ShapeScenes(4, split="train", size=32)
    assert folder.classes == direct.classes and folder.is_thing == [c != GROUND for c in direct.classes]
    for i in range(4):
        a, b = folder[i], direct[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["masks"], b["masks"])
        assert torch.equal(a["labels"], b["labels"])
        assert (a["caption"], a["phrases"], a["phrase_index"]) == (b["caption"], b["phrases"], b["phrase_index"])
    assert not (tmp_path / ".scenes.partial").exists()
    with pytest.raises(ValueError, match="classes.json"):
        SceneFolder(tmp_path)


# ----------------------------------------------------------------------------- evaluation


def test_iou_accumulator_by_hand():
    acc = IoUAccumulator(["a", "b", "c"])
    truth = np.array([[0, 0], [1, 1]])
    pred = np.array([[0, 1], [1, 1]])
    acc.add(pred, truth)
    # a: inter 1, union 2; b: inter 2, union 3; c absent
    assert acc.miou(["a"]) == pytest.approx(0.5) and acc.miou(["b"]) == pytest.approx(2 / 3)
    assert acc.miou(["a", "b", "c"]) == pytest.approx((0.5 + 2 / 3) / 2)
    assert np.isnan(acc.miou(["c"]))


class Oracle:
    """Answers from the ground truth of the scenes it is shown (looked up by image bytes)."""

    def __init__(self, scenes):
        self.truth = {}
        for ds in scenes:
            for i in range(len(ds)):
                it = ds[i]
                self.truth[hashlib.sha1(it["image"].numpy().tobytes()).hexdigest()] = (it, ds.classes)

    def _look(self, image):
        return self.truth[hashlib.sha1(image.numpy().tobytes()).hexdigest()]

    def eval(self):
        return self

    def semantic(self, images, vocab):
        out = torch.zeros(len(images), len(vocab), *images.shape[-2:])
        for b, image in enumerate(images):
            it, classes = self._look(image)
            truth = torch.from_numpy(label_map(it, vocab, classes))
            out[b].scatter_(0, truth[None], 1.0)
        return out

    def referring(self, images, prompts):
        out = []
        for image, prompt in zip(images, prompts):
            it, _ = self._look(image)
            out.append(it["masks"][it["phrases"].index(prompt)].float())
        return torch.stack(out)

    def caption(self, images):
        return [self._look(image)[0]["caption"] for image in images]


def test_evaluation_scores_an_oracle_perfectly_and_chance_low():
    oracle = Oracle([ShapeScenes(12, split="test"), ShapeScenes(6, split="seen-test")])
    r = evaluate_open_vocabulary(oracle, n_test=12, n_seen=6, batch=5)
    assert r.miou_seen == r.miou_heldout == r.referring_iou == r.caption_exact == 1.0
    assert r.miou_chance < 0.35 and r.miou_chance_seen < 0.35 and r.referring_chance < 1.0


# ----------------------------------------------------------------------------- training step


def test_training_text_embeddings_use_one_random_template(tiny):
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = training_text_embeddings(tiny, ["red circle", "ground"], generator=g1)
    b = training_text_embeddings(tiny, ["red circle", "ground"], generator=g2)
    assert torch.equal(a, b) and torch.allclose(a.norm(dim=-1), torch.ones(2), atol=1e-5)
    c = training_text_embeddings(tiny, ["red circle", "ground"], prompt=False)
    assert not torch.allclose(a, c)


def test_grounding_targets_follow_phrase_index(tiny):
    ds = ShapeScenes(3, split="train", size=32)
    batch = collate_scenes([ds[i] for i in range(3)])
    batch["phrase_index"] = [list(reversed(ix)) for ix in batch["phrase_index"]]  # phrases name masks backwards
    batch["phrases"] = [list(reversed(p)) for p in batch["phrases"]]
    targets = [{"labels": lab, "masks": m.float()} for lab, m in zip(batch["labels"], batch["masks"])]
    tokens = XDecoderLoss()._grounding(tiny, batch, targets)
    for t, ix, masks, phrases in zip(targets, batch["phrase_index"], batch["masks"], batch["phrases"]):
        assert torch.equal(t["grounding_masks"].float(), masks[ix].float())
        assert len(t["grounding_class_embs"]) == len(phrases) == len(t["grounding_hash"])
    lengths = [sum(len(tiny.predictor.lang_encoder.tokenizer.encode(p)) + 2 for p in ps) for ps in batch["phrases"]]
    assert tokens.shape[:2] == (3, max(lengths))


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = XDecoder(XDecoderConfig(**TINY)).train()
    ds = ShapeScenes(4, split="train", size=32)
    batch = collate_scenes([ds[i] for i in range(4)])
    loss_fn = XDecoderLoss(num_points=64)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for step in range(12):
        loss, metrics = loss_fn(model, batch, ds.classes, torch.Generator().manual_seed(step % 2))
        assert {"loss_mask_ce", "loss_mask_dice", "loss_grounding_dice", "loss_captioning",
                "loss_retrieval_decoder", "loss_caption"} <= set(metrics)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2])


# ----------------------------------------------------------------------------- one-pass multi-task inference


def test_multitask_equals_the_separate_tasks(tiny):
    ds = ShapeScenes(2, split="test", size=40)
    images = torch.stack([ds[i]["image"] for i in range(2)])
    prompts = [ds[i]["phrases"][0] for i in range(2)]
    vocab = all_classes() + [GROUND]
    together = tiny.multitask(images, vocab, prompts)
    assert torch.allclose(together["semantic"], tiny.semantic(images, vocab), atol=1e-5)
    assert torch.allclose(together["referring"], tiny.referring(images, prompts), atol=1e-5)
    assert together["captions"] == tiny.caption(images)


def test_benchmark_multitask_measure_checks_outputs(tiny):
    from apps.benchmarks.xdecoder import measure_multitask

    ds = ShapeScenes(2, split="test", size=40)  # padded to 64: res5 is 2 x 2 (GroupNorm needs > 1 value per group)
    images = torch.stack([ds[i]["image"] for i in range(2)])
    figures = measure_multitask(tiny, images, all_classes() + [GROUND], [ds[i]["phrases"][0] for i in range(2)], 1)
    assert figures["multitask_speedup"] > 0 and figures["multitask_max_abs_diff"] < 1e-5


class SeenOnlyOracle(Oracle):
    """Perfect masks, but a held-out object is called the seen class of its colour with another shape."""

    def semantic(self, images, vocab):
        out = super().semantic(images, vocab)
        held = held_out_classes()
        for name in held:
            colour = name.split()[0]
            stand_in = next(c for c in seen_classes() if c.startswith(colour + " "))
            out[:, vocab.index(stand_in)] += out[:, vocab.index(name)]
            out[:, vocab.index(name)] = 0
        return out


def test_a_model_that_never_names_held_out_classes_scores_zero_on_them():
    oracle = SeenOnlyOracle([ShapeScenes(10, split="test"), ShapeScenes(4, split="seen-test")])
    r = evaluate_open_vocabulary(oracle, n_test=10, n_seen=4, batch=4)
    assert r.miou_heldout == 0.0 and 0 < r.miou_seen < 1.0  # the stand-ins also hurt their seen classes


def test_loss_pads_targets_to_the_padded_input_and_survives_a_batch_without_phrases(tiny):
    ds = ShapeScenes(2, split="train", size=40)  # padded to 64 inside the model
    batch = collate_scenes([ds[i] for i in range(2)])
    loss_fn = XDecoderLoss(num_points=32, tasks=("mask", "grounding"))
    loss, metrics = loss_fn(tiny, batch, ds.classes, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and metrics["loss_grounding_dice"] > 0
    silent = dict(batch, phrases=[[], []], phrase_index=[[], []])
    loss, metrics = loss_fn(tiny, silent, ds.classes, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and metrics["loss_grounding_dice"] == 0 and metrics["loss_mask_dice"] > 0


def test_grounding_queries_are_each_distinct_phrase_tokens_once(tiny):
    ds = ShapeScenes(1, split="train", size=32)
    item = ds[0]
    phrases = [item["phrases"][0], item["phrases"][0]]  # the same phrase twice: its tokens enter once
    batch = {"phrases": [phrases], "phrase_index": [[0, 0]], "masks": [item["masks"]]}
    targets = [{}]
    tokens = XDecoderLoss()._grounding(tiny, batch, targets)
    lang = tiny.predictor.lang_encoder
    ids = lang.tokenize([phrases[0]], tiny.config.context_length)
    token_emb, class_emb = lang.forward_language_token(ids["input_ids"], ids["attention_mask"], norm=False)
    expected = token_emb[0][ids["attention_mask"][0].bool()]
    assert torch.allclose(tokens[0], expected, atol=1e-6)
    assert torch.allclose(targets[0]["grounding_class_embs"], class_emb.expand(2, -1), atol=1e-6)
    assert targets[0]["grounding_hash"][0] == targets[0]["grounding_hash"][1]


def test_outputs_come_back_at_the_requested_size(tiny):
    images = torch.rand(1, 3, 40, 56)
    assert tiny.semantic(images, ["a", "b"], output_size=(80, 112)).shape == (1, 2, 80, 112)
    assert tiny.referring(images, ["the a"], output_size=(20, 28)).shape == (1, 20, 28)
    from apps.segment_image import working_size

    assert working_size(500, 1000, 800, 1333) == (667, 1333) and working_size(600, 400, 800, 1333) == (1200, 800)
    assert working_size(30, 40, None, None) == (30, 40)


def test_class_embeddings_are_kept_per_vocabulary_until_the_weights_change(tiny):
    with torch.no_grad():
        a = tiny.class_embeddings(["red circle", "ground"])
        assert tiny.class_embeddings(["red circle", "ground"]) is a
        assert not torch.equal(tiny.class_embeddings(["blue cross", "ground"])[0], a[0])
        lang = tiny.predictor.lang_encoder
        saved = lang.lang_proj.clone()
        lang.lang_proj.mul_(2)  # in place, as an optimizer step or load_state_dict writes
        try:
            b = tiny.class_embeddings(["red circle", "ground"])
            assert b is not a and torch.allclose(b, tiny.predictor.lang_encoder.text_embeddings(
                ["red circle", "ground", "background"]))
        finally:
            lang.lang_proj.copy_(saved)
    assert tiny.class_embeddings(["red circle", "ground"]).requires_grad  # training: never cached
