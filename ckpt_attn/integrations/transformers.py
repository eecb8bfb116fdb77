"""Hugging Face transformers backend: ``attn_implementation="ckpt_attn"``.

``register()`` adds one name to two registries of transformers: an attention function
to ``AttentionInterface`` and a mask function to ``AttentionMaskInterface``. Every model
that dispatches attention through ``AttentionInterface`` (Llama, Mistral, Qwen2 and most
decoders of transformers 5) then runs ckpt_attn's op.

What the mask function hands over. A model builds each layer's mask once per forward
from a pattern (causal, sliding window, bidirectional, packed sequences) and the 2-D
padding mask. For those patterns the mask function returns a ``KeyPaddingMask``: the
(B, S_k) padding, read by the op as a (B, 1, 1, S_k) key mask, and the pattern as the
op's ``causal`` and ``window``, aligned through the cache offsets (queries sit at
positions q_offset.., keys at kv_offset..), which is how KV-cache decoding and chunked
prefill become bottom-right causal; or, for packed sequences, their cumulative lengths
for ``attention_varlen``. Nothing S_q x S_k is built. A pattern it does not recognise
(a multimodal model's extra or/and mask functions, chunked or block-wise attention) is
built as SDPA builds it, a (B, 1, S_q, S_k) bool mask (a KeyPaddingMask whose layout
holds it as full_mask), which the op reads: right, at SDPA's mask memory. Under
torch.compile only the plain causal and bidirectional patterns are recognised (the
others are closures the compiler cannot look into), so sliding windows and packing
detected by the model's mask take SDPA's mask there.

How the attention function reads what it is given:
- a ``KeyPaddingMask``: ``attention`` with the key mask (whenever the model was given an
  attention_mask, all ones or not: whether it holds a 0 is never read), causal and
  window; packed sequences through ``attention_varlen``; SDPA's mask where the mask
  function had to build one;
- ``cu_seq_lens_q/k`` and ``max_length_q/k`` keyword arguments (the padding-free batches
  of ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``) when the model was
  given no attention_mask: ``attention_varlen`` with the module's causality and
  ``sliding_window``, as flash-attention reads them, in eager and compiled code alike;
- a tensor mask prepared by the caller (4-D): as SDPA reads it, bool True = may attend,
  float added to the scores; flash keyword arguments are then ignored, as SDPA ignores
  them;
- None: as SDPA reads it, causal (top-left) when the module is causal and S_q > 1.

Packing is read from position_ids only where transformers reads it: masking_utils' own
detection (no attention_mask and no cache; a new sequence wherever positions do not step
by 1), which the mask function follows, and the flash-attention path's (no
attention_mask, one row, a sequence starting at every position equal to the row's
smallest), which covers the model that keeps a KV cache. Given an attention_mask, every
row attends as one sequence, as in SDPA. Eager and compiled code answer alike; nothing
on the way reads a tensor's value on fake or meta tensors or while torch.compile traces.

GQA runs without repeating k and v; the module's ``scaling`` and the ``dropout`` the
model passes (its attention_dropout in training, 0 in eval) reach the op.
``output_attentions=True`` is answered as SDPA answers it: a warning, once, and no
weights. What the op cannot compute raises a ValueError that names it, never a wrong
answer: logit soft-capping (``softcap``), attention sinks (``s_aux``),
``position_bias``, paged KV caches (``block_table``), a sliding window requested with no
mask that says how queries and keys line up, and packed sequences (``cu_seq_lens_q/k``)
together with an attention_mask or a cache holding earlier tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily

from .. import ops

try:
    from transformers import AttentionInterface, AttentionMaskInterface, masking_utils
    from transformers import __version__ as transformers_version
    from transformers.utils import logging as transformers_logging
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "ckpt_attn.integrations.transformers needs the transformers package: "
        'pip install "ckpt-attn[hf]"'
    ) from error

DEFAULT_NAME = "ckpt_attn"
_logger = transformers_logging.get_logger(__name__)

# Keyword arguments transformers may pass that change what attention computes and that
# the op has no counterpart for: refused by name when set.
_UNSUPPORTED = {
    "softcap": "logit soft-capping",
    "s_aux": "attention sinks",
    "position_bias": "an additive position bias",
    "block_table": "paged KV caches",
}
_FLASH_PACKING = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


@dataclass(frozen=True)
class MaskLayout:
    """How a layer's queries see its keys, in the op's terms.

    Attributes:
        kv_length: the key length the mask was made for (the attention function checks it).
        key_start: keys before this index are outside every query's window; the op is
            given ``k[:, :, key_start:]``.
        causal, window: the op's arguments (top-left causal; window (left, right), -1 =
            unbounded) relating query i to key key_start + j.
        query_offset: the position of query 0 less that of key 0 (before key_start).
        cu_seqlens, max_seqlen: packed sequences over the flattened (B * S) tokens (int32
            cumulative lengths and the longest), or None.
        key_mask: (B, 1, 1, S_k - key_start) bool, True for a real key; None when the model
            was given no attention_mask.
        full_mask: SDPA's (B, 1, S_q, S_k) bool mask, for a pattern the fields above cannot
            say (then they are unused), or None.
        attention_mask_given: whether the model was given a 2-D attention_mask.
    """

    kv_length: int
    key_start: int = 0
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    query_offset: int = 0
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    key_mask: torch.Tensor | None = None
    full_mask: torch.Tensor | None = None
    attention_mask_given: bool = False


class KeyPaddingMask(torch.Tensor):
    """What the registered mask function hands the attention function: a (B, 1, 1,
    S_k - key_start) bool key mask (True = real key) carrying its MaskLayout in
    ``.mask_layout`` (whose key_mask is this mask as a plain tensor, or None when the model
    was given no attention_mask); for a pattern the op cannot express, SDPA's (B, 1, S_q,
    S_k) mask, which is also the layout's full_mask.

    It is a 4-D tensor so that transformers passes it on as an already prepared mask
    (generate() with a static cache builds the masks ahead and hands them back to the
    model). Operations on it return plain tensors, which the attention function reads as
    SDPA would, except ``torch.empty_like``: the shape-only copy the budget planner makes
    of a layer's arguments (on fake or meta tensors) is a KeyPaddingMask whose layout's
    tensors are shape-only copies too. On fake tensors the mask's own data (never read) is
    a meta tensor, since a fake tensor cannot become a subclass; its layout holds the fake
    tensors.
    """

    mask_layout: MaskLayout

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """Plain-tensor semantics; empty_like keeps the layout (see the class docstring)."""
        kwargs = kwargs or {}
        if func is torch.empty_like and isinstance(args[0], KeyPaddingMask):
            return args[0]._empty_like(kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def create(cls, keep: torch.Tensor, padded: bool, layout: MaskLayout) -> KeyPaddingMask:
        """The mask for keep, (B, S_k) bool, True = real key, and a layout without key_mask;
        padded says whether the key mask must be applied (an attention_mask was given)."""
        key_mask = keep[:, layout.key_start:].contiguous()[:, None, None, :]
        return cls._wrap(key_mask, replace(layout, key_mask=key_mask if padded else None,
                                           attention_mask_given=padded))

    @classmethod
    def full(cls, mask: torch.Tensor, padded: bool) -> KeyPaddingMask:
        """SDPA's (B, 1, S_q, S_k) mask as a KeyPaddingMask; padded says whether the model
        was given an attention_mask."""
        return cls._wrap(mask, MaskLayout(mask.shape[-1], full_mask=mask,
                                          attention_mask_given=padded))

    @classmethod
    def _wrap(cls, key_mask: torch.Tensor, layout: MaskLayout) -> KeyPaddingMask:
        """key_mask as a KeyPaddingMask carrying layout."""
        body = key_mask
        if not torch.compiler.is_compiling() and is_fake(key_mask):
            with unset_fake_temporarily():
                body = torch.empty(key_mask.shape, dtype=key_mask.dtype, device="meta")
        mask = torch.Tensor._make_subclass(cls, body)
        mask.mask_layout = layout
        return mask

    def _empty_like(self, kwargs: dict) -> KeyPaddingMask:
        """torch.empty_like(self, **kwargs), the layout's tensors copied the same way."""
        layout = self.mask_layout
        with torch._C.DisableTorchFunctionSubclass():
            body = torch.empty_like(self.as_subclass(torch.Tensor), **kwargs)
            device = {"device": kwargs["device"]} if "device" in kwargs else {}
            cu_seqlens = (None if layout.cu_seqlens is None
                          else torch.empty_like(layout.cu_seqlens, **device))
        return self._wrap(body, replace(layout, cu_seqlens=cu_seqlens,
                                        key_mask=None if layout.key_mask is None else body,
                                        full_mask=None if layout.full_mask is None else body))


# The attention functions register() made, one per backend.
_ATTENTION_FUNCTIONS: dict[str, Callable] = {}


def register(name: str = DEFAULT_NAME, *, backend: str = "auto") -> str:
    """Register ckpt_attn's attention and mask functions under ``name`` in transformers.

    Afterwards ``attn_implementation=name`` works in ``from_pretrained``,
    ``from_config`` and ``model.set_attn_implementation``. Calling it again with the
    same arguments changes nothing; with another backend it replaces the entry. A name
    transformers already uses for another implementation ("sdpa", ...) is refused.

    Args:
        name: the attn_implementation name.
        backend: the op's backend, "auto", "triton" or "torch" (see ckpt_attn.attention).

    Returns:
        name.

    Raises:
        RuntimeError: transformers predates the mask interface of transformers 5 (masks
            built from q_length and q_offset rather than cache_position).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    taken = AttentionInterface._global_mapping.get(name)
    if taken is not None and taken not in _ATTENTION_FUNCTIONS.values():
        raise ValueError(f"name {name!r} is already an attention implementation of "
                         "transformers; pick another")
    if "q_length" not in inspect.signature(masking_utils.sdpa_mask).parameters:
        raise RuntimeError(
            f"transformers {transformers_version} builds masks from cache_position; "
            "ckpt_attn's mask function needs the q_length/q_offset interface of "
            "transformers 5 (tested with 5.24)")
    AttentionInterface.register(name, _attention_function(backend))
    AttentionMaskInterface.register(name, key_padding_mask)
    return name


def _attention_function(backend: str) -> Callable:
    """The attention function for one backend; the same object for the same backend, so
    that registering twice leaves the registry as it was."""
    if backend not in _ATTENTION_FUNCTIONS:
        def ckpt_attn_forward(module, query, key, value, attention_mask, dropout=0.0,
                              scaling=None, **kwargs):
            return attention_forward(module, query, key, value, attention_mask, dropout,
                                     scaling, backend=backend, **kwargs)
        ckpt_attn_forward.__doc__ = f"attention_forward with backend={backend!r}."
        _ATTENTION_FUNCTIONS[backend] = ckpt_attn_forward
    return _ATTENTION_FUNCTIONS[backend]


# ---------------------------------------------------------------------------------------
# The mask function
# ---------------------------------------------------------------------------------------

def key_padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0,
                     kv_offset: int = 0, mask_function: Callable | None = None,
                     attention_mask: torch.Tensor | None = None, **kwargs):
    """transformers' mask-interface function for ckpt_attn (see the module docstring).

    Args are those of ``transformers.masking_utils.sdpa_mask``: queries sit at positions
    q_offset .. q_offset + q_length - 1, keys at kv_offset .. kv_offset + kv_length - 1,
    ``attention_mask`` is the 2-D padding mask (True = real token) over positions from 0.

    Returns:
        a KeyPaddingMask: a key mask and a layout for the patterns the op expresses,
        otherwise SDPA's (B, 1, q_length, kv_length) bool mask.
    """
    mask_function = mask_function or masking_utils.causal_mask_function
    pattern = _pattern(mask_function)
    offset = _query_offset(q_offset)
    if pattern is not None and offset is not None:
        lower, upper, packed_ids = pattern
        offset -= kv_offset
        keep = _key_padding(attention_mask, batch_size, kv_length, kv_offset,
                            kwargs.get("device", "cpu"))
        padded = attention_mask is not None
        if packed_ids is None:
            layout = _aligned(kv_length, offset, lower, upper)
        elif not padded and offset == 0 and q_length == kv_length:
            layout = _packed(packed_ids, batch_size, kv_length, lower, upper)
        else:
            layout = None
        if layout is not None:
            return KeyPaddingMask.create(keep, padded, layout)
    full_mask = masking_utils.sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
        kv_offset=kv_offset, mask_function=mask_function,
        attention_mask=attention_mask, local_size=kwargs.get("local_size"),
        allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
        use_vmap=kwargs.get("use_vmap", False), device=kwargs.get("device", "cpu"))
    return KeyPaddingMask.full(full_mask, attention_mask is not None)


def _pattern(mask_function: Callable):
    """(lower, upper, packed_ids) for the mask functions masking_utils builds: key position
    p is visible to the query at position t when t - lower <= p <= t + upper (None =
    unbounded), within the packed sequences packed_ids marks (or None); None for any
    other function."""
    if mask_function is masking_utils.causal_mask_function:
        return None, 0, None
    if mask_function is masking_utils.bidirectional_mask_function:
        return None, None, None
    # torch.compile cannot read a closure made inside the traced region
    if torch.compiler.is_compiling() or not _made_by(mask_function, "and_masks", "and_mask"):
        return None
    parts = _captured(mask_function).get("mask_functions", ())
    if len(parts) != 2:
        return None
    first, second = parts
    if second is masking_utils.causal_mask_function and _made_by(first, "sliding_window_overlay"):
        window = _window_size(first)
        return None if window is None else (window - 1, 0, None)
    if (second is masking_utils.bidirectional_mask_function
            and _made_by(first, "sliding_window_bidirectional_overlay")):
        window = _window_size(first)
        return None if window is None else (window, window, None)
    if (_made_by(first, "remap_positions_for_packed_sequence")
            and _made_by(second, "packed_sequence_mask_function")):
        inner = _pattern(_captured(first).get("mask_function"))
        packed_ids = _captured(second).get("packed_sequence_mask")
        if inner is None or inner[2] is not None or not isinstance(packed_ids, torch.Tensor):
            return None
        return inner[0], inner[1], packed_ids
    return None


def _made_by(function, factory: str, inner: str = "inner_mask") -> bool:
    """Whether function is the closure `inner` that masking_utils.`factory` returns."""
    return (callable(function) and getattr(function, "__module__", None) == masking_utils.__name__
            and getattr(function, "__qualname__", None) == f"{factory}.<locals>.{inner}")


def _captured(function) -> dict:
    """The variables a closure captured, by name."""
    cells = function.__closure__ or ()
    return dict(zip(function.__code__.co_freevars, (cell.cell_contents for cell in cells),
                    strict=True))


def _window_size(overlay) -> int | None:
    """The sliding_window a sliding-window overlay captured, if it is a positive int."""
    window = _captured(overlay).get("sliding_window")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        return None
    return window


def _query_offset(q_offset) -> int | None:
    """q_offset as an int; static caches pass a 0-d tensor, read where its value exists
    (not while torch.compile traces, nor on fake or meta tensors: None, and the mask is
    built as SDPA builds it)."""
    if isinstance(q_offset, torch.Tensor):
        return int(q_offset) if _readable(q_offset) else None
    return int(q_offset)


def _readable(t: torch.Tensor) -> bool:
    """Whether t's values can be read on the host: not while torch.compile traces, and not
    on fake or meta tensors (the budget planner's and memory.measure's shape-only runs)."""
    return not torch.compiler.is_compiling() and t.device.type != "meta" and not is_fake(t)


def _key_padding(attention_mask: torch.Tensor | None, batch_size: int, kv_length: int,
                 kv_offset: int, device) -> torch.Tensor:
    """(B, kv_length) bool, True for a real key, from the 2-D mask over positions from 0
    (positions past its end are padding, as in masking_utils)."""
    if attention_mask is None:
        return torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be the 2-D padding mask (batch, positions), got "
                         f"shape {tuple(attention_mask.shape)}")
    keep = attention_mask.to(torch.bool)
    missing = kv_offset + kv_length - keep.shape[-1]
    if missing > 0:
        keep = torch.nn.functional.pad(keep, (0, missing), value=False)
    return keep[:, kv_offset:kv_offset + kv_length]


def _aligned(kv_length: int, offset: int, lower, upper) -> MaskLayout | None:
    """The op's causal/window for queries at index i, position i + offset (relative to the
    first key), seeing keys j with i + offset - lower <= j <= i + offset + upper; None
    where the op's window cannot say it (queries placed before the first key, or past
    every key's window)."""
    right = -1 if upper is None else upper + offset
    left = -1 if lower is None else lower - offset
    if upper is not None and right < 0:
        return None
    start = 0
    if lower is not None and left < 0:
        # keys before -left are left of every query's window: skip them
        start, left = -left, 0
        right = right - start if right >= 0 else -1
    if start >= kv_length:
        return None
    causal = right == 0
    return MaskLayout(kv_length, start, causal=causal,
                      window=(left, -1) if causal else (left, right), query_offset=offset)


def _packed(packed_ids: torch.Tensor, batch_size: int, length: int, lower,
            upper) -> MaskLayout:
    """Packed sequences: masking_utils' sequence ids (a new id where positions restart)
    become cumulative lengths over the flattened batch, each row starting a sequence.

    On fake or meta tensors the ids have no values (and masking_utils reports packing for
    every position_ids it cannot read): each row counts as one sequence, the layout that
    real position_ids without a restart give, which is what the shape-only runs of the
    planner and of memory.measure account for."""
    window = (-1 if lower is None else lower, -1 if upper is None else upper)
    causal = window[1] == 0
    window = (window[0], -1) if causal else window
    if not _readable(packed_ids):
        return MaskLayout(length, 0, causal=causal, window=window)
    ids = packed_ids.expand(batch_size, length)
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    cu_seqlens, max_seqlen = _cumulative_lengths(starts)
    return MaskLayout(length, 0, causal=causal, window=window, cu_seqlens=cu_seqlens,
                      max_seqlen=max_seqlen)


def _cumulative_lengths(starts: torch.Tensor) -> tuple[torch.Tensor, int]:
    """int32 cumulative lengths and the longest sequence, from a (B, S) bool tensor that
    marks the first token of each sequence."""
    flat = starts.reshape(-1)
    first = torch.nonzero(flat).reshape(-1).to(torch.int32)
    end = torch.tensor([flat.numel()], dtype=torch.int32, device=flat.device)
    cu_seqlens = torch.cat([first, end])
    return cu_seqlens, int(cu_seqlens.diff().max())


# ---------------------------------------------------------------------------------------
# The attention function
# ---------------------------------------------------------------------------------------

def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, *, backend: str = "auto", **kwargs):
    """transformers' attention-interface function backed by ckpt_attn's op.

    Args:
        module: the attention module (its ``is_causal`` is read when no mask says).
        query: (B, H_q, S_q, D); key, value: (B, H_kv, S_k, D), H_q a multiple of H_kv.
        attention_mask: a KeyPaddingMask (from the registered mask function), a tensor
            mask read as SDPA reads it, or None (see the module docstring).
        dropout: attention dropout probability, applied as the model passes it.
        scaling: softmax scale, default 1/sqrt(D).
        backend: the op's backend.
        **kwargs: what the model passes on: position_ids, is_causal, sliding_window,
            cu_seq_lens_q/k and max_length_q/k, output_attentions (a warning, as in
            SDPA); softcap, s_aux, position_bias and block_table are refused.

    Returns:
        (attn_output (B, S_q, H_q, D), None): no attention weights are formed.
    """
    _refuse_unsupported(kwargs)
    flash_packing = _flash_packing(kwargs, query.shape[0] * query.shape[2],
                                   key.shape[0] * key.shape[2])
    layout = attention_mask.mask_layout if isinstance(attention_mask, KeyPaddingMask) else None
    if flash_packing is not None and (attention_mask is None or layout is not None):
        # flash-attention's reading: the module's causality and sliding_window, whichever
        # pattern the model's mask has (which torch.compile cannot always look into)
        if layout is not None and (layout.attention_mask_given or layout.query_offset != 0
                                   or layout.key_start != 0 or query.shape[2] != key.shape[2]):
            raise ValueError("packed sequences (cu_seq_lens_q/k) cannot be combined with an "
                             "attention_mask or a KV cache that holds earlier tokens; pass "
                             "the padding-free batch without attention_mask")
        causal = _module_causal(module, kwargs)
        window = _flash_window(kwargs.get("sliding_window"), causal, key.shape[2])
        return _varlen(query, key, value, flash_packing, causal, window, dropout, scaling,
                       backend), None
    if layout is not None and layout.full_mask is None:
        return _with_layout(query, key, value, layout, dropout, scaling, backend,
                            kwargs.get("position_ids"))
    if layout is not None:
        attention_mask = layout.full_mask
    if attention_mask is None:
        window = kwargs.get("sliding_window")
        if window is not None and window < key.shape[2]:
            raise ValueError(
                f"sliding_window={window} with attention_mask=None: no mask says how the "
                f"{query.shape[2]} queries line up with the {key.shape[2]} keys; build the "
                "mask through the model (attn_implementation registered with "
                "ckpt_attn.integrations.transformers.register())")
        causal = query.shape[2] > 1 and _module_causal(module, kwargs)
    else:
        causal = False
    output = ops.attention(query, key, value, attention_mask, dropout, causal, scale=scaling,
                           backend=backend)
    return output.transpose(1, 2), None


def _refuse_unsupported(kwargs: dict) -> None:
    """ValueError naming the first argument the op cannot serve; output_attentions=True is
    served as SDPA serves it: a warning (once) and no weights."""
    for name, what in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"ckpt_attn does not support {what} ({name}=...); use "
                             f"attn_implementation='eager' for this model")
    if kwargs.get("output_attentions", False):
        _logger.warning_once("ckpt_attn never forms the attention weights: "
                             "output_attentions=True returns None for them (as sdpa does); "
                             "use attn_implementation='eager' to get them")


def _flash_packing(kwargs: dict, total_q: int, total_k: int) -> tuple | None:
    """(cu_seqlens_q, cu_seqlens_k, max_q, max_k) from flash-attention's padding-free
    keyword arguments, or None when none is given. A max_length given as a tensor is read
    where its value exists; elsewhere (torch.compile, fake or meta tensors) the token
    count bounds it."""
    given = [kwargs.get(name) is not None for name in _FLASH_PACKING]
    if not any(given):
        return None
    if not all(given):
        missing = [name for name, present in zip(_FLASH_PACKING, given, strict=True)
                   if not present]
        raise ValueError(f"packed sequences need all of {', '.join(_FLASH_PACKING)}; "
                         f"missing {', '.join(missing)}")
    cu_q, cu_k, max_q, max_k = (kwargs[name] for name in _FLASH_PACKING)
    return (cu_q.to(torch.int32), cu_k.to(torch.int32), _max_length(max_q, total_q),
            _max_length(max_k, total_k))


def _max_length(value, total: int) -> int:
    """A max_length_q/k keyword argument as the op's int (see _flash_packing)."""
    if isinstance(value, torch.Tensor):
        return int(value) if _readable(value) else total
    return int(value)


def _module_causal(module: torch.nn.Module, kwargs: dict) -> bool:
    """is_causal as the model passes it, else the module's (True when absent)."""
    causal = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", True) if causal is None else causal)


def _flash_window(sliding_window, causal: bool, key_length: int) -> tuple[int, int]:
    """The window a sliding_window keyword asks for when no mask carries it (flash's
    reading: the query and the sliding_window - 1 keys before it)."""
    if sliding_window is None or sliding_window >= key_length:
        return (-1, -1)
    if not causal:
        raise ValueError(f"sliding_window={sliding_window} on a non-causal module with "
                         "packed sequences is ambiguous; build the mask through the model")
    return (sliding_window - 1, -1)


def _with_layout(query, key, value, layout: MaskLayout, dropout, scaling, backend,
                 position_ids):
    """Run the op as a KeyPaddingMask's layout (one without full_mask) describes."""
    if key.shape[2] != layout.kv_length:
        raise ValueError(f"the mask was built for {layout.kv_length} keys, but key has "
                         f"{key.shape[2]}")
    packing = None
    if layout.cu_seqlens is not None:
        packing = (layout.cu_seqlens, layout.cu_seqlens, layout.max_seqlen, layout.max_seqlen)
    plain = layout.key_start == 0 and layout.query_offset == 0 and query.shape[2] == key.shape[2]
    if packing is None and plain and layout.causal and not layout.attention_mask_given:
        packing = _packing_from_positions(position_ids, query.shape[0], query.shape[2])
    if packing is not None:
        return _varlen(query, key, value, packing, layout.causal, layout.window, dropout,
                       scaling, backend), None
    key, value = key[:, :, layout.key_start:], value[:, :, layout.key_start:]
    window = None if layout.window == (-1, -1) else layout.window
    output = ops.attention(query, key, value, layout.key_mask, dropout, layout.causal,
                           scale=scaling, window=window, backend=backend)
    return output.transpose(1, 2), None


def _packing_from_positions(position_ids, batch_size: int, length: int) -> tuple | None:
    """Packed sequences read from position_ids where transformers' flash-attention path
    reads them (_is_packed_sequence, prepare_fa_kwargs_from_position_ids): the model was
    given no attention_mask (checked by the caller), one row of length > 1, and a sequence
    starts at every position equal to the row's smallest (and at the first token). None
    when the row is one sequence, when those conditions do not hold, and on fake or meta
    tensors (no values: counted as one sequence). While torch.compile traces the values
    cannot steer the graph: the cumulative lengths then have a fixed length + 1 entries,
    the unused ones empty sequences at the end, and the row length bounds them."""
    if (not isinstance(position_ids, torch.Tensor) or batch_size != 1 or length < 2
            or tuple(position_ids.shape) != (1, length)):
        return None
    positions = position_ids.reshape(length)
    starts = positions == positions.min()
    starts = torch.cat([starts.new_ones(1), starts[1:]])
    if torch.compiler.is_compiling():
        index = torch.arange(length, device=starts.device)
        first = torch.where(starts, index, length).sort().values
        cu_seqlens = torch.cat([first, first.new_full((1,), length)]).to(torch.int32)
        return cu_seqlens, cu_seqlens, length, length
    if not _readable(positions):
        return None
    cu_seqlens, max_seqlen = _cumulative_lengths(starts[None])
    if cu_seqlens.numel() == 2:
        return None
    return cu_seqlens, cu_seqlens, max_seqlen, max_seqlen


def _varlen(query, key, value, packing, causal, window, dropout, scaling, backend):
    """attention_varlen over the flattened (B * S) tokens; (B, S, H_q, D) out."""
    batch, _, length, _ = query.shape
    cu_q, cu_k, max_q, max_k = packing
    q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])
               for t in (query, key, value))
    output = ops.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal,
                                  scale=scaling, dropout_p=dropout,
                                  window=None if window == (-1, -1) else window,
                                  backend=backend)
    return output.reshape(batch, length, *output.shape[1:])
