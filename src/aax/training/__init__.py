"""Internals of :mod:`aax.train`: the loss and epoch loop, tensor caching, run files.

The public entry point is :func:`aax.train.train`; these modules are split out only to
keep each one small.
"""
