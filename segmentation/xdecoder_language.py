"""X-Decoder's language side: CLIP's BPE tokenizer and the causal text transformer
(Zou et al., "Generalized Decoding for Pixel, Image, and Language", CVPR 2023;
github.com/microsoft/X-Decoder, branch v2.0: modeling/language/vlpencoder.py `LanguageEncoder`,
modeling/language/LangEncoder/transformer.py `Transformer`, utils/prompt_engineering.py).

Conventions that matter:

* Tokens are what the official `CLIPTokenizer.from_pretrained('openai/clip-vit-base-patch32')`
  (Hugging Face, slow tokenizer, ftfy installed) returns for `padding='max_length',
  truncation=True, max_length=77`: `[49406] + bpe[:L - 2] + [49407]`, padded with 49407 (the
  checkpoint's pad token is <|endoftext|>); the attention mask is 1 from sot to eot. The text is
  normalised by `ftfy.fix_text` (which unescapes HTML entities only in text without '<'),
  whitespace collapsing and lower-casing. The vocabulary is open_clip's copy of CLIP's BPE file;
  open_clip's own `SimpleTokenizer` differs: it pads with 0, applies `html.unescape` twice more
  ('1 < 2 &amp; 3' tokenises differently) and treats '<|endoftext|>' in text as plain characters.
* The sentence embedding is the hidden state at `input_ids.argmax(-1)`: 49407 is the largest id
  and argmax returns the first maximum, so that is the eot, not a pad.
* The transformer is causal (`AUTOGRESSIVE: True`): the attention mask of the tokenizer is not
  used, since pads come after the eot they cannot reach it. Without causality the attention mask
  becomes a key padding mask. Layer norms use eps 1e-12: `nn.LayerNorm` then computes the
  official TF-style LayerNorm (which normalises in float32 and applies the affine part in the input
  dtype, so the two differ slightly in half precision only).
* Class embeddings (`get_text_embeddings(..., is_eval=True)`): each class name, stripped of
  '-other', '-merged' and '-stuff', fills the 81 prompt templates; each prompt's embedding is
  normalised (|x| + 1e-7), the 81 are averaged and the mean renormalised.
* Class logits: `logit_scale.exp() * v / (|v| + 1e-7) @ text_emb.T`, with `logit_scale`
  initialised to 1.0 (not CLIP's log(1 / 0.07)).
* Parameter names are the official ones, so the released state dict's entries under
  `sem_seg_head.predictor.lang_encoder.` load as they are: `lang_encoder.*` (the transformer),
  `lang_proj` (width x dim_proj) and `logit_scale`.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from functools import lru_cache

import ftfy
import regex
import torch
from open_clip.tokenizer import SimpleTokenizer, default_bpe
from torch import Tensor, nn

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
CONTEXT_LENGTH = 77

PROMPT_TEMPLATES = (
    "{}.", "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.",
    "the embroidered {}.", "a photo of a hard to see {}.", "a bright photo of a {}.",
    "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.",
    "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.", "a close-up photo of a {}.",
    "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.",
    "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.",
    "a doodle of a {}.", "a close-up photo of the {}.", "the origami {}.", "the {} in a video game.",
    "a sketch of a {}.", "a doodle of the {}.", "a origami {}.", "a low resolution photo of a {}.",
    "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.", "a photo of a large {}.",
    "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.",
    "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.",
    "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.",
    "a photo of a cool {}.", "a photo of a small {}.", "a tattoo of the {}.",
)

# HF CLIPTokenizer's pre-tokenisation pattern: the two special tokens, English clitics, letter runs,
# single digits, runs of other non-space characters.
_WORDS = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_SPECIAL_SPLIT = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
# Hugging Face's `clean_up_tokenization` (on by default when decoding), in its order.
_DECODE_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                    (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class CLIPTokenizer:
    """CLIP's byte-level BPE with the ids and masks of the official Hugging Face call.

    `__call__` gives `[sot] + bpe[:context_length - 2] + [eot]` padded with eot, as HF's
    `padding='max_length', truncation=True` does; exact special-token strings in the text map to
    their ids (HF splits on them before normalising). The BPE merge loop is open_clip's
    `SimpleTokenizer.bpe`; the normalisation and pre-tokenisation are HF's (see the module notes).
    """

    def __init__(self, bpe_path: str | None = None):
        self._bpe = SimpleTokenizer(bpe_path or default_bpe())
        self.sot_token_id: int = self._bpe.sot_token_id
        self.eot_token_id: int = self._bpe.eot_token_id
        self.vocab_size: int = self._bpe.vocab_size
        self._special_ids = {SOT_TOKEN: self.sot_token_id, EOT_TOKEN: self.eot_token_id}
        self._pieces = {**self._bpe.decoder, self.sot_token_id: SOT_TOKEN, self.eot_token_id: EOT_TOKEN}

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text` without sot/eot."""
        ids: list[int] = []
        for chunk in _SPECIAL_SPLIT.split(text):
            if chunk in self._special_ids:
                ids.append(self._special_ids[chunk])
                continue
            chunk = regex.sub(r"\s+", " ", ftfy.fix_text(chunk)).strip().lower()
            for word in _WORDS.findall(chunk):
                if word in self._special_ids:  # another capitalisation, lower-cased above
                    ids.append(self._special_ids[word])
                    continue
                word = "".join(self._bpe.byte_encoder[b] for b in word.encode("utf-8"))
                ids.extend(self._bpe.encoder[piece] for piece in self._bpe.bpe(word).split(" "))
        return ids

    def __call__(self, texts: str | list[str], context_length: int = CONTEXT_LENGTH) -> dict[str, Tensor]:
        """`input_ids` and `attention_mask`, both (N, context_length) int64."""
        if context_length < 2:
            raise ValueError(f"context_length must hold sot and eot, got {context_length}")
        if isinstance(texts, str):
            texts = [texts]
        input_ids = torch.full((len(texts), context_length), self.eot_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text)[: context_length - 2], self.eot_token_id]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def decode(self, ids: Iterable[int] | Tensor) -> str:
        """Caption text as the official captioning reads it: HF's `batch_decode(ids,
        skip_special_tokens=False)` (pieces joined, '</w>' as a space, HF's clean-up of spaces before
        punctuation), cut at the first <|endoftext|>, <|startoftext|> removed, stripped."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        pieces = "".join(self._pieces[int(i)] for i in ids)
        text = bytearray(self._bpe.byte_decoder[c] for c in pieces).decode("utf-8", errors="replace")
        text = text.replace("</w>", " ").strip()
        for old, new in _DECODE_CLEAN_UP:
            text = text.replace(old, new)
        return text.split(EOT_TOKEN)[0].replace(SOT_TOKEN, "").strip()


@lru_cache(maxsize=1)
def default_tokenizer() -> CLIPTokenizer:
    """One shared tokenizer on open_clip's vocabulary file (reading it takes a fraction of a second)."""
    return CLIPTokenizer()


def prompt_class_name(name: str) -> str:
    """A class name as the official code puts it into the templates."""
    return name.replace("-other", "").replace("-merged", "").replace("-stuff", "")


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x)), with CLIP's QuickGELU."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width, eps=1e-12)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(width * 4, width)),
        ]))
        self.ln_2 = nn.LayerNorm(width, eps=1e-12)

    def forward(self, x: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """The official `Transformer` (`lang_encoder`): token + learned position embeddings, `layers`
    pre-norm blocks (causal when `autoregressive`), final LayerNorm."""

    def __init__(self, vocab_size: int, context_length: int, width: int, layers: int, heads: int,
                 autoregressive: bool = True):
        super().__init__()
        self.context_length = context_length
        self.autoregressive = autoregressive
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width, eps=1e-12)
        nn.init.trunc_normal_(self.positional_embedding, std=0.02)
        nn.init.trunc_normal_(self.token_embedding.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):  # includes the attention's out_proj, not its in_proj
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(N, L) ids -> (N, L, width) last hidden states; L <= context_length (the official code
        needs L == context_length; by causality a shorter L gives the same first L states)."""
        length = input_ids.shape[1]
        if length > self.context_length:
            raise ValueError(f"{length} tokens exceed the context length {self.context_length}")
        x = self.token_embedding(input_ids) + self.positional_embedding[:length]
        attn_mask = key_padding_mask = None
        if self.autoregressive:
            attn_mask = torch.full((length, length), float("-inf"), dtype=x.dtype, device=x.device).triu_(1)
        elif attention_mask is not None:
            key_padding_mask = attention_mask == 0
        for block in self.resblocks:
            x = block(x, attn_mask, key_padding_mask)
        return self.ln_final(x)


class LanguageEncoder(nn.Module):
    """The official `LanguageEncoder` ("vlpencoder"): the text transformer, the projection
    `lang_proj` to the decoder's embedding size and the class-logit temperature `logit_scale`.

    Where the official code stores results with `setattr` (`default_text_embeddings`, ...), these
    methods return them.
    """

    def __init__(self, vocab_size: int = 49408, context_length: int = CONTEXT_LENGTH, width: int = 512,
                 layers: int = 12, heads: int = 8, dim_proj: int = 512, autoregressive: bool = True,
                 tokenizer: CLIPTokenizer | None = None):
        super().__init__()
        self.tokenizer = tokenizer if tokenizer is not None else default_tokenizer()
        self.context_length = context_length
        self.lang_encoder = TextTransformer(vocab_size, context_length, width, layers, heads, autoregressive)
        self.lang_proj = nn.Parameter(torch.empty(width, dim_proj))
        self.logit_scale = nn.Parameter(torch.ones([]))
        nn.init.trunc_normal_(self.lang_proj, std=0.02)

    def tokenize(self, texts: str | list[str], context_length: int | None = None) -> dict[str, Tensor]:
        return self.tokenizer(texts, context_length or self.context_length)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(N, L, width) last hidden states."""
        return self.lang_encoder(input_ids, attention_mask)

    def _pool(self, hidden: Tensor, input_ids: Tensor) -> Tensor:
        # The first eot: the largest id, and argmax returns the first maximum.
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), input_ids.argmax(dim=-1)]

    def forward_language(self, input_ids: Tensor, attention_mask: Tensor | None = None, norm: bool = True) -> Tensor:
        """(N, dim_proj) sentence embeddings: the eot state projected, unit length if `norm`.

        Causal encoder: the eot state depends only on the tokens up to it, so the padding after the
        longest text in the batch is cut off first (the same numbers; class names in 81 prompt templates
        are ~10 tokens of a 77-token context, so about 5x less work)."""
        if self.lang_encoder.autoregressive:
            length = int(input_ids.argmax(dim=-1).max()) + 1
            input_ids = input_ids[:, :length]
            attention_mask = attention_mask[:, :length] if attention_mask is not None else None
        x = self._pool(self.encode(input_ids, attention_mask), input_ids) @ self.lang_proj
        return x / (x.norm(dim=-1, keepdim=True) + 1e-7) if norm else x

    def forward_language_token(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                               norm: bool = False) -> tuple[Tensor, Tensor]:
        """(token embeddings (N, L, dim_proj), sentence embeddings (N, dim_proj)), both projected."""
        hidden = self.encode(input_ids, attention_mask)
        class_x = self._pool(hidden, input_ids) @ self.lang_proj
        token_x = hidden @ self.lang_proj
        if norm:
            class_x = class_x / (class_x.norm(dim=-1, keepdim=True) + 1e-7)
            token_x = token_x / (token_x.norm(dim=-1, keepdim=True) + 1e-7)
        return token_x, class_x

    def text_embeddings(self, class_names: list[str], prompt: bool = True) -> Tensor:
        """(K, dim_proj) unit class embeddings, as `get_text_embeddings(class_names, is_eval=True)`
        stores them (that runs under no_grad; wrap the call for inference). With `prompt`, the 81
        templates of each class are embedded, averaged and renormalised; without, the bare name.
        Callers append "background" themselves, as the official evaluation does."""
        device = self.lang_proj.device
        per_class = len(PROMPT_TEMPLATES) if prompt else 1
        texts = [t.format(prompt_class_name(name)) for name in class_names for t in PROMPT_TEMPLATES] if prompt \
            else list(class_names)
        tokens = self.tokenize(texts)
        x = self.forward_language(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        mean = x.view(len(class_names), per_class, -1).mean(dim=1)
        return mean / mean.norm(dim=-1, keepdim=True)

    def similarity(self, v_emb: Tensor, text_emb: Tensor) -> Tensor:
        """Class logits (..., Q, K) of decoder embeddings v_emb (..., Q, dim_proj) against text_emb
        (K, dim_proj), as `compute_similarity`: logit_scale.exp() * v / (|v| + 1e-7) @ text_emb.T."""
        v_emb = v_emb / (v_emb.norm(dim=-1, keepdim=True) + 1e-7)
        return self.logit_scale.exp() * v_emb @ text_emb.t()
