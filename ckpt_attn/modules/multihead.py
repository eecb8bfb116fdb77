"""MultiheadAttention: torch.nn.MultiheadAttention running ckpt_attn.attention, and
replace_attention() to swap it into an existing model.

The module subclasses nn.MultiheadAttention: same constructor, parameters, initialization,
state_dict and attributes, so torch code that reads them (TransformerEncoderLayer, checkpoints,
isinstance checks) keeps working. Only forward() differs, and torch.jit.script is refused.
PyTorch's own MultiheadAttention and Transformer tests can be run against it with
tools/client_torch_mha.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import BACKENDS
from ..ops import attention
from ..validation import check_flag

NEG_INF = float("-inf")


# torch.nn.MultiheadAttention refuses bad arguments with AssertionError or RuntimeError (and
# code written against it catches those); ckpt_attn's contract is ValueError / TypeError. Each
# of our errors is both, so either kind of handler catches it.

class _AssertionValueError(ValueError, AssertionError):
    """A bad argument that torch's MultiheadAttention refuses with AssertionError."""


class _AssertionTypeError(TypeError, AssertionError):
    """A mask dtype that torch's MultiheadAttention refuses with AssertionError."""


class _RuntimeValueError(ValueError, RuntimeError):
    """A bad argument that torch's MultiheadAttention refuses with RuntimeError."""


class _NotScriptableError(TypeError, RuntimeError):
    """torch.jit.script of the module: refused (torch raises RuntimeError for what it cannot
    compile)."""


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in torch.nn.MultiheadAttention whose attention is ckpt_attn.attention.

    Constructor, parameters (``in_proj_weight`` or ``q/k/v_proj_weight``, ``in_proj_bias``,
    ``out_proj``, ``bias_k``, ``bias_v``), their initialization and forward() are torch's,
    so ``load_state_dict`` works both ways. The one addition is the keyword-only
    ``backend`` ("auto", "triton" or "torch"), passed to ckpt_attn.attention.

    forward(..., need_weights=False) runs the fused op: backward stores q, k, v, the output
    and the logsumexp, never an L x S matrix (unless the caller's attn_mask is one). With
    ``need_weights=True`` (torch's default) the weights must be returned, so an explicit
    softmax path builds the (N, num_heads, L, S) probabilities: O(L * S) memory, like torch.
    Pass ``need_weights=False`` whenever the weights are not needed.

    Differences from torch:
        - A query that sees no key (every key masked) gives attention output 0 and weights 0
          on both paths; torch gives 0 with need_weights=False and NaN with need_weights=True.
        - Dropout (training mode, ``dropout > 0``): the weights path drops exactly as torch
          does (same random stream); the fused path draws its own mask (ckpt_attn's Philox,
          seeded from torch's generator, so torch.manual_seed reproduces it).
        - ``is_causal`` (a hint that ``attn_mask`` is the causal, top-left aligned mask)
          replaces attn_mask by the op's ``causal=True`` on the fused path (attn_mask is then
          not read, so it gets no gradient), as torch does, and also when a key_padding_mask
          is given, where torch falls back to the dense mask (except with add_bias_kv /
          add_zero_attn: the appended keys make the two differ, so the dense mask is used).
          As in torch's non-fast paths, is_causal without attn_mask raises.
        - Bad arguments raise an error that is both the ValueError / TypeError naming the
          argument (ckpt_attn's convention) and the AssertionError / RuntimeError torch raises
          for it, with torch's wording where torch has one; ``dropout`` must be in [0, 1).
        - torch's inference fast path (``torch._native_multi_head_attention``, in eval mode
          without grad) is never taken: forward() always runs ckpt_attn. NestedTensor inputs,
          which torch takes only there, are served as torch serves them (batch_first, no
          masks; see forward). nn.TransformerEncoderLayer has its own fast path that reads
          ``in_proj_weight`` etc. and bypasses forward(): see replace_attention.
        - torch.jit.script is refused with an error saying what to do instead: forward calls
          the op through Python, which TorchScript cannot compile.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None,
                 dtype=None, *, backend="auto") -> None:
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads),
                            ("kdim", kdim), ("vdim", vdim)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value <= 0):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if embed_dim % num_heads != 0:
            raise _AssertionValueError(f"embed_dim must be divisible by num_heads, got "
                                       f"embed_dim={embed_dim} and num_heads={num_heads}")
        if (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
                or not 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim,
                         vdim, batch_first, device, dtype)
        self.backend = backend

    def reset_parameters(self) -> None:
        """Initialize every parameter as the constructor does, in its order (so under the
        same torch.manual_seed the values are a freshly built module's): out_proj by
        nn.Linear's init, then nn.MultiheadAttention's own (Xavier-uniform input
        projections, zero biases, out_proj's included, Xavier-normal bias_k and bias_v).

        nn.MultiheadAttention itself has no public reset_parameters. In a loop that
        resets parents before children (``for m in model.modules()``), out_proj's own
        reset comes last and leaves its bias with nn.Linear's uniform init; resetting
        children first (``model.apply``) or calling this method last keeps it zero.
        """
        self.out_proj.reset_parameters()
        self._reset_parameters()

    def __prepare_scriptable__(self):
        """Refuse torch.jit.script, which calls this on every module it compiles, with what to
        do instead (rather than a TorchScript frontend error deep inside forward)."""
        raise _NotScriptableError(
            "torch.jit.script cannot compile ckpt_attn.modules.MultiheadAttention: its forward "
            "calls the ckpt_attn.attention op through Python. Script a model that still uses "
            "torch.nn.MultiheadAttention (before replace_attention), or compile this one with "
            "torch.compile instead of torch.jit.script.")

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of query over key/value, as torch.nn.MultiheadAttention.forward.

        Args:
            query: (L, N, E), (N, L, E) with batch_first, or (L, E) unbatched; or, with
                batch_first, a NestedTensor (N, L_i, E) as nn.TransformerEncoder passes it
                (query, key and value all nested, no attn_mask / key_padding_mask: the
                nested lengths are the padding). The result is then nested too.
            key: (S, N, kdim), (N, S, kdim) or (S, kdim).
            value: (S, N, vdim), (N, S, vdim) or (S, vdim).
            key_padding_mask: (N, S), or (S,) unbatched; bool True = ignore that key,
                or float added to the scores.
            need_weights: also return the attention weights (explicit O(L * S) path);
                False runs the fused op.
            attn_mask: (L, S) or (N * num_heads, L, S); bool True = may NOT attend, or float
                added to the scores.
            average_attn_weights: average the returned weights over heads.
            is_causal: hint that attn_mask is the causal mask (attn_mask is still required).

        Returns:
            (attn_output, attn_weights): output of query's layout with embed_dim features;
            weights (N, L, S) averaged, (N, num_heads, L, S) per head, without N when
            unbatched, or None when need_weights is False. With add_bias_kv / add_zero_attn,
            S counts the appended keys. For nested inputs L and S are the longest lengths and
            the weights of padding are 0, as torch returns them.
        """
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if query.is_nested or key.is_nested or value.is_nested:
            return self._forward_nested(query, key, value, key_padding_mask, need_weights,
                                        attn_mask, average_attn_weights, is_causal)
        batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask,
                                     need_weights, average_attn_weights, is_causal)
        self_attention = query is key and key is value
        # torch's layout: (L, N, E) views, N = 1 for unbatched inputs
        if not batched:
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
        elif self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        length, batch = query.shape[:2]

        q, k, v = self._project(query, key, value, self_attention)  # (N, H, L|S', D)
        appended = k.shape[2] - key.shape[0]
        causal = is_causal and not need_weights and (key_padding_mask is None or not appended)
        # float masks in query's dtype, as torch converts them: under autocast q is
        # bfloat16 or float16 and a float32 mask goes to the op as it is (SDPA accepts it)
        mask = _merged_mask(key_padding_mask, None if causal else attn_mask, batch,
                            self.num_heads, appended, query.dtype)
        dropout_p = self.dropout if self.training else 0.0

        weights = None
        if need_weights:
            o, weights = _attention_with_weights(q, k, v, mask, dropout_p)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            o = attention(q, k, v, mask, dropout_p, causal, backend=self.backend)

        # (N, H, L, D) -> (L, N, E), then back to the caller's layout
        out = self.out_proj(o.permute(2, 0, 1, 3).reshape(length, batch, self.embed_dim))
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _project(self, query, key, value, self_attention: bool):
        """(L, N, E), (S, N, kdim), (S, N, vdim) -> q (N, H, L, D), k and v (N, H, S', D):
        in-projection, then bias_k/bias_v and the zero key appended (S' = S + 0..2)."""
        if self_attention and self._qkv_same_embed_dim:
            # one GEMM; q, k, v are strided views of its (L, N, 3E) result
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            weights = (self.in_proj_weight.chunk(3) if self._qkv_same_embed_dim else
                       (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight))
            biases = (self.in_proj_bias.chunk(3) if self.in_proj_bias is not None
                      else (None, None, None))
            q, k, v = (F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases,
                                                            strict=True))
        batch = query.shape[1]
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(1, batch, -1)])  # (S + 1, N, E)
            v = torch.cat([v, self.bias_v.expand(1, batch, -1)])
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(1, batch, self.embed_dim)])
            v = torch.cat([v, v.new_zeros(1, batch, self.embed_dim)])
        # (seq, N, E) -> (N, H, seq, D) views, stride(-1) == 1: no copy
        return (x.unflatten(-1, (self.num_heads, self.head_dim)).permute(1, 2, 0, 3)
                for x in (q, k, v))

    def _forward_nested(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                        average_attn_weights, is_causal):
        """forward() of NestedTensor inputs, as torch's fast path takes them: padded to dense
        (N, L, E) tensors, the key lengths as a key padding mask, and the output nested again
        with the query lengths (strided or jagged, as query was).

        Where torch refuses a NestedTensor (a form its fast path does not take) this raises
        torch's AssertionError, "MultiheadAttention does not support NestedTensor outside of
        its fast path", with the reason.
        """
        check_flag(is_causal, "is_causal")
        reason = None
        if not (query.is_nested and key.is_nested and value.is_nested):
            reason = "query, key and value must all be NestedTensors or none"
        elif query.dim() != 3:
            reason = ("query should be unbatched 2D or batched 3D tensor but received "
                      f"{query.dim()}-D query tensor")
        elif not self.batch_first:
            reason = "batch_first was not True"
        elif attn_mask is not None or key_padding_mask is not None:
            reason = ("attn_mask and key_padding_mask are not supported with NestedTensor "
                      "input (the nested lengths are the padding)")
        elif is_causal:
            reason = "is_causal needs attn_mask, which NestedTensor input does not take"
        if reason is not None:
            raise _AssertionValueError("MultiheadAttention does not support NestedTensor "
                                       f"outside of its fast path: {reason}")
        padded = {}  # id -> dense tensor, so that query is key is value stays true
        for x in (query, key, value):
            if id(x) not in padded:
                padded[id(x)] = torch.nested.to_padded_tensor(x, 0.0)
        q, k, v = padded[id(query)], padded[id(key)], padded[id(value)]
        query_lengths = [t.shape[0] for t in query.unbind()]
        key_lengths = torch.tensor([t.shape[0] for t in key.unbind()], device=k.device)
        ignored_keys = torch.arange(k.shape[1], device=k.device) >= key_lengths[:, None]
        out, weights = self.forward(q, k, v, key_padding_mask=ignored_keys,
                                    need_weights=need_weights,
                                    average_attn_weights=average_attn_weights)
        if weights is not None:  # the weights of padded queries are 0
            padded_queries = (torch.arange(q.shape[1], device=q.device)
                              >= torch.tensor(query_lengths, device=q.device)[:, None])
            shape = (q.shape[0], q.shape[1], 1) if weights.dim() == 3 else (
                q.shape[0], 1, q.shape[1], 1)
            weights = weights.masked_fill(padded_queries.view(shape), 0.0)
        out = torch.nested.as_nested_tensor(
            [o[:n] for o, n in zip(out, query_lengths, strict=True)], layout=query.layout)
        return out, weights

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask, need_weights,
                      average_attn_weights, is_causal) -> bool:
        """Check forward()'s arguments; return whether the input is batched.

        Checks and wording follow torch's MultiheadAttention (F.multi_head_attention_forward),
        and each error is also the kind torch raises (see _AssertionValueError etc.). As in
        torch, the shape of an attn_mask that is not read (is_causal with need_weights=False
        and no key_padding_mask) is not checked.

        The flags must be Python bools, as torch passes them (nn.Transformer* layers
        included): a tensor's truth value is ambiguous (or a device sync), so it is refused
        with a TypeError naming the argument.
        """
        for name, flag in (("need_weights", need_weights),
                           ("average_attn_weights", average_attn_weights),
                           ("is_causal", is_causal)):
            check_flag(flag, name)
        for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if mask is None:
                continue
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor or None, got "
                                f"{type(mask).__name__}")
            if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
                raise _AssertionTypeError(f"only bool and floating types of {name} are "
                                          f"supported, got {mask.dtype}")
        batched = self._check_dims(query, key, value, key_padding_mask, attn_mask)
        if is_causal and attn_mask is None:
            raise _RuntimeValueError(
                "Need attn_mask if specifying the is_causal hint: is_causal=True says that "
                "attn_mask is the causal mask, so attn_mask is required (see "
                "nn.Transformer.generate_square_subsequent_mask)")
        if query.shape[-1] != self.embed_dim:
            raise _AssertionValueError(f"was expecting embedding dimension of "
                                       f"{self.embed_dim}, but got {query.shape[-1]}: query "
                                       f"must have embed_dim features, got shape "
                                       f"{tuple(query.shape)}")
        # torch: the packed in-projection's matmul fails (RuntimeError), the separate
        # projections assert their weight shapes (AssertionError)
        error = _RuntimeValueError if self._qkv_same_embed_dim else _AssertionValueError
        for name, t, features, attribute in (("key", key, self.kdim, "kdim"),
                                             ("value", value, self.vdim, "vdim")):
            if t.shape[-1] != features:
                raise error(f"{name} must have {attribute}={features} features, got shape "
                            f"{tuple(t.shape)}")
        if key.shape[:-1] != value.shape[:-1]:
            raise _AssertionValueError(f"key and value must share (seq, batch) dims: key's "
                                       f"sequence and batch dims {tuple(key.shape[:-1])} do "
                                       f"not match value's {tuple(value.shape[:-1])}")
        batch_dim = 0 if self.batch_first else 1
        batch = query.shape[batch_dim] if batched else 1
        if batched and key.shape[batch_dim] != batch:
            raise _RuntimeValueError(f"key and value batch size ({key.shape[batch_dim]}) must "
                                     f"equal query's ({batch}), dim {batch_dim} with "
                                     f"batch_first={self.batch_first}")
        length = query.shape[1 - batch_dim] if batched else query.shape[0]
        source = key.shape[1 - batch_dim] if batched else key.shape[0]
        padding_shape = (batch, source) if batched else (source,)
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != padding_shape:
            raise _AssertionValueError(f"expecting key_padding_mask shape of {padding_shape}, "
                                       f"but got {tuple(key_padding_mask.shape)}")
        mask_is_read = not (is_causal and not need_weights and key_padding_mask is None)
        if attn_mask is not None and mask_is_read:
            shape = ((length, source) if attn_mask.dim() == 2 else
                     (batch * self.num_heads, length, source))
            if tuple(attn_mask.shape) != shape:
                raise _RuntimeValueError(f"The shape of the {attn_mask.dim()}D attn_mask is "
                                         f"{tuple(attn_mask.shape)}, but should be {shape}.")
        return batched

    def _check_dims(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        """The numbers of dims, as torch checks them (with its messages); whether batched."""
        if query.dim() not in (2, 3):
            raise _AssertionValueError("query should be unbatched 2D or batched 3D tensor but "
                                       f"received {query.dim()}-D query tensor")
        batched = query.dim() == 3
        kind = "batched (3-D)" if batched else "unbatched (2-D)"
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise _AssertionValueError(f"For {kind} `query`, expected `key` and `value` to be "
                                       f"{query.dim()}-D but found {key.dim()}-D and "
                                       f"{value.dim()}-D tensors respectively")
        if key_padding_mask is not None and key_padding_mask.dim() != query.dim() - 1:
            raise _AssertionValueError(f"For {kind} `query`, expected `key_padding_mask` to be "
                                       f"`None` or {query.dim() - 1}-D but found "
                                       f"{key_padding_mask.dim()}-D tensor instead")
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise _AssertionValueError(f"For {kind} `query`, expected `attn_mask` to be "
                                       f"`None`, 2-D or 3-D but found {attn_mask.dim()}-D "
                                       f"tensor instead")
        if not batched and attn_mask is not None and attn_mask.dim() == 3:
            expected = (self.num_heads, query.shape[0], key.shape[0])
            if tuple(attn_mask.shape) != expected:
                raise _AssertionValueError(f"Expected `attn_mask` shape to be {expected} but "
                                           f"got {tuple(attn_mask.shape)}")
        return batched


# ---- masks: torch's conventions -> ckpt_attn's (bool True = may attend, float = added) ----

def _merged_mask(key_padding_mask, attn_mask, batch: int, heads: int, appended: int,
                 dtype: torch.dtype) -> torch.Tensor | None:
    """One mask in ckpt_attn's convention, broadcastable to (N, H, L, S + appended).

    A key padding mask alone stays (N, 1, 1, S); with attn_mask the two broadcast together.
    Bool masks stay bool; if either is float, both become float (-inf = masked). The
    appended keys (bias_k, the zero key) are visible to every query.
    """
    masks = []
    if key_padding_mask is not None:
        masks.append(_converted(key_padding_mask, dtype).view(batch, 1, 1, -1))  # (N,1,1,S)
    if attn_mask is not None:
        if attn_mask.dim() == 3:
            attn_mask = attn_mask.unflatten(0, (batch, heads))  # (N, H, L, S)
        masks.append(_converted(attn_mask, dtype))
    if not masks:
        return None
    if len(masks) == 2:
        if all(m.dtype == torch.bool for m in masks):
            masks = [masks[0] & masks[1]]
        else:
            masks = [_as_float(masks[0], dtype) + _as_float(masks[1], dtype)]
    mask = masks[0]
    if appended:
        mask = F.pad(mask, (0, appended), value=True if mask.dtype == torch.bool else 0.0)
    return mask


def _converted(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """torch's mask (bool True = ignore, or float) in ckpt_attn's convention."""
    return mask.logical_not() if mask.dtype == torch.bool else mask.to(dtype)


def _as_float(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A mask in ckpt_attn's convention as additive floats: 0 = may attend, -inf = masked."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask.logical_not(), NEG_INF)


# ---- the explicit path, for need_weights=True ----

def _attention_with_weights(q, k, v, mask, dropout_p: float):
    """Softmax attention that materializes the weights, as torch's need_weights path.

    q (N, H, L, D), k and v (N, H, S, D), mask in ckpt_attn's convention or None.
    Returns O (N, H, L, D) and the weights (N, H, L, S), after dropout as torch returns them.
    """
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))  # (N, H, L, S)
    if mask is not None:
        scores = (scores.masked_fill(mask.logical_not(), NEG_INF) if mask.dtype == torch.bool
                  else scores + mask)
    # a row with no visible key gets weights 0 (torch: NaN), as the fused op gives O = 0
    dead = scores.amax(dim=-1, keepdim=True) == NEG_INF  # (N, H, L, 1)
    weights = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return torch.matmul(weights, v), weights


# ---- swapping modules in a model ----

def replace_attention(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Replace every torch.nn.MultiheadAttention in ``model`` by MultiheadAttention, in place.

    Only exact nn.MultiheadAttention instances are replaced (not subclasses, so never
    ours again). The new module takes over the old one's Parameter objects (so an
    optimizer built before the swap keeps working), its configuration and its training
    flag; hooks registered on the old module are not carried over. ``backend`` is given
    to every new module. Returns ``model``, or its replacement if ``model`` itself is an
    nn.MultiheadAttention.

    nn.TransformerEncoderLayer (and nn.TransformerEncoder) have an inference fast path,
    taken in eval mode when no grad is needed, that reads ``self_attn.in_proj_weight``
    etc. and calls torch's native kernel without calling self_attn. It is left as is:
    the weights are the same, so it computes what the original model computed, and
    without backward nothing is stored. To run ckpt_attn there too, call
    ``torch.backends.mha.set_fastpath_enabled(False)``.
    """
    replaced = {}  # id(old) -> new: a module shared by two parents stays shared
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.MultiheadAttention:
                if id(child) not in replaced:
                    replaced[id(child)] = _replacement(child, backend)
                setattr(parent, name, replaced[id(child)])
    if type(model) is nn.MultiheadAttention:
        return _replacement(model, backend)
    return model


def _replacement(old: nn.MultiheadAttention, backend: str) -> MultiheadAttention:
    """Our module with old's configuration, Parameter objects and training flag."""
    new = MultiheadAttention(
        old.embed_dim, old.num_heads, old.dropout, bias=old.in_proj_bias is not None,
        add_bias_kv=old.bias_k is not None, add_zero_attn=old.add_zero_attn, kdim=old.kdim,
        vdim=old.vdim, batch_first=old.batch_first, device="meta",
        dtype=old.out_proj.weight.dtype, backend=backend)
    # built on the meta device, then handed old's Parameters themselves
    new.load_state_dict(old.state_dict(keep_vars=True), assign=True)
    return new.train(old.training)
