"""A reference CLIP / SigLIP with FLIP patch masking, built from the eager blocks of
:mod:`mmkernels.models.layers` (so :func:`mmkernels.models.patch` swaps in the fused
kernels).

* Image encoder: a ViT (OpenAI CLIP / open_clip ``VisionTransformer``): a strided conv
  patch embedding, a learned position embedding, **FLIP masking** (a random
  ``mask_ratio`` of the patches dropped after the position embedding and before the
  class token is prepended, as FLIP and MAE), ``ln_pre``, pre-LN blocks whose attention
  core is :class:`~mmkernels.models.layers.PaddedSelfAttention` (fixed length, no
  padding mask), ``ln_post`` on the class token, a linear projection.
* Text encoder: a causal transformer (token + position embedding, pre-LN blocks with
  ``PaddedSelfAttention(causal=True)``, ``ln_final``), the features taken at the EOT
  token (``input_ids.argmax(-1)``, CLIP's rule: EOT has the largest id) or at
  ``lengths - 1``, a linear projection. Causal, so the padding after EOT never reaches
  the features and no padding mask is needed.
* Loss on the L2-normalised features: :class:`~mmkernels.models.layers.InfoNCELoss`
  (CLIP, learnable ``logit_scale`` initialised to log(1/0.07)) or
  :class:`~mmkernels.models.layers.SigmoidContrastiveLoss` (SigLIP, ``logit_scale``
  log(10) and ``logit_bias`` -10), chosen by ``CLIPConfig.loss``. The scale is used as
  ``exp(min(logit_scale, log 100))``, CLIP's clamp. Distributed when the model is given
  a process group (or one is initialised): the loss layers gather every rank's features.

The training path never forms the B x B logits (the patched loss does not either);
:meth:`CLIP.logits` computes them for evaluation.

Patched (``mmkernels.models.patch(model)``): attention -> ``varlen_attention``, FLIP
masking -> ``random_masking``, the loss -> ``info_nce`` / ``sigmoid_contrastive``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkernels.models import layers

__all__ = ["CLIPConfig", "CLIPOutput", "CLIP", "synthetic_batch"]

_LOSSES = ("info_nce", "sigmoid")


@dataclass
class CLIPConfig:
    """Sizes of a :class:`CLIP`. The defaults are a tiny model for tests (16 x 16 images,
    4 x 4 patches -> 16 patches, width 32, 2 heads, 2 layers, context 8).

    ``mask_ratio``: FLIP's fraction of patches dropped in training (eval keeps all);
    ``loss``: ``"info_nce"`` (CLIP) or ``"sigmoid"`` (SigLIP); ``eot_token_id``: the
    end-of-text id, which must be the largest id in use (CLIP takes the text features
    at ``input_ids.argmax(-1)``), default ``vocab_size - 1``; id 0 pads.
    """

    image_size: int = 16
    patch_size: int = 4
    vision_width: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    mask_ratio: float = 0.5
    context_length: int = 8
    vocab_size: int = 64
    text_width: int = 32
    text_layers: int = 2
    text_heads: int = 2
    embed_dim: int = 32
    mlp_ratio: float = 4.0
    attention_dropout: float = 0.0
    loss: str = "info_nce"
    eot_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads",
                     "context_length", "vocab_size", "text_width", "text_layers", "text_heads",
                     "embed_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size "
                             f"({self.patch_size})")
        for width, heads in (("vision_width", "vision_heads"), ("text_width", "text_heads")):
            if getattr(self, width) % getattr(self, heads):
                raise ValueError(f"{width} ({getattr(self, width)}) must be a multiple of {heads} "
                                 f"({getattr(self, heads)})")
        if not 0.0 <= float(self.mask_ratio) < 1.0:
            raise ValueError(f"mask_ratio must lie in [0, 1), got {self.mask_ratio}")
        if not 0.0 <= float(self.attention_dropout) < 1.0:
            raise ValueError(f"attention_dropout must lie in [0, 1), got {self.attention_dropout}")
        if self.loss not in _LOSSES:
            raise ValueError(f"loss must be one of {_LOSSES}, got {self.loss!r}")
        if self.vocab_size < 3:
            raise ValueError(f"vocab_size must be >= 3 (padding, a word, EOT), got {self.vocab_size}")
        if self.eot_token_id is None:
            self.eot_token_id = self.vocab_size - 1
        if not 0 < self.eot_token_id < self.vocab_size:
            raise ValueError(f"eot_token_id must lie in [1, vocab_size), got {self.eot_token_id}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_kept_patches(self) -> int:
        """Patches left after FLIP masking in training: ``int(N * (1 - mask_ratio))``."""
        return int(self.num_patches * (1 - self.mask_ratio))

    @classmethod
    def small(cls, **overrides) -> CLIPConfig:
        """The demo model: 32 x 32 images in 4 x 4 patches (64 patches, 32 kept), width
        128, 4 heads, 4 layers per tower, context 16: a few hundred CPU training steps
        (batch 32) take about a minute."""
        return cls(**{**dict(image_size=32, patch_size=4, vision_width=128, vision_layers=4,
                             vision_heads=4, context_length=16, vocab_size=256, text_width=128,
                             text_layers=4, text_heads=4, embed_dim=128), **overrides})

    @classmethod
    def base(cls, **overrides) -> CLIPConfig:
        """ViT-B/16 (FLIP / open_clip sizes), for benchmarks: 224 x 224 images in 16 x 16
        patches (196, 98 kept at FLIP's 0.5), width 768, 12 heads, 12 layers; a text
        transformer of width 512, 8 heads, 12 layers, context 77, CLIP's 49408-token
        vocabulary; 512-d embeddings."""
        return cls(**{**dict(image_size=224, patch_size=16, vision_width=768, vision_layers=12,
                             vision_heads=12, context_length=77, vocab_size=49408, text_width=512,
                             text_layers=12, text_heads=8, embed_dim=512), **overrides})


@dataclass
class CLIPOutput:
    """What :meth:`CLIP.forward` returns.

    loss: scalar (None with ``return_loss=False``); image_features, text_features:
    (B, embed_dim), L2-normalised, float; logits_per_image: (B, B) (image i against
    text j; None unless ``return_logits=True``).
    """

    loss: Tensor | None
    image_features: Tensor
    text_features: Tensor
    logits_per_image: Tensor | None = None


class Attention(nn.Module):
    """Multi-head self-attention: fused qkv projection, the attention core
    (:class:`~mmkernels.models.layers.PaddedSelfAttention`), output projection.
    forward(x (B, L, width)) -> (B, L, width).

    The qkv projection has query and value biases but no key bias (as BEiT and
    EVA-CLIP): a key bias adds ``q . b`` to a whole row of scores, which the softmax
    cancels, so its gradient is zero in exact arithmetic and only rounding noise in
    practice; Adam would turn that noise into full learning-rate steps (and eager vs
    fused runs into different parameters) for a parameter that changes nothing.
    """

    def __init__(self, width: int, heads: int, causal: bool, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.core = layers.PaddedSelfAttention(causal=causal, dropout=dropout)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        B, L, W = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.view(B, L, 3, self.heads, W // self.heads).unbind(2)
        return self.out_proj(self.core(q, k, v).reshape(B, L, W))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) (GELU MLP).
    forward(x (B, L, width)) -> (B, L, width)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, causal: bool,
                 dropout: float) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, causal, dropout)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of :class:`Block`; forward(x (B, L, width)) -> (B, L, width)."""

    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float, causal: bool,
                 dropout: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, causal, dropout)
                                    for _ in range(depth))
        # open_clip's init: residual-branch outputs scaled down with depth
        proj_std = width ** -0.5 * (2 * depth) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp[0].weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp[2].weight, std=proj_std)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class VisionTransformer(nn.Module):
    """CLIP's ViT with FLIP masking.

    forward(images (B, 3, H, W) float) -> (B, embed_dim), images' dtype, unnormalised.
    In training the transformer sees ``1 + int(N * (1 - mask_ratio))`` tokens (the class
    token and the kept patches), in eval ``1 + N``.
    """

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        width, p = config.vision_width, config.patch_size
        self.patch_embed = nn.Conv2d(3, width, kernel_size=p, stride=p, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(config.num_patches + 1, width))
        self.masking = layers.RandomTokenMasking(config.mask_ratio)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, config.vision_layers, config.vision_heads,
                                       config.mlp_ratio, False, config.attention_dropout)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Linear(width, config.embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=scale)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, width)
        x = x + self.positional_embedding[1:]
        x, _, _ = self.masking(x)  # FLIP: (B, N_keep, width) in training
        cls = (self.class_embedding + self.positional_embedding[0]).expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls.to(x.dtype), x], dim=1))
        x = self.transformer(x)
        return self.proj(self.ln_post(x[:, 0]))


class TextTransformer(nn.Module):
    """CLIP's causal text encoder.

    forward(input_ids (B, L) int64, L <= context_length, lengths: optional (B,) int64
    in [1, L]) -> (B, embed_dim) float, unnormalised: the final hidden state at
    ``lengths - 1``, or, without ``lengths``, at ``input_ids.argmax(-1)`` (the EOT token,
    CLIP's rule).
    """

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        width = config.text_width
        self.token_embedding = nn.Embedding(config.vocab_size, width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(config.context_length, width))
        self.transformer = Transformer(width, config.text_layers, config.text_heads,
                                       config.mlp_ratio, True, config.attention_dropout)
        self.ln_final = nn.LayerNorm(width)
        self.proj = nn.Linear(width, config.embed_dim, bias=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.proj.weight, std=width ** -0.5)

    def forward(self, input_ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        L = input_ids.shape[1]
        x = self.token_embedding(input_ids) + self.positional_embedding[:L]
        x = self.ln_final(self.transformer(x))
        last = input_ids.argmax(-1) if lengths is None else lengths - 1
        return self.proj(x[torch.arange(x.shape[0], device=x.device), last])


class CLIP(nn.Module):
    """CLIP (or SigLIP, ``config.loss="sigmoid"``) with FLIP masking; see the module doc.

    Args:
        config: a :class:`CLIPConfig`.
        process_group: the group the contrastive loss gathers features over (None: the
            initialised default group, if any, else one process), passed to the loss
            layer.

    Parameters beyond the towers: ``logit_scale`` (one element, log of the scale), and
    for SigLIP ``logit_bias`` (one element; None for InfoNCE).
    """

    def __init__(self, config: CLIPConfig | None = None, process_group=None) -> None:
        super().__init__()
        config = CLIPConfig() if config is None else config
        if not isinstance(config, CLIPConfig):
            raise TypeError(f"config must be a CLIPConfig, got {type(config).__name__}")
        self.config = config
        self.visual = VisionTransformer(config)
        self.text = TextTransformer(config)
        sigmoid = config.loss == "sigmoid"
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0) if sigmoid else math.log(1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if sigmoid else None
        self.loss = (layers.SigmoidContrastiveLoss(process_group) if sigmoid
                     else layers.InfoNCELoss(process_group))

    def scale(self) -> Tensor:
        """exp(logit_scale), clamped at 100 as CLIP: a 0-d tensor."""
        return self.logit_scale.clamp(max=math.log(100.0)).exp()

    def _check(self, images: Tensor, input_ids: Tensor, lengths: Tensor | None) -> None:
        c = self.config
        side = c.image_size
        if (not isinstance(images, Tensor) or not images.is_floating_point()
                or images.shape[1:] != (3, side, side) or images.dim() != 4):
            raise ValueError(f"images must be a float (B, 3, {side}, {side}) Tensor, got "
                             f"{_describe(images)}")
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.int64:
            raise ValueError(f"input_ids must be a (B, L) int64 Tensor, got {_describe(input_ids)}")
        if input_ids.shape[0] != images.shape[0]:
            raise ValueError(f"input_ids has {input_ids.shape[0]} rows but images has "
                             f"{images.shape[0]}")
        if not 1 <= input_ids.shape[1] <= c.context_length:
            raise ValueError(f"input_ids length must lie in [1, context_length={c.context_length}], "
                             f"got {input_ids.shape[1]}")
        if lengths is not None and (not isinstance(lengths, Tensor) or lengths.dtype != torch.int64
                                    or lengths.shape != input_ids.shape[:1]):
            raise ValueError(f"lengths must be a ({input_ids.shape[0]},) int64 Tensor, got "
                             f"{_describe(lengths)}")

    def encode(self, images: Tensor, input_ids: Tensor,
               lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(image_features, text_features), each (B, embed_dim), L2-normalised.

        images (B, 3, image_size, image_size) float; input_ids (B, L) int64,
        L <= context_length, padded after EOT (any id below EOT); lengths: optional (B,)
        int64, the real tokens per text including EOT (else EOT = the row's argmax).
        """
        self._check(images, input_ids, lengths)
        image_features = F.normalize(self.visual(images), dim=-1)
        text_features = F.normalize(self.text(input_ids, lengths), dim=-1)
        return image_features, text_features

    def similarity(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """(B_i, B_t) logits ``exp(logit_scale) I T^T`` (+ ``logit_bias`` for SigLIP)."""
        logits = self.scale() * image_features @ text_features.T
        return logits if self.logit_bias is None else logits + self.logit_bias

    def forward(self, images: Tensor, input_ids: Tensor, lengths: Tensor | None = None, *,
                return_loss: bool = True, return_logits: bool = False) -> CLIPOutput:
        """images (B, 3, image_size, image_size) float, input_ids (B, L) int64, lengths:
        optional (B,) int64 (see :meth:`encode`) -> :class:`CLIPOutput`. The loss never
        forms the B x B logits; ``return_logits=True`` computes them separately."""
        image_features, text_features = self.encode(images, input_ids, lengths)
        loss = None
        if return_loss:
            if self.logit_bias is None:
                loss = self.loss(image_features, text_features, self.scale())
            else:
                loss = self.loss(image_features, text_features, self.scale(), self.logit_bias)
        logits = self.similarity(image_features, text_features) if return_logits else None
        return CLIPOutput(loss, image_features, text_features, logits)

    @torch.no_grad()
    def logits(self, images: Tensor, input_ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Evaluation helper: the (B, B) logits_per_image (image i against text j), no
        gradient, no loss. Call it in eval mode to see every patch."""
        return self.similarity(*self.encode(images, input_ids, lengths))


def _describe(t) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


def synthetic_batch(config: CLIPConfig, batch_size: int, seed: int,
                    num_classes: int | None = None) -> dict[str, Tensor]:
    """A learnable synthetic image-text batch (CPU, deterministic in ``seed``).

    Each pair belongs to one of ``num_classes`` classes (default ``max(8, batch_size)``;
    the classes within a batch are distinct when ``batch_size <= num_classes``). The
    image is the class's fixed random pattern plus noise; the text is 1 to
    ``context_length - 1`` words drawn from the class's own slice of the vocabulary,
    then EOT, then padding (id 0) up to ``context_length``. Matching needs both towers
    to recognise the class, so the contrastive loss falls with training. The class
    patterns depend only on the config, not on ``seed``.

    Returns {"images": (B, 3, H, W) float32, "input_ids": (B, context_length) int64,
    "lengths": (B,) int64 (words + EOT), "classes": (B,) int64}.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if num_classes is None:
        num_classes = max(8, batch_size)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    S, L = config.image_size, config.context_length
    words = config.eot_token_id - 1  # ids 1 .. eot-1 are words
    if words < 1 or L < 2:
        raise ValueError("synthetic_batch needs at least one word id below eot_token_id and "
                         "context_length >= 2")
    patterns = torch.randn(num_classes, 3, S, S, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(int(seed))
    if batch_size <= num_classes:
        classes = torch.randperm(num_classes, generator=g)[:batch_size]
    else:
        classes = torch.randint(num_classes, (batch_size,), generator=g)
    images = patterns[classes] + 0.5 * torch.randn(batch_size, 3, S, S, generator=g)
    lengths = torch.randint(2, L + 1, (batch_size,), generator=g)  # words + EOT
    per_class = max(1, words // num_classes)
    ids = 1 + (classes[:, None] * per_class
               + torch.randint(per_class, (batch_size, L), generator=g)) % words
    pos = torch.arange(L)
    ids = torch.where(pos < lengths[:, None] - 1, ids, 0)
    ids = torch.where(pos == lengths[:, None] - 1, config.eot_token_id, ids)
    return {"images": images, "input_ids": ids, "lengths": lengths, "classes": classes}
