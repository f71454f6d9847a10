"""iwmf-bench: a benchmark of adversarial purification for face verification."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("iwmf-bench")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"

from .defenses.diffusion import iwmfdiff  # noqa: E402
from .defenses.iwmf import iwmf, iwmf_apply  # noqa: E402
from .registry import available, create  # noqa: E402
from .models.base import frozen  # noqa: E402


def get_defense(name: str, **kwargs):
    """Build a registered defense, e.g. ``get_defense("iwmf", lambda_0=0.25)``."""
    return create("defenses", name, **kwargs)


def load_model(name: str, **kwargs):
    """Build a registered face model, e.g. ``load_model("dlib-resnet")``: in eval mode,
    its parameters frozen (attacks differentiate with respect to the input)."""
    return frozen(create("models", name, **kwargs))


def get_attack(name: str, **kwargs):
    """Build a registered attack (threat model), e.g. ``get_attack("apgd", eps=0.03)``."""
    return create("attacks", name, **kwargs)


__all__ = ["__version__", "iwmf", "iwmf_apply", "iwmfdiff", "available", "create", "get_defense", "load_model",
           "get_attack"]
