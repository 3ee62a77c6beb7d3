"""Tiny LLaVA samples and packs shared by tests/models/test_llava.py and
tests/test_data_packing.py."""

from __future__ import annotations

import torch

from mmkernels.models.llava import LlavaConfig

#: images per sample of a pack: one, none (text only), two
IMAGES_PER_SAMPLE = (1, 0, 2)


def random_samples(cfg: LlavaConfig, seed: int, images=IMAGES_PER_SAMPLE,
                   prompt: bool = True) -> list[dict]:
    """One sample per entry of ``images``: the image placeholders (one per image) inside
    a short prompt, then a learnable answer (each token is the previous one + 1,
    modulo the text vocabulary), ``prompt_length`` covering the prompt."""
    g = torch.Generator().manual_seed(seed)
    text_vocab = cfg.image_token_id  # ids below the placeholder are text

    def randint(lo, hi):
        return int(torch.randint(lo, hi, (1,), generator=g))

    samples = []
    for n_images in images:
        prompt_ids = [randint(0, text_vocab) for _ in range(randint(1, 3))]
        for _ in range(n_images):
            prompt_ids.insert(randint(0, len(prompt_ids) + 1), cfg.image_token_id)
        start = randint(0, text_vocab)
        answer = [(start + i) % text_vocab for i in range(randint(3, 7))]
        sample = {"input_ids": prompt_ids + answer}
        if prompt:
            sample["prompt_length"] = len(prompt_ids)
        if n_images:
            sample["pixel_values"] = torch.randn(n_images, cfg.num_channels, cfg.image_size,
                                                 cfg.image_size, generator=g)
        samples.append(sample)
    return samples


def make_pack(cfg: LlavaConfig, seed: int, **collator_kwargs) -> dict:
    """The collated pack of :func:`random_samples` (prompt tokens ignored)."""
    collator_kwargs.setdefault("ignore_prompt", True)
    return cfg.collator(**collator_kwargs)(random_samples(cfg, seed))
