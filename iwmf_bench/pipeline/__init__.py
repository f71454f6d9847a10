"""One benchmark cell as a short pipeline of stages.

A :class:`~iwmf_bench.pipeline.cell.Cell` (model, defense, threat model, data, seed,
device) goes through four stages, each one module with one job::

    pairs  (pairs.py, dataset_pairs.py, threshold.py)  who impersonates whom, genuine pairs, threshold
    craft  (craft.py, surrogate.py, photo_space.py)     the adversarial images
    score  (score.py)                                    purify on fresh randomness, FAR, FRR, s/img
    record (record.py)                                   the cell's JSON, atomically

:mod:`.compute` runs them in that order. Stages import only lower layers (models,
defenses, attacks, data, metrics, :mod:`iwmf_bench.util`) and each other downwards, never
the orchestrator above them (:mod:`iwmf_bench.runner`, :mod:`iwmf_bench.suite`).
This package's ``__init__`` imports nothing, so importing one stage never loads the rest.
"""
