"""InfoNCE: the contrastive loss of stages 2 and 3 (in-batch and hard negatives, false-negative masking)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DocIds = Tensor | Sequence[Hashable | None]


class InfoNCELoss(nn.Module):
    def __init__(
        self,
        temperature: float = 0.03,
        in_batch_negatives: bool = True,
        share_hard_negatives: bool = True,
        normalize: bool = False,
    ) -> None:
        """
        InfoNCE over (query, positive, hard negatives) embeddings: every query is scored against its
        own positive and a set of negatives, and the loss is the cross-entropy of picking the positive.

        For a batch of B queries the logits of row i are ``q_i . c / temperature`` for the candidates

        - the B positives of the batch (``in_batch_negatives=True``: the other B-1 are negatives of row
          i) or only its own positive (``False``), followed by
        - the hard negatives of the whole batch (``share_hard_negatives=True``: B*k columns) or only
          its own k (``False``).

        The target of row i is its own positive. Negatives can be padded: a ``neg_mask`` says which
        slots are real, so queries may carry fewer than k negatives. False negatives are masked when
        doc ids are given: a candidate whose doc id equals the doc id of row i's positive (the same
        document as another query's positive, or a mined "negative" that is the ground truth) is
        taken out of row i's softmax instead of being pushed away.

        The embeddings are used as given (the embedder of this project L2-normalises them already,
        so ``q . c`` is the cosine similarity); ``normalize=True`` normalises them here. Logits are
        computed in float32 when the embeddings are float16 / bfloat16.

        The math is in :meth:`compute_loss_from_embeddings`; :meth:`forward` delegates to it, so the
        loss can be called on embeddings directly, or by :class:`training.losses.gradcache.GradCache`
        on representations computed in mini-batches.

        Args:
            temperature: the softmax temperature (logits are divided by it). 0.03 as in the paper
                (equivalently a scale of ~33.3).
            in_batch_negatives: use the positives of the other queries of the batch as negatives.
                Stage 2 warm-up trains with these only.
            share_hard_negatives: use the hard negatives of every query of the batch as negatives of
                every query (True), or only the query's own (False).
            normalize: L2-normalise q, p and n before scoring.

        References:
            - Representation Learning with Contrastive Predictive Coding (InfoNCE): https://arxiv.org/abs/1807.03748
            - Efficient Natural Language Response Suggestion for Smart Reply (in-batch negatives),
              Section 4.4: https://arxiv.org/abs/1705.00652
            - Dense Passage Retrieval for Open-Domain Question Answering (in-batch + hard negatives):
              https://arxiv.org/abs/2004.04906
            - Magic-MM-Embedding (InfoNCE, temperature 0.03; judged hard negatives):
              https://arxiv.org/abs/2602.05275

        Requirements:
            1. One positive per query; the pairs (q_i, p_i) are aligned by row.
            2. Optionally k hard negatives per query, padded with ``neg_mask`` when fewer.

        Inputs:
            +--------------------------------------+----------------------------------------------+
            | Tensors                              | Shape                                        |
            +======================================+==============================================+
            | q: query embeddings                  | (B, d)                                       |
            +--------------------------------------+----------------------------------------------+
            | p: positive embeddings               | (B, d)                                       |
            +--------------------------------------+----------------------------------------------+
            | n: hard negatives (optional)         | (B, k, d), or flat (B*k, d) in query order   |
            +--------------------------------------+----------------------------------------------+
            | neg_mask: real negatives (optional)  | (B, k) or (B*k,), bool, True = real          |
            +--------------------------------------+----------------------------------------------+
            | pos_doc_ids (optional)               | B ids (int tensor or sequence of hashables)  |
            +--------------------------------------+----------------------------------------------+
            | neg_doc_ids (optional)               | B*k ids, (B, k) or flat; None / -1 = unknown |
            +--------------------------------------+----------------------------------------------+

        Example:
            ::

                import torch
                import torch.nn.functional as F
                from assay.training.losses import InfoNCELoss

                loss_fn = InfoNCELoss()  # temperature 0.03, in-batch + shared hard negatives
                q = F.normalize(torch.randn(4, 8), dim=-1)
                p = F.normalize(torch.randn(4, 8), dim=-1)
                n = F.normalize(torch.randn(4, 2, 8), dim=-1)  # 2 hard negatives per query
                loss = loss_fn(
                    q, p, n,
                    pos_doc_ids=["d0", "d1", "d2", "d0"],          # q0 and q3 share a document
                    neg_doc_ids=[["d5", "d6"], ["d7", "d1"], ["d8", "d9"], ["d4", None]],
                )
        """
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.in_batch_negatives = bool(in_batch_negatives)
        self.share_hard_negatives = bool(share_hard_negatives)
        self.normalize = bool(normalize)

    def forward(
        self,
        q: Tensor,
        p: Tensor,
        n: Tensor | None = None,
        *,
        neg_mask: Tensor | None = None,
        pos_doc_ids: DocIds | None = None,
        neg_doc_ids: DocIds | None = None,
        exclude: Tensor | None = None,
    ) -> Tensor:
        """The mean InfoNCE loss of the batch; see :meth:`compute_loss_from_embeddings`."""
        return self.compute_loss_from_embeddings(
            q, p, n, neg_mask=neg_mask, pos_doc_ids=pos_doc_ids, neg_doc_ids=neg_doc_ids, exclude=exclude
        )

    def compute_loss_from_embeddings(
        self,
        q: Tensor,
        p: Tensor,
        n: Tensor | None = None,
        *,
        neg_mask: Tensor | None = None,
        pos_doc_ids: DocIds | None = None,
        neg_doc_ids: DocIds | None = None,
        exclude: Tensor | None = None,
    ) -> Tensor:
        """
        The mean over queries of ``-log softmax(logits_i)[target_i]``.

        Args:
            q: (B, d) query embeddings.
            p: (B, d) positive embeddings, row i the positive of query i.
            n: hard negatives, (B, k, d) or flat (B*k, d) grouped by query (query 0's k first).
            neg_mask: bool, (B, k) or (B*k,): True where the negative is real, False for padding.
            pos_doc_ids: doc id of each positive (B,), for false-negative masking: an int tensor, or
                a sequence of hashable ids (strings...) mapped to ints here. None or a negative int
                means unknown (never matched).
            neg_doc_ids: doc id of each negative, (B, k) (a tensor, or rows as lists / tuples) or
                flat (B*k,), same kinds of ids as ``pos_doc_ids``.
            exclude: bool (B, C) over the logit columns (see :meth:`compute_logits`): True takes that
                candidate out of row i's softmax (the query's other positives and judged false
                negatives, which doc ids alone cannot tell). Never row i's own target.

        Returns:
            A scalar tensor.
        """
        logits, target = self.compute_logits(
            q, p, n, neg_mask=neg_mask, pos_doc_ids=pos_doc_ids, neg_doc_ids=neg_doc_ids, exclude=exclude
        )
        return F.cross_entropy(logits, target)

    def compute_logits(
        self,
        q: Tensor,
        p: Tensor,
        n: Tensor | None = None,
        *,
        neg_mask: Tensor | None = None,
        pos_doc_ids: DocIds | None = None,
        neg_doc_ids: DocIds | None = None,
        exclude: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """
        The logits and the targets the loss takes the cross-entropy of.

        Columns: the positives (B of them with in-batch negatives, else 1: the own positive), then
        the hard negatives (B*k when shared, else k: the own ones). Masked entries (padding, false
        negatives, other queries' negatives when not shared) are ``-inf``.

        Returns:
            ``(logits, target)``: logits (B, P + N) with P in {B, 1} and N in {B*k, k, 0}; target
            (B,) long, ``arange(B)`` with in-batch negatives, else zeros.
        """
        if q.dim() != 2 or p.dim() != 2 or q.shape != p.shape:
            raise ValueError(f"q and p must both be (B, d); got {tuple(q.shape)} and {tuple(p.shape)}")
        b, d = q.shape
        n, neg_mask = _negatives_as_padded(n, neg_mask, b, d)
        k = 0 if n is None else n.shape[1]
        if self.normalize:
            q, p = F.normalize(q, dim=-1), F.normalize(p, dim=-1)
            n = None if n is None else F.normalize(n, dim=-1)
        if q.dtype in (torch.float16, torch.bfloat16):
            q, p = q.float(), p.float()
            n = None if n is None else n.float()

        pos_ids, neg_ids = _doc_ids_as_tensors(pos_doc_ids, neg_doc_ids, b, k, q.device)
        if neg_ids is not None and pos_ids is None:
            raise ValueError("neg_doc_ids needs pos_doc_ids (negatives are compared with the positive)")

        # Positive columns.
        if self.in_batch_negatives:
            pos_logits = q @ p.T  # (B, B)
            target = torch.arange(b, device=q.device)
            if pos_ids is not None:
                same = (pos_ids[:, None] == pos_ids[None, :]) & (pos_ids[:, None] >= 0)
                same.fill_diagonal_(False)  # the own positive stays the target
                pos_logits = pos_logits.masked_fill(same, float("-inf"))
        else:
            pos_logits = (q * p).sum(-1, keepdim=True)  # (B, 1)
            target = torch.zeros(b, dtype=torch.long, device=q.device)

        if n is None:
            return _excluded(pos_logits, exclude, target) / self.temperature, target

        # Hard-negative columns.
        if self.share_hard_negatives:
            neg_logits = q @ n.reshape(b * k, d).T  # (B, B*k)
            drop = ~neg_mask.reshape(1, b * k).expand(b, b * k)
            if neg_ids is not None:
                flat = neg_ids.reshape(1, b * k)
                drop = drop | ((flat == pos_ids[:, None]) & (pos_ids[:, None] >= 0))
        else:
            neg_logits = torch.einsum("bd,bkd->bk", q, n)  # (B, k)
            drop = ~neg_mask
            if neg_ids is not None:
                drop = drop | ((neg_ids == pos_ids[:, None]) & (pos_ids[:, None] >= 0))
        neg_logits = neg_logits.masked_fill(drop, float("-inf"))
        logits = _excluded(torch.cat([pos_logits, neg_logits], dim=1), exclude, target)
        return logits / self.temperature, target

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, in_batch_negatives={self.in_batch_negatives}, "
            f"share_hard_negatives={self.share_hard_negatives}, normalize={self.normalize}"
        )

    @property
    def citation(self) -> str:
        return """
@article{oord2018representation,
  title={Representation Learning with Contrastive Predictive Coding},
  author={van den Oord, Aaron and Li, Yazhe and Vinyals, Oriol},
  journal={arXiv preprint arXiv:1807.03748},
  year={2018}
}
"""


def _excluded(logits: Tensor, exclude: Tensor | None, target: Tensor) -> Tensor:
    """``logits`` with the ``exclude`` entries set to -inf; the targets are never excluded."""
    if exclude is None:
        return logits
    exclude = exclude.to(device=logits.device, dtype=torch.bool)
    if exclude.shape != logits.shape:
        raise ValueError(f"exclude must be {tuple(logits.shape)} like the logits; got {tuple(exclude.shape)}")
    rows = torch.arange(len(target), device=logits.device)
    if exclude[rows, target].any():
        raise ValueError("exclude masks a row's own positive")
    return logits.masked_fill(exclude, float("-inf"))


def _negatives_as_padded(
    n: Tensor | None, neg_mask: Tensor | None, b: int, d: int
) -> tuple[Tensor | None, Tensor | None]:
    """(B, k, d) negatives and a (B, k) bool mask from either accepted layout."""
    if n is None:
        if neg_mask is not None:
            raise ValueError("neg_mask given without negatives")
        return None, None
    if n.dim() == 2:
        if n.shape[1] != d or n.shape[0] % b:
            raise ValueError(f"flat negatives must be (B*k, d) = ({b}*k, {d}); got {tuple(n.shape)}")
        n = n.reshape(b, n.shape[0] // b, d)
    elif n.dim() != 3 or n.shape[0] != b or n.shape[2] != d:
        raise ValueError(f"negatives must be (B, k, d) = ({b}, k, {d}); got {tuple(n.shape)}")
    k = n.shape[1]
    if neg_mask is None:
        neg_mask = torch.ones(b, k, dtype=torch.bool, device=n.device)
    else:
        if neg_mask.numel() != b * k:
            raise ValueError(f"neg_mask must have B*k = {b * k} entries; got {tuple(neg_mask.shape)}")
        neg_mask = neg_mask.to(device=n.device, dtype=torch.bool).reshape(b, k)
    return n, neg_mask


def _doc_ids_as_tensors(
    pos_doc_ids: DocIds | None, neg_doc_ids: DocIds | None, b: int, k: int, device: torch.device
) -> tuple[Tensor | None, Tensor | None]:
    """Doc ids as int64 tensors, (B,) and (B, k); hashable ids are mapped to ints, None -> -1."""
    if pos_doc_ids is None and neg_doc_ids is None:
        return None, None
    if neg_doc_ids is not None and k == 0:
        raise ValueError("neg_doc_ids given without negatives")
    if isinstance(pos_doc_ids, Tensor) and (neg_doc_ids is None or isinstance(neg_doc_ids, Tensor)):
        pos = pos_doc_ids.to(device=device, dtype=torch.long).reshape(-1)
        neg = None if neg_doc_ids is None else neg_doc_ids.to(device=device, dtype=torch.long).reshape(-1)
    else:
        codes: dict[Hashable, int] = {}

        def encode(ids: DocIds) -> Tensor:
            values = ids.tolist() if hasattr(ids, "tolist") else list(ids)
            nested = bool(values) and isinstance(values[0], list | tuple)
            flat = [v for row in values for v in row] if nested else values
            out = [
                -1 if v is None or (isinstance(v, int) and v < 0) else codes.setdefault(v, len(codes))
                for v in flat
            ]
            return torch.tensor(out, dtype=torch.long, device=device)

        pos = None if pos_doc_ids is None else encode(pos_doc_ids)
        neg = None if neg_doc_ids is None else encode(neg_doc_ids)
    if pos is not None and pos.numel() != b:
        raise ValueError(f"pos_doc_ids must have B = {b} entries; got {pos.numel()}")
    if neg is not None:
        if neg.numel() != b * k:
            raise ValueError(f"neg_doc_ids must have B*k = {b * k} entries; got {neg.numel()}")
        neg = neg.reshape(b, k)
    return pos, neg
