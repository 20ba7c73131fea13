"""Evaluation beyond the study's in-domain scores (docs/evaluation.md): false alarms and detection on real images
(:mod:`.detection`), robustness to perturbed test images (:mod:`.perturbations`, :mod:`.robustness`,
:mod:`.figures`), and their sections of the sweep report
(:mod:`deeploc.report.sections`). ``deeploc-eval --real / --perturb``
runs them on any trained run and any data source."""
