"""Annotation tools and exports: PNG / COCO, Label Studio, CVAT, a live ML backend, and
reviewers' corrections back into the store.

Importing the package itself imports nothing.
"""
