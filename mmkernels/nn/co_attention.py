"""ViLBERT co-attention as a drop-in module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmkernels import reference
from mmkernels.ops.co_attention import co_attention
from mmkernels.ops.token_gather import masked_select_rows


def _valid_positions(mask: Tensor, B: int, L: int, name: str) -> Tensor:
    """(B, L) bool from ViLBERT's additive mask (B, 1, 1, L): 0 = token, -10000 = padding."""
    if mask.numel() != B * L:
        raise ValueError(f"{name} must be an additive (B, 1, 1, L) = ({B}, 1, 1, {L}) mask, got "
                         f"shape {tuple(mask.shape)}")
    return mask.reshape(B, L) > -1.0


class BiAttention(reference.BertBiAttention):
    """Drop-in for ViLBERT's ``BertBiAttention`` (vilbert-multi-task), fused.

    Same constructor (the ViLBERT config: ``bi_hidden_size``, ``bi_num_attention_heads``,
    ``v_hidden_size``, ``hidden_size``, ``v_attention_probs_dropout_prob``,
    ``attention_probs_dropout_prob``, ``visualization``), same parameter names and
    state_dict, same ``forward`` and return tuple::

        forward(input_tensor1 (B, Nv, v_hidden) regions, attention_mask1 (B, 1, 1, Nv),
                input_tensor2 (B, Nt, hidden) text, attention_mask2 (B, 1, 1, Nt),
                co_attention_mask=None, use_co_attention_mask=False)
        -> (context_layer1 (B, Nt, bi_hidden): text queries over regions,
            context_layer2 (B, Nv, bi_hidden): region queries over text,
            attn_data)

    The padded batch is packed with :func:`mmkernels.masked_select_rows` (only real
    tokens are projected, in one QKV GEMM per stream, and attended: no padded work),
    both directions run in one
    :func:`mmkernels.co_attention` launch, and the results are scattered back. Outputs
    at padded query positions are zeros (the eager module computes values there that
    nothing reads). ``co_attention_mask`` is accepted and unused, as in ViLBERT. With
    ``visualization`` the eager path runs, since attn_data holds the probabilities.
    """

    def _project(self, x: Tensor, linears) -> tuple[Tensor, Tensor, Tensor]:
        """Q, K, V of one stream in one GEMM (the three weights concatenated), each
        (tokens, H, d): one larger GEMM beats three, forward and backward."""
        w = torch.cat([lin.weight for lin in linears])
        b = torch.cat([lin.bias for lin in linears])
        qkv = F.linear(x, w, b).view(x.shape[0], 3, self.num_attention_heads,
                                     self.attention_head_size)
        q, k, v = qkv.unbind(1)  # unbind: its backward stacks, no zero-filled base tensor
        return q, k, v

    def forward(self, input_tensor1: Tensor, attention_mask1: Tensor, input_tensor2: Tensor,
                attention_mask2: Tensor, co_attention_mask: Tensor | None = None,
                use_co_attention_mask: bool = False):
        if self.visualization:
            return super().forward(input_tensor1, attention_mask1, input_tensor2,
                                   attention_mask2, co_attention_mask, use_co_attention_mask)
        for x, name, lin in ((input_tensor1, "input_tensor1", self.query1),
                             (input_tensor2, "input_tensor2", self.query2)):
            if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[2] != lin.in_features:
                raise ValueError(f"{name} must be (B, N, {lin.in_features}), got "
                                 f"{tuple(x.shape) if isinstance(x, Tensor) else type(x)}")
        B, Nv, _ = input_tensor1.shape
        Nt = input_tensor2.shape[1]
        if input_tensor2.shape[0] != B:
            raise ValueError(f"input_tensor1 and input_tensor2 must share the batch, got {B} and "
                             f"{input_tensor2.shape[0]}")
        valid_v = _valid_positions(attention_mask1, B, Nv, "attention_mask1")
        valid_t = _valid_positions(attention_mask2, B, Nt, "attention_mask2")
        # Pack the real tokens (one host sync on CUDA, as x[mask]); the padded lengths
        # are upper bounds for max_seqlen, so no further sync is needed.
        x_v, idx_v = masked_select_rows(input_tensor1, valid_v)
        x_t, idx_t = masked_select_rows(input_tensor2, valid_t)
        H, d = self.num_attention_heads, self.attention_head_size
        zero = torch.zeros(1, dtype=torch.int32, device=valid_v.device)
        cu_v = torch.cat([zero, valid_v.sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int32)])
        cu_t = torch.cat([zero, valid_t.sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int32)])
        q1, k1, v1 = self._project(x_v, (self.query1, self.key1, self.value1))
        q2, k2, v2 = self._project(x_t, (self.query2, self.key2, self.value2))
        p = (self.dropout1.p, self.dropout2.p) if self.training else (0.0, 0.0)
        # stream A = text (queries over regions) -> context_layer1; B = regions -> context_layer2
        out_t, out_v = co_attention(q2, k2, v2, q1, k1, v1, cu_t, cu_v, Nt, Nv, dropout_p=p)
        total_t, total_v = x_t.shape[0], x_v.shape[0]
        ctx1 = torch.ops.mmkernels._scatter_rows(out_t.reshape(total_t, H * d), idx_t, B * Nt)
        ctx2 = torch.ops.mmkernels._scatter_rows(out_v.reshape(total_v, H * d), idx_v, B * Nv)
        return ctx1.view(B, Nt, H * d), ctx2.view(B, Nv, H * d), None
