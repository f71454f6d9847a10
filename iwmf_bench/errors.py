"""User-facing errors.

Anything a user can fix (bad images, missing weights, wrong options) raises a
:class:`BenchError`; the CLI prints its message on one line and exits with code 2,
without a traceback. Programming errors stay ordinary exceptions.
"""


class BenchError(Exception):
    """An error caused by input or environment that the user can fix; CLI exit code 2."""

    exit_code = 2


class DataError(BenchError):
    """A problem with an image folder or image file."""


class WeightsError(BenchError):
    """A checkpoint is missing, corrupt or does not match its pinned hash."""


class NotApplicableError(BenchError):
    """The cell's threat model does not apply to its defense (e.g. an exact-gradient attack
    on a defense that has no exact gradient); the harness reports the cell as ``n/a``."""


class MissingExtraError(BenchError):
    """An optional dependency (an extra such as ``iwmf-bench[suites]``) is not installed;
    the harness reports the cell as skipped, naming the install command."""


class DatasetMissingError(WeightsError):
    """A fetchable image set (:mod:`iwmf_bench.image_sets`) is missing, incomplete or altered
    in the cache. A subclass of :class:`WeightsError` because it is the same situation as
    missing weights, fixed the same way (``iwmf-bench fetch NAME``): the harness reports a
    cell that needs it as skipped with the fetch command, not as an error of the code."""
