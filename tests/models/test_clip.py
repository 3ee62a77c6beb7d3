"""The reference CLIP / SigLIP with FLIP masking (mmkernels.models.clip): eager vs patched
training, patch/unpatch round trip, torch.compile, DDP, and the FLIP sequence lengths."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch._inductor.config

from mmkernels import reference
from mmkernels.models import clip, layers, patch, unpatch
from mmkernels.models.training import eager_and_patched, train
from mmkernels.testing import CONVERGENCE, TOLERANCES
from tests.models._convergence import check_convergence, check_ddp, check_round_trip, executed_ops

B = 4
LOSSES = ("info_nce", "sigmoid")
#: profiler names of the fused ops each patched CLIP must run (forward and backward)
ATTENTION_OPS = ("mmkernels::varlen_attention_fwd", "mmkernels::varlen_attention_bwd",
                 "mmkernels::random_masking")
LOSS_OPS = {"info_nce": ("mmkernels::info_nce_fwd", "mmkernels::info_nce_bwd"),
            # SigLIP: the forward op also computes the gradients; there is no backward op
            "sigmoid": ("mmkernels::sigmoid_contrastive_fwd",)}
FUSED_LOSS = {"info_nce": (layers.InfoNCELoss, layers.FusedInfoNCELoss),
              "sigmoid": (layers.SigmoidContrastiveLoss, layers.FusedSigmoidContrastiveLoss)}


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tensors are tiny, and on a shared 2-core machine torch's
    thread pool costs more than it saves (a (4, 9, 32) layer norm took ~5 ms)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny(loss: str = "info_nce") -> clip.CLIPConfig:
    """16 x 16 images, 4 x 4 patches (16 patches, 8 kept), width 32, 2 heads, 2 layers,
    context 8."""
    return clip.CLIPConfig(loss=loss)


def make_model(loss: str = "info_nce"):
    torch.manual_seed(0)
    return clip.CLIP(tiny(loss))


def loss_fn(model, batch) -> torch.Tensor:
    return model(batch["images"], batch["input_ids"]).loss


def logits_fn(model, batch) -> torch.Tensor:
    return model.logits(batch["images"], batch["input_ids"])


@pytest.mark.parametrize("loss", LOSSES)
def test_shapes_and_gradients_reach_every_parameter(loss):
    model = make_model(loss)
    batch = clip.synthetic_batch(model.config, B, seed=1)
    out = model(batch["images"], batch["input_ids"], return_logits=True)
    D = model.config.embed_dim
    assert out.image_features.shape == out.text_features.shape == (B, D)
    torch.testing.assert_close(out.image_features.norm(dim=-1), torch.ones(B))
    torch.testing.assert_close(out.text_features.norm(dim=-1), torch.ones(B))
    assert out.logits_per_image.shape == (B, B)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    # the training path forms no logits; explicit lengths pick the same EOT features
    plain = model(batch["images"], batch["input_ids"], batch["lengths"])
    assert plain.logits_per_image is None
    torch.testing.assert_close(plain.text_features, out.text_features)
    out.loss.backward()
    names = {n for n, _ in model.named_parameters()}
    assert ("logit_bias" in names) == (loss == "sigmoid")
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} got no gradient"


def test_bad_inputs_raise():
    model = make_model()
    batch = clip.synthetic_batch(model.config, B, seed=0)
    with pytest.raises(ValueError, match="images"):
        model(batch["images"][:, :, :8], batch["input_ids"])
    with pytest.raises(ValueError, match="input_ids"):
        model(batch["images"], batch["input_ids"].int())
    with pytest.raises(ValueError, match="input_ids length"):
        model(batch["images"], torch.ones(B, 9, dtype=torch.int64))
    with pytest.raises(ValueError, match="lengths"):
        model(batch["images"], batch["input_ids"], batch["lengths"][:2])
    with pytest.raises(ValueError, match="loss"):
        clip.CLIPConfig(loss="triplet")
    with pytest.raises(ValueError, match="patch_size"):
        clip.CLIPConfig(image_size=15)


@pytest.mark.parametrize("loss", LOSSES)
def test_patch_replaces_the_fused_modules(loss):
    model = make_model(loss)
    params = {n: id(p) for n, p in model.named_parameters()}
    state = model.state_dict()
    replaced = patch(model)
    cfg = model.config
    n_attn = cfg.vision_layers + cfg.text_layers
    eager_loss, fused_loss = FUSED_LOSS[loss]
    kinds = {(r.before, r.after) for r in replaced}
    assert kinds == {(layers.PaddedSelfAttention, layers.FusedPaddedSelfAttention),
                     (layers.RandomTokenMasking, layers.FusedRandomTokenMasking),
                     (eager_loss, fused_loss)}
    assert len(replaced) == n_attn + 2
    assert type(model.loss) is fused_loss and type(model.visual.masking) is layers.FusedRandomTokenMasking
    assert {n: id(p) for n, p in model.named_parameters()} == params
    assert model.state_dict().keys() == state.keys()
    assert patch(model) == []  # twice: a no-op
    assert len(unpatch(model)) == n_attn + 2


@pytest.mark.parametrize("loss", LOSSES)
def test_convergence(loss):
    cfg = tiny(loss)
    heldout = clip.synthetic_batch(cfg, B, seed=10_000)
    res = check_convergence(lambda: make_model(loss), lambda step: clip.synthetic_batch(cfg, B, step),
                            loss_fn, logits_fn, heldout, ATTENTION_OPS + LOSS_OPS[loss])
    print(f"clip {loss}: max loss rel diff {res['loss_rel']:.2e}, param diff {res['param_abs']:.2e}, "
          f"loss {res['losses'][0][0]:.4f} -> {res['losses'][0][-1]:.4f}")


def test_round_trip():
    model = make_model("sigmoid")
    batch = clip.synthetic_batch(model.config, B, seed=3)

    def run(m):
        out = m(batch["images"], batch["input_ids"])
        return torch.cat([out.loss.reshape(1), out.image_features.flatten(), out.text_features.flatten()])

    check_round_trip(model, run)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_matches_eager(backend):
    """The patched model under torch.compile(fullgraph=True) gives the eager loss and
    gradients (train mode: FLIP masking on, the same noise), running the fused ops.
    aot_eager traces the fused ops through their fake kernels and autograd formulas as
    inductor does, in seconds; inductor itself (fallback_random, so torch.rand draws as
    eager) spends ~50 s compiling on a shared 2-core CPU, hence marked slow."""
    eager, fused = eager_and_patched(make_model)
    batch = clip.synthetic_batch(eager.config, B, seed=5)
    torch.manual_seed(7)
    ref = loss_fn(eager, batch)
    ref.backward()
    compiled = torch.compile(fused, backend=backend, fullgraph=True)
    out = {}

    def step():
        torch.manual_seed(7)
        out["loss"] = compiled(batch["images"], batch["input_ids"]).loss
        out["loss"].backward()

    with torch._inductor.config.patch(fallback_random=True):
        ran = executed_ops(step)
    assert set(ATTENTION_OPS + LOSS_OPS["info_nce"]) <= ran
    torch.testing.assert_close(out["loss"], ref, rtol=CONVERGENCE["loss_rtol"], atol=0)
    atol, rtol = TOLERANCES[torch.float32]
    for (n, pe), pf in zip(eager.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(pf.grad, pe.grad, atol=atol, rtol=rtol, msg=lambda m, n=n: f"{n}: {m}")


def ddp_case():
    """(make_model, make_batch(rank), loss_fn) for check_ddp: InfoNCE over both ranks."""
    return make_model, lambda rank: clip.synthetic_batch(tiny(), B, seed=rank), loss_fn


def _single_process_ddp_grads(world: int = 2) -> tuple[dict, dict]:
    """What a DDP step of ddp_case must give, computed in one process with the worker's
    seeds (model under seed 0, rank r's forward under seed 100 + r): (gathered, local).

    gathered: the gradients of a loss that gathers every rank's features. Rank r's loss
    (its rows against all columns, labels offset by r) averaged over the ranks, as DDP
    averages gradients, is exactly the InfoNCE of the concatenated global batch.
    local: each rank's loss on its own features only, averaged over the ranks.
    """
    result = []
    for gathered in (True, False):
        torch.manual_seed(0)
        model = make_model()
        feats = []
        for rank in range(world):
            torch.manual_seed(100 + rank)
            batch = clip.synthetic_batch(tiny(), B, seed=rank)
            feats.append(model.encode(batch["images"], batch["input_ids"]))
        if gathered:
            loss = reference.info_nce(torch.cat([i for i, _ in feats]),
                                      torch.cat([t for _, t in feats]), model.scale())
        else:
            loss = sum(reference.info_nce(i, t, model.scale()) for i, t in feats) / world
        loss.backward()
        result.append({n: p.grad for n, p in model.named_parameters()})
    return result[0], result[1]


def test_ddp_gathers_across_ranks(tmp_path):
    worst = check_ddp(f"{os.path.abspath(__file__)}:ddp_case", tmp_path)
    # the losses really gathered: the DDP gradients (check_ddp left them in tmp_path) are
    # those of the global batch, not those of a loss local to each rank
    gathered, local = _single_process_ddp_grads()
    atol, rtol = TOLERANCES[torch.float32]
    gap = 0.0
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        for variant in ("eager", "patched"):
            for n, g in saved[variant].items():
                torch.testing.assert_close(g, gathered[n], atol=atol, rtol=rtol,
                                           msg=lambda m, n=n, v=variant: f"{v} {n}: {m}")
        gap = max(gap, *(float((saved["patched"][n] - local[n]).abs().max()) for n in local))
    print(f"clip DDP: max |grad patched - grad eager| {worst:.2e}; vs a rank-local loss {gap:.2e}")
    assert gap > 100 * atol, f"the DDP gradients equal those of a rank-local loss (gap {gap:.2e})"


def test_flip_masking_drops_patches():
    model = make_model()
    patch(model)  # the fused masking keeps the same count
    cfg = model.config
    seen = []
    core = model.visual.transformer.blocks[0].attn.core
    core.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    batch = clip.synthetic_batch(cfg, B, seed=2)
    model.train()
    model(batch["images"], batch["input_ids"])
    model.eval()
    with torch.no_grad():
        model(batch["images"], batch["input_ids"])
    assert cfg.num_patches == 16
    assert seen == [int(16 * (1 - cfg.mask_ratio)) + 1, 16 + 1] == [9, 17]


def test_synthetic_task_is_learnable():
    """Eager InfoNCE on the synthetic batches gets well below chance (log B) in 100 tiny
    steps: the convergence tests compare models that really learn."""
    cfg = tiny()
    run = train(make_model(), lambda step: clip.synthetic_batch(cfg, B, step), loss_fn, 100, lr=1e-3)
    late = sum(run.losses[-20:]) / 20
    assert late < 0.6 * math.log(B), f"mean of the last 20 losses {late:.3f} (chance {math.log(B):.3f})"
