"""The reference LLaVA (mmkernels.models.llava) trained on packs from
mmkernels.data.VLMPackingCollator: gradients, patching, eager vs patched convergence,
patch/unpatch round trip, torch.compile and DDP."""

from __future__ import annotations

import copy

import pytest
import torch

from mmkernels.models import layers, patch
from mmkernels.models.llava import Llava, LlavaConfig, packed_lm_loss
from mmkernels.models.llava import synthetic_pack as make_pack
from mmkernels.testing import CONVERGENCE
from tests.models._convergence import check_convergence, check_ddp, check_round_trip

#: what the patched model runs (profiler names, found by profiling one patched step)
EXPECT_OPS = ("mmkernels::varlen_attention_fwd", "mmkernels::varlen_attention_bwd",
              "mmkernels::scatter_image_features")


def _model(bidirectional: bool = False) -> Llava:
    return Llava(LlavaConfig(bidirectional_images=bidirectional))


def _loss(model, batch):
    return model(**batch).loss


def _logits(model, batch):
    return model(**batch).logits


@pytest.mark.parametrize("patched", [False, True], ids=["eager", "patched"])
def test_gradients_reach_every_parameter(patched):
    model = _model(bidirectional=True)
    if patched:
        patch(model)
    _loss(model, make_pack(model.config, seed=0)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


def test_patch_replaces_the_three_cores():
    model = _model()
    cfg = model.config
    replaced = patch(model)
    counts = {}
    for r in replaced:
        counts[r.before] = counts.get(r.before, 0) + 1
    assert counts == {layers.PaddedSelfAttention: cfg.vision_layers_used,
                      layers.PackedSelfAttention: cfg.num_layers,
                      layers.ImageFeatureMerge: 1}
    assert {r.after for r in replaced} == {layers.FusedPaddedSelfAttention,
                                           layers.FusedPackedSelfAttention,
                                           layers.FusedImageFeatureMerge}


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidir-images"])
def test_convergence(bidirectional):
    cfg = LlavaConfig(bidirectional_images=bidirectional)
    res = check_convergence(lambda: Llava(cfg), lambda step: make_pack(cfg, step), _loss,
                            _logits, make_pack(cfg, 1000), EXPECT_OPS)
    print(f"\nllava {'bidir' if bidirectional else 'causal'}: max loss rel diff "
          f"{res['loss_rel']:.2e}, max param diff {res['param_abs']:.2e}, ops {res['ops']}")


def test_round_trip():
    model = _model(bidirectional=True)
    batch = make_pack(model.config, seed=3)
    check_round_trip(model, lambda m: _logits(m, batch))


def test_compile_fullgraph_matches_eager():
    """torch.compile(fullgraph=True) of the patched model: the eager model's loss and
    logits. backend="aot_eager": it traces the fake kernels and the autograd
    formulas as inductor would; inductor's CPU codegen takes minutes on 2 cores and
    adds nothing to what is checked here (the mmkernels ops stay opaque)."""
    torch._dynamo.reset()
    eager = _model(bidirectional=True)
    fused = copy.deepcopy(eager)
    patch(fused)
    batch = make_pack(eager.config, seed=4)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    out_e, out_c = eager(**batch), compiled(**batch)
    le, lc = float(out_e.loss.detach()), float(out_c.loss.detach())
    rel = abs(lc - le) / abs(le)
    assert rel <= CONVERGENCE["loss_rtol"], f"compiled loss differs by {rel:.2e} relative"
    torch.testing.assert_close(out_c.logits, out_e.logits, atol=CONVERGENCE["logits_atol"],
                               rtol=CONVERGENCE["logits_rtol"])
    out_c.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fused.parameters())


def ddp_case():
    """For tests/models/_ddp_worker.py: a different pack per rank."""
    cfg = LlavaConfig(bidirectional_images=True)
    return (lambda: Llava(cfg)), (lambda rank: make_pack(cfg, seed=10 + rank)), _loss


def test_ddp(tmp_path):
    worst = check_ddp(f"{__file__}:ddp_case", tmp_path)
    print(f"\nllava DDP: max grad diff {worst:.2e}")


# ---------------------------------------------------------------------------------
# inputs, loss convention and configuration
# ---------------------------------------------------------------------------------


def test_block_ids_are_derived_when_absent():
    model = _model(bidirectional=True).eval()
    batch = make_pack(model.config, seed=5, bidirectional_images=True)
    without = {k: v for k, v in batch.items() if k != "block_ids"}
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, model(**without).logits)
        causal = copy.deepcopy(model)
        causal.config = LlavaConfig(bidirectional_images=False)
        assert not torch.equal(causal(**without).logits, model(**without).logits)
    with pytest.raises(ValueError, match="bidirectional_images is False"):
        causal(**batch)


def test_flat_inputs_and_defaults():
    """(T,) inputs equal (1, T) ones; without cu_seq_lens one sample is assumed and
    position_ids follow from cu_seq_lens."""
    model = _model().eval()
    cfg = model.config
    batch = make_pack(cfg, seed=6)
    flat = {k: (v[0] if k in ("input_ids", "position_ids", "labels") else v)
            for k, v in batch.items()}
    no_positions = {k: v for k, v in batch.items() if k != "position_ids"}
    with torch.no_grad():
        ref = model(**batch)
        assert torch.equal(model(**flat).logits, ref.logits)
        assert torch.equal(model(**no_positions).logits, ref.logits)
        one = cfg.collator()(
            [{"input_ids": [1, cfg.image_token_id, 2, 3], "pixel_values": torch.randn(1, 3, 8, 8)}])
        bare = model(one["input_ids"], one["pixel_values"])
        torch.testing.assert_close(bare.logits, model(**one).logits, atol=0, rtol=0)
        assert bare.loss is None


def test_loss_never_predicts_across_samples():
    """packed_lm_loss ignores the label at every sample start even when the labels
    (not from the collator) do not."""
    logits = torch.randn(5, 7)
    labels = torch.tensor([1, 2, 3, 4, 5])
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    expected = torch.nn.functional.cross_entropy(logits[[0, 2, 3]], labels[[1, 3, 4]])
    torch.testing.assert_close(packed_lm_loss(logits, labels, cu), expected, atol=0, rtol=0)


@pytest.mark.parametrize("kwargs, match", [
    ({"image_size": 9}, "multiple of patch_size"),
    ({"num_kv_heads": 3}, "multiple of num_kv_heads"),
    ({"hidden_size": 36}, "even head dim"),
    ({"vision_feature_layer": -4}, "vision_feature_layer"),
    ({"image_token_id": 64}, "image_token_id"),
    ({"num_layers": 0}, "num_layers"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LlavaConfig(**kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"input_ids": torch.zeros(2, 5, dtype=torch.long)}, ValueError, "one packed row"),
    ({"input_ids": torch.zeros(5)}, TypeError, "integer"),
    ({"cu_seq_lens_q": torch.tensor([0, 5], dtype=torch.int32)}, TypeError, "max_length_q"),
    ({"cu_seq_lens_q": torch.tensor([0, 5], dtype=torch.int32), "max_length_q": 5,
      "cu_seq_lens_k": torch.tensor([0, 2, 5], dtype=torch.int32)}, ValueError, "cu_seq_lens_k"),
    ({"labels": torch.zeros(1, 4, dtype=torch.long)}, ValueError, "labels"),
    ({"pixel_values": torch.randn(1, 3, 16, 16)}, ValueError, "pixel_values"),
])
def test_forward_validation(kwargs, error, match):
    model = _model()
    kwargs.setdefault("input_ids", torch.tensor([[1, 2, 3, 4, 5]]))
    with pytest.raises(error, match=match):
        model(**kwargs)


def test_presets():
    small = LlavaConfig.small()
    assert small.num_image_tokens == 16 and small.vision_layers_used == 2
    assert sum(p.numel() for p in Llava(small).parameters()) < 2_000_000
    base = LlavaConfig.base()  # not built here: 0.71 B parameters
    assert base.num_image_tokens == 196 and base.vision_layers_used == 11
    assert base.hidden_size // base.num_heads == 64
