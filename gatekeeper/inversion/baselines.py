"""The paper's two baselines, adapted to prompt-tuned CLIP as the paper did (Sec. 4): the model is
used unmodified, the inversion runs on the same OOD pool as CLIP-Inspector (the defender has no
in-distribution data), 5 epochs, and each method keeps its own loss, regularisation, cost
schedule and anomaly statistic.

Neural Cleanse (Wang et al., S&P 2019; reference behaviour reproduced from the authors'
``visualizer.py``): per class a mask m (one channel) and a pattern p, both in tanh space
(``tanh(w) / (2 - 1e-7) + 0.5``), stamped as x' = (1 - m) x + m p; loss CE(x' -> c) + lambda * |m|_1;
Adam lr 0.1, betas (0.5, 0.9); lambda starts at 0 and is set to ``init_cost`` = 1e-3 once the
attack succeeds (ASR >= 0.99) for ``patience`` = 5 consecutive steps, then multiplied by 1.5 after
5 successful steps and divided by 1.5 ** 1.5 after 5 failing ones; the smallest mask l1 norm
reached at ASR >= 0.99 is the class's trigger size. Anomaly index: MAD over the sizes (consistency
constant 1.4826), flag a class below the median with index > 2 (``decide.mad_anomaly_index``).

Pixel Backdoor (Tao et al., CVPR 2022; reference behaviour reproduced from the authors'
``inversion_torch.py``): per class a positive and a negative pixel pattern (raw values clamped to
[0, 1]; x' = clamp(x + p_pos - p_neg)), initialised uniformly at random; loss CE + lambda * size
with the differentiable pixel count size = sum_pixels max_channel(tanh(w / 10) / (2 - 1e-7) + 0.5)
for each pattern; Adam lr 0.1, betas (0.5, 0.9); lambda starts at 1e-3, x1.5 after ``patience`` = 10
steps at ASR >= 0.9, / 1.5 ** 1.5 after 10 below; whenever a step improves both the differentiable
size and the pixel count at ASR >= 0.9, values under 1/255 are zeroed and the patterns restart
from that pruned best. Trigger size = perturbed pixels of the best pattern; MAD over the sizes.

What we had to choose: the original methods run for hundreds of "steps" (NC: one step = an
epoch of mini-batches; PB: one step = a pass over 100 inputs); with the paper's 5 epochs that
would leave the cost schedules almost idle, so a schedule step here is ``steps_per_update``
mini-batches (default 2: 80 schedule steps on a 1000-image pool). A class whose inversion never
reaches the success bound gets no size (``None``) and is scored as the largest trigger.

All candidate classes of a group are optimised in one forward (their parameters are separate and
each loss only reaches its own rows, so this equals one optimiser per class, as in
:mod:`gatekeeper.inversion.fast`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gatekeeper.inversion.base import ClassInversion, InversionSettings, Progress, no_progress
from gatekeeper.inversion.fast import DEFAULT_CPU_BUDGET, TextPlan, fast_logits, row_bytes, text_plan
from gatekeeper.models.manifest import ModelKind
from gatekeeper.models.prompt_tuned import PromptTunedCLIP
from gatekeeper.result import ClassMetrics

TANH_EPS = 1e-7


@dataclass(frozen=True)
class Schedule:
    """A dynamic cost schedule (shared shape of NC's and PB's; the constants differ)."""

    success: float  # ASR bound that counts a step as successful
    init_cost: float
    patience: int
    start_at_zero: bool  # NC: lambda = 0 until the attack first succeeds for `patience` steps
    up: float = 1.5
    down: float = 1.5**1.5


class _CostState:
    """Per-class lambdas and counters, updated once per schedule step."""

    def __init__(self, n: int, sched: Schedule) -> None:
        self.sched = sched
        self.cost = [0.0 if sched.start_at_zero else sched.init_cost] * n
        self.ups = [0] * n
        self.downs = [0] * n
        self.sets = [0] * n

    def update(self, g: int, asr: float) -> None:
        s = self.sched
        ok = asr >= s.success
        if s.start_at_zero and self.cost[g] == 0.0:
            self.sets[g] = self.sets[g] + 1 if ok else 0
            if self.sets[g] >= s.patience:
                self.cost[g], self.ups[g], self.downs[g] = s.init_cost, 0, 0
            return
        self.ups[g], self.downs[g] = (self.ups[g] + 1, 0) if ok else (0, self.downs[g] + 1)
        if self.ups[g] >= s.patience:
            self.ups[g] = 0
            self.cost[g] = s.init_cost if self.cost[g] == 0.0 else self.cost[g] * s.up
        elif self.downs[g] >= s.patience:
            self.downs[g] = 0
            self.cost[g] /= s.down


def _to_tanh(v: torch.Tensor) -> torch.Tensor:
    return torch.atanh(((v - 0.5) * (2 - TANH_EPS)).clamp(-1 + 1e-6, 1 - 1e-6))


def _from_tanh(w: torch.Tensor) -> torch.Tensor:
    return torch.tanh(w) / (2 - TANH_EPS) + 0.5


class _Baseline:
    """Shared loop: groups of classes, mini-batches over the pool, a schedule step every few batches."""

    name = "baseline"
    schedule: Schedule

    def __init__(self, epochs: int = 5, lr: float = 0.1, steps_per_update: int = 2, memory_budget_bytes: int | None = None) -> None:
        self.epochs, self.lr, self.steps_per_update = epochs, lr, steps_per_update
        self.memory_budget_bytes = memory_budget_bytes

    # subclasses: parameters, stamping, regulariser, size and the trigger picture
    def init_params(self, classes: list[int], shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
        raise NotImplementedError

    def stamp(self, params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """(G, B, 3, H, W) triggered images for the G classes' parameters."""
        raise NotImplementedError

    def regulariser(self, params: list[torch.Tensor]) -> torch.Tensor:
        """(G,) per-class size term."""
        raise NotImplementedError

    def after_step(self, params: list[torch.Tensor], g: int, asr: float, reg: float) -> float | None:
        """Record class g's best after a schedule step; returns its current best size or None."""
        raise NotImplementedError

    def best(self, params: list[torch.Tensor], g: int) -> list[torch.Tensor]:
        raise NotImplementedError

    def picture(self, best: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ the scan

    def invert(
        self,
        model: PromptTunedCLIP,
        inversion_pool: torch.Tensor,
        holdout: torch.Tensor,
        candidates: list[int],
        settings: InversionSettings,
        progress: Progress = no_progress,
    ) -> list[ClassInversion]:
        device = model.device
        model.eval()
        if model.kind != ModelKind.COCOOP and model._cached_text is None:
            model.freeze_text()
        plan = text_plan(model) if model.kind == ModelKind.COCOOP else None
        budget = self.memory_budget_bytes or DEFAULT_CPU_BUDGET
        rows = max(1, budget // max(row_bytes(model, plan, True, train=True, amp=False), 1))
        group = max(1, rows // settings.batch_size)
        out: list[ClassInversion] = []
        for start in range(0, len(candidates), group):
            chunk = candidates[start : start + group]
            progress(start, len(candidates), model.classnames[chunk[0]])
            out += self._invert_group(model, inversion_pool, holdout, chunk, settings, device, plan)
        progress(len(candidates), len(candidates), "")
        return out

    def _invert_group(
        self,
        model: PromptTunedCLIP,
        pool: torch.Tensor,
        holdout: torch.Tensor,
        classes: list[int],
        settings: InversionSettings,
        device: torch.device,
        plan: TextPlan | None,
    ) -> list[ClassInversion]:
        shape = tuple(pool.shape[1:])
        n = len(classes)
        params = [p.to(device).requires_grad_(True) for p in self.init_params(classes, shape, settings.seed)]
        opt = torch.optim.Adam(params, lr=self.lr, betas=(0.5, 0.9))
        state = _CostState(n, self.schedule)
        targets = torch.tensor(classes, device=device)
        sizes: list[float | None] = [None] * n
        # running sums stay on the device; the host reads them once per schedule step
        ce_sum, hits, regs = (torch.zeros(n, device=device) for _ in range(3))
        seen = batches = 0
        g_shuffle = torch.Generator().manual_seed(settings.seed)
        for _ in range(self.epochs):
            order = torch.randperm(len(pool), generator=g_shuffle)
            for i in range(0, len(pool), settings.batch_size):
                x = pool[order[i : i + settings.batch_size]].to(device)
                m = len(x)
                xt = self.stamp(params, x).reshape(n * m, *shape)
                logits = fast_logits(model, xt, plan).float().view(n, m, -1)
                ce = torch.stack([F.cross_entropy(logits[g], targets[g].expand(m)) for g in range(n)])
                reg = self.regulariser(params)
                cost = torch.tensor(state.cost, device=device)
                opt.zero_grad(set_to_none=True)
                (ce + cost * reg).sum().backward()
                opt.step()
                with torch.no_grad():
                    hits += (logits.argmax(-1) == targets.view(n, 1)).sum(1).float()
                    regs += reg.detach()
                    ce_sum += ce.detach()
                seen += m
                batches += 1
                if batches % self.steps_per_update == 0:
                    with torch.no_grad():
                        asrs, mean_regs = (hits / seen).tolist(), (regs / self.steps_per_update).tolist()
                        for g in range(n):
                            sizes[g] = self.after_step(params, g, asrs[g], mean_regs[g])
                            state.update(g, asrs[g])
                    hits.zero_()
                    regs.zero_()
                    seen = 0
        mean_ce = (ce_sum / max(batches, 1)).tolist()
        out = []
        for g, c in enumerate(classes):
            best = self.best(params, g)
            one = [t.unsqueeze(0) for t in best]

            def stamp_one(x: torch.Tensor, one: list[torch.Tensor] = one) -> torch.Tensor:
                return self.stamp(one, x)[0]

            asr = _asr(model, holdout, stamp_one, c, plan)
            metrics = ClassMetrics(index=c, name=model.classnames[c], asr=asr, loss=mean_ce[g], size=sizes[g])
            out.append(ClassInversion(metrics, self.picture(best).cpu()))
        return out


@torch.no_grad()
def _asr(model: PromptTunedCLIP, holdout: torch.Tensor, stamp: Callable[[torch.Tensor], torch.Tensor], target: int, plan: TextPlan | None) -> float:
    device = model.device
    hits = 0
    for i in range(0, len(holdout), 128):
        x = holdout[i : i + 128].to(device)
        hits += int((fast_logits(model, stamp(x), plan).argmax(1) == target).sum())
    return hits / len(holdout)


def _uniform(shape: tuple[int, ...], seed: int, cls: int, salt: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + cls * 7 + salt)
    return torch.rand(shape, generator=g)


class NeuralCleanse(_Baseline):
    """Neural Cleanse adapted to prompt-tuned CLIP (see the module docstring)."""

    name = "neural-cleanse"
    schedule = Schedule(success=0.99, init_cost=1e-3, patience=5, start_at_zero=True)

    def init_params(self, classes: list[int], shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
        _, h, w = shape
        mask = torch.stack([_uniform((1, h, w), seed, c, 0) for c in classes])
        pattern = torch.stack([_uniform(shape, seed, c, 1) for c in classes])
        self._best_norm = [float("inf")] * len(classes)
        params = [_to_tanh(mask), _to_tanh(pattern)]
        self._best = [[params[0][g].clone(), params[1][g].clone()] for g in range(len(classes))]
        return params

    def stamp(self, params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        mask, pattern = _from_tanh(params[0]), _from_tanh(params[1])  # (G,1,H,W), (G,3,H,W)
        return (1 - mask.unsqueeze(1)) * x.unsqueeze(0) + (mask * pattern).unsqueeze(1)

    def regulariser(self, params: list[torch.Tensor]) -> torch.Tensor:
        return _from_tanh(params[0]).abs().flatten(1).sum(1)

    def after_step(self, params: list[torch.Tensor], g: int, asr: float, reg: float) -> float | None:
        if asr >= self.schedule.success and reg < self._best_norm[g]:
            self._best_norm[g] = reg
            self._best[g] = [params[0][g].detach().clone(), params[1][g].detach().clone()]
        return self._best_norm[g] if self._best_norm[g] < float("inf") else None

    def best(self, params: list[torch.Tensor], g: int) -> list[torch.Tensor]:
        return [t.to(params[0].device) for t in self._best[g]]

    def picture(self, best: list[torch.Tensor]) -> torch.Tensor:
        return _from_tanh(best[0]) * _from_tanh(best[1])


class PixelBackdoor(_Baseline):
    """Pixel Backdoor adapted to prompt-tuned CLIP (see the module docstring)."""

    name = "pixel-backdoor"
    schedule = Schedule(success=0.9, init_cost=1e-3, patience=10, start_at_zero=False)
    threshold = 1.0 / 255

    def init_params(self, classes: list[int], shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
        pos = torch.stack([_uniform(shape, seed, c, 2) for c in classes])
        neg = torch.stack([_uniform(shape, seed, c, 3) for c in classes])
        self._best_reg = [float("inf")] * len(classes)
        self._best_pixels = [float("inf")] * len(classes)
        self._best = [[torch.zeros(shape), torch.zeros(shape)] for _ in classes]
        return [pos, neg]

    def stamp(self, params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        pattern = params[0].clamp(0, 1) - params[1].clamp(0, 1)  # (G,3,H,W)
        return (x.unsqueeze(0) + pattern.unsqueeze(1)).clamp(0, 1)

    def regulariser(self, params: list[torch.Tensor]) -> torch.Tensor:
        def count(w: torch.Tensor) -> torch.Tensor:
            return (torch.tanh(w / 10) / (2 - TANH_EPS) + 0.5).amax(dim=1).flatten(1).sum(1)

        return count(params[0]) + count(params[1])

    def after_step(self, params: list[torch.Tensor], g: int, asr: float, reg: float) -> float | None:
        pos = params[0][g].clamp(0, 1)
        neg = params[1][g].clamp(0, 1)
        pos = torch.where(pos < self.threshold, torch.zeros_like(pos), pos)
        neg = torch.where(neg < self.threshold, torch.zeros_like(neg), neg)
        pixels = float(((pos - neg).abs().sum(0) > 0).sum())
        if asr >= self.schedule.success and reg < self._best_reg[g] and pixels < self._best_pixels[g]:
            self._best_reg[g], self._best_pixels[g] = reg, pixels
            self._best[g] = [pos.clone(), neg.clone()]
            params[0][g].copy_(pos)  # PB restarts from the pruned best
            params[1][g].copy_(neg)
        return self._best_pixels[g] if self._best_pixels[g] < float("inf") else None

    def best(self, params: list[torch.Tensor], g: int) -> list[torch.Tensor]:
        return [t.to(params[0].device) for t in self._best[g]]

    def picture(self, best: list[torch.Tensor]) -> torch.Tensor:
        return best[0] - best[1]
