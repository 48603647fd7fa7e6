"""The annotation stage: an image batch through the decision protocol to stored records.

* :mod:`aax.annotation.annotate`: the core (batches in, :class:`AnnotationRecord` s out)
  and :func:`~aax.annotation.annotate.annotate_to_folder`.
* :mod:`aax.annotation.decide`: the protocol and mask fusion (pure NumPy).
* :mod:`aax.annotation.records`: the one result type.
* :mod:`aax.annotation.store`, :mod:`aax.annotation.locations`,
  :mod:`aax.annotation.review_list`, :mod:`aax.annotation.overlay`: the annotation folder.

Importing the package itself imports nothing.
"""
