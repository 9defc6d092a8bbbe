"""Traceable forms of torch's Transformer modules, so that no fused path hides their layers from quantization.

In eval mode ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` take a fast path
(``torch._transformer_encoder_layer_fwd``) that never calls ``linear1`` / ``linear2`` / ``self_attn``, so module
hooks and swapped layers would be bypassed; and ``nn.MultiheadAttention`` keeps its query, key and value projections
packed in one ``in_proj_weight`` that ``F.multi_head_attention_forward`` slices. Here:

- :func:`decompose` replaces each ``nn.MultiheadAttention`` (``batch_first=True``) by :class:`Attention`, the same
  computation with ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` as ``nn.Linear`` layers (``in_proj_weight``
  split into its three row blocks), so each is quantized, stored and exported as a linear: ``softmax(q k^T /
  sqrt(d) + mask) v`` per head (Vaswani et al. 2017), two ``matmul`` nodes around a softmax;
- :func:`traced_forward` gives the tracer the reference ("slow") path of an encoder layer (post-norm, or pre-norm
  with ``norm_first``, Xiong et al. 2020) and of an encoder, which it runs in place of their ``forward``.

An attention mask is additive and float, of shape ``[L_query, L_key]``, a parameter or buffer of the model (a
constant of the graph); a mask of another shape or dtype is a typed error naming the attention layer
(:func:`attention_mask`, which the traced graph calls and capture drops). A causal attention (``is_causal=True``,
as a decoder-only language model passes it with its causal mask) ignores the mask's values as torch's own path does
and calls :func:`causal_softmax`, captured as the softmax op with ``causal`` set (key ``j`` after query ``i`` gets
weight 0, never a NaN: key 0 is never masked). Key-padding masks, ``add_zero_attn``, ``bias_k`` / ``bias_v`` and
sequence-first layouts are refused by name. The returned attention weights are None. The decomposed paths are
recorded (:data:`ATTENTION_ATTR`; ``save`` stores them) so that :func:`packed_state` can give
``lowbit.load_state_dict`` the float architecture's own keys again.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import torch
from torch import fx, nn

from ..errors import FormatError, ShapeMismatchError, UnsupportedLayerError

#: model attribute listing the paths of the nn.MultiheadAttention modules decomposed into Attention
ATTENTION_ATTR = "lowbit_attention"


@fx.wrap
def attention_mask(mask: torch.Tensor, scores: torch.Tensor, where: str) -> torch.Tensor:
    """``mask`` itself, after checking that it is a float additive mask of shape ``[L_query, L_key]`` for the
    attention ``scores`` ``[N, heads, L_query, L_key]`` of ``where`` (ShapeMismatchError / UnsupportedLayerError)."""
    if not mask.is_floating_point():
        raise UnsupportedLayerError(f"{where}: the attention mask must be additive and float (0 where a query may "
                                    f"attend, a large negative number where not), got {mask.dtype}")
    if tuple(mask.shape) != tuple(scores.shape[-2:]):
        raise ShapeMismatchError(f"{where}: the attention mask must have shape [L_query, L_key] = "
                                 f"{list(scores.shape[-2:])}, got {list(mask.shape)}")
    return mask


@fx.wrap
def causal_softmax(scores: torch.Tensor, dim: int, causal: bool = True) -> torch.Tensor:
    """``softmax(scores, dim)`` over keys ``[..., L_query, L_key]`` with each later key (``j > i``) filled with
    -inf first: the softmax op with ``causal`` set (:func:`lowbit.ops.activation.torch_softmax`)."""
    from ..ops.activation import torch_softmax

    return torch_softmax(torch, scores, dim, causal)


#: :func:`causal_softmax` itself, as fx records it in a node: the name the softmax op's capture resolves (while a
#: trace runs, fx replaces the module's global ``causal_softmax`` by a wrapper)
CAUSAL_SOFTMAX = causal_softmax


class Attention(nn.Module):
    """``nn.MultiheadAttention`` (batch first) as four ``nn.Linear`` layers and two products per head.

    ``y = out_proj(concat_h softmax(q_h k_h^T / sqrt(d) + mask) v_h)`` with ``q = q_proj(query)``, ``k =
    k_proj(key)``, ``v = v_proj(value)`` split into ``num_heads`` heads of ``d = embed_dim / num_heads``.
    """

    def __init__(self, mha: nn.MultiheadAttention, path: str):
        super().__init__()
        self.where = f"layer {path!r}"
        if not mha.batch_first:
            raise UnsupportedLayerError(f"{self.where}: multi-head attention is captured with batch_first=True (the "
                                        "batch axis first, as the graph IR keeps it)")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise UnsupportedLayerError(f"{self.where}: multi-head attention with bias_k / bias_v or add_zero_attn "
                                        "cannot be captured")
        e, self.num_heads, self.dropout = mha.embed_dim, mha.num_heads, mha.dropout
        self.head_dim = e // mha.num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        weights = (mha.in_proj_weight.detach().chunk(3) if mha._qkv_same_embed_dim else
                   (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach()))
        biases = mha.in_proj_bias.detach().chunk(3) if mha.in_proj_bias is not None else (None,) * 3
        for name, weight, bias in zip(("q_proj", "k_proj", "v_proj"), weights, biases):
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias is not None, device=weight.device,
                              dtype=weight.dtype)
            with torch.no_grad():
                layer.weight.copy_(weight)
                if bias is not None:
                    layer.bias.copy_(bias)
            setattr(self, name, layer)
        self.out_proj = mha.out_proj
        self.train(mha.training)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        if key_padding_mask is not None:
            raise UnsupportedLayerError(f"{self.where}: key-padding masks cannot be captured; pass an additive float "
                                        "attn_mask of shape [L_query, L_key], or is_causal=True")
        if not isinstance(is_causal, bool):
            raise UnsupportedLayerError(f"{self.where}: is_causal must be a Python bool, not computed from tensors")
        n, lq, lk = query.size(0), query.size(1), key.size(1)
        heads, d = self.num_heads, self.head_dim
        q = self.q_proj(query).reshape(n, lq, heads, d).transpose(1, 2)
        k = self.k_proj(key).reshape(n, lk, heads, d).permute(0, 2, 3, 1)
        v = self.v_proj(value).reshape(n, lk, heads, d).transpose(1, 2)
        scores = torch.matmul(q, k) * self.scale
        if is_causal:  # the mask's values are not read (torch's own path hands is_causal alone to its kernel)
            weights = causal_softmax(scores, -1, causal=True)
        else:
            if attn_mask is not None:
                scores = scores + attention_mask(attn_mask, scores, self.where)
            weights = torch.softmax(scores, -1)
        weights = nn.functional.dropout(weights, self.dropout, self.training)
        y = torch.matmul(weights, v).transpose(1, 2).reshape(n, lq, heads * d)
        return self.out_proj(y), None


def decompose(model: nn.Module, leaves: tuple[str | type, ...] = ()) -> nn.Module:
    """``model``, or where it holds ``nn.MultiheadAttention`` modules a copy with each replaced by
    :class:`Attention` at the same path (UnsupportedLayerError for forms Attention refuses); those inside
    ``leaves`` (module paths or classes kept whole, which run their own forward) stay."""
    kept = [name for name, m in model.named_modules()
            if name in leaves or isinstance(m, tuple(leaf for leaf in leaves if isinstance(leaf, type)))]
    paths = [name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
             and not any(name == k or name.startswith(f"{k}.") or not k for k in kept)]
    if not paths:
        return model
    if "" in paths:
        raise UnsupportedLayerError("a bare nn.MultiheadAttention cannot be captured; wrap it in a model")
    model = copy.deepcopy(model)
    for path in paths:
        owner, _, name = path.rpartition(".")
        holder = model.get_submodule(owner) if owner else model
        setattr(holder, name, Attention(holder.get_submodule(name), path))
    setattr(model, ATTENTION_ATTR, sorted({*getattr(model, ATTENTION_ATTR, []), *paths}))
    return model


def packed_state(state: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    """``state`` with each decomposed attention's projections packed back as ``nn.MultiheadAttention`` holds them:
    ``<path>.in_proj_weight`` / ``in_proj_bias`` (rows q, k, v), or ``q_proj_weight`` / ``k_proj_weight`` /
    ``v_proj_weight`` where keys and values have their own sizes; FormatError where a projection is missing."""
    state = dict(state)
    for path in paths:
        parts = {}
        for p in ("q", "k", "v"):
            prefix = f"{path}.{p}_proj."
            if f"{prefix}weight" not in state:
                raise FormatError("bad-document", f"attention {path!r} is recorded, but {prefix}weight is not stored")
            parts[p] = {k[len(prefix):]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
        weights = [parts[p]["weight"] for p in ("q", "k", "v")]
        if all(w.shape == weights[0].shape for w in weights):
            state[f"{path}.in_proj_weight"] = torch.cat(weights)
        else:
            state.update({f"{path}.{p}_proj_weight": w for p, w in zip("qkv", weights)})
        if "bias" in parts["q"]:
            state[f"{path}.in_proj_bias"] = torch.cat([parts[p]["bias"] for p in ("q", "k", "v")])
    return state


def _encoder_layer(m: nn.TransformerEncoderLayer, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                   src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """The reference path of ``nn.TransformerEncoderLayer.forward`` (never the fused one)."""
    def attend(x: torch.Tensor) -> torch.Tensor:
        y = m.self_attn(x, x, x, attn_mask=src_mask, key_padding_mask=src_key_padding_mask, need_weights=False,
                        is_causal=is_causal)[0]
        return m.dropout1(y)

    def feed_forward(x: torch.Tensor) -> torch.Tensor:
        return m.dropout2(m.linear2(m.dropout(m.activation(m.linear1(x)))))

    x = src
    if m.norm_first:
        x = x + attend(m.norm1(x))
        return x + feed_forward(m.norm2(x))
    x = m.norm1(x + attend(x))
    return m.norm2(x + feed_forward(x))


def _encoder(m: nn.TransformerEncoder, src: torch.Tensor, mask: torch.Tensor | None = None,
             src_key_padding_mask: torch.Tensor | None = None, is_causal: bool | None = None) -> torch.Tensor:
    """The reference path of ``nn.TransformerEncoder.forward``: its layers in turn, then its norm."""
    x = src
    for layer in m.layers:
        x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
    return m.norm(x) if m.norm is not None else x


#: module class -> its traceable forward (for instances that keep the class's own forward)
_FORWARDS: dict[type, Callable[..., Any]] = {nn.TransformerEncoderLayer: _encoder_layer,
                                             nn.TransformerEncoder: _encoder}


def traced_forward(m: nn.Module) -> Callable[..., Any] | None:
    """The function the tracer runs as ``m.forward`` (``function(m, *args, **kwargs)``), None to keep its own."""
    for cls, function in _FORWARDS.items():
        if isinstance(m, cls) and type(m).forward is cls.forward:
            return function
    return None
