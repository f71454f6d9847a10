"""APGD-EOT: APGD with the defense in the loop and Expectation over Transformation.

The gradient (and the objective used for step-size control and for keeping the best
iterate) is averaged over ``eot_iter`` draws of the defense's randomness per iteration
(Athalye et al. 2018), and it passes *through the purifier*: ``grad_mode`` ``"exact"``
(IWMF is linear for fixed windows, so autograd gives its exact gradient; also diffusion
defenses that support it) or ``"bpda"`` (forward purification, identity backward);
``None`` picks the defense's best. Note: the reference "APGD_EOT" of Wang et al. (TDSC
2024) never saw the purifier (crafted on the bare model); this one does. Run it on a
task with ``defense=None`` and it is plain APGD (the transfer setting).
"""

from __future__ import annotations

from .apgd import APGD


class APGDEOT(APGD):
    """APGD with the defense in the loop, gradients averaged over eot_iter draws of its randomness."""

    registered_name = "apgd-eot"

    def __init__(self, norm: str = "Linf", eps: float | None = None, steps: int = 40, eot_iter: int = 20,
                 grad_mode: str | None = None, goal: str = "impersonation"):
        super().__init__(norm=norm, eps=eps, steps=steps, eot_iter=eot_iter, grad_mode=grad_mode, goal=goal)
