"""The evaluation stage: scores, calibration and the report, from annotation records.

* :mod:`aax.evaluation.evaluate` (``evaluate``) and :mod:`aax.evaluation.calibrate`
  (``calibrate``, ``calibrate_run``) are the entry points;
* the parts they are built from: :mod:`~aax.evaluation.inputs`,
  :mod:`~aax.evaluation.scoring`, :mod:`~aax.evaluation.trivial`,
  :mod:`~aax.evaluation.examples`, :mod:`~aax.evaluation.tables`,
  :mod:`~aax.evaluation.metrics`, :mod:`~aax.evaluation.openset` and
  :mod:`aax.evaluation.calibration`;
* :mod:`aax.evaluation.report` renders what evaluation computed (plain results in, HTML
  out) and imports nothing back from the modules that compute it.

Importing the package itself imports nothing.
"""
