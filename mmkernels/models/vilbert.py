"""A reference ViLBERT (two streams with co-attention, as facebookresearch/vilbert-multi-task)
built from the eager modules of :mod:`mmkernels.models.layers`, with its pre-training heads.

Architecture (module names follow vilbert-multi-task where it has the module)::

    text:   input_ids (B, Nt) -> BertEmbeddings (word + position + token type, LayerNorm)
    vision: feature_map (B, C, H, W), boxes (B, R, 4) -> RegionPooling (B*R, C)
            -> [IMG] token (mean of the valid input regions) + R regions = (B, 1 + R, C)
            -> image_embeddings (C -> v_hidden) + image_location_embeddings (5 -> v_hidden),
               LayerNorm
    encoder: text layers (BertLayer, attention core PaddedSelfAttention),
             vision layers (BertImageLayer, PaddedSelfAttention),
             co-attention layers (BertConnectionLayer: BertBiAttention, BertBiOutput, one FFN
             per stream), interleaved as ViLBERT's ``t_biattention_id`` / ``v_biattention_id``:
             before co-attention layer i, the text layers up to ``t_biattention_id[i]`` and
             the vision layers up to ``v_biattention_id[i]`` run; the remaining ones run after
             the last co-attention layer.
    heads:  masked LM (transform + decoder tied to the word embeddings), on the masked text
            rows only (MaskedRowSelect);
            masked region classification (KL divergence to the detector's class
            distribution) and masked region feature regression (MSE to the region's pooled
            feature before masking), on the masked regions only (MaskedRowSelect);
            image-text matching: pooled text ([CLS]) * pooled vision ([IMG]) -> 2 classes.
            loss = the sum of the four.

:func:`mmkernels.models.patch` swaps, in place, PaddedSelfAttention ->
varlen_attention, BertBiAttention -> co_attention, RegionPooling -> region_features and
MaskedRowSelect -> masked_select_rows.

Padded positions: the fused attention modules return zeros at padded query positions;
eager BertBiAttention computes values there. The two models therefore differ only in
the hidden states of padded positions, which are masked out as keys everywhere and
read by no head (every head reads [CLS], [IMG], masked text rows or masked regions,
which must be real positions), so their losses and logits agree.

:func:`synthetic_batch` makes a batch with a learnable structure (captions name the
detector classes of the image's regions) for the tests, the benchmarks and the demo.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkernels import reference
from mmkernels.models.layers import MaskedRowSelect, PaddedSelfAttention, RegionPooling
from mmkernels.ops.roi_align import region_features

LAYER_NORM_EPS = 1e-12  # BERT's (vilbert-multi-task's BertLayerNorm default)

# ---------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------


@dataclass
class ViLBertConfig:
    """ViLBERT hyper-parameters, named as vilbert-multi-task's ``BertConfig``.

    The defaults are a tiny model for tests (hidden sizes 32, two heads of 16; one text
    layer, then one co-attention layer, then one vision layer: so the vision layer sees
    the co-attention layer's padded rows, which differ between eager and fused).
    :meth:`base` is ViLBERT's published configuration (``bert_base_6layer_6conect.json``);
    :meth:`small` is a CPU demo size.

    Fields beyond ViLBERT's: ``roi_output_size`` and ``feature_stride`` (the RoIAlign
    bins and the stride of the backbone feature map the regions are pooled from:
    ``spatial_scale = 1 / feature_stride``), and the special token ids used by
    :func:`synthetic_batch`.
    """

    # text stream (BERT)
    vocab_size: int = 64
    hidden_size: int = 32
    num_hidden_layers: int = 1
    num_attention_heads: int = 2
    intermediate_size: int = 64
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 16
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    # vision stream
    v_feature_size: int = 16
    v_target_size: int = 10
    v_hidden_size: int = 32
    v_num_hidden_layers: int = 1
    v_num_attention_heads: int = 2
    v_intermediate_size: int = 64
    v_hidden_dropout_prob: float = 0.1
    v_attention_probs_dropout_prob: float = 0.1
    # co-attention
    bi_hidden_size: int = 32
    bi_num_attention_heads: int = 2
    t_biattention_id: tuple[int, ...] = (1,)
    v_biattention_id: tuple[int, ...] = (0,)
    visualization: bool = False
    # region pooling
    roi_output_size: int = 2
    feature_stride: int = 4
    # special tokens (synthetic_batch; BERT's ids in base())
    pad_token_id: int = 0
    cls_token_id: int = 1
    sep_token_id: int = 2
    mask_token_id: int = 3
    num_special_tokens: int = 4

    def __post_init__(self) -> None:
        self.t_biattention_id = tuple(int(i) for i in self.t_biattention_id)
        self.v_biattention_id = tuple(int(i) for i in self.v_biattention_id)
        for hidden, heads, name in ((self.hidden_size, self.num_attention_heads, "hidden_size"),
                                    (self.v_hidden_size, self.v_num_attention_heads, "v_hidden_size"),
                                    (self.bi_hidden_size, self.bi_num_attention_heads,
                                     "bi_hidden_size")):
            if heads < 1 or hidden % heads != 0:
                raise ValueError(f"{name} ({hidden}) must be a positive multiple of its number of "
                                 f"heads ({heads})")
        if len(self.t_biattention_id) != len(self.v_biattention_id):
            raise ValueError(f"t_biattention_id {self.t_biattention_id} and v_biattention_id "
                             f"{self.v_biattention_id} must have one entry per co-attention layer")
        for ids, total, name in ((self.t_biattention_id, self.num_hidden_layers, "t_biattention_id"),
                                 (self.v_biattention_id, self.v_num_hidden_layers,
                                  "v_biattention_id")):
            if list(ids) != sorted(ids) or any(i < 0 or i > total for i in ids):
                raise ValueError(f"{name} must be non-decreasing layer counts in [0, {total}], "
                                 f"got {ids}")
        if not 0 <= self.pad_token_id < self.num_special_tokens < self.vocab_size:
            raise ValueError("the special token ids must lie below num_special_tokens < vocab_size")

    @property
    def num_coattention_layers(self) -> int:
        return len(self.t_biattention_id)

    @classmethod
    def base(cls, **overrides) -> ViLBertConfig:
        """ViLBERT base (vilbert-multi-task ``bert_base_6layer_6conect.json``): BERT-base text
        (768 hidden, 12 layers, 12 heads, FFN 3072, vocab 30522), vision stream 1024 hidden, 6
        layers, 8 heads, FFN 1024, 6 co-attention layers of 1024 hidden / 8 heads, after text
        layers 6..11 and vision layers 0..5; 2048-d region features pooled 7x7 from a stride-16
        backbone map (bottom-up attention's ResNet), 1601 Visual Genome detector classes.
        About 241 M parameters with the heads."""
        values = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
                  "num_attention_heads": 12, "intermediate_size": 3072,
                  "max_position_embeddings": 512, "v_feature_size": 2048, "v_target_size": 1601,
                  "v_hidden_size": 1024, "v_num_hidden_layers": 6, "v_num_attention_heads": 8,
                  "v_intermediate_size": 1024, "bi_hidden_size": 1024, "bi_num_attention_heads": 8,
                  "t_biattention_id": (6, 7, 8, 9, 10, 11), "v_biattention_id": (0, 1, 2, 3, 4, 5),
                  "roi_output_size": 7, "feature_stride": 16, "pad_token_id": 0,
                  "cls_token_id": 101, "sep_token_id": 102, "mask_token_id": 103,
                  "num_special_tokens": 104}
        return cls(**{**values, **overrides})

    @classmethod
    def small(cls, **overrides) -> ViLBertConfig:
        """A CPU demo size (about 0.3 M parameters): hidden sizes 64 (two heads of 32), two
        text, two vision and two co-attention layers (text 0, vision 0, co 0, text 1,
        vision 1, co 1), vocab 128, 32-d region features, 16 detector classes, no
        dropout. A few hundred steps of batch 16 train in about a minute."""
        values = {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 2, "intermediate_size": 128, "max_position_embeddings": 32,
                  "v_feature_size": 32, "v_target_size": 16, "v_hidden_size": 64,
                  "v_num_hidden_layers": 2, "v_num_attention_heads": 2, "v_intermediate_size": 128,
                  "bi_hidden_size": 64, "bi_num_attention_heads": 2, "t_biattention_id": (1, 2),
                  "v_biattention_id": (1, 2), "hidden_dropout_prob": 0.0,
                  "attention_probs_dropout_prob": 0.0, "v_hidden_dropout_prob": 0.0,
                  "v_attention_probs_dropout_prob": 0.0}
        return cls(**{**values, **overrides})

    def without_dropout(self) -> ViLBertConfig:
        """This configuration with every dropout probability 0 (the equivalence tests:
        eager dropout draws torch's generator, the fused kernels draw Philox)."""
        return dataclasses.replace(self, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                   v_hidden_dropout_prob=0.0, v_attention_probs_dropout_prob=0.0)


# ---------------------------------------------------------------------------------
# embeddings
# ---------------------------------------------------------------------------------


class BertEmbeddings(nn.Module):
    """forward(input_ids (B, Nt) int64, token_type_ids (B, Nt) int64) -> (B, Nt, hidden)."""

    def __init__(self, config: ViLBertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                            padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
             + self.token_type_embeddings(token_type_ids))
        return self.dropout(self.LayerNorm(x))


def box_locations(boxes: Tensor, image_sizes: Tensor) -> Tensor:
    """ViLBERT's 5-d region location: (x1 / W, y1 / H, x2 / W, y2 / H, box area / image area).

    boxes (B, R, 4) float [x1, y1, x2, y2] in pixels, image_sizes (B, 2) float [H, W]
    -> (B, R, 5) in boxes' dtype.
    """
    h = image_sizes[:, 0, None].to(boxes.dtype)
    w = image_sizes[:, 1, None].to(boxes.dtype)
    x1, y1, x2, y2 = boxes.unbind(-1)
    area = (x2 - x1) * (y2 - y1) / (w * h)
    return torch.stack([x1 / w, y1 / h, x2 / w, y2 / h, area], dim=-1)


class BertImageEmbeddings(nn.Module):
    """Region features and locations -> the vision stream's input.

    forward(features (B, Nv, v_feature_size), locations (B, Nv, 5)) -> (B, Nv, v_hidden):
    LayerNorm(image_embeddings(features) + image_location_embeddings(locations)).
    """

    def __init__(self, config: ViLBertConfig) -> None:
        super().__init__()
        self.image_embeddings = nn.Linear(config.v_feature_size, config.v_hidden_size)
        self.image_location_embeddings = nn.Linear(5, config.v_hidden_size)
        self.LayerNorm = nn.LayerNorm(config.v_hidden_size, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(config.v_hidden_dropout_prob)

    def forward(self, features: Tensor, locations: Tensor) -> Tensor:
        x = self.image_embeddings(features) + self.image_location_embeddings(locations)
        return self.dropout(self.LayerNorm(x))


# ---------------------------------------------------------------------------------
# single-stream layers (text: BertLayer; vision: the same with the v_ sizes)
# ---------------------------------------------------------------------------------


class BertSelfAttention(nn.Module):
    """Q/K/V projections around a :class:`~mmkernels.models.layers.PaddedSelfAttention` core.

    forward(x (B, L, hidden), mask (B, L) bool, True at real tokens) -> (B, L, hidden);
    zeros at padded query positions.
    """

    def __init__(self, hidden: int, heads: int, attention_dropout: float) -> None:
        super().__init__()
        self.num_attention_heads, self.attention_head_size = heads, hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.core = PaddedSelfAttention(dropout=attention_dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        B, L, _ = x.shape
        shape = (B, L, self.num_attention_heads, self.attention_head_size)
        q, k, v = (f(x).view(shape) for f in (self.query, self.key, self.value))
        return self.core(q, k, v, key_padding_mask=mask).reshape(B, L, -1)


class DenseResidual(nn.Module):
    """BERT's output sub-layer: LayerNorm(dropout(dense(x)) + residual).

    forward(x (..., in_features), residual (..., out_features)) -> (..., out_features).
    (BertSelfOutput, BertOutput, BertImageSelfOutput, BertImageOutput.)
    """

    def __init__(self, in_features: int, out_features: int, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, out_features)
        self.LayerNorm = nn.LayerNorm(out_features, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Intermediate(nn.Module):
    """BERT's FFN expansion: GELU(dense(x)), (..., hidden) -> (..., intermediate)."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


class BertAttention(nn.Module):
    """Self-attention + its output sub-layer. forward(x (B, L, hidden), mask (B, L) bool)."""

    def __init__(self, hidden: int, heads: int, dropout: float, attention_dropout: float) -> None:
        super().__init__()
        self.self = BertSelfAttention(hidden, heads, attention_dropout)
        self.output = DenseResidual(hidden, hidden, dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.output(self.self(x, mask), x)


class BertLayer(nn.Module):
    """One transformer layer of a single stream (BertLayer for text, BertImageLayer for
    vision). forward(x (B, L, hidden), mask (B, L) bool, True at real tokens) -> (B, L, hidden)."""

    def __init__(self, hidden: int, heads: int, intermediate: int, dropout: float,
                 attention_dropout: float) -> None:
        super().__init__()
        self.attention = BertAttention(hidden, heads, dropout, attention_dropout)
        self.intermediate = Intermediate(hidden, intermediate)
        self.output = DenseResidual(intermediate, hidden, dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)

    @classmethod
    def text(cls, config: ViLBertConfig) -> BertLayer:
        return cls(config.hidden_size, config.num_attention_heads, config.intermediate_size,
                   config.hidden_dropout_prob, config.attention_probs_dropout_prob)

    @classmethod
    def vision(cls, config: ViLBertConfig) -> BertLayer:
        return cls(config.v_hidden_size, config.v_num_attention_heads, config.v_intermediate_size,
                   config.v_hidden_dropout_prob, config.v_attention_probs_dropout_prob)


# ---------------------------------------------------------------------------------
# co-attention layer
# ---------------------------------------------------------------------------------


class BertBiOutput(nn.Module):
    """Both streams' co-attention output sub-layers (vilbert-multi-task's BertBiOutput,
    without its unused ``q_dense`` linears).

    forward(hidden_states1 (B, Nv, bi_hidden), input_tensor1 (B, Nv, v_hidden),
    hidden_states2 (B, Nt, bi_hidden), input_tensor2 (B, Nt, hidden))
    -> (vision (B, Nv, v_hidden), text (B, Nt, hidden)).
    """

    def __init__(self, config: ViLBertConfig) -> None:
        super().__init__()
        self.dense1 = nn.Linear(config.bi_hidden_size, config.v_hidden_size)
        self.LayerNorm1 = nn.LayerNorm(config.v_hidden_size, eps=LAYER_NORM_EPS)
        self.dropout1 = nn.Dropout(config.v_hidden_dropout_prob)
        self.dense2 = nn.Linear(config.bi_hidden_size, config.hidden_size)
        self.LayerNorm2 = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.dropout2 = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states1: Tensor, input_tensor1: Tensor, hidden_states2: Tensor,
                input_tensor2: Tensor) -> tuple[Tensor, Tensor]:
        out1 = self.LayerNorm1(self.dropout1(self.dense1(hidden_states1)) + input_tensor1)
        out2 = self.LayerNorm2(self.dropout2(self.dense2(hidden_states2)) + input_tensor2)
        return out1, out2


class BertConnectionLayer(nn.Module):
    """One co-attention layer (vilbert-multi-task's BertConnectionLayer): BertBiAttention,
    BertBiOutput, then each stream's FFN.

    forward(vision (B, Nv, v_hidden), vision_mask (B, 1, 1, Nv) additive, text (B, Nt,
    hidden), text_mask (B, 1, 1, Nt) additive; 0 at real tokens, -10000 at padding)
    -> (vision (B, Nv, v_hidden), text (B, Nt, hidden)).
    """

    def __init__(self, config: ViLBertConfig) -> None:
        super().__init__()
        self.biattention = reference.BertBiAttention(config)
        self.biOutput = BertBiOutput(config)
        self.v_intermediate = Intermediate(config.v_hidden_size, config.v_intermediate_size)
        self.v_output = DenseResidual(config.v_intermediate_size, config.v_hidden_size,
                                      config.v_hidden_dropout_prob)
        self.t_intermediate = Intermediate(config.hidden_size, config.intermediate_size)
        self.t_output = DenseResidual(config.intermediate_size, config.hidden_size,
                                      config.hidden_dropout_prob)

    def forward(self, vision: Tensor, vision_mask: Tensor, text: Tensor,
                text_mask: Tensor) -> tuple[Tensor, Tensor]:
        # context1: text queries over regions (B, Nt, bi); context2: regions over text (B, Nv, bi)
        context1, context2, _ = self.biattention(vision, vision_mask, text, text_mask)
        vision, text = self.biOutput(context2, vision, context1, text)
        vision = self.v_output(self.v_intermediate(vision), vision)
        text = self.t_output(self.t_intermediate(text), text)
        return vision, text


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, L) bool -> ViLBERT's additive (B, 1, 1, L) mask: 0 at tokens, -10000 at padding."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * -10000.0


class BertEncoder(nn.Module):
    """The interleaved text, vision and co-attention layers.

    forward(text (B, Nt, hidden), text_mask (B, Nt) bool, vision (B, Nv, v_hidden),
    vision_mask (B, Nv) bool) -> (text, vision), same shapes.
    """

    def __init__(self, config: ViLBertConfig) -> None:
        super().__init__()
        self.t_biattention_id = config.t_biattention_id
        self.v_biattention_id = config.v_biattention_id
        self.layer = nn.ModuleList(BertLayer.text(config) for _ in range(config.num_hidden_layers))
        self.v_layer = nn.ModuleList(BertLayer.vision(config)
                                     for _ in range(config.v_num_hidden_layers))
        self.c_layer = nn.ModuleList(BertConnectionLayer(config)
                                     for _ in range(config.num_coattention_layers))

    def forward(self, text: Tensor, text_mask: Tensor, vision: Tensor,
                vision_mask: Tensor) -> tuple[Tensor, Tensor]:
        text_add, vision_add = additive_mask(text_mask, text.dtype), additive_mask(vision_mask,
                                                                                   vision.dtype)
        t_done = v_done = 0
        for t_end, v_end, co in zip(self.t_biattention_id, self.v_biattention_id, self.c_layer):
            for layer in self.layer[t_done:t_end]:
                text = layer(text, text_mask)
            for layer in self.v_layer[v_done:v_end]:
                vision = layer(vision, vision_mask)
            t_done, v_done = t_end, v_end
            vision, text = co(vision, vision_add, text, text_add)
        for layer in self.layer[t_done:]:
            text = layer(text, text_mask)
        for layer in self.v_layer[v_done:]:
            vision = layer(vision, vision_mask)
        return text, vision


class Pooler(nn.Module):
    """First token -> ReLU(dense) (BertTextPooler / BertImagePooler).
    forward(x (B, L, in_features)) -> (B, bi_hidden)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.dense(x[:, 0]))


# ---------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------


@dataclass
class ViLBertEncoding:
    """The two streams' outputs.

    text (B, Nt, hidden); vision (B, 1 + R, v_hidden), position 0 the [IMG] token;
    pooled_text, pooled_vision (B, bi_hidden); region_features (B, R, v_feature_size):
    the pooled region features before masking (zeros at padded regions);
    text_mask (B, Nt), vision_mask (B, 1 + R) bool (True at real tokens).
    """

    text: Tensor
    vision: Tensor
    pooled_text: Tensor
    pooled_vision: Tensor
    region_features: Tensor
    text_mask: Tensor
    vision_mask: Tensor


class ViLBertModel(nn.Module):
    """The two-stream encoder (vilbert-multi-task's BertModel): see :meth:`forward`."""

    def __init__(self, config: ViLBertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.region_pooling = RegionPooling(config.roi_output_size, 1.0 / config.feature_stride,
                                            sampling_ratio=2, aligned=True)
        self.v_embeddings = BertImageEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.t_pooler = Pooler(config.hidden_size, config.bi_hidden_size)
        self.v_pooler = Pooler(config.v_hidden_size, config.bi_hidden_size)

    def forward(self, input_ids: Tensor, feature_map: Tensor, boxes: Tensor,
                attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                image_attention_mask: Tensor | None = None, image_sizes: Tensor | None = None,
                zeroed_regions: Tensor | None = None) -> ViLBertEncoding:
        """Encode a padded batch.

        Args:
            input_ids: (B, Nt) int64 (masked tokens already replaced by [MASK]).
            feature_map: (B, v_feature_size, H, W) float, the backbone map the regions
                are pooled from (stride ``config.feature_stride``).
            boxes: (B, R, 4) float [x1, y1, x2, y2] in image pixels.
            attention_mask: (B, Nt) bool or 0/1 int, 1 at real tokens (default: all).
            token_type_ids: (B, Nt) int64 (default zeros).
            image_attention_mask: (B, R) bool or 0/1 int, 1 at real regions (default all).
                Padded boxes are pooled too (any finite box), then zeroed.
            image_sizes: (B, 2) float [H, W] of each image in pixels (default: the
                feature map's size times ``feature_stride``).
            zeroed_regions: (B, R) bool, regions whose input feature is set to zero
                (ViLBERT's masked-region input); default none.

        The [IMG] token is the mean of the valid input region features (after zeroing),
        at location (0, 0, 1, 1, 1).
        """
        cfg = self.config
        B, Nt = _check_ids(input_ids, "input_ids")
        if not isinstance(feature_map, Tensor) or feature_map.dim() != 4 or (
                feature_map.shape[0], feature_map.shape[1]) != (B, cfg.v_feature_size):
            raise ValueError(f"feature_map must be (B, v_feature_size, H, W) = ({B}, "
                             f"{cfg.v_feature_size}, H, W), got {_shape(feature_map)}")
        R = _check_boxes(boxes, B)
        text_mask = _mask_or_ones(attention_mask, "attention_mask", (B, Nt), input_ids.device)
        region_mask = _mask_or_ones(image_attention_mask, "image_attention_mask", (B, R),
                                    input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        elif not isinstance(token_type_ids, Tensor) or token_type_ids.shape != (B, Nt):
            raise ValueError(f"token_type_ids must be (B, Nt) = ({B}, {Nt}), got "
                             f"{_shape(token_type_ids)}")
        if image_sizes is None:
            H, W = feature_map.shape[2:]
            image_sizes = boxes.new_tensor([H * cfg.feature_stride, W * cfg.feature_stride]).expand(B, 2)
        elif not isinstance(image_sizes, Tensor) or image_sizes.shape != (B, 2):
            raise ValueError(f"image_sizes must be (B, 2) = ({B}, 2), got {_shape(image_sizes)}")

        # region features: one RoIAlign-mean per box, B * R rois [batch_index, x1, y1, x2, y2]
        batch_index = torch.arange(B, device=boxes.device, dtype=boxes.dtype)
        rois = torch.cat([batch_index[:, None, None].expand(B, R, 1), boxes], dim=2)
        pooled = self.region_pooling(feature_map, rois.reshape(B * R, 5)).view(B, R, -1)
        pooled = pooled.masked_fill(~region_mask[..., None], 0.0)
        features = pooled
        if zeroed_regions is not None:
            zeroed = _mask_or_ones(zeroed_regions, "zeroed_regions", (B, R), input_ids.device)
            features = pooled.masked_fill(zeroed[..., None], 0.0)
        count = region_mask.sum(1, keepdim=True).clamp(min=1).to(features.dtype)
        img_token = features.sum(1, keepdim=True) / count[..., None]
        locations = box_locations(boxes, image_sizes)
        img_location = locations.new_tensor([0.0, 0.0, 1.0, 1.0, 1.0]).expand(B, 1, 5)
        vision = self.v_embeddings(torch.cat([img_token, features], 1),
                                   torch.cat([img_location, locations], 1))
        vision_mask = torch.cat([region_mask.new_ones(B, 1), region_mask], 1)

        text = self.embeddings(input_ids, token_type_ids)
        text, vision = self.encoder(text, text_mask, vision, vision_mask)
        return ViLBertEncoding(text, vision, self.t_pooler(text), self.v_pooler(vision), pooled,
                               text_mask, vision_mask)


class PredictionHeadTransform(nn.Module):
    """LayerNorm(GELU(dense(x))), (M, hidden) -> (M, hidden) (BertPredictionHeadTransform,
    BertImgPredictionHeadTransform)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    """forward(rows (M, hidden)) -> (M, vocab): transform, then the decoder whose weight
    is the word-embedding matrix (tied), plus its own bias."""

    def __init__(self, config: ViLBertConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.transform = PredictionHeadTransform(config.hidden_size)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.decoder.weight = word_embeddings.weight

    def forward(self, rows: Tensor) -> Tensor:
        return self.decoder(self.transform(rows))


class BertImagePredictionHead(nn.Module):
    """forward(rows (M, v_hidden)) -> (class logits (M, v_target_size), features (M,
    v_feature_size)): one transform, then the classification decoder (ViLBERT's) and the
    feature-regression decoder."""

    def __init__(self, config: ViLBertConfig) -> None:
        super().__init__()
        self.transform = PredictionHeadTransform(config.v_hidden_size)
        self.decoder = nn.Linear(config.v_hidden_size, config.v_target_size)
        self.feature_decoder = nn.Linear(config.v_hidden_size, config.v_feature_size)

    def forward(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        h = self.transform(rows)
        return self.decoder(h), self.feature_decoder(h)


class BertPreTrainingHeads(nn.Module):
    """The heads of :class:`ViLBertForPreTraining` (vilbert-multi-task's ``cls``), with
    the row selections: only masked text rows and masked regions reach their heads."""

    def __init__(self, config: ViLBertConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config, word_embeddings)
        self.imagePredictions = BertImagePredictionHead(config)
        self.bi_seq_relationship = nn.Linear(config.bi_hidden_size, 2)
        self.text_select = MaskedRowSelect()
        self.region_select = MaskedRowSelect()


@dataclass
class ViLBertOutput:
    """What :class:`ViLBertForPreTraining` returns.

    loss: () float, the sum of the parts that had targets (None when none had);
    mlm_loss, region_cls_loss, region_reg_loss, itm_loss: () float or None;
    mlm_logits: (M_t, vocab), the masked text rows in row-major order of the mask (or
    None); region_logits: (M_r, v_target_size) and region_predictions: (M_r,
    v_feature_size), the masked regions (or None); itm_logits: (B, 2), index 1 =
    "the caption matches the image"; encoding: the :class:`ViLBertEncoding`.
    """

    loss: Tensor | None
    mlm_loss: Tensor | None
    region_cls_loss: Tensor | None
    region_reg_loss: Tensor | None
    itm_loss: Tensor | None
    mlm_logits: Tensor | None
    region_logits: Tensor | None
    region_predictions: Tensor | None
    itm_logits: Tensor
    encoding: ViLBertEncoding = field(repr=False)


class ViLBertForPreTraining(nn.Module):
    """ViLBERT with its pre-training heads (vilbert-multi-task's
    BertForMultiModalPreTraining): masked LM, masked region classification (KL) and
    feature regression (MSE), and image-text matching; the loss is their sum.

    Example::

        config = ViLBertConfig.small()
        model = ViLBertForPreTraining(config)
        out = model(**synthetic_batch(config, batch_size=8, seed=0))
        out.loss.backward()
        mmkernels.models.patch(model)   # the same parameters, fused kernels
    """

    def __init__(self, config: ViLBertConfig) -> None:
        super().__init__()
        if not isinstance(config, ViLBertConfig):
            raise TypeError(f"config must be a ViLBertConfig, got {type(config).__name__}")
        self.config = config
        self.bert = ViLBertModel(config)
        self.cls = BertPreTrainingHeads(config, self.bert.embeddings.word_embeddings)
        self.apply(self._init_weights)
        with torch.no_grad():  # (the tied decoder's init overwrote the padding row)
            self.bert.embeddings.word_embeddings.weight[config.pad_token_id].zero_()

    def _init_weights(self, module: nn.Module) -> None:
        """BERT's initialisation: N(0, initializer_range) weights, zero biases, LayerNorm 1/0."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: Tensor, feature_map: Tensor, boxes: Tensor,
                attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                image_attention_mask: Tensor | None = None, image_sizes: Tensor | None = None,
                masked_regions: Tensor | None = None, zeroed_regions: Tensor | None = None,
                region_targets: Tensor | None = None, mlm_labels: Tensor | None = None,
                itm_labels: Tensor | None = None) -> ViLBertOutput:
        """Encode and compute the pre-training losses whose targets are given.

        Args (besides :meth:`ViLBertModel.forward`'s):
            masked_regions: (B, R) bool, the regions the region losses are computed on
                (real regions only). ``zeroed_regions`` defaults to these (ViLBERT zeroes
                90% of them; pass the subset explicitly for that).
            region_targets: (B, R, v_target_size) float, the detector's class
                distribution per region (KL target); needs ``masked_regions``.
            mlm_labels: (B, Nt) int64, the original token at masked positions (real
                tokens only) and -100 elsewhere.
            itm_labels: (B,) int64, 1 when the caption matches the image, else 0.

        Losses: ``mlm_loss`` = mean cross-entropy over the masked text rows;
        ``region_cls_loss`` = KL(target || softmax(logits)) summed over classes, mean over
        masked regions; ``region_reg_loss`` = MSE to the region's pooled feature before
        masking (detached), mean over masked regions and features; ``itm_loss`` = mean
        cross-entropy. The heads read only [CLS], [IMG], masked text rows and masked
        regions: never a padded position.
        """
        B, Nt = _check_ids(input_ids, "input_ids")
        if masked_regions is not None:
            R = _check_boxes(boxes, B)
            masked_regions = _mask_or_ones(masked_regions, "masked_regions", (B, R), input_ids.device)
            if zeroed_regions is None:
                zeroed_regions = masked_regions
        enc = self.bert(input_ids, feature_map, boxes, attention_mask, token_type_ids,
                        image_attention_mask, image_sizes, zeroed_regions)
        parts: list[Tensor] = []

        mlm_loss = mlm_logits = None
        if mlm_labels is not None:
            if not isinstance(mlm_labels, Tensor) or mlm_labels.shape != (B, Nt):
                raise ValueError(f"mlm_labels must be (B, Nt) = ({B}, {Nt}), got {_shape(mlm_labels)}")
            selected = mlm_labels != -100
            rows, index = self.cls.text_select(enc.text, selected)
            mlm_logits = self.cls.predictions(rows)
            targets = mlm_labels.reshape(-1).index_select(0, index)
            mlm_loss = (F.cross_entropy(mlm_logits, targets, reduction="sum")
                        / _count(selected, mlm_logits.dtype))
            parts.append(mlm_loss)

        region_cls_loss = region_reg_loss = region_logits = region_predictions = None
        if masked_regions is not None:
            rows, index = self.cls.region_select(enc.vision[:, 1:], masked_regions)
            region_logits, region_predictions = self.cls.imagePredictions(rows)
            n = _count(masked_regions, region_logits.dtype)
            original = enc.region_features.detach().reshape(-1, self.config.v_feature_size)
            region_reg_loss = F.mse_loss(region_predictions, original.index_select(0, index),
                                         reduction="sum") / (n * self.config.v_feature_size)
            parts.append(region_reg_loss)
            if region_targets is not None:
                R = masked_regions.shape[1]
                if not isinstance(region_targets, Tensor) or region_targets.shape != (
                        B, R, self.config.v_target_size):
                    raise ValueError(f"region_targets must be (B, R, v_target_size) = ({B}, {R}, "
                                     f"{self.config.v_target_size}), got {_shape(region_targets)}")
                target = region_targets.reshape(B * R, -1).index_select(0, index)
                region_cls_loss = F.kl_div(F.log_softmax(region_logits, dim=-1),
                                           target.to(region_logits.dtype), reduction="sum") / n
                parts.append(region_cls_loss)

        itm_logits = self.cls.bi_seq_relationship(enc.pooled_text * enc.pooled_vision)
        itm_loss = None
        if itm_labels is not None:
            if not isinstance(itm_labels, Tensor) or itm_labels.shape != (B,):
                raise ValueError(f"itm_labels must be (B,) = ({B},), got {_shape(itm_labels)}")
            itm_loss = F.cross_entropy(itm_logits, itm_labels)
            parts.append(itm_loss)

        loss = sum(parts[1:], parts[0]) if parts else None
        return ViLBertOutput(loss, mlm_loss, region_cls_loss, region_reg_loss, itm_loss, mlm_logits,
                             region_logits, region_predictions, itm_logits, enc)


# ---------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------


def _shape(x) -> object:
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__


def _check_ids(input_ids, name: str) -> tuple[int, int]:
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"{name} must be an integer (B, Nt) Tensor, got {_shape(input_ids)}")
    return input_ids.shape[0], input_ids.shape[1]


def _check_boxes(boxes, B: int) -> int:
    """R, after checking that boxes is a float (B, R, 4) Tensor."""
    if not isinstance(boxes, Tensor) or boxes.dim() != 3 or boxes.shape[0] != B or (
            boxes.shape[2] != 4) or not boxes.is_floating_point():
        raise ValueError(f"boxes must be a float (B, R, 4) = ({B}, R, 4) Tensor, got {_shape(boxes)}")
    return boxes.shape[1]


def _mask_or_ones(mask, name: str, shape: tuple[int, int], device: torch.device) -> Tensor:
    """(B, L) bool from a bool or 0/1 integer mask; all True when None."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if not isinstance(mask, Tensor) or tuple(mask.shape) != shape or mask.is_floating_point():
        raise ValueError(f"{name} must be a bool or 0/1 integer {shape} Tensor, got {_shape(mask)}")
    return mask if mask.dtype == torch.bool else mask != 0


def _count(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """() ``dtype``: the number of True entries, at least 1 (an empty selection gives loss 0)."""
    return mask.sum().clamp(min=1).to(dtype)


# ---------------------------------------------------------------------------------
# synthetic data
# ---------------------------------------------------------------------------------


def _teacher(config: ViLBertConfig) -> Tensor:
    """(v_feature_size, v_target_size): the fixed "detector" classifier of the synthetic
    data (the same for every batch, so the region classes are learnable)."""
    g = torch.Generator().manual_seed(1234)
    return torch.randn(config.v_feature_size, config.v_target_size, generator=g) * 3.0


def synthetic_batch(config: ViLBertConfig, batch_size: int, seed: int | None = None, *,
                    generator: torch.Generator | None = None, seq_len: int | None = None,
                    num_regions: int = 5, feature_map_size: tuple[int, int] = (6, 6),
                    mask_prob: float = 0.15, device: torch.device | str = "cpu") -> dict:
    """A random pre-training batch for :class:`ViLBertForPreTraining` (``model(**batch)``).

    Structure that a model can learn: each region's detector class distribution is a
    fixed function of its pooled feature; a matching caption (``itm_labels`` 1, half of
    the batch) names the argmax classes of the image's regions (one word per class:
    ``num_special_tokens + class``), a non-matching one names random classes.

    Returns a dict (CPU tensors moved to ``device``):
        input_ids (B, Nt) int64: [CLS] words [SEP] then [PAD]; masked words replaced
            (BERT's 80% [MASK] / 10% random / 10% kept); at least one per caption.
        attention_mask (B, Nt) int64 (1 = token); token_type_ids (B, Nt) zeros;
        mlm_labels (B, Nt) int64: original word at masked positions, -100 elsewhere;
        feature_map (B, v_feature_size, H, W) float32;
        boxes (B, R, 4) float32 [x1, y1, x2, y2] pixels inside the image (also at padded
            regions); image_sizes (B, 2) float32 [H, W] = feature map size * stride;
        image_attention_mask (B, R) int64 (at least 2 real regions per image);
        masked_regions (B, R) bool: 15% of the real regions, at least one per image;
        zeroed_regions (B, R) bool: 90% of the masked ones (ViLBERT's input masking);
        region_targets (B, R, v_target_size) float32 class distributions;
        itm_labels (B,) int64.
    Seeded by ``seed`` (or ``generator``). Nt defaults to num_regions + 2 (a caption of
    one word per region fits), capped at max_position_embeddings.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    g = generator
    cfg = config
    B, R = int(batch_size), int(num_regions)
    if B < 1 or R < 2:
        raise ValueError(f"batch_size must be >= 1 and num_regions >= 2, got {batch_size}, "
                         f"{num_regions}")
    Nt = seq_len if seq_len is not None else min(cfg.max_position_embeddings, R + 2)
    if not 4 <= Nt <= cfg.max_position_embeddings:
        raise ValueError(f"seq_len must lie in [4, {cfg.max_position_embeddings}], got {Nt}")
    Hf, Wf = feature_map_size
    H, W = Hf * cfg.feature_stride, Wf * cfg.feature_stride

    feature_map = torch.randn(B, cfg.v_feature_size, Hf, Wf, generator=g)
    size = torch.tensor([W, H], dtype=torch.float32)
    min_size = float(cfg.feature_stride)
    lo = torch.rand(B, R, 2, generator=g) * (size - min_size)
    extent = min_size + torch.rand(B, R, 2, generator=g) * (size - lo - min_size)
    boxes = torch.cat([lo, lo + extent], -1)
    n_regions = torch.randint(2, R + 1, (B,), generator=g)
    region_valid = torch.arange(R)[None] < n_regions[:, None]

    rois = torch.cat([torch.arange(B, dtype=torch.float32).repeat_interleave(R)[:, None],
                      boxes.reshape(B * R, 4)], 1)
    pooled = region_features(feature_map, rois, cfg.roi_output_size, 1.0 / cfg.feature_stride, 2,
                             True)
    unit = pooled / pooled.norm(dim=1, keepdim=True).clamp(min=1e-6)
    region_targets = torch.softmax(unit @ _teacher(cfg), -1).view(B, R, -1)
    classes = region_targets.argmax(-1)

    itm_labels = (torch.rand(B, generator=g) < 0.5).long()
    random_classes = torch.randint(0, cfg.v_target_size, (B, R), generator=g)
    named = torch.where(itm_labels[:, None].bool(), classes, random_classes)
    words = (cfg.num_special_tokens + named % (cfg.vocab_size - cfg.num_special_tokens))
    n_words = torch.minimum(n_regions, torch.tensor(Nt - 2))
    input_ids = torch.full((B, Nt), cfg.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(B, Nt, dtype=torch.long)
    word_pos = torch.zeros(B, Nt, dtype=torch.bool)
    for b in range(B):
        n = int(n_words[b])
        input_ids[b, 0], input_ids[b, n + 1] = cfg.cls_token_id, cfg.sep_token_id
        input_ids[b, 1:n + 1] = words[b, :n]
        attention_mask[b, :n + 2] = 1
        word_pos[b, 1:n + 1] = True

    def choose(candidates: Tensor) -> Tensor:
        """mask_prob of the candidates per row, at least one."""
        pick = (torch.rand(candidates.shape, generator=g) < mask_prob) & candidates
        first = torch.argmax((torch.rand(candidates.shape, generator=g) * candidates).float(), 1)
        pick[torch.arange(candidates.shape[0]), first] = True
        return pick

    text_masked = choose(word_pos)
    mlm_labels = torch.where(text_masked, input_ids, torch.full_like(input_ids, -100))
    u = torch.rand(B, Nt, generator=g)
    random_words = torch.randint(cfg.num_special_tokens, cfg.vocab_size, (B, Nt), generator=g)
    input_ids = torch.where(text_masked & (u < 0.8), torch.full_like(input_ids, cfg.mask_token_id),
                            input_ids)
    input_ids = torch.where(text_masked & (u >= 0.8) & (u < 0.9), random_words, input_ids)

    masked_regions = choose(region_valid)
    zeroed_regions = masked_regions & (torch.rand(B, R, generator=g) < 0.9)

    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "token_type_ids": torch.zeros_like(input_ids), "mlm_labels": mlm_labels,
             "feature_map": feature_map, "boxes": boxes,
             "image_sizes": torch.tensor([[H, W]], dtype=torch.float32).expand(B, 2).contiguous(),
             "image_attention_mask": region_valid.long(), "masked_regions": masked_regions,
             "zeroed_regions": zeroed_regions, "region_targets": region_targets,
             "itm_labels": itm_labels}
    return {k: v.to(device) for k, v in batch.items()}
