"""Scaling out on Ray (``pip install aax[ray]``): annotation on Ray Data, one Ray task
per ensemble member for training.

- :mod:`aax.scale.cluster`: start a local Ray instance or join a cluster.
- :mod:`aax.scale.annotate`: ``aax annotate ... --ray``; the same store, the same resume.
- :mod:`aax.scale.train`: ``aax train ... --ray``; the same RUN folder.

Ray is imported only when one of these runs, so AAX works without it.
"""
