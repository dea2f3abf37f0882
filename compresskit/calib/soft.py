"""Soft code assignments for zero-data calibration (VQ4DiT, Deng et al. 2024).

Instead of one code per subvector, keep its ``n_candidates`` nearest centroids and learnable logits
over them; the weight is the softmax-weighted mix of the candidates, which is differentiable with
respect to both the logits and the centroid table, so a task loss (VQ4DiT: match the full-precision
model's outputs) can train both with gradient descent. As training goes, subvectors whose best
candidate is nearly certain are frozen to it (:meth:`SoftAssignment.freeze_confident`); at the end
every subvector is hardened to its most likely candidate and written back into the quantizer.

The centroid table is a parameter in float32, a copy of the quantizer's layout table (see
:class:`~compresskit.quantizers.codebook.CodebookLayout`): for a pooled PQ the pool ``[P, d]``
(codebook slots look it up through the fixed ``slot_rows``), otherwise the codebooks
``[n_books, k, d]``. :meth:`SoftAssignment.write_back` stores it and the hardened codes through the
quantizer's setters, in place.
"""
from __future__ import annotations

import torch
from torch import nn

from compresskit.calib.estep import centroid_target, codebook_layout_of
from compresskit.errors import CompressKitError


class SoftAssignment(nn.Module):
    """Learnable soft codes over the top ``n_candidates`` centroids of every subvector of ``W``.

    ``candidates  # [m, n_sub, n] int64`` codes within each subvector's book, the current code first;
    ``logits      # [m, n_sub, n] float32`` parameter, initialised to ``-distance / temperature``
    with the current code raised to be the most likely; ``table`` the centroid parameter (see module
    docstring); ``frozen  # [m, n_sub] bool`` and ``frozen_choice  # [m, n_sub]`` index into candidates.
    ``temperature`` defaults to the mean squared distance from a subvector to its candidates.
    """

    def __init__(self, quantizer, W: torch.Tensor, n_candidates: int = 4, temperature: float | None = None):
        super().__init__()
        layout = codebook_layout_of(quantizer, "SoftAssignment")
        table, book = layout.centroids(), layout.book  # [B, k, d] float32, [m, n_sub]
        n_books, k, d = table.shape
        m, n_sub = quantizer.codes_.shape
        if isinstance(n_candidates, bool) or not isinstance(n_candidates, int) or n_candidates < 1:
            raise CompressKitError(f"SoftAssignment: n_candidates must be a positive integer, got {n_candidates!r}")
        if W.shape[0] != m:
            raise CompressKitError(f"SoftAssignment: the weight {tuple(W.shape)} does not match the quantizer's codes {(m, n_sub)}")
        W2, row_s = centroid_target(quantizer, W)  # centroids live in the space of W / row scale
        if n_sub * d - W2.shape[1] not in range(d):
            raise CompressKitError(f"SoftAssignment: the weight {tuple(W.shape)} does not match the quantizer's codes {(m, n_sub)} (d={d})")
        n = min(n_candidates, k)
        self.shape = tuple(quantizer.shape_)
        self.n_cols = W2.shape[1]
        self.k, self.d = k, d
        self.code_dtype = quantizer.codes_.dtype

        sub = nn.functional.pad(W2, (0, n_sub * d - self.n_cols)).reshape(m, n_sub, d)
        cur = quantizer.codes_.long()  # [m, n_sub]
        cand = torch.empty(m, n_sub, n, dtype=torch.int64)
        cand_dist = torch.empty(m, n_sub, n)
        for g in range(n_sub):  # one subspace at a time: memory O(m k d), not O(m n k)
            dist = (sub[:, g, None, :] - table[book[:, g]]).pow(2).sum(-1)  # [m, k]
            others = dist.scatter(1, cur[:, g, None], float("inf")).topk(n - 1, dim=-1, largest=False).indices
            cand[:, g] = torch.cat([cur[:, g, None], others], dim=-1)  # current code first
            cand_dist[:, g] = dist.gather(1, cand[:, g])
        if temperature is None:
            temperature = float(cand_dist.mean().clamp(min=1e-12))
        logits = -cand_dist / temperature
        if n > 1:  # the current code (possibly not the nearest, after an E-step) starts most likely
            logits[..., 0] = torch.maximum(logits[..., 0], logits[..., 1:].max(-1).values + 1.0)

        slot = book[..., None] * k + cand  # [m, n_sub, n] index into the flat codebook slots
        self.table = nn.Parameter(layout.table.detach().float().clone())  # [P, d] or [B, k, d]
        self.register_buffer("entry", layout.slot_rows.reshape(-1)[slot])  # [m, n_sub, n] rows of table.reshape(-1, d)
        self.register_buffer("candidates", cand)
        self.register_buffer("row_scale", row_s)  # [m], ones without row_scale
        self.logits = nn.Parameter(logits)
        self.register_buffer("frozen", torch.zeros(m, n_sub, dtype=torch.bool))
        self.register_buffer("frozen_choice", torch.zeros(m, n_sub, dtype=torch.int64))

    def probs(self) -> torch.Tensor:
        """Assignment probabilities ``[m, n_sub, n]``; one-hot (no gradient to logits) where frozen."""
        p = self.logits.softmax(-1)
        hard = nn.functional.one_hot(self.frozen_choice, p.shape[-1]).to(p.dtype)
        return torch.where(self.frozen[..., None], hard, p)

    def weight(self) -> torch.Tensor:
        """The soft weight ``sum_j p_j centroid_j`` in the quantizer's fitted shape, float32."""
        vecs = self.table.reshape(-1, self.d)[self.entry]  # [m, n_sub, n, d]
        sub = (self.probs().unsqueeze(-1) * vecs).sum(-2)  # [m, n_sub, d]
        W = sub.reshape(sub.shape[0], -1)[:, : self.n_cols] * self.row_scale[:, None]
        return W.reshape(self.shape)

    def forward(self) -> torch.Tensor:
        return self.weight()

    def entropy(self) -> torch.Tensor:
        """Mean entropy (nats) of the assignments, frozen subvectors counting as 0: a differentiable
        regulariser. Adding ``beta * entropy()`` to the loss, with beta ramped up during training,
        pushes each subvector toward one candidate and so closes the gap between the soft weight and
        the hardened one (without it the mix drifts to points no single centroid reaches)."""
        p = self.logits.softmax(-1)
        h = -(p * p.clamp_min(1e-12).log()).sum(-1)  # [m, n_sub]
        return torch.where(self.frozen, torch.zeros_like(h), h).mean()

    @torch.no_grad()
    def freeze_confident(self, threshold: float = 0.99) -> int:
        """Freeze subvectors whose most likely candidate has probability > ``threshold`` to that
        candidate (cumulative over calls; frozen ones stay frozen). Returns how many were newly frozen."""
        p = self.logits.softmax(-1)
        top, choice = p.max(-1)
        new = (top > threshold) & ~self.frozen
        self.frozen_choice[new] = choice[new]
        self.frozen |= new
        return int(new.sum())

    @torch.no_grad()
    def harden(self) -> torch.Tensor:
        """Codes ``[m, n_sub]`` in the quantizer's code dtype: the most likely candidate (frozen choice where frozen)."""
        choice = torch.where(self.frozen, self.frozen_choice, self.logits.argmax(-1))
        return self.candidates.gather(2, choice[..., None]).squeeze(2).to(self.code_dtype)

    @torch.no_grad()
    def write_back(self, quantizer) -> None:
        """Store the trained centroid table (rounded to its stored dtype, float16 for PQ and VQ) and
        the hardened codes in ``quantizer``, in place through its setters: a compressed module
        sharing those tensors sees the result, and no tensor is replaced."""
        codebook_layout_of(quantizer, "SoftAssignment.write_back")
        quantizer.set_centroids(self.table.detach())
        quantizer.set_codes(self.harden())
