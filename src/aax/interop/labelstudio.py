"""Label Studio: the labeling config, tasks with AAX's predictions, and reviewed
annotations back.

A task's prediction holds a ``decision`` Choices region (every class and ``review``),
a ``reason`` TextArea region (why: ``consensus``, ``uncertain``, ``no-consensus``,
``novel``) and, for positive decisions, a ``mask`` BrushLabels region in Label Studio's
brush RLE (:mod:`aax.interop.brush`) at the image's own size; a flagged image with a
draft (:func:`aax.annotation.decide.draft_members`) gets its draft in that region instead,
labelled with the class the members lean to, for the reviewer to correct or delete (the
decision stays ``review``). Its ``score`` is the ensemble's
confidence (:func:`confidence`): flagged images score below 0.5 and decided ones above,
so Label Studio's uncertainty sampling (lowest score first) serves flagged images first.
The members' probabilities, uncertainties and any novelty scores are in the task's
data as flat ``aax_*`` fields, so that reviewers can filter and sort on them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from urllib.parse import quote
from xml.etree import ElementTree as ET

import numpy as np

from aax.annotation.records import REVIEW
from aax.interop import brush
from aax.interop.reviews import Review

IMAGE = "image"
DECISION = "decision"
REASON = "reason"
MASK = "mask"
LOCAL_FILES_PREFIX = "/data/local-files/?d="
PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c")


def label_config(classes: Sequence[str], negative: str) -> str:
    """The labeling config (XML) that AAX's tasks and predictions fit."""
    view = ET.Element("View")
    ET.SubElement(view, "Header", value="AAX: $aax_decision ($aax_reason), confidence $aax_score")
    ET.SubElement(view, "Image", name=IMAGE, value="$image", zoom="true", zoomControl="true")
    choices = ET.SubElement(view, "Choices", name=DECISION, toName=IMAGE, choice="single",
                            showInline="true", required="true")
    for c in classes:
        ET.SubElement(choices, "Choice", value=c)
    ET.SubElement(choices, "Choice", value=REVIEW,
                  hint="AAX was unsure; pick a class instead before submitting")
    brushes = ET.SubElement(view, "BrushLabels", name=MASK, toName=IMAGE)
    for i, c in enumerate(c for c in classes if c != negative):
        ET.SubElement(brushes, "Label", value=c, background=PALETTE[i % len(PALETTE)])
    ET.SubElement(view, "TextArea", name=REASON, toName=IMAGE, editable="true", maxSubmissions="1",
                  rows="1", placeholder="AAX's reason; replace it with a note if you like")
    ET.indent(view)
    return ET.tostring(view, encoding="unicode") + "\n"


def model_version(settings: dict) -> str:
    """``<run folder name>@<weights digest>``: another run or retrained weights differ."""
    return f"{Path(settings.get('run', 'run')).name}@{settings.get('weights', 'unknown')}"


def confidence(decision: str | None, members: Sequence[dict], agreeing: Sequence[str],
               classes: Sequence[str]) -> float:
    """The ensemble's confidence in [0, 1].

    Decided images: ``0.5 + 0.5 * p``, with ``p`` the mean probability of the decided
    class over the agreeing members (over all members for negative decisions).
    Flagged images: ``0.5 * (1 - 2 * mean u)`` (clipped), with ``u`` the members'
    MC-Dropout uncertainties (a standard deviation of a probability, at most 0.5), so
    the most uncertain come first among them.
    """
    if not members:
        return 0.0
    if decision == REVIEW or decision not in classes:
        u = float(np.mean([m["uncertainty"] for m in members]))
        return float(np.clip(0.5 * (1.0 - 2.0 * u), 0.0, 0.4999))
    index = list(classes).index(decision)
    voters = [m for m in members if m["name"] in agreeing] or list(members)
    return float(0.5 + 0.5 * np.mean([m["probs"][index] for m in voters]))


def _flat_number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def member_fields(members: Sequence[dict], classes: Sequence[str]) -> dict:
    """Flat ``aax_*`` task-data fields per member: ``aax_p_<class>_<member>``,
    ``aax_u_<member>``, ``aax_predicted_<member>``, and every other number the member
    carries (novelty scores: ``aax_<key>_<member>``, or ``aax_<key>_<name>_<member>``
    for a mapping of scores)."""
    out: dict = {}
    for m in members:
        name = m["name"]
        for c, p in zip(classes, m.get("probs", [])):
            out[f"aax_p_{c}_{name}"] = round(float(p), 6)
        out[f"aax_u_{name}"] = round(float(m.get("uncertainty", 0.0)), 6)
        out[f"aax_predicted_{name}"] = m.get("predicted")
        for key, value in m.items():
            if key in ("name", "probs", "uncertainty", "predicted"):
                continue
            if (v := _flat_number(value)) is not None:
                out[f"aax_{key}_{name}"] = round(v, 6)
            elif isinstance(value, dict):
                for sub, subvalue in value.items():
                    if (v := _flat_number(subvalue)) is not None:
                        out[f"aax_{key}_{sub}_{name}"] = round(v, 6)
    return out


def config_names(config: str | None) -> dict[str, str]:
    """The control names of a labeling config that AAX fills: ``image`` (the Image tag's
    name), ``field`` (the task-data key its ``value`` reads), ``decision`` (the first
    Choices), ``mask`` (the first BrushLabels), ``reason`` (the first TextArea); AAX's
    own names where the config has no such tag or cannot be read."""
    names = {"image": IMAGE, "field": IMAGE, "decision": DECISION, "mask": MASK, "reason": REASON}
    if not config:
        return names
    try:
        root = ET.fromstring(config)
    except ET.ParseError:
        return names
    found = {}
    for el in root.iter():
        tag = el.tag.lower()
        if tag == "image" and "image" not in found and el.get("name"):
            found["image"] = el.get("name")
            found["field"] = (el.get("value") or "$image").lstrip("$")
        elif tag in ("choices", "brushlabels", "textarea"):
            key = {"choices": "decision", "brushlabels": "mask", "textarea": "reason"}[tag]
            if key not in found and el.get("name"):
                found[key] = el.get("name")
    return {**names, **found}


def prediction(decision: str, reason: str | None, mask: np.ndarray | None, size: tuple[int, int] | None,
               score: float, version: str, names: dict[str, str] | None = None,
               draft: np.ndarray | None = None, draft_class: str | None = None) -> dict:
    """One Label Studio prediction: decision, reason and (when given) the mask, under
    the control names ``names`` (:func:`config_names`; AAX's own by default). A flagged
    image's ``draft`` of ``draft_class`` fills the mask region (id ``aax-draft``)."""
    n = names or config_names(None)
    result = [{"id": "aax-decision", "from_name": n["decision"], "to_name": n["image"], "type": "choices",
               "value": {"choices": [decision]}, "origin": "prediction"},
              {"id": "aax-reason", "from_name": n["reason"], "to_name": n["image"], "type": "textarea",
               "value": {"text": [reason or ""]}, "origin": "prediction"}]
    region = None
    if mask is not None and decision != REVIEW:
        region = ("aax-mask", mask, decision)
    elif draft is not None and draft_class and decision == REVIEW:
        region = ("aax-draft", draft, draft_class)
    if region is not None and size is not None:
        h, w = size
        rid, layer, label = region
        result.append({"id": rid, "from_name": n["mask"], "to_name": n["image"], "type": "brushlabels",
                       "original_width": int(w), "original_height": int(h), "image_rotation": 0,
                       "value": {"format": "rle", "rle": brush.mask_to_rle(layer), "brushlabels": [label]},
                       "origin": "prediction"})
    return {"model_version": version, "score": round(float(score), 6), "result": result}


def task_data(row: dict, classes: Sequence[str], image_url: str, score: float) -> dict:
    """A task's ``data``: the image URL, the store's key for the image (``aax_image``,
    which the import reads back), the decision, reason, confidence and member fields."""
    return {IMAGE: image_url, "aax_image": row["image"], "aax_decision": row["decision"],
            "aax_reason": row["reason"], "aax_score": round(score, 6),
            "aax_reviewed": bool(row.get("reviewed")), **member_fields(row["members"], classes)}


def local_files_url(path: Path, document_root: Path) -> str:
    """Label Studio's URL of a local file under its ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``."""
    try:
        rel = Path(os.path.abspath(path)).relative_to(Path(os.path.abspath(document_root)))
    except ValueError:
        raise ValueError(f"{path} is not under the local-files document root {document_root}") from None
    return LOCAL_FILES_PREFIX + quote(rel.as_posix(), safe="/")


def image_url_maker(store, image_root: str | None = None,
                    local_files: str | os.PathLike | None = None) -> Callable[[dict], str]:
    """How tasks name their image: ``image_root`` + the name relative to the input root
    (a URL or path prefix), a local-files URL under ``local_files``, or else the
    image's absolute path."""
    from aax.annotation.locations import image_location, image_name

    if image_root is not None and local_files is not None:
        raise ValueError("give an image root or a local-files document root, not both")
    if image_root is not None:
        prefix = image_root.rstrip("/")
        is_url = "://" in prefix or prefix.startswith("/data/")
        return lambda row: f"{prefix}/{quote(image_name(store, row), safe='/') if is_url else image_name(store, row)}"
    if local_files is not None:
        root = Path(local_files)
        return lambda row: local_files_url(image_location(store, row), root)
    return lambda row: str(Path(os.path.abspath(image_location(store, row))))


def export_label_studio(out: str | os.PathLike, to: str | os.PathLike, *, image_root: str | None = None,
                        local_files: str | os.PathLike | None = None) -> dict:
    """Write ``to/tasks.json`` (one task per annotated image, with AAX's prediction) and
    ``to/config.xml`` (the labeling config) from the output folder ``out``.

    Reviewed images carry the reviewed decision and mask (with ``aax_reviewed`` true).
    """
    from aax.interop.export import _open
    from aax.interop.reviews import load_mask, reviewed_rows

    store = _open(out)
    settings = store.settings
    classes, negative = list(settings.get("classes", [])), settings.get("negative_class")
    version = model_version(settings)
    url_of = image_url_maker(store, image_root, local_files)
    target = Path(to)
    target.mkdir(parents=True, exist_ok=True)
    tasks, errors = [], []
    for row in reviewed_rows(store):
        if row["status"] != "ok":
            continue
        try:
            url = url_of(row)
        except ValueError as exc:
            errors.append({"image": row["image"], "error": str(exc)})
            continue
        score = 1.0 if row["reviewed"] else confidence(row["decision"], row["members"], row["agreeing"], classes)
        mask = load_mask(Path(out) / row["mask"]) if row["mask"] else None
        draft = load_mask(Path(out) / row["draft"]) if row.get("draft") else None
        size = (row["height"], row["width"])
        tasks.append({"data": task_data(row, classes, url, score),
                      "predictions": [prediction(row["decision"], row["reason"], mask, size, score,
                                                 version + ("+reviewed" if row["reviewed"] else ""),
                                                 draft=draft, draft_class=row.get("draft_class"))]})
    store.close()
    _write_json(target / "tasks.json", tasks)
    (target / "config.xml").write_text(label_config(classes, negative))
    regions = [r["id"] for t in tasks for r in t["predictions"][0]["result"]]
    return {"tasks": len(tasks), "masks": regions.count("aax-mask"), "drafts": regions.count("aax-draft"),
            "flagged": sum(t["data"]["aax_decision"] == REVIEW for t in tasks), "errors": errors,
            "tasks_file": str(target / "tasks.json"), "config": str(target / "config.xml")}


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(value, separators=(",", ":")))  # dumps uses the C encoder; dump does not
    os.replace(tmp, path)


# -- reviewed annotations back -------------------------------------------------------
def _latest_annotation(task: dict) -> dict | None:
    done = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if not done:
        return None
    return max(done, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0))


def review_from_task(task: dict, classes: Sequence[str], negative: str) -> tuple[Review | None, str | None]:
    """The reviewer's answer in one exported task: a :class:`Review`, or None and why
    the task gives none (no annotation, still ``review``, an unknown class, ...)."""
    data = task.get("data") or {}
    image = data.get("aax_image")
    if not image:
        return None, f"task {task.get('id')}: no aax_image in its data (not a task AAX exported)"
    annotation = _latest_annotation(task)
    if annotation is None:
        return None, None  # not reviewed yet: nothing to say
    decision, mask, note = None, None, None
    brush_labels: set[str] = set()
    for region in annotation.get("result") or []:
        kind, value = region.get("type"), region.get("value") or {}
        if kind == "choices" and region.get("from_name") == DECISION and value.get("choices"):
            decision = value["choices"][0]
        elif kind == "textarea" and region.get("from_name") == REASON and value.get("text"):
            note = "\n".join(value["text"])
        elif kind == "brushlabels" and value.get("format", "rle") == "rle" and "rle" in value:
            h, w = int(region["original_height"]), int(region["original_width"])
            try:
                layer = brush.rle_to_mask(value["rle"], h, w)
            except ValueError as exc:
                return None, f"{image}: bad brush region {region.get('id')}: {exc}"
            mask = layer if mask is None else mask | layer
            brush_labels.update(value.get("brushlabels") or [])
    if decision is None and len(brush_labels) == 1:
        decision = next(iter(brush_labels))
    if decision is None:
        return None, f"{image}: the annotation has no decision"
    if decision == REVIEW:
        return None, f"{image}: the reviewer left it as 'review'"
    if decision not in classes:
        return None, f"{image}: '{decision}' is not one of the classes {list(classes)}"
    if decision == negative:
        mask = None
    elif mask is None:
        mask = None  # a positive class without a painted mask: the decision alone is kept
    reviewer = annotation.get("completed_by")
    if isinstance(reviewer, dict):
        reviewer = reviewer.get("email") or reviewer.get("id")
    model_reason = data.get("aax_reason")
    return Review(image=image, decision=decision, mask=mask,
                  note=note if note and note != model_reason else None,
                  reviewer=None if reviewer is None else str(reviewer), tool="label-studio",
                  tool_ref=f"task {task.get('id')} annotation {annotation.get('id')}",
                  reviewed_at=annotation.get("updated_at") or annotation.get("created_at")), None


def read_export(path: str | os.PathLike, classes: Sequence[str], negative: str) -> tuple[list[Review], list[str]]:
    """Reviews from a Label Studio JSON export (a list of tasks with ``annotations``),
    and a note for every task that gives none."""
    path = Path(path)
    try:
        tasks = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a Label Studio JSON export ({exc})") from None
    if not isinstance(tasks, list):
        raise ValueError(f"{path}: a Label Studio JSON export is a list of tasks; found {type(tasks).__name__}")
    reviews, notes = [], []
    for task in tasks:
        if not isinstance(task, dict):
            notes.append(f"a task that is not an object: {str(task)[:60]}")
            continue
        review, why = review_from_task(task, classes, negative)
        if review is not None:
            reviews.append(review)
        elif why:
            notes.append(why)
    return reviews, notes


def predictions_for_records(records: Iterable, classes: Sequence[str], version: str,
                            names: dict[str, str] | None = None) -> list[dict]:
    """Label Studio predictions (one per record, in order) for freshly annotated
    records: what the ML backend answers. A record that failed gets an empty result
    and its error."""
    out = []
    for record in records:
        if record.status != "ok":
            out.append({"model_version": version, "score": 0.0, "result": [], "error": record.error})
            continue
        members = [m.to_json() for m in record.members]
        score = confidence(record.decision, members, record.agreeing, classes)
        out.append(prediction(record.decision, record.reason, record.mask, record.size, score, version, names,
                              draft=record.draft, draft_class=record.draft_class))
    return out
