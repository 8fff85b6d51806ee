"""Exponential moving average of the weights (SPEC §8), stored in checkpoints as checkpoint['ema']."""
import contextlib

import torch


class EMA:
    """shadow <- shadow - (1 - d)(shadow - theta), d = min(decay, (1 + n) / (10 + n))."""

    def __init__(self, parameters, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.shadow_params = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def update(self, parameters):
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        params = [p.detach() for p in parameters]
        torch._foreach_lerp_(self.shadow_params, [p.to(s.dtype) for p, s in zip(params, self.shadow_params)], 1 - d)

    @torch.no_grad()
    def copy_to(self, parameters):
        for s, p in zip(self.shadow_params, parameters):
            p.copy_(s)

    @contextlib.contextmanager
    def applied(self, parameters):
        """Temporarily swap the EMA weights into `parameters` (e.g. for evaluation)."""
        parameters = list(parameters)
        backup = [p.detach().clone() for p in parameters]
        self.copy_to(parameters)
        try:
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, parameters):
                    p.copy_(b)

    def to(self, device):
        self.shadow_params = [s.to(device) for s in self.shadow_params]
        return self

    def state_dict(self) -> dict:
        return {'decay': self.decay, 'num_updates': self.num_updates, 'shadow_params': self.shadow_params}

    def load_state_dict(self, state: dict):
        if len(state['shadow_params']) != len(self.shadow_params):
            raise ValueError(f"checkpoint EMA has {len(state['shadow_params'])} tensors but the model has "
                             f"{len(self.shadow_params)} parameters: the checkpoint is of another model")
        self.decay = state['decay']
        self.num_updates = state['num_updates']
        self.shadow_params = [s.to(p.device, p.dtype) for s, p in zip(state['shadow_params'], self.shadow_params)]
