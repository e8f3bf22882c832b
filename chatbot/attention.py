"""Attention mechanisms behind one interface.

Every mechanism scores a decoder ``query`` against encoder ``keys``, masks padding to
-inf, normalises with a softmax over source positions and returns the weighted sum of
``values``::

    context, weights = attention(query, keys, values, mask)
    # query (B, T, Hq), keys (B, S, Hk), values (B, S, Hv), mask (B, S) bool, True = real token
    # context (B, T, Hv), weights (B, T, S); weights sum to 1 over S and are 0 on padding
    context, weights = attention(query, keys, values, mask, bias)  # bias (B, T, S) added to the scores

``keys`` are what :meth:`Attention.project_keys` made of the encoder outputs, computed
once per source sentence (not once per decoder step).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Base class: subclasses implement :meth:`score`."""

    def project_keys(self, memory: Tensor) -> Tensor:
        """memory (B, S, H) -> keys (B, S, Hk); once per source."""
        return memory

    def score(self, query: Tensor, keys: Tensor) -> Tensor:
        """query (B, T, Hq), keys (B, S, Hk) -> scores (B, T, S)."""
        raise NotImplementedError

    def forward(self, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor,
                bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``bias`` (B, T, S) or None: added to the scores before the softmax (a recall model's continuation)."""
        scores = self.score(query, keys)  # (B, T, S)
        if bias is not None:
            scores = scores + bias.to(scores.dtype)
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        weights = F.softmax(scores.float(), dim=-1).to(values.dtype)  # (B, T, S)
        context = torch.bmm(weights, values)  # (B, T, Hv)
        return context, weights


class DotAttention(Attention):
    """Luong et al. (2015), eq. (8) "dot": score(h_t, h̄_s) = h_tᵀ h̄_s."""

    def score(self, query: Tensor, keys: Tensor) -> Tensor:
        return torch.bmm(query, keys.transpose(1, 2))


class GeneralAttention(Attention):
    """Luong et al. (2015), eq. (8) "general": score(h_t, h̄_s) = h_tᵀ W_a h̄_s.

    ``W_a h̄_s`` is computed once per source in :meth:`project_keys`.
    """

    def __init__(self, query_dim: int, key_dim: int):
        super().__init__()
        self.W_a = nn.Linear(key_dim, query_dim, bias=False)

    def project_keys(self, memory: Tensor) -> Tensor:
        return self.W_a(memory)  # (B, S, Hq)

    def score(self, query: Tensor, keys: Tensor) -> Tensor:
        return torch.bmm(query, keys.transpose(1, 2))


class AdditiveAttention(Attention):
    """Bahdanau et al. (2015), eq. (6) / appendix A.1.2: e_ij = v_aᵀ tanh(W_a s_{i-1} + U_a h_j).

    ``U_a h_j`` is computed once per source in :meth:`project_keys`.
    """

    def __init__(self, query_dim: int, key_dim: int, attn_dim: int | None = None):
        super().__init__()
        attn_dim = attn_dim or query_dim
        self.W_a = nn.Linear(query_dim, attn_dim, bias=False)
        self.U_a = nn.Linear(key_dim, attn_dim, bias=True)
        self.v_a = nn.Linear(attn_dim, 1, bias=False)

    def project_keys(self, memory: Tensor) -> Tensor:
        return self.U_a(memory)  # (B, S, A)

    def score(self, query: Tensor, keys: Tensor) -> Tensor:
        q = self.W_a(query)  # (B, T, A)
        e = torch.tanh(q.unsqueeze(2) + keys.unsqueeze(1))  # (B, T, S, A)
        return self.v_a(e).squeeze(-1)  # (B, T, S)


def build_attention(kind: str, query_dim: int, key_dim: int) -> Attention | None:
    """``none`` -> None (the plain fixed-context seq2seq); else the named mechanism."""
    if kind == "none":
        return None
    if kind == "dot":
        if query_dim != key_dim:
            raise ValueError("dot attention needs query and key sizes to match")
        return DotAttention()
    if kind == "general":
        return GeneralAttention(query_dim, key_dim)
    if kind == "additive":
        return AdditiveAttention(query_dim, key_dim)
    raise ValueError(f"unknown attention {kind!r}")
