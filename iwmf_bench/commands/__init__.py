"""Subcommands of ``iwmf-bench``: one module each, with ``register(subparsers)``.

``register`` adds the subparser and sets ``func`` to a callable taking the parsed
arguments and returning an exit code. :data:`MODULES` is the order shown in ``--help``.
"""

MODULES = [
    "list_cmd",
    "purify",
    "attack",
    "fetch",
    "align",
    "eval_cmd",
    "calibrate",
    "run",
    "leaderboard",
    "rescore",
    "recommend",
]
