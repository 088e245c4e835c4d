"""DiffHammer (Wang et al. 2024, as vendored in FlowPure's ``attacker.py``; spec sections 3.5 and 7.10).

APGD with restarts over the CW, CE and DLR losses (one loss per restart, ``n_iter``
iterations each; restarts after the first re-attack only the examples whose best
fraction of misclassifying draws is <= ``restart_thr``), where every iterate is
evaluated with ``n_eval`` fresh purifications stacked along the batch (protocol P3), and
the gradient of the next step comes from those same draws:

1. **N-evaluation.** The N draws at an iterate give, per example, whether *any* draw
   misclassifies (``worst``), the fraction that does (``avg``) and the per-draw losses.
   Per example the attack keeps the iterate with the best (worst, mean loss) pair (or
   (avg, mean loss) with ``worst_any_iterate=false``). Its curve counts the examples no
   draw of any iterate so far misclassified: that is DiffHammer's "Worst" robust count,
   optimistic for the attacker (deviation 1). The engine always re-scores the returned
   example with R fresh draws, so the stored robust accuracy is the stricter
   final-iterate variant; the curve's last entry over n is the vendored number.
2. **EM selection** (``em``): each draw j also gives the BPDA gradient g_j = dl_j/dx_pur
   of its loss w.r.t. its purified image. The selected draw a maximises
   ``sum_i ELU(l_i + eps <unit(g_a), g_i>)``; then ``em_steps`` EM iterations of
   ``w_i = sigmoid(em_lam (l_i + <unit(r), g_i>))``, ``r = sum_i w_i g_i / sum_i w_i``
   from r = g_a. (The vendored loop never updates r, so its result is one such step:
   ``em_steps=1`` reproduces it.) With ``em=false`` the aggregate is draw 0's own gradient.
3. **Gradient grafting.** One backward pass through the selected draw's own purification
   (replayed with the same generator seed along the job's gradient path), with r as the
   output-side gradient: ``grad = J_{P(x; w_a)}^T r``. Through ``bpda`` the VJP is r
   itself; through ``full`` the evaluation pass keeps its graph and no replay is needed.
   The draws are stacked along the batch, so the replay runs every draw of the stack (the
   cotangent is zero off the selected rows): the same gradient as the vendored per-seed
   replay, at N times its purifier cost. With ``fresh_surrogate=true`` a ``surrogate``
   path instead takes a fresh-noise single-sample loss gradient, ignoring r and the seed,
   as the vendored ``FlowPureClassifier.gradient`` does (deviation 2).
4. Momentum across iterations ``grad <- v grad + (1-v) grad_prev``, ``v = (i+1)^-em_alpha``,
   then the APGD step (2 eps initial step, heavy ball 0.75, step halving with rho 0.75 at
   the checkpoints {0, .22, .41, .57, .7, .8, .87, .93} n_iter, reset to the restart's best
   iterate there). The heavy ball uses the previous iterate, as pyautoattack does (the
   vendored ``x_adv_last`` is never updated, so its momentum points from the start).

Deviation 3 (DiffHammer's DiffPure is the 10-step DDPM variant, not the official SDE) is
a choice of defense, not of attack: ``--defense diffpure-ddpm`` (its ``denoising_steps``,
``max_timestep``) against ``--defense diffpure``; both are recorded in the job config.

Deterministic models: the attack runs as plain APGD over the three losses (N_eval = 1, the
spec's setting for deterministic FlowPure): EM over one draw selects it, and grafting is its
exact gradient. Models without a separable purifier (``AttackedFunction``, a defense with its
own ``classify``, the classifier path) are treated as purifier = identity: the per-draw
gradients are full input gradients and grafting is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from harness.core.attack import Attack, AttackConfig, AttackResult, AttackSuite, register_attack, register_suite
from harness.core.defense import Defense, GradientPath
from threat_models.losses import LOSSES, attack_loss, margin

CHECKPOINTS = (0, 0.22, 0.41, 0.57, 0.7, 0.8, 0.87, 0.93)


@dataclass(frozen=True)
class DiffHammerConfig(AttackConfig):
    """Options of DiffHammer (``--set diffhammer.KEY=VALUE``); the deviations of spec 7.10 are flags here."""

    n_iter: int = field(default=50, metadata={"help": "APGD iterations per restart (DiffHammer: 50)"})
    losses: str = field(default="cw,ce,dlr", metadata={"help": "loss of each restart, comma-separated (DiffHammer: cw,ce,dlr)"})
    n_eval: int = field(default=10, metadata={"help": "purifications per iterate, stacked along the batch (1 if deterministic)"})
    restart_thr: float = field(default=0.5, metadata={"help": "later restarts re-attack examples whose best avg success <= this"})
    em: bool = field(default=True, metadata={"help": "EM selection of the gradient among the N draws (false: draw 0's)"})
    em_lam: float = field(default=5.0, metadata={"help": "EM weight temperature"})
    em_steps: int = field(default=5, metadata={"help": "EM iterations (1 = the vendored code, whose loop never updates r)"})
    em_alpha: float = field(default=0.5, metadata={"help": "momentum exponent: v = (i+1)^-em_alpha"})
    worst_any_iterate: bool = field(
        default=True, metadata={"help": "deviation 1: keep/count by 'any draw at any iterate' (false: by the best avg fraction)"}
    )
    fresh_surrogate: bool = field(
        default=False,
        metadata={"help": "deviation 2: on a surrogate path take a fresh-noise gradient, ignoring EM (vendored FlowPure)"},
    )

    def __post_init__(self):
        names = [s.strip() for s in self.losses.split(",") if s.strip()]
        if not names or any(n not in LOSSES for n in names):
            raise ValueError(f"losses={self.losses!r}: a comma-separated list of {', '.join(LOSSES)}")
        if self.n_iter < 1 or self.n_eval < 1 or self.em_steps < 0:
            raise ValueError("n_iter and n_eval must be >= 1, em_steps >= 0")

    @property
    def loss_list(self) -> list[str]:
        return [s.strip() for s in self.losses.split(",") if s.strip()]


def unit(g: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent direction of ``g`` (..., d) for the norm (sign for linf)."""
    return g.sign() if norm == "linf" else g / (g.norm(dim=-1, keepdim=True) + 1e-12)


def em_select(grads: torch.Tensor, loss: torch.Tensor, eps: torch.Tensor, norm: str, *, lam: float, steps: int):
    """DiffHammer's selection: grads (N, B, d), loss (N, B), eps (B,) -> (selected draw (B,), aggregate r (B, d))."""
    B = grads.shape[1]
    u = unit(grads, norm)
    delta = torch.einsum("jbd,ibd->jib", u, grads)  # <unit(g_j), g_i>
    expected = F.elu(loss.unsqueeze(0) + eps.view(1, 1, B) * delta).sum(1)  # (N_j, B)
    sel = expected.argmax(0)
    r = grads[sel, torch.arange(B, device=grads.device)]
    for _ in range(steps):
        w = torch.sigmoid(lam * (loss + torch.einsum("bd,ibd->ib", unit(r, norm), grads)))
        r = (w.unsqueeze(-1) * grads).sum(0) / w.sum(0).unsqueeze(-1)
    return sel, r


class _Draws:
    """The N-draw evaluation of one iterate and the grafted gradient (see the module docstring)."""

    def __init__(self, model, n_eval: int, norm: str, seeds, fresh_surrogate: bool):
        self.model, self.N, self.norm, self.seeds, self.fresh = model, n_eval, norm, seeds, fresh_surrogate
        defense, path = getattr(model, "defense", None), getattr(model, "path", None)
        self.split = (
            isinstance(defense, Defense) and path not in (None, GradientPath.CLASSIFIER)
            and type(defense).classify is Defense.classify
        )
        self.defense, self.path = defense, path
        self.classifier = getattr(model, "classifier", None)
        self.per_chunk = max(1, getattr(model, "max_forward", 1 << 30))

    def _gen(self, seed: int, device) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        return g

    def _count(self, n: int) -> None:
        for attr in ("purified", "classified"):
            if hasattr(self.model, attr):
                setattr(self.model, attr, getattr(self.model, attr) + n)

    def evaluate(self, xa: torch.Tensor, y: torch.Tensor, loss: str, want_grad: bool):
        """Logits (N, b, C), per-draw losses (N, b), per-draw gradients (N, b, d) and the graft state."""
        N, b = self.N, xa.shape[0]
        k = max(1, min(N, self.per_chunk // max(b, 1)))  # draws per chunk
        logits, losses, grads, chunks = [], [], [], []
        seed = self.seeds()
        for c, d0 in enumerate(range(0, N, k)):
            kk = min(k, N - d0)
            xr = xa.detach().repeat(kk, 1, 1, 1)
            yr = y.repeat(kk)
            graph = None
            with torch.enable_grad():
                if self.split:
                    gen = self._gen(seed + c, xa.device)
                    if want_grad and self.path is GradientPath.FULL and N <= k:
                        xin = xr.clone().requires_grad_(True)
                        xp_graph = self.defense.purify_along(xin, GradientPath.FULL, generator=gen)
                        graph, xp = (xin, xp_graph), xp_graph.detach()
                    else:
                        xp = self.defense.purify_along(xr, None, generator=gen)
                    self._count(xr.shape[0])
                    leaf = xp.detach().requires_grad_(True)
                    z = self.classifier(leaf)
                else:
                    leaf = xr.clone().requires_grad_(True)
                    z = self.model(leaf)
                ell = attack_loss(loss, z, yr)
                g = torch.autograd.grad(ell.sum(), leaf)[0] if want_grad else torch.zeros_like(leaf)
            logits.append(z.detach().view(kk, b, -1))
            losses.append(ell.detach().view(kk, b))
            grads.append(g.detach().view(kk, b, -1))
            chunks.append((d0, kk, seed + c, graph))
        return torch.cat(logits), torch.cat(losses), torch.cat(grads), chunks

    def graft(self, xa: torch.Tensor, y: torch.Tensor, loss: str, sel: torch.Tensor, r: torch.Tensor, chunks) -> torch.Tensor:
        """The input gradient: r through the selected draws' purifications (identity without a purifier)."""
        b = xa.shape[0]
        if not self.split or self.path is GradientPath.BPDA:
            return r.view_as(xa)
        if self.path is GradientPath.SURROGATE and self.fresh:
            xin = xa.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                obj = attack_loss(loss, self.model(xin), y).sum()
                return torch.autograd.grad(obj, xin)[0]
        out = torch.zeros_like(xa)
        rows = torch.arange(b, device=xa.device)
        for d0, kk, seed, graph in chunks:
            mask = (sel >= d0) & (sel < d0 + kk)
            if not mask.any():
                continue
            cot = torch.zeros((kk, b) + xa.shape[1:], device=xa.device, dtype=xa.dtype)
            cot[sel[mask] - d0, rows[mask]] = r[mask].view(-1, *xa.shape[1:])
            with torch.enable_grad():
                if graph is None:  # replay the chunk with its seed along the path
                    xin = xa.detach().repeat(kk, 1, 1, 1).requires_grad_(True)
                    xp = self.defense.purify_along(xin, self.path, generator=self._gen(seed, xa.device))
                    self._count(xin.shape[0])
                else:
                    xin, xp = graph
                g = torch.autograd.grad(xp, xin, cot.view_as(xp))[0]
            out += g.view(kk, b, *xa.shape[1:]).sum(0)
        return out


@register_attack("diffhammer")
class DiffHammer(Attack):
    """DiffHammer: APGD restarts over CW/CE/DLR, N-draw evaluation per iterate, EM gradient selection, grafting."""

    description = ("DiffHammer (FlowPure's vendored version): APGD restarts over cw/ce/dlr, n_eval draws per iterate, "
                   "EM selection of the draws' BPDA gradients, grafted through the selected draw")
    Config = DiffHammerConfig
    eot = "batched"  # its n_eval draws are stacked along the batch

    def ticks(self) -> int:
        return (self.config.n_iter + 1) * len(self.config.loss_list)

    def model_calls(self, eot: int) -> int:
        """An upper bound for ``--dry-run``: per restart and iterate, ``n_eval`` stacked purifications,
        and as many again to replay the selected draws for the grafted gradient (not needed
        through ``full`` or ``bpda``, and one draw for a deterministic defense).
        """
        return self.ticks() * 2 * self.config.n_eval

    def run(self, model, x, y, budget, rng, progress):
        cfg, geo = self.config, budget.geometry
        x, B = x.detach(), x.shape[0]
        dev = x.device
        eps = torch.as_tensor(budget.eps, dtype=x.dtype, device=dev).flatten()
        eps = (eps.expand(B) if eps.numel() == 1 else eps).contiguous()
        N = cfg.n_eval if getattr(model, "stochastic", False) else 1
        counter = [0]

        def next_seed() -> int:
            counter[0] += 1
            if rng.generator is not None:
                return int(torch.randint(0, 2**62, (1,), generator=rng.generator, device=rng.generator.device))
            return rng.seed * 100_003 + counter[0]

        draws = _Draws(model, N, budget.norm, next_seed, cfg.fresh_surrogate)
        # per-example state across restarts
        wor_best = torch.zeros(B, dtype=torch.bool, device=dev)
        avg_best = torch.zeros(B, device=dev)
        key1 = torch.full((B,), -1.0, device=dev)  # kept iterate: (worst or avg, mean loss), lexicographic
        key2 = torch.full((B,), float("-inf"), device=dev)
        best_x = x.clone()
        best_m = torch.full((B,), float("-inf"), device=dev)
        curve: list[int] = []

        def robust() -> int:
            return int((~wor_best).sum()) if cfg.worst_any_iterate else int((avg_best <= 0.5).sum())

        for r_i, loss in enumerate(cfg.loss_list):
            idx = torch.arange(B, device=dev) if r_i == 0 else (avg_best <= cfg.restart_thr).nonzero().flatten()
            if idx.numel() == 0:
                curve += [robust()] * (cfg.n_iter + 1)
                progress(cfg.n_iter + 1)
                continue
            xs, ys, es = x[idx], y[idx], eps[idx]
            e4 = es.view(-1, *([1] * (x.dim() - 1)))
            xa = geo.random_start(xs, e4, rng.generator)
            x_last = xa.clone()
            step, step_last = 2 * e4, 2 * e4
            checks = sorted({int(p * cfg.n_iter) for p in CHECKPOINTS})
            hist: list[torch.Tensor] = []
            lk1 = torch.full((len(idx),), -1.0, device=dev)  # the restart's own best iterate (reset target)
            lk2 = torch.full((len(idx),), float("-inf"), device=dev)
            lbest_x, lbest_g = xa.clone(), torch.zeros_like(xa)
            grad_prev = None
            for it in range(cfg.n_iter + 1):
                want = it < cfg.n_iter
                z, ell, G, chunks = draws.evaluate(xa, ys, loss, want)
                m = torch.stack([margin(z[j], ys) for j in range(z.shape[0])])  # (N, b)
                mis = m > 0
                wor_t, avg_t, lavg = mis.any(0), mis.float().mean(0), ell.mean(0)
                m_t = m.max(0).values if cfg.worst_any_iterate else margin(z.mean(0), ys)
                k1_t = wor_t.float() if cfg.worst_any_iterate else avg_t
                better = (k1_t > key1[idx]) | ((k1_t == key1[idx]) & (lavg > key2[idx]))
                gi = idx[better]
                best_x[gi], best_m[gi], key1[gi], key2[gi] = xa[better], m_t[better], k1_t[better], lavg[better]
                wor_best[idx] |= wor_t
                avg_best[idx] = torch.maximum(avg_best[idx], avg_t)
                lbetter = (k1_t > lk1) | ((k1_t == lk1) & (lavg > lk2))
                lk1, lk2 = torch.where(lbetter, k1_t, lk1), torch.where(lbetter, lavg, lk2)
                lbest_x[lbetter] = xa[lbetter]
                hist.append(ell.max(0).values)
                curve.append(robust())
                progress(1)
                if not want:
                    break
                if bool(mis.all()):  # every draw of every example misclassifies: nothing left to gain
                    rest = cfg.n_iter - it
                    curve += [robust()] * rest
                    progress(rest)
                    break
                Gf = G.flatten(2)
                if cfg.em:
                    sel, r = em_select(Gf, ell, es, budget.norm, lam=cfg.em_lam, steps=cfg.em_steps)
                else:
                    sel, r = torch.zeros(len(idx), dtype=torch.long, device=dev), Gf[0]
                grad = draws.graft(xa, ys, loss, sel, r, chunks)
                grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
                if grad_prev is not None:
                    v = (it + 1) ** -cfg.em_alpha
                    grad = v * grad + (1 - v) * grad_prev
                grad_prev = grad
                lbest_g[lbetter] = grad[lbetter]
                if it in checks and it > 0:  # APGD's step-size check, then reset to the restart's best iterate
                    last = checks[checks.index(it) - 1]
                    h = torch.stack(hist)
                    inc = (h[last + 1: it + 1] > h[last:it]).sum(0)
                    reduce = (inc < 0.75 * (it - last)) | ((step == step_last).flatten() & (h[it] == h[last]))
                    step_last = step.clone()
                    step = torch.where(reduce.view(-1, *([1] * (x.dim() - 1))), step / 2, step)
                    xa, grad = lbest_x.clone(), lbest_g.clone()
                    grad_prev = grad
                a = 0.75 if it > 0 else 1.0
                zs = geo.project(xa + geo.ascent_step(grad, step), xs, e4)
                xn = geo.project(xa + a * (zs - xa) + (1 - a) * (xa - x_last), xs, e4)
                x_last, xa = xa, xn.detach()
        # DiffHammer's own two statistics per example, stored as columns of the job (robust_accuracy_<label>_any_iterate,
        # robust_accuracy_<label>_avg): robust under any draw at every iterate tried, and one minus the best fraction of
        # misclassifying draws over the iterates
        stats = {"any_iterate": (~wor_best).float(), "avg": 1.0 - avg_best}
        return AttackResult(x_adv=geo.project(best_x, x, eps.view(-1, *([1] * (x.dim() - 1)))), margin=best_m, curve=curve,
                            stats=stats)


# DiffHammer is an attack on stochastic defenses: against a deterministic model it would be APGD
# over three losses, which AutoAttack-standard already covers, so the suite that the adaptive
# threat lists runs it only against stochastic models (run ``diffhammer`` itself to get the fallback).
register_suite(AttackSuite("diffhammer-stochastic", "DiffHammer against a stochastic model; nothing against a deterministic one",
                           (), stochastic=("diffhammer",)))
