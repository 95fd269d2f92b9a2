"""X-Decoder language side: tokenizer ids against the official Hugging Face call, encoder parity
against values recorded from the official LanguageEncoder, official key layout, causality."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from segmentation.xdecoder_language import PROMPT_TEMPLATES, CLIPTokenizer, LanguageEncoder, default_tokenizer

DATA = Path(__file__).resolve().parents[1] / "data"
BPE = json.loads((DATA / "xdecoder_bpe_ids.json").read_text())
KEYS = json.loads((DATA / "xdecoder_focalt_language_keys.json").read_text())
TINY = dict(context_length=16, width=32, layers=2, heads=4, dim_proj=24)  # the recorded parity config


def seeded_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights that depend only on the key names and shapes (also used to record the parity data)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name in sorted(shapes):
        t = torch.randn(shapes[name], generator=gen)
        if ".ln_" in name and name.endswith("weight"):
            t = 1 + 0.1 * t
        elif name == "logit_scale":
            t = 2 + 0.1 * t
        else:
            t = 0.1 * t
        state[name] = t
    return state


def tiny_encoder(autoregressive: bool = True) -> LanguageEncoder:
    model = LanguageEncoder(autoregressive=autoregressive, **TINY).eval()
    model.load_state_dict(seeded_state({k: tuple(v.shape) for k, v in model.state_dict().items()}))
    return model


@pytest.fixture(scope="module")
def recorded():
    return dict(np.load(DATA / "xdecoder_language_parity.npz"))


def test_tokenizer_ids_and_masks_equal_official_call():
    tok = default_tokenizer()
    assert (tok.sot_token_id, tok.eot_token_id, tok.vocab_size) == (49406, 49407, 49408)
    for case in BPE["encode"]:
        out = tok([case["text"]], context_length=case["context_length"])
        assert out["input_ids"].dtype == out["attention_mask"].dtype == torch.long
        assert out["input_ids"][0].tolist() == case["input_ids"], case["text"]
        assert out["attention_mask"][0].tolist() == case["attention_mask"], case["text"]
    # the recorded set covers truncation that keeps eot, pads equal to eot, and special-token strings
    long = [c for c in BPE["encode"] if c["context_length"] == 8 and sum(c["attention_mask"]) == 8]
    assert long and all(c["input_ids"][-1] == 49407 for c in long)
    assert any(49407 in c["input_ids"][1:-1] and sum(c["attention_mask"]) < 77 for c in BPE["encode"])


def test_batch_call_equals_single_calls():
    tok = default_tokenizer()
    texts = [c["text"] for c in BPE["encode"] if c["context_length"] == 77]
    batch = tok(texts)["input_ids"]
    assert batch.shape == (len(texts), 77)
    assert batch.tolist() == [c["input_ids"] for c in BPE["encode"] if c["context_length"] == 77]


def test_decode_equals_official_caption_postprocessing():
    tok = default_tokenizer()
    for case in BPE["decode"]:
        assert tok.decode(case["ids"]) == case["text"], case["ids"]
    ids = tok(["A man riding a horse, on the beach."])["input_ids"][0]
    assert tok.decode(ids) == "a man riding a horse, on the beach."
    assert tok.decode(torch.tensor([49406, 320, 2368, 49407, 320, 1929])) == "a cat"  # stops at eot


def test_tokenizer_reads_a_given_bpe_file():
    from open_clip.tokenizer import default_bpe
    tok = CLIPTokenizer(default_bpe())
    assert tok(["a photo of a cat."])["input_ids"][0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407]
    with pytest.raises(ValueError):
        tok(["x"], context_length=1)


@torch.no_grad()
def test_encoder_parity_with_official(recorded):
    model = tiny_encoder()
    ids = torch.from_numpy(recorded["input_ids"])
    mask = torch.from_numpy(recorded["attention_mask"])
    assert torch.equal(model.tokenize(list(json.loads(str(recorded["texts"]))))["input_ids"], ids)

    def close(ours, name):
        ref = torch.from_numpy(recorded[name])
        assert ours.shape == ref.shape, name
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5, msg=name)

    close(model.encode(ids, mask), "last_hidden_state")
    close(model.forward_language(ids, mask), "language")
    close(model.forward_language(ids, mask, norm=False), "language_unnormed")
    token_x, class_x = model.forward_language_token(ids, mask)
    close(token_x, "token_emb")
    close(class_x, "class_emb")
    token_x, class_x = model.forward_language_token(ids, mask, norm=True)
    close(token_x, "token_emb_normed")
    close(class_x, "class_emb_normed")
    # captioning: the start tokens without an attention mask
    close(model.forward_language_token(torch.full((1, 16), 49406))[0], "caption_token_emb")
    names = list(json.loads(str(recorded["class_names"])))
    text_emb = model.text_embeddings(names)
    close(text_emb, "text_emb_prompt")
    close(model.text_embeddings(names[:2], prompt=False), "text_emb_plain")
    close(model.similarity(torch.from_numpy(recorded["v_emb"]), text_emb), "similarity")


@torch.no_grad()
def test_non_causal_encoder_uses_padding_mask(recorded):
    model = tiny_encoder(autoregressive=False)
    ids = torch.from_numpy(recorded["input_ids"])
    mask = torch.from_numpy(recorded["attention_mask"])
    out = model.encode(ids, mask)
    torch.testing.assert_close(out, torch.from_numpy(recorded["last_hidden_state_bidirectional"]), rtol=0, atol=1e-5)
    assert not torch.allclose(out, model.encode(ids), atol=1e-4)  # without the mask the pads are attended


@torch.no_grad()
def test_causality():
    model = tiny_encoder()
    ids = model.tokenize(["a photo of a small dog on a red sofa."])["input_ids"]
    changed = ids.clone()
    changed[0, 6] = 1234
    a, b = model.encode(ids), model.encode(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=0)
    assert (a[:, 6:] - b[:, 6:]).abs().amax(-1).min() > 1e-4
    # a shorter context gives the same prefix; the attention mask is not used, and what follows the
    # eot cannot change the sentence embedding
    torch.testing.assert_close(model.encode(ids[:, :10]), a[:, :10], rtol=0, atol=1e-5)
    sentence = model.forward_language(ids, model.tokenize(["x"])["attention_mask"])
    torch.testing.assert_close(sentence, model.forward_language(ids), rtol=0, atol=0)
    eot = int(ids.argmax())
    after = ids.clone()
    after[0, eot + 1:] = torch.arange(100, 100 + ids.shape[1] - eot - 1)
    torch.testing.assert_close(model.forward_language(after), sentence, rtol=0, atol=1e-6)


def test_prompt_templates_are_the_official_81():
    assert len(PROMPT_TEMPLATES) == len(set(PROMPT_TEMPLATES)) == 81
    assert PROMPT_TEMPLATES[:2] == ("{}.", "a photo of a {}.") and PROMPT_TEMPLATES[-1] == "a tattoo of the {}."


def test_official_key_names_and_shapes():
    with torch.device("meta"):
        model = LanguageEncoder()
    ours = {KEYS["prefix"] + k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == KEYS["keys"]
    assert sum(int(np.prod(s)) for s in ours.values()) == KEYS["num_parameters"]
