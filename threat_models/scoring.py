"""Scoring: R independent defended predictions per example and the three rules over them."""

from __future__ import annotations

from typing import Callable

import torch

#: The rules every example is scored under; a threat's ``scoring`` picks the headline.
RULES = ("single", "majority", "worst")


@torch.no_grad()
def predict_draws(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, draws: int, max_batch: int = 1024) -> torch.Tensor:
    """(B, draws) predicted labels from ``draws`` independent defended forward passes."""
    B = x.shape[0]
    per_chunk = max(1, min(draws, max_batch // max(B, 1)))
    out = []
    done = 0
    while done < draws:
        k = min(per_chunk, draws - done)
        logits = model(x.repeat(k, 1, 1, 1)).view(k, B, -1)
        out.append(logits.argmax(-1))
        done += k
    return torch.cat(out, 0).T.contiguous()


def score_draws(preds: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example correctness under the three rules, from (B, R) predictions.

    - ``single``: the first draw is correct (protocol P1);
    - ``majority``: the true class is the strict plurality of the R draws (P2; a tie
      with another class counts as wrong);
    - ``worst``: every one of the R draws is correct (worst-of-R, P3-style).
    """
    correct = preds == y[:, None]
    n_classes = int(max(preds.max().item(), y.max().item())) + 1
    counts = torch.zeros(preds.shape[0], n_classes, dtype=torch.long, device=preds.device)
    counts.scatter_add_(1, preds, torch.ones_like(preds))
    c_true = counts.gather(1, y[:, None]).squeeze(1)
    counts.scatter_(1, y[:, None], -1)
    majority = c_true > counts.max(1).values
    return {"single": correct[:, 0], "majority": majority, "worst": correct.all(1)}
