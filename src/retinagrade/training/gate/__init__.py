"""Fitting and validating the gate: :mod:`.measure` (features, cached), :mod:`.fit` (rules, detector head,
gradability), :mod:`.report` (``docs/gate-report.md``). Entry point: :func:`retinagrade.training.gate.fit.fit_gate`
(``retinagrade fit-gate``)."""
