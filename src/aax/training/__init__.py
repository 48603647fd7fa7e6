"""The training stage: :func:`aax.training.train.train` writes a RUN folder.

:mod:`aax.training.train` holds ``TrainConfig`` and ``train``; the loss and epoch loop
(:mod:`~aax.training.loop`), tensor caching (:mod:`~aax.training.tensors`) and
initialisation (:mod:`~aax.training.init`) are split out only to keep each module small.
The RUN folder's files are :mod:`aax.models.runfiles`, which loading needs too.
"""
