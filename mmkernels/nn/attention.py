"""Attention modules over packed sequences."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmkernels.ops.varlen_attention import varlen_attention


class VarlenSelfAttention(nn.Module):
    """Multi-head self-attention on packed sequences, with a fused QKV projection.

    forward(x: (total, embed_dim), cu_seqlens: (batch + 1,) int32, max_seqlen: int,
    block_ids: optional (total,) int32) -> (total, embed_dim). With ``causal=True`` and
    block ids, each image block attends bidirectionally (prefix-LM / Transfusion style).
    ``num_kv_heads`` < ``num_heads`` gives GQA (MQA at 1).
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int | None = None,
                 bias: bool = True, dropout: float = 0.0, causal: bool = False,
                 softmax_scale: float | None = None, device=None, dtype=None) -> None:
        super().__init__()
        if num_heads < 1 or embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads "
                             f"({num_heads})")
        num_kv_heads = num_kv_heads or num_heads
        if num_heads < 1 or num_kv_heads < 1:
            raise ValueError(f"num_heads ({num_heads}) and num_kv_heads ({num_kv_heads}) must be "
                             f"positive")
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.dropout, self.causal, self.softmax_scale = dropout, causal, softmax_scale
        kw = {"device": device, "dtype": dtype}
        self.qkv = nn.Linear(embed_dim, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=bias,
                             **kw)
        self.out_proj = nn.Linear(num_heads * self.head_dim, embed_dim, bias=bias, **kw)

    def forward(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                block_ids: Tensor | None = None) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.embed_dim:
            raise ValueError(f"x must be (total, embed_dim) = (total, {self.embed_dim}), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        total = x.shape[0]
        qkv = self.qkv(x).view(total, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = torch.split(qkv, [self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        out = varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                               softmax_scale=self.softmax_scale, causal=self.causal,
                               block_ids=block_ids,
                               dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.reshape(total, self.num_heads * self.head_dim))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, causal={self.causal}, dropout={self.dropout}")
