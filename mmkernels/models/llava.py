"""A reference LLaVA, trained padding-free on packed samples, built from eager modules.

Architecture (LLaVA-1.5's, at any size):

* a CLIP-style ViT vision tower: patch embedding (Conv2d), CLS token, learned position
  embeddings, CLIP's pre-layernorm, pre-LN transformer blocks whose attention core is
  :class:`~mmkernels.models.layers.PaddedSelfAttention` (no mask, all images the same
  size). The image features are the hidden states of ``vision_feature_layer`` (Hugging
  Face's indexing: 0 = the embeddings, -1 = the last layer, -2 = LLaVA's choice) without
  the CLS token (LLaVA's "default"/"patch" strategy); layers after the selected one
  cannot change the output and are not built;
* a 2-layer MLP projector (Linear, GELU, Linear) to the language model's width;
* a decoder-only language model (Llama-style): token embedding, RMSNorm, rotary
  position embeddings computed from ``position_ids`` (which restart at every packed
  sample), grouped-query attention (``num_kv_heads`` < ``num_heads``) whose core is
  :class:`~mmkernels.models.layers.PackedSelfAttention` (causal, over the packed samples
  of ``cu_seq_lens_q``), SwiGLU MLPs, an untied ``lm_head``;
* the image features replace the embeddings of the image placeholder tokens with
  :class:`~mmkernels.models.layers.ImageFeatureMerge` (Hugging Face's ``masked_scatter``).

:func:`mmkernels.models.patch` swaps the three eager cores for
:func:`mmkernels.varlen_attention` (vision tower and language model) and
:func:`mmkernels.scatter_image_features`.

Inputs come from :class:`mmkernels.data.VLMPackingCollator` (``Llava(config)(**batch)``):
one packed row of S samples, T tokens in all.

Loss convention (Hugging Face's): ``labels`` (1, T) are aligned with ``input_ids`` and
not shifted; the model shifts them (position t predicts ``labels[t + 1]``) and takes
the mean cross-entropy over the labels that are not -100. The collator puts -100 at
image tokens, at prompt tokens on request, and at the first token of every sample; the
model also ignores the label at every sample start of ``cu_seq_lens_q`` itself, so the
shift never crosses a sample boundary whatever the labels.

``bidirectional_images=True`` lets the tokens of one image attend to each other both
ways inside the causal language model (``block_ids``: one id per image; the model
derives them from ``input_ids`` when the batch has none).

Configurations: :class:`LlavaConfig` (tiny: the tests), :meth:`LlavaConfig.small` (the
CPU demo: a few hundred steps in about a minute), :meth:`LlavaConfig.base` (the
benchmarks: a ViT-B/16 tower and a Qwen2-0.5B-shaped language model, LLaVA-OneVision-0.5B
scale).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkernels.data.packing import IGNORE_INDEX, VLMPackingCollator, image_block_ids
from mmkernels.models import layers

__all__ = ["LlavaConfig", "Llava", "LlavaOutput", "VisionTower", "LanguageModel",
           "packed_lm_loss", "rotary_cos_sin", "synthetic_samples", "synthetic_pack"]


@dataclasses.dataclass
class LlavaConfig:
    """Sizes of :class:`Llava`. The defaults are the tiny test model: 8x8 images in 4x4
    patches (4 image tokens), a 2-layer ViT of width 32 with 2 heads, a 2-layer LM of
    width 32 with 4 heads / 2 kv heads, vocab 64 (the last id is the image token). The
    ViT has 2 heads, not 4, because every head of every image is one Triton program,
    and the tests run the kernels in Triton's (slow) CPU interpreter."""

    # vision tower (CLIP ViT)
    image_size: int = 8
    patch_size: int = 4
    num_channels: int = 3
    vision_hidden_size: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate_size: int = 64
    vision_feature_layer: int = -1
    layer_norm_eps: float = 1e-5
    # language model (Llama-style)
    vocab_size: int = 64
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 64
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    #: the placeholder id of an image token (inside the vocabulary, as in HF LLaVA)
    image_token_id: int = 63
    #: each image's tokens form one bidirectional block inside the causal LM
    bidirectional_images: bool = False
    attention_dropout: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        def positive(*names):
            for n in names:
                v = getattr(self, n)
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"LlavaConfig.{n} must be a positive int, got {v!r}")

        positive("image_size", "patch_size", "num_channels", "vision_hidden_size",
                 "vision_layers", "vision_heads", "vision_intermediate_size", "vocab_size",
                 "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size "
                             f"({self.patch_size})")
        if self.vision_hidden_size % self.vision_heads:
            raise ValueError(f"vision_hidden_size ({self.vision_hidden_size}) must be a multiple "
                             f"of vision_heads ({self.vision_heads})")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be num_heads "
                             f"({self.num_heads}) x an even head dim (rotary embeddings)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if not -(self.vision_layers + 1) <= self.vision_feature_layer <= self.vision_layers:
            raise ValueError(f"vision_feature_layer must index the {self.vision_layers + 1} "
                             f"hidden states (-{self.vision_layers + 1} .. {self.vision_layers}), "
                             f"got {self.vision_feature_layer}")
        if not 0 <= self.image_token_id < self.vocab_size:
            raise ValueError(f"image_token_id ({self.image_token_id}) must lie in the vocabulary "
                             f"[0, {self.vocab_size})")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"attention_dropout must lie in [0, 1), got {self.attention_dropout}")

    @property
    def num_image_tokens(self) -> int:
        """Feature tokens per image: (image_size / patch_size)^2 (CLS dropped)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def vision_layers_used(self) -> int:
        """Vision layers that are built and run (up to ``vision_feature_layer``)."""
        return self.vision_feature_layer % (self.vision_layers + 1)

    def collator(self, **kwargs) -> VLMPackingCollator:
        """A :class:`~mmkernels.data.VLMPackingCollator` for this model (its image token,
        its image token count, its ``bidirectional_images``); ``kwargs`` go to it."""
        kwargs.setdefault("bidirectional_images", self.bidirectional_images)
        return VLMPackingCollator(self.image_token_id, self.num_image_tokens, **kwargs)

    @classmethod
    def small(cls, **overrides) -> LlavaConfig:
        """The CPU demo: 32x32 images in 8x8 patches (16 image tokens), a 3-layer ViT of
        width 64 (features from the penultimate layer, as LLaVA), a 4-layer LM of width
        128 with 4 heads / 2 kv heads, vocab 512. About 1.0 M parameters: a few hundred
        training steps on packs of a few samples take about a minute on a CPU."""
        base = dict(image_size=32, patch_size=8, vision_hidden_size=64, vision_layers=3,
                    vision_heads=4, vision_intermediate_size=256, vision_feature_layer=-2,
                    vocab_size=512, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                    intermediate_size=352, image_token_id=511)
        return cls(**{**base, **overrides})

    @classmethod
    def base(cls, **overrides) -> LlavaConfig:
        """The benchmark model (LLaVA-OneVision-0.5B scale): a CLIP ViT-B/16 tower at 224
        pixels (196 image tokens, 12 layers of width 768, features from layer -2, so 11
        layers built) and a Qwen2-0.5B-shaped language model (24 layers of width 896,
        14 heads / 2 kv heads of dim 64, SwiGLU 4864, vocab 151936, rope theta 1e6),
        0.71 B parameters (the untied lm_head adds 136 M to Qwen2-0.5B)."""
        base = dict(image_size=224, patch_size=16, vision_hidden_size=768, vision_layers=12,
                    vision_heads=12, vision_intermediate_size=3072, vision_feature_layer=-2,
                    vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14,
                    num_kv_heads=2, intermediate_size=4864, rope_theta=1e6,
                    image_token_id=151646)
        return cls(**{**base, **overrides})


class LlavaOutput(NamedTuple):
    """loss: scalar float32 (None without labels); logits: (1, T, vocab_size)."""

    loss: Tensor | None
    logits: Tensor


# ---------------------------------------------------------------------------------
# vision tower
# ---------------------------------------------------------------------------------


class VisionAttention(nn.Module):
    """Multi-head self-attention of a ViT block: x (B, L, W) -> (B, L, W)."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.core = layers.PaddedSelfAttention(causal=False, dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, L, W = x.shape
        shape = (B, L, self.heads, W // self.heads)
        out = self.core(self.q_proj(x).view(shape), self.k_proj(x).view(shape),
                        self.v_proj(x).view(shape))
        return self.out_proj(out.reshape(B, L, W))


class VisionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then + mlp(ln2(x))."""

    def __init__(self, config: LlavaConfig) -> None:
        super().__init__()
        w = config.vision_hidden_size
        self.layer_norm1 = nn.LayerNorm(w, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(w, config.vision_heads, config.attention_dropout)
        self.layer_norm2 = nn.LayerNorm(w, eps=config.layer_norm_eps)
        self.mlp = nn.Sequential(nn.Linear(w, config.vision_intermediate_size), nn.GELU(),
                                 nn.Linear(config.vision_intermediate_size, w))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionTower(nn.Module):
    """CLIP-style ViT: pixel_values (N, C, H, W) float -> patch features
    (N, num_image_tokens, vision_hidden_size), the hidden states of
    ``vision_feature_layer`` without the CLS token."""

    def __init__(self, config: LlavaConfig) -> None:
        super().__init__()
        w, p = config.vision_hidden_size, config.patch_size
        self.image_size = config.image_size
        self.patch_embedding = nn.Conv2d(config.num_channels, w, kernel_size=p, stride=p,
                                         bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(w))
        self.position_embedding = nn.Parameter(torch.zeros(config.num_image_tokens + 1, w))
        self.pre_layrnorm = nn.LayerNorm(w, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(VisionBlock(config) for _ in range(config.vision_layers_used))

    def forward(self, pixel_values: Tensor) -> Tensor:
        if pixel_values.dim() != 4 or pixel_values.shape[-2:] != (self.image_size,) * 2:
            raise ValueError(f"pixel_values must be (num_images, C, {self.image_size}, "
                             f"{self.image_size}), got {tuple(pixel_values.shape)}")
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.position_embedding
        x = self.pre_layrnorm(x)
        for layer in self.layers:
            x = layer(x)
        return x[:, 1:]


class Projector(nn.Module):
    """LLaVA-1.5's mlp2x_gelu: (..., vision_hidden_size) -> (..., hidden_size)."""

    def __init__(self, config: LlavaConfig) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(config.vision_hidden_size, config.hidden_size)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


# ---------------------------------------------------------------------------------
# language model
# ---------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Llama's RMSNorm: x / sqrt(mean(x^2) + eps) * weight, computed in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotary_cos_sin(position_ids: Tensor, head_dim: int, theta: float, dtype: torch.dtype
                   ) -> tuple[Tensor, Tensor]:
    """Rotary tables for ``position_ids`` (T,) int: cos, sin (T, 1, head_dim) in
    ``dtype`` (Llama's layout: the two halves of the head dim share a frequency)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device,
                                            dtype=torch.float32) / head_dim)
    freqs = position_ids.float()[:, None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class DecoderAttention(nn.Module):
    """Grouped-query causal attention over packed samples.

    forward(x (T, hidden), cos/sin (T, 1, head_dim), cu_seqlens (S + 1,) int32,
    max_seqlen int, block_ids optional (T,) int32) -> (T, hidden).
    """

    def __init__(self, config: LlavaConfig) -> None:
        super().__init__()
        d, self.heads, self.kv_heads = config.hidden_size, config.num_heads, config.num_kv_heads
        self.head_dim = d // self.heads
        self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=False)
        self.core = layers.PackedSelfAttention(causal=True, dropout=config.attention_dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                block_ids: Tensor | None) -> Tensor:
        T = x.shape[0]
        q = _rotate(self.q_proj(x).view(T, self.heads, self.head_dim), cos, sin)
        k = _rotate(self.k_proj(x).view(T, self.kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(T, self.kv_heads, self.head_dim)
        out = self.core(q, k, v, cu_seqlens, max_seqlen, block_ids)
        return self.o_proj(out.reshape(T, self.heads * self.head_dim))


class SwiGLU(nn.Module):
    """Llama's MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm Llama block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: LlavaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DecoderAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                block_ids: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, max_seqlen,
                               block_ids)
        return x + self.mlp(self.post_attention_layernorm(x))


class LanguageModel(nn.Module):
    """The decoder without its embedding and head: inputs_embeds (T, hidden) ->
    normed hidden states (T, hidden)."""

    def __init__(self, config: LlavaConfig) -> None:
        super().__init__()
        self.head_dim = config.hidden_size // config.num_heads
        self.rope_theta = config.rope_theta
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, position_ids: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                block_ids: Tensor | None = None) -> Tensor:
        cos, sin = rotary_cos_sin(position_ids, self.head_dim, self.rope_theta, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, cu_seqlens, max_seqlen, block_ids)
        return self.norm(x)


def packed_lm_loss(logits: Tensor, labels: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Next-token cross-entropy over packed samples.

    logits (T, V), labels (T,) int64 aligned with the inputs (not shifted; -100 =
    ignored), cu_seqlens (S + 1,) int32. Position t predicts ``labels[t + 1]``; the
    label at every sample start is ignored, so no position predicts the next sample's
    first token. Returns the mean over the remaining labels, float32 (NaN when none
    remain, as ``F.cross_entropy``).
    """
    T = labels.shape[0]
    starts = torch.zeros(T + 1, dtype=torch.bool, device=labels.device)
    starts = starts.index_fill(0, cu_seqlens[:-1].long(), True)[:T]
    labels = labels.masked_fill(starts, IGNORE_INDEX)
    return F.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=IGNORE_INDEX)


# ---------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------


def _flat(t: Tensor | None, name: str, T: int | None = None) -> Tensor | None:
    """(T,) or (1, T) -> (T,)."""
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1 or (T is not None and t.shape[0] != T):
        want = "(T,) or (1, T)" if T is None else f"(1, {T}) or ({T},)"
        raise ValueError(f"{name} must be {want} (one packed row; pack a batch with "
                         f"mmkernels.data.VLMPackingCollator), got {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer Tensor, got {t.dtype}")
    return t


class Llava(nn.Module):
    """LLaVA over one packed row (see the module docstring).

    forward(input_ids (1, T) or (T,) int64,
            pixel_values: optional (num_images, C, image_size, image_size) float, the images
                of the placeholders in order (none: the placeholders keep their embeddings),
            position_ids: optional (1, T) int64, restarting at every sample (default: from
                cu_seq_lens_q),
            cu_seq_lens_q: optional (S + 1,) int32 sample offsets (default: one sample),
            cu_seq_lens_k: optional, must equal cu_seq_lens_q (self-attention),
            max_length_q: Python int >= the longest sample (required with cu_seq_lens_q),
            max_length_k: ignored (the same as max_length_q for self-attention),
            block_ids: optional (T,) int32 image blocks (``bidirectional_images`` only;
                default: derived from input_ids),
            labels: optional (1, T) int64, -100 where ignored)
    -> LlavaOutput(loss (scalar float32, or None without labels), logits (1, T, vocab)).
    """

    def __init__(self, config: LlavaConfig | None = None) -> None:
        super().__init__()
        self.config = config = config if config is not None else LlavaConfig()
        self.vision_tower = VisionTower(config)
        self.multi_modal_projector = Projector(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.merge = layers.ImageFeatureMerge()
        self.language_model = LanguageModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, VisionTower):
            nn.init.normal_(module.class_embedding, std=std)
            nn.init.normal_(module.position_embedding, std=std)

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """(num_images, C, H, W) -> projected features (num_images * num_image_tokens,
        hidden_size)."""
        feats = self.multi_modal_projector(self.vision_tower(pixel_values))
        return feats.reshape(-1, feats.shape[-1])

    def forward(self, input_ids: Tensor, pixel_values: Tensor | None = None,
                position_ids: Tensor | None = None, cu_seq_lens_q: Tensor | None = None,
                cu_seq_lens_k: Tensor | None = None, max_length_q: int | None = None,
                max_length_k: int | None = None, block_ids: Tensor | None = None,
                labels: Tensor | None = None) -> LlavaOutput:
        cfg = self.config
        ids = _flat(input_ids, "input_ids")
        T = ids.shape[0]
        if T == 0:
            raise ValueError("input_ids is empty")
        if cu_seq_lens_q is None:
            cu = torch.tensor([0, T], dtype=torch.int32, device=ids.device)
            max_len = T
        else:
            if not isinstance(cu_seq_lens_q, Tensor):
                raise TypeError(f"cu_seq_lens_q must be an int32 Tensor, got "
                                f"{type(cu_seq_lens_q).__name__}")
            if isinstance(max_length_q, bool) or not isinstance(max_length_q, int):
                raise TypeError("max_length_q must be a Python int with cu_seq_lens_q (the "
                                f"longest sample), got {max_length_q!r}")
            if (cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q
                    and not torch.compiler.is_compiling()
                    and not torch.equal(cu_seq_lens_k.cpu(), cu_seq_lens_q.cpu())):
                raise ValueError("cu_seq_lens_k must equal cu_seq_lens_q (self-attention)")
            cu, max_len = cu_seq_lens_q, max_length_q
        if position_ids is None:
            positions = torch.arange(T, device=ids.device) - cu.long()[layers.segment_ids(cu, T)]
        else:
            positions = _flat(position_ids, "position_ids", T)
        if block_ids is not None and not cfg.bidirectional_images:
            raise ValueError("block_ids given but config.bidirectional_images is False (build "
                             "the collator with bidirectional_images=False, or the model with True)")

        image_mask = ids == cfg.image_token_id
        x = self.embed_tokens(ids)[None]
        if pixel_values is not None:
            x = self.merge(x, image_mask[None], self.image_features(pixel_values).to(x.dtype))
        if cfg.bidirectional_images and block_ids is None:
            block_ids = image_block_ids(image_mask, cfg.num_image_tokens)
        hidden = self.language_model(x[0], positions, cu, max_len, block_ids)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = packed_lm_loss(logits, _flat(labels, "labels", T).long(), cu)
        return LlavaOutput(loss, logits[None])


#: images per sample of :func:`synthetic_samples`' default pack: one, none (text only), two
IMAGES_PER_SAMPLE = (1, 0, 2)


def synthetic_samples(config: LlavaConfig, seed: int, images=IMAGES_PER_SAMPLE,
                      prompt: bool = True) -> list[dict]:
    """Learnable synthetic samples (tests and the demo), one per entry of ``images``.

    Each: ``input_ids`` (list of int) with the image placeholders (one per image) inside
    a short random prompt, then an answer whose every token is the previous one + 1
    (modulo the text vocabulary: the ids below ``image_token_id``);
    ``prompt_length`` covering the prompt (when ``prompt``); ``pixel_values``
    (n_images, num_channels, image_size, image_size) float32 when it has images.
    """
    g = torch.Generator().manual_seed(seed)
    text_vocab = config.image_token_id

    def randint(lo, hi):
        return int(torch.randint(lo, hi, (1,), generator=g))

    samples = []
    for n_images in images:
        prompt_ids = [randint(0, text_vocab) for _ in range(randint(1, 3))]
        for _ in range(n_images):
            prompt_ids.insert(randint(0, len(prompt_ids) + 1), config.image_token_id)
        start = randint(0, text_vocab)
        answer = [(start + i) % text_vocab for i in range(randint(3, 7))]
        sample = {"input_ids": prompt_ids + answer}
        if prompt:
            sample["prompt_length"] = len(prompt_ids)
        if n_images:
            sample["pixel_values"] = torch.randn(n_images, config.num_channels,
                                                 config.image_size, config.image_size, generator=g)
        samples.append(sample)
    return samples


def synthetic_pack(config: LlavaConfig, seed: int, images=IMAGES_PER_SAMPLE,
                   **collator_kwargs) -> dict:
    """The collated pack of :func:`synthetic_samples` (prompt tokens ignored by default)."""
    collator_kwargs.setdefault("ignore_prompt", True)
    return config.collator(**collator_kwargs)(synthetic_samples(config, seed, images))
