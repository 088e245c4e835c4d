"""Consistency disruption (CMAP's own attack, Algorithm 2; spec section 3.6).

The attacker knows the whole defense and the label. Starting from latents fitted to the
clean input (Algorithm 1 without the adversarial term), it runs Adam on the N latents
(the defense's learning rate) on

    L_atk = L_a({x_hat_i}, x) + beta L_d({z_i}) - gamma (1/N) sum_i CE(h(Pi(x_hat_i)), y)

where x_hat_i = (G(z_i) + 1) / 2 and Pi projects onto the eps-ball around the clean x and
[0, 1]. The N projected images are the adversarial candidates. The CE is taken on the
projected images (the sub-gradient of the projection is the identity inside the ball;
``on_projected=false`` takes it on x_hat_i, the other reading of the paper's Eq. 15).

Protocol P4: every ``eval_every`` iterations (and at the end) each candidate is run
through the full CMAP defense with fresh latents; an example is broken as soon as any
candidate is misclassified, and that candidate is what the attack returns (else the
candidate the classifier finds most adversarial). The robust count at every evaluation
is the attack's curve. The engine then re-scores the returned example with R fresh
purifications, so a reported break is a break of the defense, not of one draw.

gamma is unrecovered (the paper chose it per setting); the harness default is 10,
recorded with every job; ``grids/cmap-gamma.yaml`` sweeps {0.1, 1, 10, 100}.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from harness.core.attack import Attack, AttackConfig, AttackResult, register_attack
from harness.core.defense import CostLevel
from threat_models.losses import margin


@dataclass(frozen=True)
class ConsistencyDisruptionConfig(AttackConfig):
    """Options of the consistency-disruption attack (``--set consistency-disruption.KEY=VALUE``)."""

    gamma: float = field(default=10.0, metadata={"help": "weight of the classifier term (unrecovered; sweep 0.1-100)"})
    steps: int = field(default=50, metadata={"help": "K_atk Adam steps on the latents (spec: up to 200)"})
    eval_every: int = field(default=10, metadata={"help": "full-CMAP evaluation of the candidates every this many steps"})
    on_projected: bool = field(default=True, metadata={"help": "CE on the projected candidates (else on x_hat)"})

    def __post_init__(self):
        if self.steps < 1 or self.eval_every < 1:
            raise ValueError("steps and eval_every must be >= 1")


@register_attack("consistency-disruption")
class ConsistencyDisruption(Attack):
    """CMAP Algorithm 2: adversarial latent optimisation, any-of-N candidates judged by the full defense."""

    description = "CMAP's consistency-disruption attack on the latents (needs a latent generator); P4 any-of-N"
    Config = ConsistencyDisruptionConfig
    requires = frozenset({"latent_generator"})
    eot = "batched"  # the defense's randomness (latent initialisation) is redrawn for every candidate check
    cost_level = CostLevel.GRADIENT
    uses_path = False  # it differentiates through the defense's generator, whatever the job's path

    def ticks(self) -> int:
        return self.config.steps

    def _judge(self, defense, classifier, cands, x, y, gen):
        """Full-CMAP predictions (fresh latents) of every candidate: (B, N) correct flags and vote scores."""
        B, N = cands.shape[:2]
        flat = cands.reshape(B * N, *x.shape[1:])
        scores = defense.classify(flat, classifier, path=None, generator=gen)
        return (scores.argmax(1) == y.repeat_interleave(N)).view(B, N), margin(scores, y.repeat_interleave(N)).view(B, N)

    def run(self, model, x, y, budget, rng, progress):
        defense, classifier, cfg = model.defense, model.classifier, self.config
        gen = model.generator
        x, y = x.detach(), y.detach()
        B = x.shape[0]
        z = defense.fit_latents(x, gen).detach()
        m, v = torch.zeros_like(z), torch.zeros_like(z)
        b1, b2 = 0.9, 0.999
        broken = torch.zeros(B, dtype=torch.bool, device=x.device)
        best_x, best_m = x.clone(), torch.full((B,), float("-inf"), device=x.device)
        curve = []

        def evaluate(cands: torch.Tensor) -> None:
            correct, marg = self._judge(defense, classifier, cands, x, y, gen)
            for i in torch.nonzero(~broken).flatten().tolist():
                wrong = torch.nonzero(~correct[i]).flatten()
                j = int(wrong[0]) if len(wrong) else int(marg[i].argmax())
                if len(wrong) or marg[i, j] > best_m[i]:
                    best_x[i], best_m[i] = cands[i, j], marg[i, j]
                if len(wrong):
                    broken[i] = True
            curve.append(int((~broken).sum()))

        for k in range(1, cfg.steps + 1):
            with torch.enable_grad():
                zz = z.requires_grad_(True)
                purification, _ = defense.latent_loss(zz, x)
                x_hat = defense.images(zz)
                proj = budget.project(x_hat.reshape(B * x_hat.shape[1], *x.shape[1:]), x.repeat_interleave(x_hat.shape[1], 0))
                target = proj if cfg.on_projected else x_hat.reshape(proj.shape)
                ce = F.cross_entropy(classifier(target), y.repeat_interleave(x_hat.shape[1]), reduction="none").view(B, -1).mean(1)
                loss = (purification - cfg.gamma * ce).sum()
                (g,) = torch.autograd.grad(loss, zz)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            z = (z - defense.settings.lr * (m / (1 - b1**k)) / (torch.sqrt(v / (1 - b2**k)) + 1e-8)).detach()
            if k % cfg.eval_every == 0 or k == cfg.steps:
                with torch.no_grad():
                    cands = budget.project(defense.images(z).reshape(proj.shape), x.repeat_interleave(z.shape[1], 0))
                evaluate(cands.view_as(x_hat))
            progress(1)
        return AttackResult(x_adv=best_x, margin=best_m, curve=curve)
