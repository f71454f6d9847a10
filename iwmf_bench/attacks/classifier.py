"""Face verification seen as a two-class classifier, so classifier attack libraries
(AutoAttack, torchattacks) run unchanged on our tasks.

:class:`VerificationClassifier` is an ``nn.Module`` mapping [0,1] images to two logits
``(-m/2, m/2)`` where ``m`` is the goal-signed verification margin of :mod:`.base`
(impersonation: ``margin`` against reference ``i``; dodging: ``-margin``). Class 1 means
"the attacker's goal is met" (accepted as the target for impersonation, rejected for
dodging); every sample's label is 0 (:meth:`labels`), so an *untargeted* library attack
on label 0 is exactly our attack. The argmax is 1 when ``m > 0``; our own attacks count
``m = 0`` as accepted for impersonation, a difference on a set of measure zero. The logits
are symmetric rather than ``(0, m)`` because some library losses mask the other classes
by multiplying with a one-hot vector (torchattacks' CW: ``max((1 - onehot) * z)``), which
with a zero logit would hide ``m < 0`` and give a zero gradient exactly where it matters.

What the libraries' losses mean on two classes:

* cross-entropy (AutoAttack's APGD-CE, torchattacks' PGD/MIFGSM/DIFGSM/TIFGSM/VMIFGSM/...):
  ``CE(logits, 0) = softplus(m)``, strictly increasing in the margin: well defined,
  same maximizer as our objective (only the step scale differs, and sign/normalized
  steps ignore it);
* the margin loss ``z_y - max_{j != y} z_j = -m`` (CW's ``f`` gives ``-m/2``, Square's
  margin loss, UPGD ``loss='margin'``): exactly our objective (up to the factor);
* targeted variants with target 1 are the untargeted attack again (two classes);
* DLR (``(z_y - z_pi1) / (z_pi1 - z_pi3)``) needs the third-largest logit: undefined
  with two classes (>= 3 needed; its targeted form >= 4); so are AutoAttack's APGD-T
  and FAB-T, which attack the top-9 *other* classes with DLR-targeted losses, and any
  attack that needs a target class different from the label besides class 1.

Gradients pass through the defense by its gradient mode (``"exact"``, ``"bpda"``; the
defense must support it). A stochastic defense draws from ``generator``, an explicit
``torch.Generator`` advanced across calls: each forward pass is a fresh draw, so a
library's EOT (averaging several forward passes) averages over fresh randomness.

EOT in one call. A library's EOT (AutoAttack's ``rand`` flavour) is a loop: forward pass
on ``x``, backward, again, ``eot_iter`` times on the same tensor, summing the gradients.
With :attr:`VerificationClassifier.eot_draws` set to that count, the first forward pass
of such a group purifies all its draws in one :meth:`Defense.purify_draws` call (same
randomness as the loop) and each pass returns its draw's logits; the backward passes
hand in their cotangents, and the last one backpropagates all draws at once and returns
the gradients' sum, added in draw order, while the earlier ones return zeros, so the
library's sum is the loop's bit for bit. A group is the ``eot_draws`` consecutive
differentiable passes on one tensor that requires grad (AutoAttack's other passes run
without gradients or on inputs that do not require them, and go through unbatched).

Batches. A library may call the module on the full batch (row ``i`` is source ``i``) or
on a subset (AutoAttack keeps attacking only the samples not yet fooled). A call with
any other number of rows is attributed row by row to the nearest source in the attack's
norm, which must be unambiguous (sources differ far more than the budget); inputs of
another size (a library's input-diversity resizing) must then come as a full batch.
:attr:`forward_passes` counts images passed through the system (queries).
"""

from __future__ import annotations

import torch

from .. import metrics
from ..defenses.base import Defense


class _EOTGroup:
    """The draws of one EOT group: their margins (with the graph back to ``inputs``), and
    the cotangents the library's backward passes hand in."""

    def __init__(self, x: torch.Tensor, draws: int, inputs: torch.Tensor, margins: torch.Tensor):
        self.x, self.version, self.draws = x, x._version, draws
        self.inputs, self.margins = inputs, margins
        self.served = 0  # forward passes answered
        self.cotangents: list[torch.Tensor | None] = [None] * draws

    def matches(self, x: torch.Tensor) -> bool:
        return x is self.x and x._version == self.version and self.served < self.draws

    def margin(self, d: int) -> torch.Tensor:
        n = self.x.shape[0]
        return self.margins[d * n:(d + 1) * n].detach()

    def backward(self, d: int, cotangent: torch.Tensor) -> torch.Tensor:
        """Gradient for draw ``d``'s pass: zeros until the last draw, then the sum of all."""
        self.cotangents[d] = cotangent
        if d < self.draws - 1:
            return torch.zeros_like(self.x)
        missing = [i for i, c in enumerate(self.cotangents) if c is None]
        if missing:
            raise RuntimeError(f"batched EOT: the library did not backpropagate draws {missing} before the "
                               "last one; set the classifier's batched_eot = False for this library")
        (grad,) = torch.autograd.grad(self.margins, self.inputs, torch.cat(self.cotangents), allow_unused=True)
        total = torch.zeros_like(self.x)
        if grad is not None:
            n = self.x.shape[0]
            for i in range(self.draws):  # the loop's order of addition
                total += grad[i * n:(i + 1) * n]
        self.inputs = self.margins = None  # free the graph
        return total


class _DrawMargin(torch.autograd.Function):
    """Draw ``d``'s margins as a function of ``x``; its backward goes through the group."""

    @staticmethod
    def forward(ctx, x, margin, group, d):
        ctx.group, ctx.d = group, d
        return margin.clone()

    @staticmethod
    def backward(ctx, grad):
        return ctx.group.backward(ctx.d, grad), None, None, None


class VerificationClassifier(torch.nn.Module):
    """Model (+ defense) as a two-class classifier: logits ``(-m/2, m/2)``, m the goal-signed margin."""

    def __init__(self, model: torch.nn.Module, references: torch.Tensor, sources: torch.Tensor,
                 defense: Defense | None = None, grad_mode: str = "none", goal: str = "impersonation",
                 threshold: float | None = None, generator: torch.Generator | None = None,
                 norm: str = "Linf"):
        super().__init__()
        self.model, self.defense, self.grad_mode, self.goal = model, defense, grad_mode, goal
        self.register_buffer("references", references.detach(), persistent=False)
        self.register_buffer("sources", sources.detach(), persistent=False)
        self.threshold = float(model.threshold if threshold is None else threshold)
        self.generator, self.norm = generator, norm
        self.forward_passes = 0
        #: Called with the source index of every row passed (query counting, progress).
        self.on_rows = None
        #: The library's EOT draws per gradient (see the module docstring; 1: no groups).
        self.eot_draws = 1
        #: Purify an EOT group's draws in one call (False: one call per pass, the old loop).
        self.batched_eot = True
        self._group: _EOTGroup | None = None

    def labels(self) -> torch.Tensor:
        """Every sample's true class: 0, "goal not met"."""
        return torch.zeros(self.sources.shape[0], dtype=torch.long, device=self.sources.device)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the source behind each row of ``x`` (see the module docstring)."""
        n = self.sources.shape[0]
        if x.shape[0] == n:
            return torch.arange(n, device=x.device)
        if x.shape[1:] != self.sources.shape[1:]:
            raise RuntimeError(f"library passed {x.shape[0]} of {n} images at size {tuple(x.shape[2:])}: "
                               "cannot tell which reference each belongs to")
        diff = (x.detach().unsqueeze(1) - self.sources.unsqueeze(0)).flatten(2)
        dist = diff.abs().amax(dim=2) if self.norm == "Linf" else diff.norm(dim=2)
        if n == 1:
            return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        two = dist.topk(2, dim=1, largest=False).values
        if not bool((two[:, 0] < 0.5 * two[:, 1]).all()):
            raise RuntimeError("library passed images that are not clearly perturbations of one source "
                               "(nearest and second-nearest sources at similar distances)")
        return dist.argmin(dim=1)

    def margin(self, x: torch.Tensor) -> torch.Tensor:
        """Goal-signed margin of one forward pass (one fresh draw of the defense)."""
        rows = self.rows(x)
        if self.on_rows is not None:
            self.on_rows(rows)
        if self._in_eot_group(x):
            return self._group_margin(x, rows)
        x = x.clamp(0, 1)  # some libraries probe outside the image domain (VMI-FGSM's neighbours)
        z = x if self.defense is None else self.defense.purify(x, self.generator, self.grad_mode)
        return self._purified_margin(z, self.references[rows])

    def _purified_margin(self, z: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        s = metrics.scores(self.model.embed(z), refs, self.model.metric)
        m = metrics.margin(s, self.threshold, self.model.metric)
        return m if self.goal == "impersonation" else -m

    def _in_eot_group(self, x: torch.Tensor) -> bool:
        return (self.batched_eot and self.eot_draws > 1 and self.defense is not None
                and torch.is_grad_enabled() and x.requires_grad)

    def _group_margin(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """This pass's draw of the current EOT group (all its draws purified at the first)."""
        if self._group is None or not self._group.matches(x):
            draws, n = self.eot_draws, x.shape[0]
            inputs = x.detach().repeat(draws, 1, 1, 1).requires_grad_(True)
            z = self.defense.purify_draws(inputs.clamp(0, 1), self.generator, draws, self.grad_mode)
            # The model sees each draw as its own batch on a fresh buffer, as in the loop
            # (see Attack.objective_draws): the same values and gradients bit for bit.
            refs = self.references[rows]
            margins = torch.cat([self._purified_margin(chunk.clone(), refs) for chunk in z.split(n)])
            self._group = _EOTGroup(x, draws, inputs, margins)
        group = self._group
        d, group.served = group.served, group.served + 1
        return _DrawMargin.apply(x, group.margin(d), group, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forward_passes += x.shape[0]
        m = self.margin(x)
        return torch.stack([-m / 2, m / 2], dim=1)
