"""Which keys a query may attend to: the one definition every kernel and every metric uses.

`Visibility.__call__(b, row, j)` is written with broadcasting tensor operations only, so the same
code serves as FlexAttention's `mask_mod` (scalar index tensors, traced by torch.compile) and as
the explicit boolean mask of the hand-written kernels and the metrics (index grids).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionEdit:
    """An ablation applied inside the attention function (docs/tokens.md, docs/design.md).

    window: restrict each query to the last `window` keys (itself included).
    keep_sinks: with `window`, the first `keep_sinks` tokens stay visible.
    drop_sinks: hide the first `drop_sinks` tokens (softmax renormalises over the rest).
    layers: attention layers the edit applies to (None = all).
    A query always sees itself, so no row is ever empty.
    """

    window: int | None = None
    keep_sinks: int = 0
    drop_sinks: int = 0
    layers: tuple[int, ...] | None = None

    def applies(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def hides_nothing(self, n_keys: int) -> bool:
        """True when no key of an `n_keys`-key input is hidden (window >= n_keys, no dropped sinks).

        The attention function then runs the unedited kernel, so such an edit leaves the
        model's outputs bit-for-bit unchanged.
        """
        return not self.drop_sinks and (self.window is None or self.window >= n_keys)

    def describe(self) -> str:
        parts = []
        if self.window is not None:
            parts.append(f"window:{self.window}" + (f",sinks:{self.keep_sinks}" if self.keep_sinks else ""))
        if self.drop_sinks:
            parts.append(f"nosink:{self.drop_sinks}")
        if self.layers is not None:
            parts.append("layers:" + "+".join(map(str, self.layers)))
        return ";".join(parts) or "none"


@dataclass(frozen=True, eq=False)
class Visibility:
    """The mask rule of one attention call.

    Query row i (of the call's T rows) sits at absolute key position `q_offset + i` (a KV cache
    puts earlier keys in front). Key j is visible to row i when j <= q_offset + i, the model's
    mask allows it (padding), it lies inside the layer's sliding window, it is among the keys
    the model's sparse selection picked for row i (`indices`, DeepSeek-V3.2-style top-k), and
    the attention edit (if any) keeps it; an edited row always sees itself.
    """

    q_offset: int
    mask: torch.Tensor | None  # bool [B, 1, T, S] from the model; None means plain causal
    window: int | None
    edit: AttentionEdit | None
    row_starts: torch.Tensor  # [B] key index of each batch row's first real token
    # token position of key index 0: > 0 only when a sliding-window cache dropped older keys
    key_start: int = 0
    # int [B, T, k]: the keys each query row may see (sparse top-k selection); entries < 0 or
    # >= S select nothing. None = no selection. Applied by `grid` (a scatter per block of rows),
    # not by `__call__`: FlexAttention is never given a rule with a selection (kernels.choose).
    indices: torch.Tensor | None = None

    def __call__(self, b, row, j):
        """Broadcasting bool: may query row `row` of batch row `b` see key `j` (the sparse
        selection aside: see `indices`)."""
        qa = row + self.q_offset
        vis = j <= qa
        if self.mask is not None:  # a mask with one query row applies to every row
            vis = vis & self.mask[b, 0, row if self.mask.shape[2] > 1 else 0 * row, j]
        if self.window is not None:
            vis = vis & (qa - j < self.window)
        edit = self.edit
        if edit is not None:
            rel = j + self.key_start - self.row_starts[b]  # key position within its batch row
            if edit.window is not None:
                local = qa - j < edit.window
                if edit.keep_sinks:
                    local = local | ((rel >= 0) & (rel < edit.keep_sinks))
                vis = vis & local
            if edit.drop_sinks:
                vis = vis & (rel >= edit.drop_sinks)
            vis = vis | (j == qa)  # a query always sees itself
        return vis

    def grid(self, q_rows: torch.Tensor, k_lo: int, k_hi: int) -> torch.Tensor:
        """Bool [B, Q, K]: may row q_rows[q] of each batch row see key k_lo + k."""
        device = q_rows.device
        B = self.row_starts.shape[0]
        b = torch.arange(B, device=device)[:, None, None]
        j = torch.arange(k_lo, k_hi, device=device)[None, None, :]
        vis = self(b, q_rows[None, :, None], j).expand(B, len(q_rows), k_hi - k_lo)
        if self.indices is not None:
            vis = vis & self.selected(q_rows, k_lo, k_hi)
        return vis

    def selected(self, q_rows: torch.Tensor, k_lo: int, k_hi: int) -> torch.Tensor:
        """Bool [B, Q, K]: is key k_lo + k among the keys the sparse selection gave row q_rows[q]."""
        idx = self.indices[:, q_rows].long() - k_lo  # [B, Q, k]
        n = k_hi - k_lo
        idx = torch.where((idx >= 0) & (idx < n), idx, n)  # out of range -> a spare column
        out = torch.zeros(idx.shape[:2] + (n + 1,), dtype=torch.bool, device=idx.device)
        out.scatter_(2, idx, True)
        out = out[..., :n]
        if self.edit is not None:  # an edited row always sees itself, selected or not
            out = out | (torch.arange(k_lo, k_hi, device=idx.device)[None, None]
                         == (q_rows + self.q_offset)[None, :, None])
        return out

    def for_batch_row(self, b: int) -> "Visibility":
        """The same rule for batch row `b` alone (index 0 of a batch of one)."""
        mask = None if self.mask is None else self.mask[b:b + 1]
        indices = None if self.indices is None else self.indices[b:b + 1]
        return Visibility(self.q_offset, mask, self.window, self.edit, self.row_starts[b:b + 1],
                          self.key_start, indices)

    @property
    def local_span(self) -> int | None:
        """Keys further back than this are never visible (window, or an edit window without
        kept sinks); None when a row may reach back to its start."""
        local = self.window
        e = self.edit
        if e is not None and e.window is not None and not e.keep_sinks:
            local = e.window if local is None else min(local, e.window)
        return local

    @property
    def causal_only(self) -> bool:
        """No padding mask, window, selection or edit: key j is visible to row i iff
        j <= q_offset + i."""
        return (self.mask is None and self.window is None and self.edit is None
                and self.indices is None)

    def cache_key(self) -> tuple:
        """Hashable identity of the rule (the mask tensor by object: the model passes one mask
        object to every layer of a forward)."""
        mask_id = None if self.mask is None else (id(self.mask), tuple(self.mask.shape))
        starts = None if self.mask is None and self.edit is None else id(self.row_starts)
        indices = None if self.indices is None else id(self.indices)
        return (self.q_offset, mask_id, self.window, self.edit, starts, self.key_start, indices)


def row_starts(mask: torch.Tensor | None, batch: int, device) -> torch.Tensor:
    """[B] first key any query of each batch row may see: its first real token under left
    padding, 0 otherwise."""
    if mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    seen = mask[:, 0].any(dim=1)
    starts = seen.int().argmax(dim=-1)
    return torch.where(seen.any(dim=-1), starts, torch.zeros_like(starts)).expand(batch)
