"""Fitting and validating the gate: :mod:`.measure` (features, cached), :mod:`.fit` (rules, detector head,
gradability), :mod:`.report` (``docs/gate-report.md``), :mod:`.build` (all of it, in order). Entry point:
:func:`retinagrade.training.gate.build.fit_gate` (``retinagrade fit-gate``)."""
