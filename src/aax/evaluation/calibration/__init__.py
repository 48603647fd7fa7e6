"""The parts :func:`aax.evaluation.calibrate.calibrate` is made of, one concern each:

* :mod:`~aax.evaluation.calibration.collect`: the one annotate pass, reduced to what the
  sweeps need (probabilities, uncertainties, exact per-tau pixel counts);
* :mod:`~aax.evaluation.calibration.theta`: choosing theta on the risk-coverage curve;
* :mod:`~aax.evaluation.calibration.masks`: tau curves and the choice of tau, fusion,
  refinement and mask members;
* :mod:`~aax.evaluation.calibration.files`: what calibration writes into a RUN folder,
  and the validation split it reads back from one.

Importing the package itself imports nothing.
"""
