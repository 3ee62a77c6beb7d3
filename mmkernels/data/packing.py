"""Padding-free packing of vision-language samples (LLaVA-style) into one row.

Hugging Face's ``DataCollatorWithFlattening`` packs text only. :class:`VLMPackingCollator`
does the same for samples with images: it expands every image placeholder to the
image's feature tokens, and returns the tensors that :func:`mmkernels.varlen_attention`
(through :class:`mmkernels.models.llava.Llava`, or Hugging Face models with a
flash-attention style implementation) needs to keep the samples apart, under the
field names Hugging Face uses.

Layout of a pack of S samples, T tokens in all (after expansion)::

    input_ids     (1, T) int64   the samples one after the other; each image placeholder
                                 replaced by ``num_image_tokens`` copies of it
    position_ids  (1, T) int64   0, 1, ... restarting at every sample (images included:
                                 an image's tokens take consecutive positions)
    labels        (1, T) int64   input_ids, with -100 at image tokens, at prompt tokens
                                 (``ignore_prompt``) and at the first token of every sample
    cu_seq_lens_q (S + 1,) int32 sample offsets: 0, len_0, len_0 + len_1, ..., T
    cu_seq_lens_k (S + 1,) int32 the same values (self-attention)
    max_length_q  int            the longest sample
    max_length_k  int            the same
    block_ids     (T,) int32     only with ``bidirectional_images``: 1, 2, ... one id per
                                 image (in pack order), 0 at text tokens
    pixel_values  (N, 3, H, W)   every sample's images, in order (absent when the pack
                                 has none)

Label convention (Hugging Face's): ``labels`` are aligned with ``input_ids``, not
shifted; the model predicts ``labels[t + 1]`` from position t. The -100 at the first
token of every sample is what keeps that shift from crossing a sample boundary (the
last token of sample s is never trained to predict the first token of sample s + 1),
exactly as ``DataCollatorWithFlattening``'s ``separator_id``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["VLMPackingCollator", "image_block_ids", "IGNORE_INDEX"]

#: The label that cross-entropy ignores (``torch.nn.CrossEntropyLoss``'s default).
IGNORE_INDEX = -100


def image_block_ids(image_mask: Tensor, tokens_per_image: int) -> Tensor:
    """One block id per image: (T,) int32, 0 at text tokens, ``1 + i`` at the tokens of
    the i-th image of the pack (images numbered in order).

    ``image_mask``: (T,) or (1, T) bool, True at image tokens, which come in runs of
    exactly ``tokens_per_image`` per image (two adjacent images make one run of twice
    that). No host synchronisation (works under ``torch.compile``).
    """
    if not isinstance(image_mask, Tensor) or image_mask.dtype != torch.bool:
        raise TypeError("image_mask must be a bool Tensor")
    if isinstance(tokens_per_image, bool) or not isinstance(tokens_per_image, int) \
            or tokens_per_image < 1:
        raise ValueError(f"tokens_per_image must be a positive int, got {tokens_per_image!r}")
    mask = image_mask.reshape(-1)
    rank = torch.cumsum(mask.to(torch.int32), 0, dtype=torch.int32)  # 1-based at image tokens
    ids = torch.div(rank - 1, tokens_per_image, rounding_mode="floor") + 1
    return torch.where(mask, ids, torch.zeros_like(ids))


def _as_id_list(value, name: str) -> list[int]:
    if isinstance(value, Tensor):
        if value.dim() != 1:
            raise ValueError(f"{name} must be 1-d, got shape {tuple(value.shape)}")
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer token ids, got dtype {value.dtype}")
        return value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list of ints or a 1-d integer Tensor, got "
                        f"{type(value).__name__}")
    for t in value:
        if isinstance(t, bool) or not isinstance(t, int):
            raise TypeError(f"{name} must hold ints, got {type(t).__name__} {t!r}")
    return list(value)


class VLMPackingCollator:
    """Pack vision-language samples into one padding-free row (see the module docstring
    for the output layout).

    Args:
        image_token_id: the placeholder token id of an image (``<image>``).
        num_image_tokens: feature tokens per image (the vision tower's patch count
            after feature selection, e.g. (336 / 14)^2 = 576 for LLaVA-1.5).
        ignore_prompt: also set -100 at the first ``prompt_length`` tokens of each
            sample (every sample must then carry ``prompt_length``).
        bidirectional_images: also return ``block_ids``, so that, under causal
            attention, the tokens of one image see each other both ways.
        expanded: False (default): each image is ONE placeholder in ``input_ids``, and the
            collator expands it. True: ``input_ids`` already hold ``num_image_tokens``
            placeholders per image (a Hugging Face LLaVA processor's output); they are
            validated and kept.

    Each sample is a mapping with:
        ``input_ids``: list of ints or 1-d integer Tensor, not empty; one placeholder per
            image (``expanded=False``) in the order of ``pixel_values``.
        ``pixel_values``: optional (num_images, 3, H, W) floating Tensor (one image may be
            given as (3, H, W)); absent or None for a text-only sample. All images of a
            pack share (3, H, W) and dtype.
        ``prompt_length``: optional int in [0, len(input_ids)]: how many leading tokens of
            ``input_ids`` (as given, before expansion: an image placeholder inside the
            prompt counts once) are prompt. Used with ``ignore_prompt``.

    Returns the dict of tensors described in the module docstring (a fresh one per
    call; one packed row per call).

    Raises:
        ValueError / TypeError naming the sample and the field: no samples, an empty
        sample, a placeholder count that differs from the sample's images, non-integer
        ids, non-floating or mismatched images, a missing or out-of-range prompt_length.

    Example::

        collate = VLMPackingCollator(image_token_id=32000, num_image_tokens=576)
        loader = DataLoader(dataset, batch_size=8, collate_fn=collate)
        for batch in loader:
            loss = model(**batch).loss
    """

    def __init__(self, image_token_id: int, num_image_tokens: int, *, ignore_prompt: bool = False,
                 bidirectional_images: bool = False, expanded: bool = False) -> None:
        if isinstance(image_token_id, bool) or not isinstance(image_token_id, int) \
                or image_token_id < 0:
            raise ValueError(f"image_token_id must be a non-negative int, got {image_token_id!r}")
        if isinstance(num_image_tokens, bool) or not isinstance(num_image_tokens, int) \
                or num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be a positive int, got {num_image_tokens!r}")
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.ignore_prompt = bool(ignore_prompt)
        self.bidirectional_images = bool(bidirectional_images)
        self.expanded = bool(expanded)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(image_token_id={self.image_token_id}, "
                f"num_image_tokens={self.num_image_tokens}, ignore_prompt={self.ignore_prompt}, "
                f"bidirectional_images={self.bidirectional_images}, expanded={self.expanded})")

    # -- one sample ------------------------------------------------------------------

    def _images(self, sample: Mapping, i: int) -> Tensor | None:
        pv = sample.get("pixel_values")
        if pv is None:
            return None
        if not isinstance(pv, Tensor):
            raise TypeError(f"sample {i}: pixel_values must be a Tensor, got {type(pv).__name__}")
        if not pv.dtype.is_floating_point:
            raise TypeError(f"sample {i}: pixel_values must be floating point, got {pv.dtype}")
        if pv.dim() == 3:
            pv = pv[None]
        if pv.dim() != 4:
            raise ValueError(f"sample {i}: pixel_values must be (num_images, C, H, W), got shape "
                             f"{tuple(pv.shape)}")
        return pv

    def _expand(self, ids: list[int], prompt_length: int, n_images: int, i: int
                ) -> tuple[list[int], list[bool], int]:
        """(expanded ids, is-image flags, expanded prompt length)."""
        img, n = self.image_token_id, self.num_image_tokens
        count = ids.count(img)
        if self.expanded:
            if count != n_images * n:
                raise ValueError(f"sample {i}: input_ids hold {count} image tokens but its "
                                 f"{n_images} image(s) need {n_images} x {n} = {n_images * n} "
                                 "(expanded=True)")
            run = 0
            for t in [*ids, None]:
                if t == img:
                    run += 1
                    continue
                if run % n:
                    raise ValueError(f"sample {i}: a run of {run} image tokens is not a whole "
                                     f"number of images of {n} tokens (expanded=True)")
                run = 0
            return ids, [t == img for t in ids], prompt_length
        if count != n_images:
            hint = (" (already expanded? pass expanded=True)"
                    if n > 1 and count == n_images * n else "")
            raise ValueError(f"sample {i}: input_ids hold {count} image placeholder(s) "
                             f"(image_token_id={img}) but pixel_values has {n_images} "
                             f"image(s){hint}")
        out: list[int] = []
        flags: list[bool] = []
        expanded_prompt = 0
        for j, t in enumerate(ids):
            if j == prompt_length:
                expanded_prompt = len(out)
            reps = n if t == img else 1
            out.extend([t] * reps)
            flags.extend([t == img] * reps)
        if prompt_length == len(ids):
            expanded_prompt = len(out)
        return out, flags, expanded_prompt

    def _prompt_length(self, sample: Mapping, length: int, i: int) -> int:
        if not self.ignore_prompt:
            return 0
        if "prompt_length" not in sample:
            raise ValueError(f"sample {i} has no prompt_length (required by ignore_prompt=True)")
        p = sample["prompt_length"]
        if isinstance(p, Tensor) and p.numel() == 1 and not p.dtype.is_floating_point:
            p = int(p)
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= length:
            raise ValueError(f"sample {i}: prompt_length must be an int in [0, {length}] (the "
                             f"length of its input_ids), got {p!r}")
        return p

    # -- the pack --------------------------------------------------------------------

    def __call__(self, samples: Sequence[Mapping]) -> dict:
        if isinstance(samples, Mapping) or not isinstance(samples, Sequence):
            raise TypeError(f"samples must be a list of dicts, got {type(samples).__name__}")
        if len(samples) == 0:
            raise ValueError("samples is empty: nothing to pack")
        input_ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        is_image: list[bool] = []
        cu = [0]
        images: list[Tensor] = []
        for i, sample in enumerate(samples):
            if not isinstance(sample, Mapping):
                raise TypeError(f"sample {i} must be a dict, got {type(sample).__name__}")
            if "input_ids" not in sample:
                raise ValueError(f"sample {i} has no input_ids")
            ids = _as_id_list(sample["input_ids"], f"sample {i}: input_ids")
            if not ids:
                raise ValueError(f"sample {i} is empty (input_ids has no tokens)")
            if min(ids) < 0:
                raise ValueError(f"sample {i}: input_ids must be non-negative, got {min(ids)}")
            pv = self._images(sample, i)
            n_images = 0 if pv is None else pv.shape[0]
            if pv is not None and n_images:
                if images and (pv.shape[1:] != images[0].shape[1:] or pv.dtype != images[0].dtype):
                    raise ValueError(f"sample {i}: pixel_values {tuple(pv.shape[1:])} {pv.dtype} "
                                     f"differ from the pack's images {tuple(images[0].shape[1:])} "
                                     f"{images[0].dtype}")
                images.append(pv)
            prompt = self._prompt_length(sample, len(ids), i)
            ids, flags, prompt = self._expand(ids, prompt, n_images, i)
            lab = [IGNORE_INDEX if f or j < prompt else t for j, (t, f) in
                   enumerate(zip(ids, flags))]
            lab[0] = IGNORE_INDEX  # the shifted loss never predicts across samples
            input_ids += ids
            labels += lab
            is_image += flags
            positions += range(len(ids))
            cu.append(cu[-1] + len(ids))
        if cu[-1] > 2**31 - 1:
            raise ValueError(f"the pack has {cu[-1]} tokens; int32 cu_seq_lens address at most "
                             f"{2**31 - 1}")
        max_len = max(b - a for a, b in zip(cu, cu[1:]))
        batch = {
            "input_ids": torch.tensor([input_ids], dtype=torch.int64),
            "position_ids": torch.tensor([positions], dtype=torch.int64),
            "labels": torch.tensor([labels], dtype=torch.int64),
            "cu_seq_lens_q": torch.tensor(cu, dtype=torch.int32),
            "cu_seq_lens_k": torch.tensor(cu, dtype=torch.int32),
            "max_length_q": max_len,
            "max_length_k": max_len,
        }
        if self.bidirectional_images:
            batch["block_ids"] = image_block_ids(torch.tensor(is_image, dtype=torch.bool),
                                                 self.num_image_tokens)
        if images:
            batch["pixel_values"] = torch.cat(images)
        return batch
