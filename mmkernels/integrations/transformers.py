"""Hugging Face transformers integration: ``attn_implementation="mmkernels"``,
:func:`apply_to_clip`, :func:`apply_to_llava` and :func:`revert`.

Importing this module registers the attention function (:func:`attention_forward`)
with ``transformers.AttentionInterface`` and its mask function with
``transformers.masking_utils.AttentionMaskInterface``, under the name ``"mmkernels"``,
so both of these work::

    import mmkernels.integrations.transformers  # registers "mmkernels"
    model = AutoModel.from_pretrained(name, attn_implementation="mmkernels")
    model.set_attn_implementation("mmkernels")   # on a model already loaded

The mask function is needed: a name missing from ``AttentionMaskInterface`` makes
``create_causal_mask`` return no mask at all, which silently drops causal and padding
masking. Ours is flash-attention's: ``None`` when nothing is padded, else the 2-D
padding mask, from which the rows are unpadded.

Batch layouts (checked in this order, as transformers' flash-attention path):
  1. a 2-D padding mask (B, L_k): the real rows of q, k and v are gathered with
     :func:`mmkernels.masked_select_rows`, attended with
     :func:`mmkernels.varlen_attention` and scattered back (zeros at padded query
     positions, as flash-attention; the eager path computes values there that no real
     token reads). L_q < L_k (a decoding step over a cache) takes the mask's last L_q
     columns for the queries (left padding, as transformers assumes);
  2. packed sequences given by the flash kwargs ``cu_seq_lens_q``, ``cu_seq_lens_k``,
     ``max_length_q``, ``max_length_k`` (all four; int32 or int64 tensors and ints or
     0-d tensors, as ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` and
     ``mmkernels.data`` emit them) on a (1, T) batch;
  3. packed sequences given by ``position_ids`` alone on a (1, T) batch: a sequence
     starts wherever a position is not its predecessor + 1 (the rule of transformers'
     eager/sdpa packed masks, ``find_packed_sequence_indices``). This reads the
     positions on the host in every layer, as transformers' flash path does; pass the
     flash kwargs to avoid it;
  4. otherwise B dense sequences (no copy).

Keyword arguments transformers passes to attention functions:
  * honoured: ``dropout`` (-> ``dropout_p``; the modules pass 0 in eval mode; the
    Philox mask differs from eager's torch RNG draws), ``scaling`` (-> softmax scale;
    None means 1/sqrt(D)), ``is_causal`` (None: the module's ``is_causal``, as
    flash-attention; bottom-right aligned when L_q != L_k), ``sliding_window`` (->
    ``window_size=(w - 1, w - 1)``: query i sees keys j with i - j < w, transformers'
    mask and its flash path; Mistral, Qwen2, Gemma-2 local layers), ``softcap`` (->
    tanh soft-capping of the scores, Gemma-2's ``attn_logit_softcapping``; None or 0:
    none), ``attention_mask`` (2-D padding mask or None), ``position_ids``,
    ``cu_seq_lens_q``, ``cu_seq_lens_k``, ``max_length_q``, ``max_length_k``,
    ``block_ids`` (packed batches only: :class:`mmkernels.data.VLMPackingCollator`'s
    bidirectional image blocks in causal models), ``deterministic``; grouped-query
    attention (k/v with fewer heads) runs natively, without repeating k and v.
  * raise ``ValueError`` (never ignored): ``s_aux`` (learned attention sinks), the
    paged-cache kwargs (``block_table``, ``k_cache``, ``v_cache``), a 4-D
    ``attention_mask`` (a custom mask the varlen kernel cannot express), value heads
    of another size than q's, packing kwargs on a batch of more than one row.
  * ignored because they do not change the result: ``output_attentions`` (attention
    weights are returned as None, as with sdpa and flash-attention), ``cache_position``,
    ``use_cache`` and other bookkeeping kwargs.

:func:`apply_to_clip` and :func:`apply_to_llava` switch a loaded model to this
attention and patch its loss or image merge; :func:`revert` undoes either exactly.
Requires transformers >= 5.24 (the ``LlavaModel.forward`` mirrored by
:func:`apply_to_llava` is 5.24's).
"""

from __future__ import annotations

import copy
import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

try:
    import transformers
except ImportError as e:  # the optional extra
    raise ImportError("mmkernels.integrations.transformers needs Hugging Face transformers: "
                      "pip install 'mmkernels[hf]'") from e
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from mmkernels.models.layers import padded_varlen_attention
from mmkernels.ops import contrastive as _contrastive
from mmkernels.ops.token_gather import scatter_image_features
from mmkernels.ops.varlen_attention import varlen_attention

__all__ = ["NAME", "attention_forward", "register", "apply_to_clip", "apply_to_llava", "revert",
           "Change"]

#: the ``attn_implementation`` name
NAME = "mmkernels"

#: the minimum transformers version (pyproject's ``[hf]`` extra)
MIN_TRANSFORMERS = "5.24"

# flash-attention varlen kwargs describing the packed text batch (transformers' names)
_FLASH_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")

def _version_tuple(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split(".")[:2]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


if _version_tuple(transformers.__version__) < _version_tuple(MIN_TRANSFORMERS):
    raise ImportError(f"mmkernels.integrations.transformers needs transformers >= {MIN_TRANSFORMERS}, "
                      f"found {transformers.__version__} (pip install 'mmkernels[hf]')")


# ---------------------------------------------------------------------------------
# the attention function
# ---------------------------------------------------------------------------------


def _check_kwargs(module: nn.Module, kwargs: dict) -> None:
    if kwargs.get("s_aux") is not None:
        raise ValueError(f"attn_implementation='{NAME}' does not implement learned attention sinks "
                         f"(s_aux, passed by {type(module).__name__}); use 'eager' or 'sdpa'")
    paged = [k for k in ("block_table", "k_cache", "v_cache") if kwargs.get(k) is not None]
    if paged:
        raise ValueError(f"attn_implementation='{NAME}' does not implement paged attention "
                         f"(got {', '.join(paged)}); use 'paged|eager' or a flash implementation")


def _window(sliding_window) -> tuple[int, int]:
    """transformers' sliding window as flash-attention's ``window_size``: query i sees
    keys j with i - j < sliding_window (``(w - 1, w - 1)``, as transformers' flash path;
    the right bound is the causal one in causal models)."""
    if sliding_window is None:
        return (-1, -1)
    w = int(sliding_window)
    if w < 1:
        raise ValueError(f"sliding_window must be a positive int, got {sliding_window!r}")
    return (w - 1, w - 1)


def _as_int(x) -> int:
    return int(x.item()) if isinstance(x, Tensor) else int(x)


def _cu_seqlens_from_positions(position_ids: Tensor) -> tuple[Tensor, int] | None:
    """(cu_seqlens (S + 1,) int32, longest length) of the sequences packed in a (1, T)
    ``position_ids``, or None when it holds one sequence. A sequence starts wherever a
    position is not its predecessor + 1 (transformers' packed-mask rule)."""
    pos = position_ids.reshape(-1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = pos[1:] != pos[:-1] + 1
    idx = starts.nonzero().flatten().to(torch.int32)
    if idx.numel() <= 1:
        return None
    end = torch.full((1,), pos.numel(), dtype=torch.int32, device=pos.device)
    cu = torch.cat([idx, end])
    return cu, int(cu.diff().max())


def attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, dropout: float = 0.0,
                      scaling: float | None = None, sliding_window: int | None = None,
                      softcap: float | None = None, is_causal: bool | None = None,
                      **kwargs) -> tuple[Tensor, None]:
    """The ``"mmkernels"`` attention function (transformers' AttentionInterface).

    Args:
        module: the calling attention module (``is_causal``, ``config``).
        query: (B, H, L_q, D); key, value: (B, H_kv, L_k, D), H % H_kv == 0, one float
            dtype (float16/bfloat16/float32).
        attention_mask: None, or (B, L_k) bool/int padding mask (1 = real token), as the
            registered mask function returns.
        dropout, scaling, sliding_window, softcap, is_causal and ``kwargs``: see the
            module docstring (honoured / raising / ignored).

    Returns:
        (attn_output (B, L_q, H, D) in query's dtype, None).
    """
    _check_kwargs(module, kwargs)
    B, H, Lq, D = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    if value.shape[-1] != D:
        raise ValueError(f"attn_implementation='{NAME}' needs value heads of q's size {D}, got "
                         f"{value.shape[-1]} ({type(module).__name__})")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    run = {"softmax_scale": scaling, "causal": causal, "dropout_p": float(dropout),
           "window_size": _window(sliding_window), "softcap": float(softcap or 0.0),
           "deterministic": bool(kwargs.get("deterministic") or False)}
    block_ids = kwargs.get("block_ids")  # mmkernels.data's bidirectional image blocks
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, L, H, D)
    packed_kwargs = all(kwargs.get(n) is not None for n in _FLASH_VARLEN_KWARGS)
    if block_ids is not None and not (packed_kwargs and attention_mask is None):
        raise ValueError(f"block_ids (image blocks) need a packed batch with cu_seq_lens_q/k "
                         f"and max_length_q/k (as mmkernels.data emits them) and no attention_mask; "
                         f"{type(module).__name__} got neither")
    if attention_mask is not None:
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (B, Lk):
            raise ValueError(f"attn_implementation='{NAME}' takes a (batch, kv_length) = ({B}, {Lk}) "
                             f"padding mask or None, got attention_mask of shape "
                             f"{tuple(attention_mask.shape)} (a custom 4-D mask cannot be expressed "
                             "by the varlen kernel; use 'eager' or 'sdpa')")
        out = padded_varlen_attention(q, k, v, attention_mask.bool(), **run)
        return out, None
    flash = [kwargs.get(n) for n in _FLASH_VARLEN_KWARGS]
    packed = None
    if all(x is not None for x in flash):
        if B != 1:
            raise ValueError(f"cu_seq_lens_q/k describe a packed (1, T) batch, but "
                             f"{type(module).__name__} got a batch of {B}: the packing kwargs belong "
                             "to another tower (transformers' LLaVA forwards them to the vision "
                             "tower too; apply_to_llava(model) keeps them to the language model)")
        cu_q, cu_k, max_q, max_k = flash
        packed = (cu_q.to(device=q.device, dtype=torch.int32),
                  cu_k.to(device=q.device, dtype=torch.int32), _as_int(max_q), _as_int(max_k))
    elif (kwargs.get("position_ids") is not None and B == 1 and Lq == Lk > 1
          and kwargs["position_ids"].numel() == Lq):
        found = _cu_seqlens_from_positions(kwargs["position_ids"])
        if found is not None:
            packed = (found[0], found[0], found[1], found[1])
    if packed is None:
        return padded_varlen_attention(q, k, v, None, **run), None
    cu_q, cu_k, max_q, max_k = packed
    if block_ids is not None and causal:  # (bidirectional attention needs no blocks)
        run["block_ids"] = block_ids.reshape(-1).to(device=q.device, dtype=torch.int32)
    out = varlen_attention(q.reshape(-1, H, D), k.reshape(-1, Hkv, D), v.reshape(-1, Hkv, D),
                           cu_q, cu_k, max_q, max_k, **run)
    return out.view(B, Lq, H, D), None


def register() -> None:
    """Register ``"mmkernels"`` with AttentionInterface (:func:`attention_forward`) and
    AttentionMaskInterface (flash-attention's mask: None, or the 2-D padding mask).
    Idempotent; done on import."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)


register()


# ---------------------------------------------------------------------------------
# apply / revert
# ---------------------------------------------------------------------------------

_STATE = "_mmkernels_integration"


class _MISSING:
    """Sentinel: the attribute was not in the object's __dict__ (a class, so that
    deepcopy keeps its identity)."""


@dataclass(frozen=True)
class Change:
    """One thing :func:`apply_to_clip` / :func:`apply_to_llava` changed (or
    :func:`revert` restored): where (``"config.text_config._attn_implementation"``,
    ``"model.forward"``), the value before and the value after (an attention
    implementation name; for a patched method, its qualified name, None when the
    instance had none of its own)."""

    name: str
    before: object
    after: object


@dataclass
class _Applied:
    kind: str
    # (name, config, previous _attn_implementation_internal)
    configs: list = field(default_factory=list)
    # (name, object, attribute, previous value in the object's __dict__ or _MISSING)
    attrs: list = field(default_factory=list)
    process_group: object = None
    inner_forward: Callable | None = None
    return_loss_pos: int = -1

    def __deepcopy__(self, memo):
        # a process group is a process-wide handle: a copied model shares it
        new = copy.copy(self)
        for f in ("configs", "attrs", "inner_forward"):
            setattr(new, f, copy.deepcopy(getattr(self, f), memo))
        return new


def _configs(model: nn.Module) -> list[tuple[str, object]]:
    """Every config whose ``_attn_implementation`` the model's modules read: the
    model's, its sub-configs (recursively) and those of nested PreTrainedModels."""
    seen, out = set(), []

    def visit(name, cfg):
        if cfg is None or id(cfg) in seen:
            return
        seen.add(id(cfg))
        out.append((name, cfg))
        for key in getattr(cfg, "sub_configs", {}) or {}:
            visit(f"{name}.{key}", getattr(cfg, key, None))

    visit("config", model.config)
    for mod_name, mod in model.named_modules():
        if isinstance(mod, transformers.PreTrainedModel):
            visit(f"{mod_name}.config", mod.config)
    return out


def _set_attr(state: _Applied, name: str, obj, attr: str, value) -> None:
    state.attrs.append((name, obj, attr, obj.__dict__.get(attr, _MISSING)))
    obj.__dict__[attr] = value


def _begin(model: nn.Module, kind: str, process_group=None) -> _Applied:
    if _STATE in model.__dict__:
        raise ValueError(f"the mmkernels integration is already applied to this "
                         f"{type(model).__name__} ({model.__dict__[_STATE].kind}); call "
                         "revert(model) first")
    state = _Applied(kind=kind, process_group=process_group)
    state.configs = [(n, c, c._attn_implementation_internal) for n, c in _configs(model)]
    return state


def _switch_attention(model: nn.Module, state: _Applied) -> None:
    model.set_attn_implementation(NAME)
    failed = [n for n, c, _ in state.configs if c._attn_implementation != NAME]
    if failed:
        _restore(model, state)
        raise ValueError(f"{type(model).__name__}: set_attn_implementation('{NAME}') left {failed} "
                         "unchanged")


def _changes(state: _Applied, model: nn.Module, undo: bool) -> list[Change]:
    out = []
    for name, cfg, before in state.configs:
        now = cfg._attn_implementation_internal
        if now != before:
            out.append(Change(f"{name}._attn_implementation", now if undo else before,
                              before if undo else now))
    for name, obj, attr, before in state.attrs:
        now = obj.__dict__.get(attr, _MISSING)
        pair = (now, before) if undo else (before, now)
        out.append(Change(f"{name}.{attr}", *(_describe(x) for x in pair)))
    return out


def _describe(value) -> str | None:
    """A short name for a patched attribute's value (None: not set on the instance)."""
    if value is _MISSING:
        return None
    func = getattr(value, "__func__", value)
    return f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', type(func).__name__)}"


def _restore(model: nn.Module, state: _Applied) -> None:
    for _, obj, attr, before in reversed(state.attrs):
        if before is _MISSING:
            obj.__dict__.pop(attr, None)
        else:
            obj.__dict__[attr] = before
    for _, cfg, before in state.configs:
        cfg._attn_implementation_internal = before
    model.__dict__.pop(_STATE, None)


def revert(model: nn.Module) -> list[Change]:
    """Undo :func:`apply_to_clip` or :func:`apply_to_llava` exactly: every config's
    previous ``_attn_implementation`` and every patched attribute (``forward`` of the
    model or of its ``LlavaModel``) come back as they were, the same objects; the model
    then behaves bit-identically to before the apply. Parameters were never touched.

    Returns:
        What was restored (``Change(name, before=patched value, after=restored value)``).

    Raises:
        ValueError: the model has no mmkernels integration applied.
    """
    state = model.__dict__.get(_STATE) if isinstance(model, nn.Module) else None
    if state is None:
        raise ValueError(f"revert: no mmkernels integration is applied to this "
                         f"{type(model).__name__}")
    changes = _changes(state, model, undo=True)
    _restore(model, state)
    return changes


# ---------------------------------------------------------------------------------
# CLIP / SigLIP
# ---------------------------------------------------------------------------------


def _where(process_group) -> tuple[object, int, int]:
    """(group, world, rank): local (no collective) unless a group is given, as
    transformers' own loss."""
    if process_group is None:
        return None, 1, 0
    return _contrastive._group_info(process_group)


def _contrastive_loss(model: nn.Module, state: _Applied, out) -> Tensor:
    image, text = out.image_embeds, out.text_embeds
    image = image.to(text.device)
    where = _where(state.process_group)
    scale = model.logit_scale.to(text.device).exp()
    if state.kind == "siglip":
        bias = model.logit_bias.to(text.device)
        return _contrastive._sigmoid_contrastive_on(image, text, scale, bias, None, *where)
    return _contrastive._info_nce_on(image, text, scale, None, *where)


def _contrastive_forward(self, *args, **kwargs):
    """The model's forward, with the loss from mmkernels.info_nce /
    sigmoid_contrastive (``return_loss=True``); every other output is the original
    forward's."""
    state: _Applied = self.__dict__[_STATE]
    return_loss = kwargs.pop("return_loss", None)
    if len(args) > state.return_loss_pos:
        args = list(args)
        return_loss, args[state.return_loss_pos] = args[state.return_loss_pos], False
    else:
        kwargs["return_loss"] = False
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    out = state.inner_forward(*args, return_dict=True, **kwargs)
    if return_loss:
        fields = dict(out.items())
        fields["loss"] = _contrastive_loss(self, state, out)
        out = type(out)(**fields)
    return out if return_dict else out.to_tuple()


def apply_to_clip(model: nn.Module, *, process_group=None) -> list[Change]:
    """Switch a loaded Hugging Face ``CLIPModel`` or ``SiglipModel`` to mmkernels, in
    place: the ``"mmkernels"`` attention in both towers, and with ``return_loss=True``
    the loss from :func:`mmkernels.info_nce` (CLIP) or
    :func:`mmkernels.sigmoid_contrastive` (SigLIP), without the B x B logits in the
    backward. The other outputs (logits, embeddings, tower outputs) are the model's own.

    Args:
        model: a ``transformers.CLIPModel`` or ``SiglipModel`` (or a subclass whose
            outputs carry ``image_embeds`` and ``text_embeds``), any attention
            implementation, already loaded.
        process_group: None (default): the loss is local to the process, as
            transformers' own (whose loss cannot be distributed: transformers issue
            22252). A group: the loss is open_clip's ``local_loss=True,
            gather_with_grad=True`` over that group's ranks (each rank's images against
            every rank's texts and vice versa; gradients flow back across ranks), and
            averaging gradients over the ranks (DDP) gives the global batch's gradient.
            The returned logits stay local (B_local x B_local).

    Returns:
        What changed (a list of :class:`Change`). Undo with :func:`revert`.

    Raises:
        TypeError: not a CLIP/SigLIP model. ValueError: already applied.
    """
    from transformers import CLIPModel, SiglipModel

    if not isinstance(model, (CLIPModel, SiglipModel)):
        raise TypeError(f"apply_to_clip needs a transformers CLIPModel or SiglipModel, got "
                        f"{type(model).__name__}")
    kind = "siglip" if isinstance(model, SiglipModel) else "clip"
    state = _begin(model, kind, process_group)
    inner = model.forward
    params = [p for p in inspect.signature(inner).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in params]
    if "return_loss" not in names:
        raise TypeError(f"{type(model).__name__}.forward has no return_loss argument "
                        f"(transformers {transformers.__version__})")
    state.inner_forward, state.return_loss_pos = inner, names.index("return_loss")
    _switch_attention(model, state)
    _set_attr(state, "model", model, "forward", types.MethodType(_contrastive_forward, model))
    model.__dict__[_STATE] = state
    return _changes(state, model, undo=False)


# ---------------------------------------------------------------------------------
# LLaVA
# ---------------------------------------------------------------------------------


@can_return_tuple
@deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
def _llava_model_forward(self, input_ids=None, pixel_values=None, attention_mask=None,
                         position_ids=None, cache=None, inputs_embeds=None,
                         vision_feature_layer=None, vision_feature_select_strategy=None,
                         image_sizes=None, mm_encoder_outputs=None, **kwargs):
    """transformers 5.24's ``LlavaModel.forward`` with two changes: the image features
    are merged by :func:`mmkernels.scatter_image_features` (not ``masked_scatter``),
    and the flash packing kwargs (which describe the text batch) are kept from the
    vision tower, which ignores them under eager/sdpa and would misread them under a
    varlen attention."""
    from transformers.models.llava.modeling_llava import LlavaModelOutputWithPast

    if (input_ids is None) ^ (inputs_embeds is not None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if pixel_values is not None and mm_encoder_outputs is not None:
        raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs at the same time")
    if inputs_embeds is None:
        inputs_embeds = self.get_input_embeddings()(input_ids)
    mm_encoder_outputs = mm_encoder_outputs if mm_encoder_outputs is not None else {}
    if mm_encoder_outputs.get("image") is None and pixel_values is not None:
        vision_kwargs = {k: v for k, v in kwargs.items()
                         if k not in _FLASH_VARLEN_KWARGS and k != "block_ids"}
        mm_encoder_outputs["image"] = self.get_image_features(
            pixel_values=pixel_values, vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy, image_sizes=image_sizes,
            return_dict=True, **vision_kwargs)
    if mm_encoder_outputs.get("image") is not None:
        image_features = mm_encoder_outputs["image"].pooler_output
        image_features = torch.cat(image_features, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
        image_mask = self.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds,
                                               image_features=image_features)
        inputs_embeds = scatter_image_features(inputs_embeds, image_mask[..., 0], image_features)
    outputs = self.language_model(attention_mask=attention_mask, position_ids=position_ids,
                                  cache=cache, inputs_embeds=inputs_embeds, **kwargs)
    return LlavaModelOutputWithPast(**outputs, image_outputs=mm_encoder_outputs.get("image"))


def apply_to_llava(model: nn.Module) -> list[Change]:
    """Switch a loaded Hugging Face LLaVA to mmkernels, in place: the ``"mmkernels"``
    attention in the vision tower and the language model, and the image features merged
    into the text embeddings by :func:`mmkernels.scatter_image_features`.

    Packed batches (input_ids (1, T), position_ids restarting per sample, and the flash
    kwargs ``cu_seq_lens_q/k``, ``max_length_q/k``) run the language model as varlen
    attention with no (T, T) mask; the packing kwargs do not reach the vision tower.

    Args:
        model: a ``transformers.LlavaForConditionalGeneration`` (or a ``LlavaModel``),
            already loaded; its ``LlavaModel`` must not override ``forward`` (the patch
            mirrors transformers 5.24's).

    Returns:
        What changed (a list of :class:`Change`). Undo with :func:`revert`.

    Raises:
        TypeError: not a LLaVA model, or one whose LlavaModel.forward is overridden.
        ValueError: already applied.
    """
    from transformers import LlavaForConditionalGeneration, LlavaModel

    if isinstance(model, LlavaForConditionalGeneration):
        inner, inner_name = model.model, "model.model"
    elif isinstance(model, LlavaModel):
        inner, inner_name = model, "model"
    else:
        raise TypeError(f"apply_to_llava needs a transformers LlavaForConditionalGeneration or "
                        f"LlavaModel, got {type(model).__name__}")
    if type(inner).forward is not LlavaModel.forward:
        raise TypeError(f"{type(inner).__name__} overrides LlavaModel.forward; apply_to_llava "
                        "replaces transformers' own forward only")
    state = _begin(model, "llava")
    _switch_attention(model, state)
    _set_attr(state, inner_name, inner, "forward", types.MethodType(_llava_model_forward, inner))
    model.__dict__[_STATE] = state
    return _changes(state, model, undo=False)
