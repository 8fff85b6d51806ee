"""Metrics (SPEC §7): the likelihood bound over a validation set.

val/nll is the mean per-token loss over every counted position of every sequence (nats),
val/ppl = exp(nll), val/bpd = nll / ln 2.
"""
import math

import torch
import torchmetrics


class NLLMetric(torchmetrics.Metric):
    """Token-weighted mean of per-token losses, summed across batches and DDP ranks in float64."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state('total', torch.zeros((), dtype=torch.float64), dist_reduce_fx='sum')
        self.add_state('count', torch.zeros((), dtype=torch.float64), dist_reduce_fx='sum')

    def update(self, weighted_losses: torch.Tensor, weights: torch.Tensor):
        """weighted_losses, weights (B, L): per-token loss times its weight (0 at excluded positions)."""
        self.total += weighted_losses.double().sum()
        self.count += weights.double().sum()

    def compute(self) -> tuple[float, float, float, int]:
        """(nll, ppl, bpd, tokens) over everything seen since the last reset."""
        count = self.count.item()
        nll = self.total.item() / count if count else float('nan')
        ppl = math.exp(nll) if nll < 700 else float('inf')
        return nll, ppl, nll / math.log(2), int(round(count))
