"""The reference ViLBERT (mmkernels.models.vilbert): eager vs patched training, patching,
torch.compile, DDP, and what the pre-training heads read."""

from __future__ import annotations

import copy

import pytest
import torch

from mmkernels import nn as mmnn
from mmkernels import reference
from mmkernels.models import layers, patch, unpatch
from mmkernels.models.vilbert import ViLBertConfig, ViLBertForPreTraining, synthetic_batch
from mmkernels.testing import CONVERGENCE, assert_close_to_reference
from tests.models._convergence import check_convergence, check_ddp, check_round_trip

CONFIG = ViLBertConfig().without_dropout()
B = 2


def make_model() -> ViLBertForPreTraining:
    return ViLBertForPreTraining(CONFIG)


def loss_fn(model, batch) -> torch.Tensor:
    return model(**batch).loss


def logits_fn(model, batch) -> torch.Tensor:
    """Every head's output on the rows it reads."""
    out = model(**batch)
    return torch.cat([out.mlm_logits.flatten(), out.itm_logits.flatten(),
                      out.region_logits.flatten(), out.region_predictions.flatten()])


def ddp_case():
    """For tests/models/_ddp_worker.py: each rank gets its own batch."""
    return make_model, lambda rank: synthetic_batch(CONFIG, B, seed=10 + rank), loss_fn


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: these tensors are tiny, and on a loaded 2-core machine
    OpenMP's hand-offs cost ~10 ms per op (20x the whole eager step)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def batch():
    return synthetic_batch(CONFIG, B, seed=0)


def test_synthetic_batch_is_consistent():
    b = synthetic_batch(CONFIG, 8, seed=3)
    text, regions = b["attention_mask"].bool(), b["image_attention_mask"].bool()
    labelled = b["mlm_labels"] != -100
    assert labelled.any(1).all() and not (labelled & ~text).any()
    assert (b["input_ids"][~text] == CONFIG.pad_token_id).all()
    assert b["masked_regions"].any(1).all() and not (b["masked_regions"] & ~regions).any()
    assert not (b["zeroed_regions"] & ~b["masked_regions"]).any()
    x1, y1, x2, y2 = b["boxes"].unbind(-1)
    H, W = b["image_sizes"][0].tolist()
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= W).all() and (y2 <= H).all()
    assert (x2 > x1).all() and (y2 > y1).all()
    torch.testing.assert_close(b["region_targets"].sum(-1), torch.ones(8, 5))
    again = synthetic_batch(CONFIG, 8, seed=3)
    assert all(torch.equal(b[k], again[k]) for k in b)


def test_forward_shapes_and_gradients_reach_every_parameter(batch):
    model = make_model()
    out = model(**batch)
    n_text, n_regions = int((batch["mlm_labels"] != -100).sum()), int(batch["masked_regions"].sum())
    assert out.mlm_logits.shape == (n_text, CONFIG.vocab_size)
    assert out.region_logits.shape == (n_regions, CONFIG.v_target_size)
    assert out.region_predictions.shape == (n_regions, CONFIG.v_feature_size)
    assert out.itm_logits.shape == (B, 2)
    R = batch["boxes"].shape[1]
    assert out.encoding.vision.shape == (B, 1 + R, CONFIG.v_hidden_size)
    parts = [out.mlm_loss, out.region_cls_loss, out.region_reg_loss, out.itm_loss]
    assert all(p.dim() == 0 and torch.isfinite(p) for p in parts)
    torch.testing.assert_close(out.loss, sum(parts))
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the MLM decoder is tied to the word embeddings
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_patch_replaces_the_eager_modules_in_place():
    model = make_model()
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    replaced = patch(model)
    got = {r.name: (r.before, r.after) for r in replaced}
    assert got == {
        "bert.region_pooling": (layers.RegionPooling, layers.FusedRegionPooling),
        "bert.encoder.layer.0.attention.self.core": (layers.PaddedSelfAttention,
                                                     layers.FusedPaddedSelfAttention),
        "bert.encoder.v_layer.0.attention.self.core": (layers.PaddedSelfAttention,
                                                       layers.FusedPaddedSelfAttention),
        "bert.encoder.c_layer.0.biattention": (reference.BertBiAttention, mmnn.BiAttention),
        "cls.text_select": (layers.MaskedRowSelect, layers.FusedMaskedRowSelect),
        "cls.region_select": (layers.MaskedRowSelect, layers.FusedMaskedRowSelect),
    }
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    assert patch(model) == []
    assert sorted(r.name for r in unpatch(model)) == sorted(got)


def test_convergence_eager_vs_patched():
    batches = [synthetic_batch(CONFIG, B, seed=s) for s in (1, 2)]
    figures = check_convergence(
        make_model, lambda step: batches[step % 2], loss_fn, logits_fn,
        synthetic_batch(CONFIG, B, seed=99),
        expect_ops=["mmkernels::varlen_attention_fwd", "mmkernels::varlen_attention_bwd",
                    "mmkernels::co_attention_fwd", "mmkernels::co_attention_bwd",
                    "mmkernels::region_features", "mmkernels::masked_select_rows"])
    print(f"vilbert convergence: max loss rel diff {figures['loss_rel']:.2e}, "
          f"max param diff {figures['param_abs']:.2e}")


def test_patch_unpatch_round_trip(batch):
    def run(model):
        out = model(**batch)
        return torch.cat([out.loss[None], out.mlm_logits.flatten(), out.itm_logits.flatten()])

    check_round_trip(make_model(), run)


def test_compile_fullgraph_gives_the_eager_loss(batch):
    torch.manual_seed(0)
    eager = make_model()
    fused = copy.deepcopy(eager)
    patch(fused)
    expected = loss_fn(eager, batch)
    expected.backward()
    # masked_select_rows returns a data-dependent number of rows
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True,
                                    capture_scalar_outputs=True):
        torch._dynamo.reset()
        compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
        loss = loss_fn(compiled, batch)
        loss.backward()
    torch._dynamo.reset()
    torch.testing.assert_close(loss, expected, rtol=CONVERGENCE["loss_rtol"], atol=0)
    for (name, pe), pf in zip(eager.named_parameters(), fused.parameters()):
        assert_close_to_reference(pf.grad, pe.grad, tol="float32_compiled_vs_eager_grads",
                                  what=name)


def test_ddp_patched_gives_the_eager_gradients(tmp_path):
    check_ddp(f"{__file__}:ddp_case", tmp_path)


def test_region_losses_read_only_the_masked_regions(batch):
    model = make_model()
    rows = {}
    model.cls.imagePredictions.register_forward_hook(lambda m, i, o: rows.update(v=i[0]))
    model.cls.predictions.register_forward_hook(lambda m, i, o: rows.update(t=i[0]))
    out = model(**batch)
    masked = batch["masked_regions"]
    # only the masked rows reach the heads
    assert rows["v"].shape[0] == int(masked.sum())
    assert rows["t"].shape[0] == int((batch["mlm_labels"] != -100).sum())
    torch.testing.assert_close(rows["v"], out.encoding.vision[:, 1:][masked])
    # regression: MSE to the pooled features of the masked regions, before masking
    target = out.encoding.region_features[masked]
    torch.testing.assert_close(out.region_reg_loss,
                               torch.nn.functional.mse_loss(out.region_predictions, target))
    # classification: the targets of unmasked regions do not matter, masked ones do
    targets = batch["region_targets"].clone()
    targets[~masked] = torch.rand_like(targets[~masked]).softmax(-1)
    other = model(**{**batch, "region_targets": targets})
    assert torch.equal(other.region_cls_loss, out.region_cls_loss)
    targets[masked] = targets[masked].flip(-1)
    assert not torch.equal(model(**{**batch, "region_targets": targets}).region_cls_loss,
                           out.region_cls_loss)


def test_padded_positions_are_never_read(batch):
    """Eager BertBiAttention computes values at padded query positions, the fused one
    returns zeros there: garbage at those positions must not change any output."""
    model = make_model()
    ref = model(**batch)
    text_pad = ~batch["attention_mask"].bool()
    vision_pad = torch.cat([torch.zeros(B, 1, dtype=torch.bool),
                            ~batch["image_attention_mask"].bool()], 1)
    assert text_pad.any() or vision_pad.any()

    def garbage(module, args, out):
        ctx1, ctx2, data = out
        ctx1 = ctx1.masked_fill(text_pad[..., None], 1e3)
        ctx2 = ctx2.masked_fill(vision_pad[..., None], -1e3)
        return ctx1, ctx2, data

    model.bert.encoder.c_layer[0].biattention.register_forward_hook(garbage)
    out = model(**batch)
    for name in ("loss", "mlm_logits", "itm_logits", "region_logits", "region_predictions"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=0, atol=0, msg=name)


def test_configs_and_bad_inputs(batch):
    base = ViLBertConfig.base()
    assert (base.hidden_size, base.v_hidden_size, base.bi_hidden_size, base.v_feature_size) == (
        768, 1024, 1024, 2048)
    assert base.num_coattention_layers == 6
    assert ViLBertConfig.small().num_coattention_layers == 2
    with pytest.raises(ValueError, match="bi_hidden_size"):
        ViLBertConfig(bi_hidden_size=30, bi_num_attention_heads=4)
    with pytest.raises(ValueError, match="t_biattention_id"):
        ViLBertConfig(t_biattention_id=(3,))
    model = make_model()
    with pytest.raises(ValueError, match="boxes"):
        model(**{**batch, "boxes": batch["boxes"][..., :3]})
    with pytest.raises(ValueError, match="feature_map"):
        model(**{**batch, "feature_map": batch["feature_map"][:, :3]})
    with pytest.raises(ValueError, match="masked_regions"):
        model(**{**batch, "masked_regions": batch["masked_regions"][:, :2]})
    with pytest.raises(ValueError, match="mlm_labels"):
        model(**{**batch, "mlm_labels": batch["mlm_labels"][:, :2]})
