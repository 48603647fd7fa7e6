"""Run by tests/test_cvat.py in the Datumaro environment (``.venv-dm``): read a CVAT
for images 1.1 folder with Datumaro (CVAT's own dataset library) and write what it
found: ``OUT.npz`` (one mask per masked item, keyed by item id) and ``OUT.json`` (per
item: its annotations' types, labels and attributes).

Usage: python datumaro_check.py CVAT_FOLDER OUT
"""

import json
import sys

import numpy as np
from datumaro.components.annotation import AnnotationType
from datumaro.components.dataset import Dataset

folder, out = sys.argv[1], sys.argv[2]
dataset = Dataset.import_from(folder, "cvat")
labels = dataset.categories()[AnnotationType.label]
masks, items = {}, {}
for item in dataset:
    found = []
    for ann in item.annotations:
        entry = {"type": ann.type.name, "label": labels[ann.label].name,
                 "attributes": {k: v for k, v in ann.attributes.items() if k != "occluded"}}
        if ann.type == AnnotationType.mask:
            masks[item.id] = np.asarray(ann.image, dtype=bool)
        found.append(entry)
    items[item.id] = found
np.savez(out + ".npz", **masks)
with open(out + ".json", "w") as f:
    json.dump(items, f)
print(json.dumps({"items": len(items), "masks": len(masks)}))
