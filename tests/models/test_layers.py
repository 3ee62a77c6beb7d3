"""The eager building blocks of the reference models against their fused versions,
and patch()/unpatch() on a user model built from them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmkernels import reference
from mmkernels.models import is_patched, layers, patch, register, unpatch
from mmkernels.models.patching import Replacement
from mmkernels.testing import TOLERANCES

ATOL, RTOL = TOLERANCES[torch.float32]


def _close(fused, eager):
    torch.testing.assert_close(fused, eager, atol=ATOL, rtol=RTOL)


def _grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, inputs, g)


def _leaf(*shape):
    return torch.randn(*shape).requires_grad_()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_padded_attention_fused_equals_eager(causal, padded):
    B, L, H, Hkv, D = 3, 7, 4, 2, 16
    q, k, v = _leaf(B, L, H, D), _leaf(B, L, Hkv, D), _leaf(B, L, Hkv, D)
    mask = None
    if padded:
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[1, 5:] = False
        mask[2, 1:] = False
    eager = layers.PaddedSelfAttention(causal=causal)(q, k, v, mask)
    fused = layers.FusedPaddedSelfAttention(causal=causal)(q, k, v, mask)
    _close(fused, eager)
    for gf, ge in zip(_grads(fused, (q, k, v)), _grads(eager, (q, k, v)), strict=True):
        _close(gf, ge)
    if padded:  # padded query rows are zeros in both, so nothing downstream differs
        assert not eager[~mask].any() and not fused[~mask].any()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("blocks", [False, True])
def test_packed_attention_fused_equals_eager(causal, blocks):
    T, H, Hkv, D = 20, 4, 1, 8
    cu = torch.tensor([0, 5, 5, 12, 20], dtype=torch.int32)  # an empty sequence too
    q, k, v = _leaf(T, H, D), _leaf(T, Hkv, D), _leaf(T, Hkv, D)
    bid = None
    if blocks:
        bid = torch.zeros(T, dtype=torch.int32)
        bid[6:10], bid[14:18] = 1, 2
    eager = layers.PackedSelfAttention(causal=causal)(q, k, v, cu, 8, bid)
    fused = layers.FusedPackedSelfAttention(causal=causal)(q, k, v, cu, 8, bid)
    _close(fused, eager)
    for gf, ge in zip(_grads(fused, (q, k, v)), _grads(eager, (q, k, v)), strict=True):
        _close(gf, ge)


def test_packed_visibility_never_crosses_a_boundary():
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    bid = torch.tensor([0, 1, 1, 0, 1, 1, 0], dtype=torch.int32)  # block 1 in both samples
    vis = layers.packed_visibility(cu, 7, causal=True, block_ids=bid)
    assert not vis[:3, 3:].any() and not vis[3:, :3].any()
    assert vis[1, 2] and vis[4, 5] and not vis[3, 4]  # blocks both ways; text causal
    assert torch.equal(vis[:3, :3], torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 1]]).bool())


def test_region_pooling_fused_equals_eager():
    feat = _leaf(2, 6, 12, 10)
    rois = torch.tensor([[0, 1.0, 2.0, 30.0, 20.0], [1, 0.0, 0.0, 39.0, 47.0],
                         [1, 5.5, 3.25, 9.0, 40.0]])
    kw = {"output_size": (3, 2), "spatial_scale": 0.25, "sampling_ratio": 2, "aligned": True}
    eager = layers.RegionPooling(**kw)(feat, rois)
    fused = layers.FusedRegionPooling(**kw)(feat, rois)
    assert eager.shape == (3, 6)
    _close(fused, eager)
    # without torchvision the eager module falls back to the plain PyTorch reference
    _close(reference.region_features(feat, rois, **kw), eager)
    _close(_grads(fused, (feat,))[0], _grads(eager, (feat,))[0])


def test_random_token_masking_same_draws_and_eval_identity():
    x = _leaf(3, 10, 4)
    eager, fused = layers.RandomTokenMasking(0.6), layers.FusedRandomTokenMasking(0.6)
    torch.manual_seed(5)
    ke, me, ie = eager(x)
    torch.manual_seed(5)
    kf, mf, i_f = fused(x)
    assert ke.shape == (3, 4, 4)
    assert torch.equal(ke, kf) and torch.equal(me, mf) and torch.equal(ie, i_f)
    _close(_grads(kf, (x,))[0], _grads(ke, (x,))[0])
    fused.eval()
    kept, mask, ids = fused(x)
    assert kept is x and not mask.any() and torch.equal(ids[1], torch.arange(10))
    with pytest.raises(ValueError, match="mask_ratio"):
        layers.RandomTokenMasking(1.0)


def test_masked_rows_and_image_merge_fused_equal_eager():
    x = _leaf(2, 5, 3)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    (re, ie), (rf, i_f) = layers.MaskedRowSelect()(x, mask), layers.FusedMaskedRowSelect()(x, mask)
    assert torch.equal(re, rf) and torch.equal(ie, i_f)
    _close(_grads(rf, (x,))[0], _grads(re, (x,))[0])
    emb, feats = _leaf(2, 5, 3), _leaf(5, 3)
    me = layers.ImageFeatureMerge()(emb, mask, feats)
    mf = layers.FusedImageFeatureMerge()(emb, mask, feats)
    assert torch.equal(me, mf)
    for gf, ge in zip(_grads(mf, (emb, feats)), _grads(me, (emb, feats)), strict=True):
        _close(gf, ge)
    with pytest.raises(ValueError, match="do not match"):
        layers.FusedImageFeatureMerge()(emb, mask, feats[:4])


@pytest.mark.parametrize("kind", ["info_nce", "sigmoid"])
def test_contrastive_losses_fused_equal_eager(kind):
    img = torch.nn.functional.normalize(torch.randn(6, 8), dim=1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(6, 8), dim=1).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-3.0, requires_grad=True)
    args = (img, txt, scale) if kind == "info_nce" else (img, txt, scale, bias)
    cls = layers.InfoNCELoss if kind == "info_nce" else layers.SigmoidContrastiveLoss
    fused_cls = layers.FusedInfoNCELoss if kind == "info_nce" else layers.FusedSigmoidContrastiveLoss
    eager, fused = cls()(*args), fused_cls()(*args)
    ref = (reference.info_nce(*args) if kind == "info_nce" else reference.sigmoid_contrastive(*args))
    assert torch.equal(eager, ref)
    _close(fused, eager)
    for gf, ge in zip(_grads(fused, args), _grads(eager, args), strict=True):
        _close(gf, ge)


def test_attention_cores_check_their_inputs():
    q = torch.randn(2, 4, 3, 8)
    with pytest.raises(ValueError, match="multiple of k's"):
        layers.FusedPaddedSelfAttention()(q, torch.randn(2, 4, 2, 8), torch.randn(2, 4, 2, 8))
    with pytest.raises(ValueError, match="4-d"):
        layers.PaddedSelfAttention()(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="share"):
        layers.FusedPackedSelfAttention()(q[0], q[0, :3], q[0, :3],
                                          torch.tensor([0, 4], dtype=torch.int32), 4)


class _UserBlock(nn.Module):
    """A user's model built from the eager classes (not one of ours)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.attn = layers.PaddedSelfAttention(causal=True)
        self.shared = self.attn  # the same module twice: patched once
        self.select = layers.MaskedRowSelect()
        self.head = nn.Linear(8, 3)

    def forward(self, x, mask):
        q, k, v = self.qkv(x).view(*x.shape[:2], 3, 2, 4).unbind(2)
        h = self.attn(q, k, v).reshape(x.shape)
        rows, _ = self.select(h, mask)
        return self.head(rows)


class _MyAttention(layers.PaddedSelfAttention):
    """A user subclass with its own forward: patch() must leave it alone."""


def test_patch_user_model_in_place_keeps_parameters_and_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(_UserBlock(), nn.Identity())
    model.add_module("mine", _MyAttention())
    x, mask = torch.randn(2, 5, 8), torch.rand(2, 5) > 0.3
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model[0](x, mask)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    replaced = patch(model)
    assert replaced == [Replacement("0.attn", layers.PaddedSelfAttention,
                                    layers.FusedPaddedSelfAttention),
                        Replacement("0.select", layers.MaskedRowSelect, layers.FusedMaskedRowSelect)]
    assert type(model.mine) is _MyAttention and model[0].shared is model[0].attn
    assert is_patched(model) and patch(model) == []  # idempotent
    assert list(model.parameters()) == params and model.state_dict().keys() == state.keys()
    after = model[0](x, mask)
    _close(after, before)
    after.sum().backward()
    opt.step()  # the optimizer built before the patch updates the patched model
    assert not torch.equal(model[0].head.weight, state["0.head.weight"])
    restored = unpatch(model)
    assert [r.after for r in restored] == [layers.PaddedSelfAttention, layers.MaskedRowSelect]
    assert not is_patched(model) and unpatch(model) == []


def test_register_checks_its_arguments():
    with pytest.raises(TypeError, match="subclass"):
        register(layers.MaskedRowSelect, layers.FusedImageFeatureMerge)
    with pytest.raises(TypeError, match="nn.Module"):
        register(int, bool)
    with pytest.raises(ValueError, match="already registered"):
        register(layers.MaskedRowSelect, type("Other", (layers.MaskedRowSelect,), {}))
    with pytest.raises(TypeError, match="model"):
        patch("not a model")


def test_review_fixes_zero_length_nan_and_register():
    # zero-length sequences: the fused core returns the (empty) eager result
    q = torch.randn(3, 0, 4, 8)
    assert layers.FusedPaddedSelfAttention()(q, q[:, :, :2], q[:, :, :2]).shape == (3, 0, 4, 8)
    assert layers.PaddedSelfAttention()(q, q[:, :, :2], q[:, :, :2]).shape == (3, 0, 4, 8)
    # a NaN input stays NaN in the eager core, as in the fused one (only rows without a
    # visible key become zeros)
    x = torch.randn(1, 3, 2, 4)
    x[0, 1, 0, 0] = float("nan")
    for cls in (layers.PaddedSelfAttention, layers.FusedPaddedSelfAttention):
        assert cls()(x, x, x).isnan().any(), cls.__name__
    # one fused class cannot serve two eager classes (unpatch would pick the wrong one)
    register(layers.MaskedRowSelect, layers.FusedMaskedRowSelect)  # the same pair again: fine
    with pytest.raises(ValueError, match="already registered for"):
        register(nn.Module, layers.FusedMaskedRowSelect)
