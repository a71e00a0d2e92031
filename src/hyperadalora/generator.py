"""Generated adapter tensors: the machinery every hypernetwork method shares.

A method declares *roles* (HyperAdaLoRA: ``P``, ``lambda``, ``Q``). Each role has one `RoleGenerator`
that owns one `Hypernetwork` shared by all adapted layers and the state the tensors are generated from.
A role's tensor of layer ``i`` is stored token-major as a matrix ``(L_i, w)``: a row per token in
``tokens='row'`` (P: its rows, width r; Q: its columns, width r; lambda: one value per rank, width 1).
Layers whose matrices have the same length ``L`` are stacked into one group and go through the
hypernetwork in one batched pass, so a step costs one pass per role and distinct shape, whatever the
number of layers.

Generation (``X`` the state, ``H`` the increment of the hypernetwork):
- ``static``: ``G = X_0 + s * H(X_0)``, a reparameterisation around a fixed seed state.
- ``recurrent``: ``G_t = X_t + s * H(X_t)``; after the optimizer step, `commit` stores ``X_{t+1} = G_t``.
  The increment's output projection is anchored (see `hypernet.Hypernetwork`): after each commit the
  anchor moves to ``momentum * anchor + (1 - momentum) * W_t``. ``momentum=1`` keeps the anchor at zero
  (the paper's ``X_{t+1} = H(X_t)``, whose learned increment is applied again at every step and can run
  away, METHOD.md section 2); ``momentum < 1`` makes the carried-over increment decay geometrically.
A role may then put its generated matrices on a basis (``basis``): ``unit`` columns or ``orthonormal`` ones
(`to_basis`), which HyperAdaLoRA offers for P and Q.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

import torch
import torch.utils.checkpoint
from torch import nn

from .hypernet import Hypernetwork, chunk_tokens


def init_state(kind: str, n: int, length: int, width: int, rank_axis: int, std: float,
               generator: torch.Generator) -> torch.Tensor:
    """Seed state (n, length, width). rank_axis=1: columns are ranks (P, Q^T); 0: rows are ranks (lambda)."""
    if kind == "zeros":
        return torch.zeros(n, length, width)
    if kind == "normal":
        return torch.randn(n, length, width, generator=generator) * std
    if kind == "orthonormal":  # orthonormal columns (length >= width) or rows
        g = torch.randn(n, max(length, width), min(length, width), generator=generator)
        q, r = torch.linalg.qr(g)
        q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
        return q if length >= width else q.transpose(1, 2)
    raise ValueError(f"unknown initialisation {kind!r}")


def _constant(t: torch.Tensor) -> torch.Tensor:
    """A constant that is only ever added (the identity offset of P and Q), stored as float16 where its range allows:
    it is as large as the generated P and Q together and is live through every step, so half precision saves half of it
    (on MiniLM enough to keep a training step's peak memory below AdaLoRA's). The rounding (relative 2**-11 of the
    increment, itself scaled by ``output_scale / hypernet_dim``) moves the first generation off the seed state by
    about 1e-4 of an entry; nothing is learned from it."""
    if t.dtype == torch.float32 and bool(torch.isfinite(t).all()) and t.abs().max().item() < 6e4:
        return t.to(torch.float16)
    return t.clone()


def to_basis(out: torch.Tensor, basis: str) -> torch.Tensor:
    """``out``: (n, L, r) generated matrices whose r columns are ranks. ``free``: unchanged; ``unit``: every column
    scaled to norm 1; ``orthonormal``: the Q factor of a reduced QR decomposition with the signs of R's diagonal
    folded in, so that a matrix whose columns are already orthonormal is returned unchanged (to rounding) and the
    map is continuous: a small change of ``out`` gives a small change of the basis. Differentiable."""
    if basis == "free":
        return out
    if basis == "unit":
        return out / out.norm(dim=-2, keepdim=True).clamp_min(1e-12)
    if out.shape[-2] < out.shape[-1]:
        raise ValueError(f"basis='orthonormal' needs at least as many rows as ranks, got a {tuple(out.shape[-2:])} "
                         f"matrix: lower init_r or use basis='free'.")
    q, r = torch.linalg.qr(out.float())
    sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (q * sign.unsqueeze(-2)).to(out.dtype)


class RoleGenerator(nn.Module):
    """Generates one role's tensors for all layers from a shared hypernetwork.

    Args:
        lengths: ``L_i`` for every adapted layer (tokens per matrix in row layout).
        width: ``w``, the token width in row layout (same for all layers).
        rank_axis: 1 if the columns of the ``(L, w)`` matrix are the ranks (P, Q), 0 if the rows are (lambda).
        init: ``orthonormal``, ``normal`` or ``zeros`` for the seed state.
        initial: seed states given per layer (``(L_i, w)`` each) instead of ``init``.
        compact_offset: store the identity offset as float16 (`_constant`), for a role whose first generation
            only needs to be close to its seed state (HyperAdaLoRA's P and Q: lambda_0 = 0 makes step 0 the
            identity whatever they are); a role that must start exactly at its seed (lambda, LoRA's B) keeps it
            exact.
        basis: ``free``, ``unit`` or ``orthonormal``: what every generated matrix is made into (`to_basis`); only
            for roles whose columns are ranks (``rank_axis=1``).
    """

    def __init__(self, role: str, lengths: list[int], width: int, rank_axis: int, init: str, cfg,
                 generator: torch.Generator, initial: Optional[list[torch.Tensor]] = None,
                 compact_offset: bool = False, basis: str = "free"):
        super().__init__()
        if basis != "free" and rank_axis != 1:
            raise ValueError(f"basis={basis!r} applies to matrices whose columns are ranks (P, Q), not to {role}.")
        if basis == "orthonormal" and min(lengths) < width:
            raise ValueError(f"basis='orthonormal' needs at least as many rows as ranks: a {role} matrix has "
                             f"{min(lengths)} rows and {width} ranks. Lower init_r or use basis='free'.")
        self.basis = basis
        self.role, self.width, self.rank_axis = role, width, rank_axis
        self.element = cfg.tokens == "element"
        self.generation = cfg.generation
        self.output_scale = cfg.output_scale
        self.increment_scale = cfg.increment_scale
        self.center = cfg.center_increment
        self.hypernet_dim = cfg.hypernet_dim
        self.chunk = cfg.element_chunk
        self.checkpoint = cfg.hypernet_checkpointing
        n_layers = len(lengths)
        groups: "OrderedDict[int, list[int]]" = OrderedDict()
        for i, length in enumerate(lengths):
            groups.setdefault(length, []).append(i)
        self.group_lengths = list(groups)
        self.layer_slot: list[tuple[int, int]] = [None] * n_layers  # layer -> (group, position in group)
        for g, (length, members) in enumerate(groups.items()):
            if self.element and length * width > cfg.max_element_tokens:
                raise ValueError(
                    f"tokens='element' would make {length * width:,} tokens for one {role} matrix (limit "
                    f"max_element_tokens={cfg.max_element_tokens:,}). Use tokens='row' or raise the limit.")
            for pos, i in enumerate(members):
                self.layer_slot[i] = (g, pos)
            self.register_buffer(f"ids_{g}", torch.tensor(members, dtype=torch.long), persistent=False)
            if initial is not None:  # given seed states, one (length, width) per layer
                state = torch.stack([initial[i].detach().float().cpu() for i in members])
            else:
                state = init_state(init, len(members), length, width, rank_axis, cfg.init_std, generator)
            self.register_buffer(f"state_{g}", state)
        ranks = width if rank_axis == 1 else max(lengths)
        # learned codes per row of P / column of Q (context 'feature' / 'layer_feature'), and with lambda_codes per
        # singular value of lambda (one (r, feature_dim) table per layer)
        codes = (cfg.context in ("feature", "layer_feature") and rank_axis == 1) or (
            cfg.context == "layer_feature" and cfg.lambda_codes)
        uses_positions = self.element or rank_axis == 0
        self.hypernet = Hypernetwork(
            token_width=1 if self.element else width, dim=cfg.hypernet_dim, arch=cfg.hypernet,
            heads=cfg.hypernet_heads, ffn_mult=cfg.hypernet_ffn_mult,
            n_modules=n_layers if cfg.context != "none" else 0,
            n_positions=ranks if (uses_positions and cfg.context != "none") else 0,
            attention=cfg.attention, n_induced=cfg.n_induced,
            feature_dim=cfg.feature_dim if codes else None)
        # context='feature': a learned embedding of each row of P / column of Q (the feature it reads or writes),
        # one table per group of equal length, so that layers of the same dimension share what they learn about it
        # context='layer_feature': one embedding per row of every layer (n_g, L_g, d_h), nothing shared
        self.feature_embeddings = nn.ParameterList()
        if codes:
            feature_dim = cfg.feature_dim or cfg.hypernet_dim
            for length, members in groups.items():
                shape = (length, feature_dim) if cfg.context == "feature" else (len(members), length, feature_dim)
                self.feature_embeddings.append(nn.Parameter(torch.randn(*shape, generator=generator)))
        # identity='offset': a non-zero output projection from the start (every parameter gets a gradient at step 1),
        # and the initial increment H_phi0(X_0) subtracted as a constant, so the first generation is still X_0
        # (with ``compact_offset``, to float16 rounding: the constant is stored at half precision, `_constant`)
        self.offset = cfg.identity == "offset"
        if self.offset:
            self.hypernet.out_proj.reset_parameters()
            with torch.no_grad():
                for g in range(len(self.group_lengths)):
                    offset = self._raw_increment(g).detach()
                    self.register_buffer(f"offset_{g}", _constant(offset) if compact_offset else offset.clone())
        self._used_weight: Optional[torch.Tensor] = None  # output projection used by the last training pass
        self._used_bias: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ generation
    def states(self) -> list[torch.Tensor]:
        return [getattr(self, f"state_{g}") for g in range(len(self.group_lengths))]

    def _positions(self, length: int, device) -> Optional[torch.Tensor]:
        if self.hypernet.position_embedding is None:
            return None
        if self.element:  # element k of a (length, width) matrix sits at rank k % width (cols) or k // width (rows)
            k = torch.arange(length * self.width, device=device)
            return k % self.width if self.rank_axis == 1 else k // self.width
        return torch.arange(length, device=device)

    def _pass(self, tokens: torch.Tensor, scale: float, *rest):
        return self.hypernet(tokens * scale if scale != 1.0 else tokens, *rest)

    def _run(self, tokens: torch.Tensor, scale: float, *rest):
        """The hypernetwork pass on ``tokens * scale``; with gradients, its activations are recomputed in backward
        instead of stored (tens of thousands of tokens per step: activation memory would otherwise exceed
        AdaLoRA's). The scaling happens inside the pass, so only the unscaled state (a buffer) is kept for it."""
        if self.checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._pass, tokens, scale, *rest, use_reentrant=False)
        return self._pass(tokens, scale, *rest)

    def _increment(self, g: int) -> torch.Tensor:
        """The hypernetwork's increment for group ``g``: (n_g, L_g, w), before the output scale, less the identity
        offset; with ``center_increment``, the part of a P / Q increment shared by all rows of the matrix removed
        (after the offset, so that a rounded offset leaves the increment exactly centred)."""
        inc = self._raw_increment(g)
        if self.offset:
            inc = inc - getattr(self, f"offset_{g}").to(inc.dtype)
        if self.center and self.rank_axis == 1:
            inc = inc - inc.mean(dim=1, keepdim=True)
        return inc

    def _raw_increment(self, g: int) -> torch.Tensor:
        """The hypernetwork's output for group ``g``: (n_g, L_g, w)."""
        length = self.group_lengths[g]
        state = getattr(self, f"state_{g}")
        ids = getattr(self, f"ids_{g}")
        n = state.shape[0]
        in_scale = math.sqrt(length) if self.rank_axis == 1 else 1.0  # unit-scale entries for the network
        dtype = self.hypernet.in_proj.weight.dtype
        x = state.to(dtype)
        pos = self._positions(length, state.device)
        feat = self.feature_embeddings[g] if len(self.feature_embeddings) else None
        if not self.element:
            return self._run(x, in_scale, ids, pos, None, feat)
        tokens = x.reshape(n, length * self.width, 1)
        n_tok = tokens.shape[1]
        if feat is not None:  # element (j, k) of the (length, width) matrix stands for feature j
            feat = feat.repeat_interleave(self.width, dim=-2)
        if n_tok > self.chunk:
            chunks, padding, _ = chunk_tokens(tokens, self.chunk)
            per = chunks.shape[0] // n
            pos_c = None
            if pos is not None:
                pos_c = torch.nn.functional.pad(pos, (0, per * self.chunk - n_tok)).view(per, self.chunk)
                pos_c = pos_c.repeat(n, 1)
            feat_c = None
            if feat is not None:
                feat_c = torch.nn.functional.pad(feat, (0, 0, 0, per * self.chunk - n_tok))
                if feat_c.dim() == 2:  # shared by the layers of the group
                    feat_c = feat_c.view(per, self.chunk, -1).repeat(n, 1, 1)
                else:                  # one per layer: (n, per * chunk, d) -> (n * per, chunk, d)
                    feat_c = feat_c.reshape(n * per, self.chunk, -1)
            inc = self._run(chunks, in_scale, ids.repeat_interleave(per), pos_c, padding, feat_c)
            inc = inc.reshape(n, per * self.chunk, 1)[:, :n_tok]
        else:
            inc = self._run(tokens, in_scale, ids, pos, None, feat)
        return inc.reshape(n, length, self.width)

    def generate(self, track: bool = False) -> list[torch.Tensor]:
        """One batched pass per group: returns [(n_g, L_g, w)] generated tensors.

        ``track=True`` (a training pass) remembers the output projection used, for `commit`.
        """
        if track:
            self._used_weight = self.hypernet.out_proj.weight.detach().clone()
            self._used_bias = self.hypernet.out_proj.bias.detach().clone()
        outs = []
        for g, length in enumerate(self.group_lengths):
            state = getattr(self, f"state_{g}")
            inc = self._increment(g)
            if self.increment_scale == "width":  # an Adam step then moves every entry by about the learning rate
                factor = self.output_scale / self.hypernet_dim
            else:                                 # in units of the state's typical entry
                factor = self.output_scale / (math.sqrt(length) if self.rank_axis == 1 else 1.0)
            outs.append(to_basis(state + inc.to(state.dtype) * factor, self.basis))
        return outs

    @torch.no_grad()
    def commit(self, generated: list[torch.Tensor], momentum: float) -> None:
        """Recurrent mode, after an optimizer step: the generated tensors become the new state."""
        if self.generation != "recurrent":
            return
        for g, out in enumerate(generated):
            getattr(self, f"state_{g}").copy_(out.detach())
        if momentum < 1.0 and self._used_weight is not None:
            hn = self.hypernet
            hn.anchor_weight.mul_(momentum).add_(self._used_weight.to(hn.anchor_weight), alpha=1.0 - momentum)
            hn.anchor_bias.mul_(momentum).add_(self._used_bias.to(hn.anchor_bias), alpha=1.0 - momentum)

    def per_layer(self, outs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Views of the generated group tensors, one (L_i, w) per layer, in layer order, from one `unbind` per group:
        its backward is a single stack of the layers' gradients (indexing each layer would cost a zero-filled copy
        of the whole group per layer in backward, quadratic in the number of layers)."""
        views = [t.unbind(0) for t in outs]
        return [views[g][pos] for g, pos in self.layer_slot]


FEATURE_GROUP = "feature_embeddings"  # the optimizer group of the row embeddings (see hypernetwork_param_groups)


def feature_lr_multiplier(cfg, step: int, total_steps: int) -> float:
    """Factor on the row embeddings' lr at 0-based optimizer step ``step`` of ``total_steps``: their ratio moves
    geometrically from ``feature_lr_ratio`` at step 0 to ``feature_lr_ratio_final`` at the last step (1.0 when
    ``feature_lr_ratio_final`` is None). Applied on top of the run's own lr schedule."""
    final = getattr(cfg, "feature_lr_ratio_final", None)
    start = cfg.feature_lr_ratio if cfg.feature_lr_ratio is not None else cfg.hypernet_lr_ratio
    if final is None or total_steps is None or total_steps <= 1:
        return 1.0
    frac = min(max(step / (total_steps - 1), 0.0), 1.0)
    return (final / start) ** frac


HYPERNET_GROUP = "hypernetworks"  # the optimizer group of the bodies (and module / position embeddings)


def group_lr_factor(group: dict, cfg, step: int, total_steps: int) -> float:
    """Factor on an optimizer group's lr at 0-based step ``step``: for the hypernetworks' two groups the linear
    warm-up over ``hypernet_warmup_steps`` and, for the row embeddings, their schedule (`feature_lr_multiplier`);
    1.0 for any other group. Used by the training loop and the Trainer callback alike."""
    name = group.get("name")
    if name not in (HYPERNET_GROUP, FEATURE_GROUP):
        return 1.0
    warmup = getattr(cfg, "hypernet_warmup_steps", 0)
    factor = min(1.0, (step + 1) / warmup) if warmup else 1.0
    if name == FEATURE_GROUP:
        factor *= feature_lr_multiplier(cfg, step, total_steps)
    return factor


def hypernetwork_param_groups(generators: nn.ModuleDict, cfg, lr: float, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer groups of the hypernetworks: their bodies (and module / position embeddings) at
    ``lr * hypernet_lr_ratio``; the row embeddings of context 'feature' / 'layer_feature', which hold one code
    per row of a layer and act like per-layer parameters, at ``lr * feature_lr_ratio`` (None: the same ratio)."""
    features = [p for g in generators.values() for p in g.feature_embeddings]
    ids = {id(p) for p in features}
    body = [p for p in generators.parameters() if id(p) not in ids]
    feature_ratio = cfg.feature_lr_ratio if cfg.feature_lr_ratio is not None else cfg.hypernet_lr_ratio
    groups = [{"params": body, "lr": lr * cfg.hypernet_lr_ratio, "weight_decay": weight_decay, "name": HYPERNET_GROUP},
              {"params": features, "lr": lr * feature_ratio, "weight_decay": weight_decay,
               "name": FEATURE_GROUP}]
    return [g for g in groups if g["params"]]
