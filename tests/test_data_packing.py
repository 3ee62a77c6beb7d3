"""mmkernels.data.VLMPackingCollator: the packed layout on a hand-written example, its
validation, and the reference LLaVA on packs: a packed forward equals the per-sample
forwards (eager and patched), and no sample sees another."""

from __future__ import annotations

import copy

import pytest
import torch

from mmkernels.data import IGNORE_INDEX, VLMPackingCollator, image_block_ids
from mmkernels.models import patch
from mmkernels.models.llava import Llava, LlavaConfig
from mmkernels.models.llava import synthetic_samples as random_samples
from mmkernels.testing import TOLERANCES

ATOL, RTOL = TOLERANCES[torch.float32]
X = IGNORE_INDEX
IMG = 9  # the hand-written example's placeholder, 2 tokens per image
TINY_IMG = LlavaConfig().image_token_id  # the tiny model's placeholder (the last id)


def _images(n, fill):
    return torch.full((n, 3, 4, 4), float(fill))


def _hand_samples(expanded=False):
    def ids(seq):  # a placeholder -> 2 copies when the input is already expanded
        return [t for x in seq for t in ([x, x] if expanded and x == IMG else [x])]

    return [
        {"input_ids": ids([5, IMG, 6, 7]), "pixel_values": _images(1, 1.0), "prompt_length": 2},
        {"input_ids": torch.tensor([1, 2, 3]), "prompt_length": 2},
        {"input_ids": ids([IMG, 4, IMG]), "pixel_values": _images(2, 2.0), "prompt_length": 0},
    ]


@pytest.mark.parametrize("expanded", [False, True], ids=["placeholders", "expanded"])
def test_hand_written_pack(expanded):
    prompt_lengths = [3, 2, 0] if expanded else [2, 2, 0]
    samples = _hand_samples(expanded)
    for s, p in zip(samples, prompt_lengths):
        s["prompt_length"] = p
    collate = VLMPackingCollator(IMG, 2, ignore_prompt=True, bidirectional_images=True,
                                 expanded=expanded)
    b = collate(samples)
    assert b["input_ids"].tolist() == [[5, IMG, IMG, 6, 7, 1, 2, 3, IMG, IMG, 4, IMG, IMG]]
    assert b["input_ids"].dtype == torch.int64
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4]]
    assert b["labels"].tolist() == [[X, X, X, 6, 7, X, X, 3, X, X, 4, X, X]]
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert b[key].dtype == torch.int32 and b[key].tolist() == [0, 5, 8, 13]
    assert b["max_length_q"] == b["max_length_k"] == 5 and type(b["max_length_q"]) is int
    assert b["block_ids"].dtype == torch.int32
    assert b["block_ids"].tolist() == [0, 1, 1, 0, 0, 0, 0, 0, 2, 2, 0, 3, 3]
    assert torch.equal(b["pixel_values"], torch.cat([_images(1, 1.0), _images(2, 2.0)]))


def test_defaults_keep_prompt_and_omit_blocks():
    b = VLMPackingCollator(IMG, 2)(_hand_samples())
    assert b["labels"].tolist() == [[X, X, X, 6, 7, X, 2, 3, X, X, 4, X, X]]
    assert "block_ids" not in b
    text_only = VLMPackingCollator(IMG, 2)([{"input_ids": [1, 2]}, {"input_ids": [3]}])
    assert "pixel_values" not in text_only
    assert text_only["labels"].tolist() == [[X, 2, X]]


def test_image_block_ids_runs():
    mask = torch.tensor([0, 1, 1, 1, 1, 0, 1, 1], dtype=torch.bool)  # two adjacent images
    assert image_block_ids(mask, 2).tolist() == [0, 1, 1, 2, 2, 0, 3, 3]
    assert image_block_ids(mask[None], 2).shape == (8,)


def _sample(**kw):
    return {"input_ids": [1, IMG, 2], "pixel_values": _images(1, 0.5), **kw}


@pytest.mark.parametrize("samples, kwargs, error, match", [
    ([], {}, ValueError, "samples is empty"),
    ({"input_ids": [1]}, {}, TypeError, "list of dicts"),
    ([{"input_ids": []}], {}, ValueError, "sample 0 is empty"),
    ([_sample(), {"pixel_values": _images(1, 0.0)}], {}, ValueError, "sample 1 has no input_ids"),
    ([{"input_ids": [1, IMG, IMG]}], {}, ValueError, "2 image placeholder.*0 image"),
    ([_sample(input_ids=[1, 2])], {}, ValueError, "0 image placeholder.*1 image"),
    ([_sample(input_ids=[1, IMG, IMG, 2])], {}, ValueError, "already expanded"),
    ([_sample()], {"expanded": True}, ValueError, "1 image.*need 1 x 2"),
    ([{"input_ids": [IMG, 1, IMG], "pixel_values": _images(1, 0.0)}], {"expanded": True},
     ValueError, "not a whole number"),
    ([_sample(input_ids=torch.tensor([1.0, 9.0]))], {}, TypeError, "integer token ids"),
    ([_sample(input_ids=[1, 9.0])], {}, TypeError, "must hold ints"),
    ([_sample(input_ids="abc")], {}, TypeError, "list of ints"),
    ([_sample(input_ids=[-1, IMG])], {}, ValueError, "non-negative"),
    ([_sample(pixel_values=torch.zeros(1, 3, 4, 4, dtype=torch.uint8))], {}, TypeError,
     "floating point"),
    ([_sample(pixel_values=torch.zeros(4, 4))], {}, ValueError, "num_images, C, H, W"),
    ([_sample(), _sample(pixel_values=torch.zeros(1, 3, 8, 8))], {}, ValueError,
     "sample 1: pixel_values .* differ"),
    ([_sample()], {"ignore_prompt": True}, ValueError, "no prompt_length"),
    ([_sample(prompt_length=4)], {"ignore_prompt": True}, ValueError, r"prompt_length .*\[0, 3\]"),
    ([_sample(prompt_length=1.0)], {"ignore_prompt": True}, ValueError, "prompt_length"),
], ids=["no-samples", "not-a-list", "empty-sample", "no-input-ids", "placeholders-no-images",
        "images-no-placeholder", "expanded-hint", "expanded-count", "expanded-run",
        "float-tensor-ids", "float-in-list", "string-ids", "negative-id", "int-pixels",
        "pixels-rank", "image-size-mismatch", "missing-prompt-length", "prompt-too-long",
        "prompt-float"])
def test_validation(samples, kwargs, error, match):
    with pytest.raises(error, match=match):
        VLMPackingCollator(IMG, 2, **kwargs)(samples)


@pytest.mark.parametrize("kwargs, match", [
    ({"image_token_id": -1, "num_image_tokens": 2}, "image_token_id"),
    ({"image_token_id": 9, "num_image_tokens": 0}, "num_image_tokens"),
    ({"image_token_id": 9, "num_image_tokens": True}, "num_image_tokens"),
])
def test_constructor_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VLMPackingCollator(**kwargs)


# ---------------------------------------------------------------------------------
# the reference LLaVA on packs
# ---------------------------------------------------------------------------------


def _setup(patched: bool, bidirectional: bool, seed: int):
    """(model in eval mode, its collator, 3 samples, their pack)."""
    torch.manual_seed(0)
    model = Llava(LlavaConfig(bidirectional_images=bidirectional)).eval()
    if patched:
        assert patch(model)
    collate = model.config.collator(ignore_prompt=True)
    samples = random_samples(model.config, seed=seed)
    return model, collate, samples, collate(samples)


VARIANTS = [(p, b) for p in (False, True) for b in (False, True)]
VARIANT_IDS = [f"{'patched' if p else 'eager'}-{'bidir' if b else 'causal'}" for p, b in VARIANTS]


@pytest.mark.parametrize("patched, bidirectional", VARIANTS, ids=VARIANT_IDS)
def test_packed_forward_equals_per_sample_forwards(patched, bidirectional):
    model, collate, samples, packed = _setup(patched, bidirectional, seed=1)
    with torch.no_grad():
        out = model(**packed)
        singles = [collate([s]) for s in samples]
        alone = [model(**b) for b in singles]
    cu = packed["cu_seq_lens_q"].tolist()
    total_loss, total_labels = 0.0, 0
    for i, (single, res) in enumerate(zip(singles, alone)):
        a, b = cu[i], cu[i + 1]
        assert torch.equal(packed["labels"][0, a:b], single["labels"][0]), f"sample {i} labels"
        assert torch.equal(packed["input_ids"][0, a:b], single["input_ids"][0])
        assert torch.equal(packed["position_ids"][0, a:b], single["position_ids"][0])
        torch.testing.assert_close(out.logits[0, a:b], res.logits[0], atol=ATOL, rtol=RTOL,
                                   msg=lambda m, i=i: f"sample {i} logits: {m}")
        n = int((single["labels"][0, 1:] != X).sum())
        total_loss, total_labels = total_loss + float(res.loss) * n, total_labels + n
    # the packed loss is the token-weighted mean of the per-sample losses
    torch.testing.assert_close(float(out.loss), total_loss / total_labels, atol=ATOL, rtol=RTOL)


def _perturbed(samples, i, seed):
    g = torch.Generator().manual_seed(seed)
    s = copy.deepcopy(samples)
    ids = s[i]["input_ids"]
    shift = [1 + int(torch.randint(0, 5, (1,), generator=g)) for _ in ids]
    s[i]["input_ids"] = [t if t == TINY_IMG else (t + d) % TINY_IMG for t, d in zip(ids, shift)]
    if "pixel_values" in s[i]:
        s[i]["pixel_values"] = torch.randn(s[i]["pixel_values"].shape, generator=g)
    return s


@pytest.mark.parametrize("patched, bidirectional", VARIANTS, ids=VARIANT_IDS)
def test_no_attention_across_samples(patched, bidirectional):
    model, collate, samples, base = _setup(patched, bidirectional, seed=2)
    cu = base["cu_seq_lens_q"].tolist()
    with torch.no_grad():
        ref = model(**base).logits[0]
        for changed in range(len(samples)):
            batch = collate(_perturbed(samples, changed, seed=changed))
            assert torch.equal(batch["cu_seq_lens_q"], base["cu_seq_lens_q"])
            logits = model(**batch).logits[0]
            for i in range(len(samples)):
                a, b = cu[i], cu[i + 1]
                if i == changed:
                    assert not torch.allclose(logits[a:b], ref[a:b]), "the perturbation did nothing"
                else:  # bit for bit: nothing of sample `changed` reaches sample i
                    assert torch.equal(logits[a:b], ref[a:b]), (
                        f"changing sample {changed} changed sample {i}'s logits by "
                        f"{float((logits[a:b] - ref[a:b]).abs().max()):.3e}")
