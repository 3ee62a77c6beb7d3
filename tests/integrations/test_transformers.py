"""Hugging Face transformers integration: attn_implementation="mmkernels",
apply_to_clip / apply_to_llava / revert, on tiny random models built here (nothing is
downloaded). Skipped when transformers (>= the [hf] extra's minimum) is missing."""

from __future__ import annotations

import copy
import os

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.24")

from models._convergence import (  # noqa: E402
    check_convergence,
    check_round_trip,
    executed_ops,
    run_ranks,
)
from transformers import (  # noqa: E402
    AttentionInterface,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    Gemma2Config,
    Gemma2Model,
    LlamaConfig,
    LlamaModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    MistralModel,
    SiglipConfig,
    SiglipModel,
)
from transformers.masking_utils import AttentionMaskInterface, create_causal_mask  # noqa: E402

import mmkernels.integrations.transformers as mmhf  # noqa: E402
from mmkernels.data import VLMPackingCollator  # noqa: E402
from mmkernels.models.layers import _eager_attention  # noqa: E402
from mmkernels.testing import CONVERGENCE, assert_close_to_reference  # noqa: E402

VARLEN = ("mmkernels::varlen_attention_fwd", "mmkernels::varlen_attention_bwd")
WORKER = os.path.join(os.path.dirname(__file__), "_dist_worker.py")



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these tiny models spend more time in thread hand-offs than in
    compute, 50x more on a shared, oversubscribed CPU (eager and patched alike)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---------------------------------------------------------------------------------
# tiny models and batches
# ---------------------------------------------------------------------------------

TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
TEXT = dict(TOWER, vocab_size=64, max_position_embeddings=16)
VISION = dict(TOWER, image_size=16, patch_size=8)
EOS = 63  # CLIP text: the pooled token is each sequence's first EOS


def tiny_clip(attn: str = "eager", siglip: bool = False, **text) -> CLIPModel | SiglipModel:
    torch.manual_seed(0)
    if siglip:
        cfg = SiglipConfig(text_config=dict(TEXT, **text), vision_config=VISION)
        model = SiglipModel(cfg)
    else:
        cfg = CLIPConfig(text_config=dict(TEXT, eos_token_id=EOS, bos_token_id=0, pad_token_id=1, **text),
                         vision_config=VISION, projection_dim=16)
        model = CLIPModel(cfg)
    model.set_attn_implementation(attn)
    return model


def freeze_key_biases(model: torch.nn.Module) -> torch.nn.Module:
    """Freeze every attention key bias. Its gradient is exactly zero in exact arithmetic
    (a softmax is invariant to adding one constant to a query's scores), so what any
    implementation computes for it is float noise (~1e-9), which Adam turns into
    updates of ~lr per step with random signs: no two implementations can agree on it
    (eager vs sdpa neither). Frozen, both runs keep it at its initial value."""
    for name, p in model.named_parameters():
        if name.endswith("k_proj.bias"):
            p.requires_grad_(False)
    return model


def clip_for_training() -> CLIPModel:
    return freeze_key_biases(tiny_clip())


def clip_batch(step: int, B: int = 3, L: int = 10) -> dict:
    """Padded text (lengths 5..L, EOS last, attention_mask) and images."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(2, EOS, (B, L), generator=g)
    lengths = torch.randint(5, L + 1, (B,), generator=g)
    lengths[0] = L
    mask = torch.arange(L)[None, :] < lengths[:, None]
    ids[torch.arange(B), lengths - 1] = EOS
    ids = ids.masked_fill(~mask, 1)
    return dict(input_ids=ids, attention_mask=mask.long(),
                pixel_values=torch.randn(B, 3, 16, 16, generator=g), return_loss=True)


def clip_loss(model, batch):
    return model(**batch).loss


def clip_logits(model, batch):
    return model(**batch).logits_per_image


IMAGE_TOKEN, IMAGE_TOKENS = 63, 4  # 16 px / 8 px patches = 4 tokens per image (CLS dropped)


def tiny_llava(attn: str = "eager") -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION),
        text_config=LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64),
        image_token_index=IMAGE_TOKEN, image_seq_length=IMAGE_TOKENS,
        vision_feature_layer=-1)  # the last layer: every vision parameter trains
    model = LlavaForConditionalGeneration(cfg)
    model.set_attn_implementation(attn)
    return model


def pack(samples: list[torch.Tensor], images: torch.Tensor | None = None) -> dict:
    """Padding-free packing with mmkernels.data's collator, in the layout of HF's
    DataCollatorWithFlattening(return_flash_attn_kwargs=True): input_ids (1, T),
    position_ids restarting at 0 per sample, labels with -100 at each sample's first
    token and at image tokens, cu_seq_lens_q/k (S + 1,) int32, max_length_q/k ints;
    ``images`` (one per sample that has image tokens, in order) as pixel_values. The
    samples hold the expanded placeholders, as HF's LLaVA processor makes them."""
    collate = VLMPackingCollator(IMAGE_TOKEN, IMAGE_TOKENS, expanded=True)
    items, i = [], 0
    for s in samples:
        item = {"input_ids": s}
        if images is not None and bool((s == IMAGE_TOKEN).any()):
            item["pixel_values"], i = images[i:i + 1], i + 1
        items.append(item)
    return collate(items)


def llava_for_training() -> LlavaForConditionalGeneration:
    return freeze_key_biases(tiny_llava())


def llava_batch(step: int, lens=(9, 12)) -> dict:
    """Packed samples, each: a token, one image's tokens, then counting text (a
    learnable next-token rule) from a random start."""
    g = torch.Generator().manual_seed(2000 + step)
    samples = []
    for n in lens:
        start = torch.randint(1, IMAGE_TOKEN, (1,), generator=g)
        s = (start + torch.arange(n)) % (IMAGE_TOKEN - 1) + 1
        s[1:1 + IMAGE_TOKENS] = IMAGE_TOKEN
        samples.append(s)
    batch = pack(samples, torch.randn(len(lens), 3, 16, 16, generator=g))
    batch.update(use_cache=False)
    return batch


def llava_loss(model, batch):
    return model(**batch).loss


def llava_logits(model, batch):
    return model(**batch).logits


def report(name: str, figures: dict) -> None:
    print(f"{name}: max loss rel diff {figures['loss_rel']:.2e}, max param diff "
          f"{figures['param_abs']:.2e}, ops {figures['ops']}")


# ---------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------


def test_registered_with_attention_and_mask_interfaces():
    assert AttentionInterface._global_mapping[mmhf.NAME] is mmhf.attention_forward
    assert mmhf.NAME in AttentionMaskInterface._global_mapping
    cfg = LlamaConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, vocab_size=8)
    cfg._attn_implementation = mmhf.NAME
    x = torch.zeros(2, 5, 32)
    # no padding: no mask (causality is the kernel's); padding: the 2-D mask is kept
    assert create_causal_mask(cfg, x, torch.ones(2, 5, dtype=torch.long), None) is None
    padded = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    got = create_causal_mask(cfg, x, padded, None)
    assert got.dtype == torch.bool and torch.equal(got, padded.bool())


def test_from_pretrained_and_set_attn_implementation(tmp_path):
    eager = tiny_clip()
    eager.save_pretrained(tmp_path)
    loaded = CLIPModel.from_pretrained(tmp_path, attn_implementation=mmhf.NAME)
    switched = tiny_clip()
    switched.set_attn_implementation(mmhf.NAME)
    batch = clip_batch(0)
    with torch.no_grad():
        ref = eager(**batch)
        for model in (loaded, switched):
            for cfg in (model.config, model.config.text_config, model.config.vision_config):
                assert cfg._attn_implementation == mmhf.NAME
            ran = {}
            names = executed_ops(lambda m=model, ran=ran: ran.update(out=m(**batch)))
            assert "mmkernels::varlen_attention_fwd" in names
            assert_close_to_reference(ran["out"].logits_per_image, ref.logits_per_image,
                                      tol="float32_fused_vs_eager")
            assert_close_to_reference(ran["out"].loss, ref.loss, tol="float32_fused_vs_eager_loss")


# ---------------------------------------------------------------------------------
# convergence (Liger-Kernel style), profiler, round trip
# ---------------------------------------------------------------------------------


def test_clip_convergence():
    """20 AdamW steps of HF CLIP (eager attention, HF loss) vs the same 20 steps after
    apply_to_clip (padded text through masked_select_rows + varlen, images as dense
    varlen, the loss from info_nce)."""
    figures = check_convergence(clip_for_training, clip_batch, clip_loss, clip_logits, clip_batch(99),
                                (*VARLEN, "mmkernels::masked_select_rows",
                                 "mmkernels::info_nce_fwd", "mmkernels::info_nce_bwd"),
                                apply=mmhf.apply_to_clip)
    report("HF CLIP", figures)


def test_llava_packed_convergence():
    """20 steps of HF LLaVA on packed batches: eager (HF's packed mask from
    position_ids) vs apply_to_llava (varlen from cu_seq_lens, scatter_image_features)."""
    figures = check_convergence(llava_for_training, llava_batch, llava_loss, llava_logits,
                                llava_batch(99, lens=(11, 6, 8)),
                                (*VARLEN, "mmkernels::scatter_image_features"),
                                apply=mmhf.apply_to_llava)
    report("HF LLaVA packed", figures)


def _applied_then_run(apply, run):
    """apply, then run the patched model once (the round trip must also undo whatever a
    patched forward leaves behind)."""
    def go(model):
        changes = apply(model)
        with torch.no_grad():
            run(model)
        return changes
    go.__name__ = apply.__name__
    return go


@pytest.mark.parametrize("kind", ["clip", "siglip", "llava"])
def test_revert_is_exact(kind):
    if kind == "llava":
        model, apply = tiny_llava(attn="sdpa"), mmhf.apply_to_llava
        batch = llava_batch(5)
        run = lambda m: m(**batch).logits  # noqa: E731
    else:
        model, apply = tiny_clip(attn="sdpa", siglip=kind == "siglip"), mmhf.apply_to_clip
        batch = clip_batch(5)
        run = lambda m: torch.stack([m(**batch).loss, m(**batch).logits_per_image.sum()])  # noqa: E731
    with torch.no_grad():
        run(model)  # transformers installs its output-capturing hooks on a first forward
    configs = [c._attn_implementation for _, c in mmhf._configs(model)]
    dicts = {n: dict(m.__dict__) for n, m in model.named_modules()}
    check_round_trip(model, run, apply=_applied_then_run(apply, run), undo=mmhf.revert)
    assert [c._attn_implementation for _, c in mmhf._configs(model)] == configs == ["sdpa"] * len(configs)
    for n, m in model.named_modules():  # the same attributes, the same objects
        assert m.__dict__.keys() == dicts[n].keys(), n
        assert all(m.__dict__[k] is v for k, v in dicts[n].items() if k != "_parameters"), n
    with pytest.raises(ValueError, match="no mmkernels integration"):
        mmhf.revert(model)


def test_revert_restores_an_instance_forward():
    """A forward already set on the instance (as accelerate's hooks do) comes back."""
    model = tiny_clip()
    own = model.forward
    model.forward = own
    changes = mmhf.apply_to_clip(model)
    assert [c.name for c in changes][-1] == "model.forward"
    assert model.forward is not own
    mmhf.revert(model)
    assert model.__dict__["forward"] is own


def test_applied_model_can_be_copied_and_reverted_alone():
    model = tiny_clip(attn="sdpa")
    mmhf.apply_to_clip(model)
    twin = copy.deepcopy(model)
    restored = mmhf.revert(twin)
    assert {c.name for c in restored} >= {"config._attn_implementation", "model.forward"}
    assert "forward" not in twin.__dict__ and twin.config.text_config._attn_implementation == "sdpa"
    assert model.__dict__["forward"].__self__ is model  # the original keeps its patch
    assert model.config.text_config._attn_implementation == mmhf.NAME


# ---------------------------------------------------------------------------------
# batch layouts
# ---------------------------------------------------------------------------------


def test_padded_clip_text_equals_eager():
    """Right-padded text with an attention mask (the causal CLIP text tower): the real
    positions and the pooled output equal eager attention's."""
    eager = tiny_clip()
    fused = copy.deepcopy(eager)
    mmhf.apply_to_clip(fused)
    batch = clip_batch(3)
    real = batch["attention_mask"].bool()
    assert not real.all()
    with torch.no_grad():
        e = eager.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        f = fused.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert_close_to_reference(f.last_hidden_state[real], e.last_hidden_state[real],
                              tol="float32_fused_vs_eager")
    assert_close_to_reference(f.pooler_output, e.pooler_output, tol="float32_fused_vs_eager")


def tiny_llama(attn: str, **kw) -> LlamaModel:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)
    model = LlamaModel(cfg).eval()
    model.set_attn_implementation(attn)
    return model


def test_padded_llama_left_padding_and_gqa_equals_eager():
    eager, fused = tiny_llama("eager"), tiny_llama(mmhf.NAME)
    ids = torch.randint(0, 64, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, :1] = 0
    with torch.no_grad():
        e = eager(input_ids=ids, attention_mask=mask).last_hidden_state
        f = fused(input_ids=ids, attention_mask=mask).last_hidden_state
    assert_close_to_reference(f[mask.bool()], e[mask.bool()], tol="float32_fused_vs_eager")


def test_packed_via_position_ids_only():
    """(1, T) input_ids with position_ids restarting per sample and no flash kwargs:
    the same as the flash-kwargs run and as eager (HF's packed mask, which HF builds only
    without a cache: use_cache=False, as in training)."""
    eager, fused = tiny_llama("eager"), tiny_llama(mmhf.NAME)
    batch = pack([torch.randint(0, 64, (n,)) for n in (5, 8, 3)])
    common = dict(input_ids=batch["input_ids"], use_cache=False)
    with torch.no_grad():
        e = eager(**common, position_ids=batch["position_ids"]).last_hidden_state
        by_pos = fused(**common, position_ids=batch["position_ids"]).last_hidden_state
        flash = {k: batch[k] for k in mmhf._FLASH_VARLEN_KWARGS}
        by_cu = fused(**common, position_ids=batch["position_ids"], **flash).last_hidden_state
        # without position_ids the batch is one sequence: packing must change the result
        whole = fused(**common).last_hidden_state
    assert_close_to_reference(by_pos, e, tol="float32_fused_vs_eager")
    assert torch.equal(by_pos, by_cu)
    assert not torch.allclose(whole, e, atol=1e-3)


def test_decoding_with_cache_equals_eager():
    """Generation-style calls: a prefill then two tokens over the KV cache (L_q < L_k,
    bottom-right causal), without padding and with a left-padded row."""
    eager, fused = tiny_llama("eager"), tiny_llama(mmhf.NAME)
    ids = torch.randint(0, 64, (2, 8))
    for mask in (None, torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8])):
        outs = []
        with torch.no_grad():
            for m in (eager, fused):
                pre = m(input_ids=ids[:, :6], use_cache=True,
                        attention_mask=None if mask is None else mask[:, :6])
                outs.append(m(input_ids=ids[:, 6:], cache=pre.cache, use_cache=True,
                              attention_mask=mask).last_hidden_state)
        assert_close_to_reference(outs[1], outs[0], tol="float32_fused_vs_eager")


def test_packing_kwargs_do_not_reach_the_vision_tower():
    """HF LLaVA forwards **kwargs (the text's cu_seq_lens) to the vision tower: with only
    set_attn_implementation that is a clear error; apply_to_llava keeps them to the LM."""
    model = tiny_llava(attn=mmhf.NAME)
    batch = llava_batch(1)
    with pytest.raises(ValueError, match="apply_to_llava"):
        model(**batch)
    mmhf.apply_to_llava(model)
    eager = tiny_llava()
    with torch.no_grad():
        assert_close_to_reference(model(**batch).logits, eager(**batch).logits,
                                  tol="float32_fused_vs_eager")


# ---------------------------------------------------------------------------------
# kwargs: honoured or raising
# ---------------------------------------------------------------------------------


class _Module(torch.nn.Module):
    def __init__(self, is_causal: bool, config=None):
        super().__init__()
        self.is_causal, self.config = is_causal, config


def _reference(query, key, value, scale, causal):
    L = query.shape[2]
    visible = torch.ones(L, L, dtype=torch.bool)
    if causal:
        visible = visible.tril()
    return _eager_attention(query, key, value, visible, scale, 0.0).transpose(1, 2)


@pytest.mark.parametrize("module_causal", [False, True], ids=["module-bidirectional", "module-causal"])
@pytest.mark.parametrize("is_causal", [None, False, True], ids=["kw-none", "kw-false", "kw-true"])
def test_scaling_and_is_causal_are_honoured(module_causal, is_causal):
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    out, weights = mmhf.attention_forward(_Module(module_causal), q, k, v, None, scaling=0.3,
                                          is_causal=is_causal)
    assert weights is None and out.shape == (2, 6, 4, 8)
    causal = module_causal if is_causal is None else is_causal
    assert_close_to_reference(out, _reference(q, k, v, 0.3, causal), tol="float32_fused_vs_eager")


def test_dropout_is_passed_and_zero_in_eval(monkeypatch):
    """CLIP passes dropout=config.attention_dropout in training and 0.0 in eval: eval
    equals eager; training hands the probability to varlen_attention."""
    eager = tiny_clip(attention_dropout=0.5).eval()
    fused = copy.deepcopy(eager)
    mmhf.apply_to_clip(fused)
    batch = clip_batch(2)
    with torch.no_grad():
        assert_close_to_reference(fused(**batch).logits_per_image, eager(**batch).logits_per_image,
                                  tol="float32_fused_vs_eager")
    seen = []
    import mmkernels.models.layers as layers

    real = layers.varlen_attention

    def spy(*args, **kwargs):
        seen.append(kwargs["dropout_p"])
        return real(*args, **kwargs)

    monkeypatch.setattr(layers, "varlen_attention", spy)
    fused.train()
    fused.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert seen == [0.5, 0.5]  # two text layers, config.attention_dropout


def _both(model):
    """The model with our attention, and a copy with transformers' eager attention."""
    model.set_attn_implementation(mmhf.NAME)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    return model, eager


def test_sliding_window_is_honoured():
    """Mistral with a window shorter than the sequences equals transformers' eager
    attention (its mask: i - j < sliding_window), padded, unpadded and packed (the
    window's gradients: tests/test_varlen_attention.py against the float64 reference)."""
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    model, eager = _both(MistralModel(MistralConfig(sliding_window=3, **cfg)).eval())
    ids = torch.randint(0, 64, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    for kw in ({}, {"attention_mask": mask}):
        got = model(input_ids=ids, use_cache=False, **kw).last_hidden_state
        want = eager(input_ids=ids, use_cache=False, **kw).last_hidden_state
        rows = slice(None) if not kw else mask.bool()
        assert_close_to_reference(got[rows], want[rows], tol="float32_fused_vs_eager")
    # the window really masks: without it the outputs differ
    wide, _ = _both(MistralModel(MistralConfig(sliding_window=None, **cfg)).eval())
    wide.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(wide(input_ids=ids).last_hidden_state,
                                  model(input_ids=ids).last_hidden_state, atol=1e-3)
    # packed: the window applies inside each sample
    batch = pack([torch.randint(0, 64, (n,)) for n in (7, 5)])
    flash = {k: batch[k] for k in mmhf._FLASH_VARLEN_KWARGS}
    with torch.no_grad():
        got = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                    use_cache=False, **flash).last_hidden_state[0]
        for s, (a, b) in enumerate(((0, 7), (7, 12))):
            alone = eager(input_ids=batch["input_ids"][:, a:b], use_cache=False).last_hidden_state[0]
            assert_close_to_reference(got[a:b], alone, tol="float32_fused_vs_eager",
                                      what=f"sample {s}")


def _ref64_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     sliding_window=None, softcap=None, is_causal=None, **kwargs):
    """A float64 reference attention for transformers (no padding): causal, the sliding
    window (i - j < w) and tanh soft-capping, all in the inputs' dtype. transformers'
    own eager attention runs its softmax in float32 even for a float64 model, which
    Gemma-2's final norm amplifies in the gradients (measured: 10% on some weights), so
    the gradients are checked against this instead."""
    L = query.shape[2]
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    visible = j <= i
    if sliding_window is not None:
        visible &= i - j < sliding_window
    rep = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    scores = query @ k.transpose(-1, -2) * scaling
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)
    return (probs @ v).transpose(1, 2), None


def test_softcap_is_honoured(monkeypatch):
    """Gemma-2 (attn_logit_softcapping, GQA, sliding-window layers): the forward equals
    transformers' eager attention; in float64 on the CPU path the forward and every
    gradient equal a float64 reference attention; the capping really acts."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       max_position_embeddings=64, attn_logit_softcapping=1.5, sliding_window=4,
                       query_pre_attn_scalar=16)
    model, eager = _both(Gemma2Model(cfg).eval())
    ids = torch.randint(1, 64, (2, 7))
    with torch.no_grad():
        assert_close_to_reference(model(input_ids=ids, use_cache=False).last_hidden_state,
                                  eager(input_ids=ids, use_cache=False).last_hidden_state,
                                  tol="float32_fused_vs_eager")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # float64: the CPU path
    AttentionInterface.register("ref64", _ref64_attention)
    AttentionMaskInterface.register("ref64", mmhf.flash_attention_mask)
    ours64 = model.double()
    ref64 = copy.deepcopy(ours64)
    ref64.set_attn_implementation("ref64")
    outs = []
    for m in (ours64, ref64):
        out = m(input_ids=ids, use_cache=False).last_hidden_state
        out.square().sum().backward()
        outs.append(out.detach())
    assert_close_to_reference(outs[0], outs[1], what="last_hidden_state")  # the float64 table
    for (n, p), (_, pr) in zip(ours64.named_parameters(), ref64.named_parameters(), strict=True):
        assert_close_to_reference(p.grad, pr.grad, what=n)
    q = torch.randn(1, 2, 3, 8) * 4
    capped, _ = mmhf.attention_forward(_Module(True), q, q, q, None, softcap=0.5)
    plain, _ = mmhf.attention_forward(_Module(True), q, q, q, None, softcap=0.0)  # 0: none
    assert_close_to_reference(plain, _reference(q, q, q, 8 ** -0.5, True),
                              tol="float32_fused_vs_eager")
    assert not torch.allclose(capped, plain, atol=1e-3)


def test_padded_cross_attention_equals_eager():
    """BART's decoder cross-attends to a padded encoder (L_q != L_k, not causal): every
    decoder query is real, only the encoder keys are masked."""
    from transformers import BartConfig, BartModel

    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                     decoder_ffn_dim=64, max_position_embeddings=64)
    model, eager = _both(BartModel(cfg).eval())
    ids = torch.randint(3, 64, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 5:] = 0
    for dec_len in (4, 11):  # shorter and longer than the encoder
        dec = torch.randint(3, 64, (2, dec_len))
        with torch.no_grad():
            assert_close_to_reference(
                model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).last_hidden_state,
                eager(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).last_hidden_state,
                tol="float32_fused_vs_eager")


def test_collator_block_ids_reach_the_attention():
    """block_ids from mmkernels.data make each image's tokens one bidirectional block in
    a causal LM (one layer: exactly the image tokens that gain a later token of their
    block change); without packing they raise instead of being ignored."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = LlamaModel(cfg).eval()
    model.set_attn_implementation(mmhf.NAME)
    collate = VLMPackingCollator(63, 3, bidirectional_images=True)
    image = torch.randn(1, 3, 4, 4)
    batch = collate([{"input_ids": [1, 63, 5, 6], "pixel_values": image},
                     {"input_ids": [7, 63, 9], "pixel_values": image}])
    flash = {k: batch[k] for k in mmhf._FLASH_VARLEN_KWARGS}
    kw = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    with torch.no_grad():
        plain = model(**kw, **flash).last_hidden_state[0]
        blocks = model(**kw, **flash, block_ids=batch["block_ids"]).last_hidden_state[0]
    changed = (plain - blocks).abs().amax(-1) > 1e-6
    bid = batch["block_ids"]
    last_of_block = torch.cat([bid[1:] != bid[:-1], torch.tensor([True])])
    assert torch.equal(changed, (bid != 0) & ~last_of_block), (changed, bid)
    with pytest.raises(ValueError, match="block_ids"):
        model(input_ids=batch["input_ids"], block_ids=batch["block_ids"], use_cache=False)


def test_unsupported_inputs_raise():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="4-D mask"):
        mmhf.attention_forward(_Module(False), q, q, q, torch.zeros(1, 1, 3, 3))
    with pytest.raises(ValueError, match="s_aux"):
        mmhf.attention_forward(_Module(False), q, q, q, None, s_aux=torch.zeros(2))
    with pytest.raises(TypeError, match="CLIPModel or SiglipModel"):
        mmhf.apply_to_clip(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        mmhf.apply_to_llava(tiny_clip())
    model = tiny_clip()
    mmhf.apply_to_clip(model)
    with pytest.raises(ValueError, match="already applied"):
        mmhf.apply_to_clip(model)


# ---------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------


def test_siglip_loss_uses_sigmoid_contrastive():
    eager = tiny_clip(siglip=True)
    fused = copy.deepcopy(eager)
    mmhf.apply_to_clip(fused)
    batch = dict(clip_batch(4), attention_mask=None)  # SigLIP pools the last token: no padding mask
    le = eager(**batch).loss
    ran = {}
    names = executed_ops(lambda: ran.update(loss=fused(**batch).loss))
    assert "mmkernels::sigmoid_contrastive_fwd" in names
    assert not any("info_nce" in n for n in names)
    assert_close_to_reference(ran["loss"], le, tol="float32_fused_vs_eager_loss")
    le.backward()
    ran["loss"].backward()
    for (n, pe), pf in zip(eager.named_parameters(), fused.parameters()):
        assert_close_to_reference(pf.grad, pe.grad, tol="float32_fused_vs_eager_grads", what=n)
    # return_dict=False: the loss leads the tuple, as transformers'; return_loss may
    # come positionally (input_ids, pixel_values, attention_mask, position_ids, return_loss)
    with torch.no_grad():
        tup = fused(**batch, return_dict=False)
        positional = fused(batch["input_ids"], batch["pixel_values"], None, None, True).loss
    assert isinstance(tup, tuple) and torch.equal(tup[0], ran["loss"].detach())
    assert torch.equal(positional, ran["loss"].detach())


def test_distributed_loss_two_processes(tmp_path):
    """2 gloo ranks, each with half the batch: apply_to_clip(process_group=WORLD) gives
    losses whose mean is the eager global-batch loss and, averaged over the ranks, its
    gradients (CLIP and SigLIP). Without a group the loss stays local, as HF's."""
    res = run_ranks(WORKER, 2, [str(tmp_path)], tmp_path)
    for kind in ("clip", "siglip"):
        ref = res[0][kind]["global"]
        mean = sum(r[kind]["loss"] for r in res) / 2
        assert abs(mean - ref["loss"]) <= CONVERGENCE["loss_rtol"] * abs(ref["loss"]), kind
        for r in res:
            for n, g in r[kind]["grads"].items():
                assert_close_to_reference(g, ref["grads"][n], what=f"{kind} {n}",
                                          tol="float32_distributed_vs_single_grads")
            local = r[kind]["local"]
            assert abs(local["ours"] - local["hf"]) <= CONVERGENCE["loss_rtol"] * abs(local["hf"]), kind
            assert abs(local["ours"] - r[kind]["loss"]) > 1e-4  # distributed != local
