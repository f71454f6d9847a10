"""Reading one cell's record: the rates the regression check compares, the attack's
success rate, the rate as a table shows it, and the file a cell is committed under."""

from __future__ import annotations

from ..metrics import Rate
from ..paired import identity_interval
from ..pipeline.outcome import CellMetrics, metrics_of
from ..ranking import pct, per_pair_success


def checked_rates(m: CellMetrics) -> dict[str, float]:
    """The rates the regression check compares, by their names in the JSON (a dodging
    cell's success rates are ``dodging_success*``): single-shot and worst-of-N, the
    majority deployment's, and a known-randomness cell's on fresh draws."""
    out = {m.rate_name: m.success.value, f"{m.rate_name}_worst_of_n": m.success_worst_of_n.value,
           "frr_genuine": m.frr_genuine.value, "frr_adv_true_identity": m.frr_adv_true_identity.value}
    majority = m.deployment("majority")
    out.update({f"{m.rate_name}_majority": majority.success.value, "frr_genuine_majority": majority.frr_genuine.value,
                "frr_adv_true_identity_majority": majority.frr_adv_true_identity.value})
    if m.fresh_draws:
        out[f"{m.rate_name}_fresh_draws"] = m.fresh_draws["single-shot"].value
    return out


def success(record: dict) -> Rate:
    """The attack's success rate of a cell: its FAR (impersonation), or the rate of
    probes rejected against their own identity (``goal: dodging``)."""
    return metrics_of(record).success


def cell_display(record: dict) -> str:
    """A cell's rate with its interval: over identities where the data has enough of them
    (:func:`~iwmf_bench.paired.identity_interval`), else the Wilson interval of its Rate."""
    m = metrics_of(record)
    by_identity = identity_interval(per_pair_success(record), m.per_pair.probe_identity)
    return pct({"value": m.success.value, "ci95": by_identity} if by_identity else m.success)


def cell_file(record: dict) -> str:
    c = record["cell"]
    return f"{c['model']}__{c['defense']}__{c['threat']}.json"
