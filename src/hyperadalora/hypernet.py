"""The hypernetworks: token in, increment out.

A hypernetwork reads a batch of token sequences ``(B, L, w)``: one sequence per adapted matrix, one token
per row (``tokens='row'``) or per scalar (``tokens='element'``). Each token is projected to width ``d_h``, a
context is added (a learned embedding of the adapted module, and of the rank position where a token
stands for one rank), a body mixes the tokens of the same matrix, and an output projection gives back
an increment of the token's width. The increment is added to the input state by the caller
(`generator.RoleGenerator`), so a zero-initialised output projection makes the first generation exact.

Bodies (METHOD.md section 2), of comparable parameter count:
- ``attention``: one BERT layer (multi-head self-attention + feed-forward, post-LayerNorm). Every output
  token depends on every token of the same matrix (paper eq. 8).
- ``mlp``: two residual feed-forward blocks, token-wise (no mixing across tokens).
- ``cnn``: a residual 1-D convolution over the token sequence (kernel 3) + a feed-forward block.

``ffn_mult=0`` drops the feed-forward block of the ``attention`` and ``cnn`` bodies (the cnn body's forward +
backward then costs about half: 5.0 against 10.4 ms for 30 x 384 tokens of width 8 on one CPU thread).

The output projection carries an *anchor* (`anchor_weight`, `anchor_bias`, buffers): the increment uses
``W - W_anchor``. With the anchor at zero this is the plain projection (the paper's recurrence); the
generator moves the anchor towards the weights used at each step to damp the recurrence (`momentum`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class AttentionBody(nn.Module):
    """One BERT layer: x = LN(x + Attn(x)); x = LN(x + FFN(x)).

    ``attention='full'``: softmax attention among all tokens of a matrix (paper eq. 8), O(L^2) per matrix.
    ``attention='induced'``: the tokens first write ``n_induced`` learned summary slots (attention from the slots
    to all tokens), then every token reads the slots (attention from the token to the slots), as in the Set
    Transformer's induced attention. Every output still depends on every token of the matrix, at O(L * m).
    """

    def __init__(self, dim: int, heads: int, hidden: int, attention: str = "full", n_induced: int = 16):
        super().__init__()
        self.heads, self.attention = heads, attention
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_out = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, hidden) if hidden else None  # hidden 0: no feed-forward block
        self.norm2 = nn.LayerNorm(dim) if hidden else None
        if attention == "induced":
            self.inducing = nn.Parameter(torch.randn(n_induced, dim))
            self.slot_kv = nn.Linear(dim, 2 * dim)
            self.slot_norm = nn.LayerNorm(dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # (b, n, d) -> (b, heads, n, d / heads)
        b, n, d = t.shape
        return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, key_padding: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (self._split(t) for t in self.qkv(x).chunk(3, dim=-1))
        mask = None if key_padding is None else key_padding[:, None, None, :]  # True = attend
        if self.attention == "full":
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            slots_q = self._split(self.inducing.expand(b, -1, -1))
            slots = F.scaled_dot_product_attention(slots_q, k, v, attn_mask=mask)    # (b, h, m, d/h)
            slots = self.slot_norm(slots.transpose(1, 2).reshape(b, -1, d) + self.inducing)
            sk, sv = (self._split(t) for t in self.slot_kv(slots).chunk(2, dim=-1))
            a = F.scaled_dot_product_attention(q, sk, sv)
        x = self.norm1(x + self.attn_out(a.transpose(1, 2).reshape(b, n, d)))
        return x if self.ffn is None else self.norm2(x + self.ffn(x))


class MLPBody(nn.Module):
    """Two residual token-wise feed-forward blocks (the paper's MLP ablation)."""

    def __init__(self, dim: int, heads: int, hidden: int, **_):
        super().__init__()
        self.ffn1, self.norm1 = FeedForward(dim, hidden), nn.LayerNorm(dim)
        self.ffn2, self.norm2 = FeedForward(dim, hidden), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, key_padding: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.norm1(x + self.ffn1(x))
        return self.norm2(x + self.ffn2(x))


class CNNBody(nn.Module):
    """A residual 1-D convolution over the token sequence, then a feed-forward block (the CNN ablation)."""

    def __init__(self, dim: int, heads: int, hidden: int, kernel_size: int = 3, **_):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, hidden) if hidden else None  # hidden 0: no feed-forward block
        self.norm2 = nn.LayerNorm(dim) if hidden else None

    def forward(self, x: torch.Tensor, key_padding: Optional[torch.Tensor] = None) -> torch.Tensor:
        if key_padding is not None:
            x = x * key_padding[..., None]
        x = self.norm1(x + F.gelu(self.conv(x.transpose(1, 2))).transpose(1, 2))
        return x if self.ffn is None else self.norm2(x + self.ffn(x))


BODIES = {"attention": AttentionBody, "mlp": MLPBody, "cnn": CNNBody}


class Hypernetwork(nn.Module):
    """Shared hypernetwork of one role: ``increment = out(body(in(tokens) + context))``.

    Args:
        token_width: width ``w`` of a token (``r`` for row tokens of P and Q, 1 for lambda and elements).
        dim: hidden width ``d_h``.
        arch: ``attention``, ``mlp`` or ``cnn``.
        n_modules: number of adapted modules (size of the module embedding); 0 disables it.
        n_positions: number of rank positions (size of the rank-position embedding); 0 disables it.
        attention: ``full`` or ``induced`` self-attention (``arch='attention'`` only), see `AttentionBody`.
        feature_dim: width of the feature context the caller passes, if not ``dim``: a linear map (no bias) takes it
            to ``dim`` inside the pass (so the ``dim``-wide context is recomputed, not stored, under checkpointing).
    """

    def __init__(self, token_width: int, dim: int, arch: str = "attention", heads: int = 4, ffn_mult: int = 2,
                 n_modules: int = 0, n_positions: int = 0, attention: str = "full", n_induced: int = 16,
                 feature_dim: Optional[int] = None):
        super().__init__()
        self.token_width = token_width
        self.in_proj = nn.Linear(token_width, dim)
        self.module_embedding = nn.Embedding(n_modules, dim) if n_modules else None
        self.position_embedding = nn.Embedding(n_positions, dim) if n_positions else None
        for emb in (self.module_embedding, self.position_embedding):
            if emb is not None:
                nn.init.normal_(emb.weight, std=1.0)
        self.feature_proj = nn.Linear(feature_dim, dim, bias=False) if feature_dim and feature_dim != dim else None
        if self.feature_proj is not None:  # unit-variance context entries from unit-variance embeddings
            nn.init.normal_(self.feature_proj.weight, std=1.0 / math.sqrt(feature_dim))
        self.body = BODIES[arch](dim, heads, ffn_mult * dim, attention=attention, n_induced=n_induced)
        self.out_proj = nn.Linear(dim, token_width)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)
        self.register_buffer("anchor_weight", torch.zeros_like(self.out_proj.weight))
        self.register_buffer("anchor_bias", torch.zeros_like(self.out_proj.bias))

    def features(self, tokens: torch.Tensor, module_ids: Optional[torch.Tensor] = None,
                 position_ids: Optional[torch.Tensor] = None,
                 key_padding: Optional[torch.Tensor] = None,
                 feature_context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens (B, L, w); module_ids (B,) long; position_ids (L,) or (B, L) long; feature_context (L, f) or
        (B, L, f) (f = feature_dim or d_h), added to every token -> (B, L, d_h)."""
        h = self.in_proj(tokens)
        if feature_context is not None and self.feature_proj is not None:
            feature_context = self.feature_proj(feature_context)
        if feature_context is not None:
            h = h + (feature_context if feature_context.dim() == 3 else feature_context[None])
        if self.module_embedding is not None and module_ids is not None:
            h = h + self.module_embedding(module_ids)[:, None, :]
        if self.position_embedding is not None and position_ids is not None:
            pos = self.position_embedding(position_ids)
            h = h + (pos if pos.dim() == 3 else pos[None])
        return self.body(h, key_padding)

    def forward(self, tokens: torch.Tensor, module_ids: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None,
                key_padding: Optional[torch.Tensor] = None,
                feature_context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The increment (B, L, w), through the anchored output projection."""
        h = self.features(tokens, module_ids, position_ids, key_padding, feature_context)
        return F.linear(h, self.out_proj.weight - self.anchor_weight, self.out_proj.bias - self.anchor_bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def chunk_tokens(tokens: torch.Tensor, chunk: int):
    """Split (B, L, w) into (B * ceil(L / chunk), chunk, w), zero-padded; returns (chunks, key_padding, L)."""
    b, n, w = tokens.shape
    n_chunks = math.ceil(n / chunk)
    pad = n_chunks * chunk - n
    if pad:
        tokens = F.pad(tokens, (0, 0, 0, pad))
    valid = torch.ones(b, n_chunks * chunk, dtype=torch.bool, device=tokens.device)
    if pad:
        valid[:, n:] = False
    return tokens.reshape(b * n_chunks, chunk, w), (valid.reshape(b * n_chunks, chunk) if pad else None), n
