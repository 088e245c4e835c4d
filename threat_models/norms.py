"""Perturbation norms as registered geometry: distance, projection, random start, step.

A threat spec names its norm (``--set norm=l2``); attacks declare which norms they
support and take every geometric operation from the :class:`Norm` registered under
that name, so adding a norm is one class here and no engine edit. Budgets ``eps`` are
floats or per-example ``(B,)`` tensors (training data with random budgets).

Projection (spec section 0): l_inf clips the perturbation to [-eps, eps]; l_2 scales it
by min(1, eps / ||delta||_2); both then clip the image to [0, 1].
"""

from __future__ import annotations

import torch

from harness.core.registry import Registry


def flat_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-example l_2 norm of ``t``, shaped (B, 1, 1, 1) to broadcast over ``t``."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def broadcast_eps(eps, x: torch.Tensor):
    """A float, or a per-example (B,) tensor of budgets shaped to broadcast over x."""
    if isinstance(eps, torch.Tensor):
        return eps.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return eps


class Norm:
    """One perturbation geometry. Subclasses set ``name`` and ``library_name``."""

    name: str = ""
    #: how pyautoattack and torchattacks spell it
    library_name: str = ""

    def distance(self, delta: torch.Tensor) -> torch.Tensor:
        """(B,) size of each perturbation."""
        raise NotImplementedError

    def clip_delta(self, delta: torch.Tensor, eps) -> torch.Tensor:
        """The perturbation moved into the eps-ball (before the [0, 1] clip)."""
        raise NotImplementedError

    def project(self, x_adv: torch.Tensor, x: torch.Tensor, eps) -> torch.Tensor:
        """Project onto the eps-ball around ``x`` intersected with [0, 1]."""
        return (x + self.clip_delta(x_adv - x, broadcast_eps(eps, x))).clamp(0.0, 1.0)

    def sample_delta(self, x: torch.Tensor, eps, generator: torch.Generator | None) -> torch.Tensor:
        """A random perturbation inside the ball (the random start of PGD)."""
        raise NotImplementedError

    def random_start(self, x: torch.Tensor, eps, generator: torch.Generator | None) -> torch.Tensor:
        """``x`` plus a random perturbation inside the ball, projected."""
        return self.project(x + self.sample_delta(x, broadcast_eps(eps, x), generator), x, eps)

    def ascent_step(self, grad: torch.Tensor, alpha) -> torch.Tensor:
        """The steepest-ascent step of size ``alpha`` for this norm."""
        raise NotImplementedError


class LInf(Norm):
    """The l_inf ball: sign steps, elementwise clipping."""

    name, library_name = "linf", "Linf"

    def distance(self, delta):
        return delta.flatten(1).abs().max(1).values

    def clip_delta(self, delta, eps):
        e = torch.as_tensor(eps, dtype=delta.dtype, device=delta.device)
        return torch.maximum(torch.minimum(delta, e), -e)

    def sample_delta(self, x, eps, generator):
        gdev = generator.device if generator is not None else x.device
        u = torch.rand(x.shape, generator=generator, device=gdev, dtype=x.dtype).to(x.device)
        return (2 * u - 1) * eps

    def ascent_step(self, grad, alpha):
        return alpha * grad.sign()


class L2(Norm):
    """The l_2 ball: normalised steps, projection by rescaling."""

    name, library_name = "l2", "L2"

    def distance(self, delta):
        return delta.flatten(1).norm(dim=1)

    def clip_delta(self, delta, eps):
        return delta * torch.clamp(eps / (flat_norm(delta) + 1e-12), max=1.0)

    def sample_delta(self, x, eps, generator):
        gdev = generator.device if generator is not None else x.device
        d = torch.randn(x.shape, generator=generator, device=gdev, dtype=x.dtype).to(x.device)
        r = torch.rand((x.shape[0],), generator=generator, device=gdev, dtype=x.dtype).to(x.device)
        return d / (flat_norm(d) + 1e-12) * (eps * r.view(-1, *([1] * (x.dim() - 1))))

    def ascent_step(self, grad, alpha):
        return alpha * grad / (flat_norm(grad) + 1e-12)


NORMS: Registry[Norm] = Registry("norm")
for _norm in (LInf(), L2()):
    NORMS.register(_norm.name, _norm)
