"""The models stage: the ensemble's members and what they compute for an image batch.

* :mod:`aax.models.members`: backbones with the MC Dropout head (and, once retrained on
  reviewed masks, a segmentation head: :mod:`aax.models.members.segment`); :mod:`aax.models.device`.
* :mod:`aax.models.uncertainty` (MC Dropout), :mod:`aax.models.explain` (XGrad-CAM),
  :mod:`aax.models.maps` (the map pass and its settings), :mod:`aax.models.patch_maps`,
  :mod:`aax.models.refine` (superpixel pooling of a fused map).
* :mod:`aax.models.novelty` (open-set scores) and :mod:`aax.models.novelty_fit` (fitting them).
* :mod:`aax.models.runfiles` (the RUN folder's files) and :mod:`aax.models.ensemble`
  (``Ensemble.load(run)``).

Nothing here imports the annotation core: :func:`aax.annotate` takes an ensemble, not
the other way round. Importing the package itself imports nothing.
"""
