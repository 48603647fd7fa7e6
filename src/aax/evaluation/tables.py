"""How evaluation results are named and tabulated: the methods' names, the settings in
words, the paper's tables as markdown and the per-image CSV.

The HTML report (:mod:`aax.evaluation.report`), the CLI and the demo say things the same
way by using these; nothing here computes a score.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from typing import Any

from aax.evaluation.openset import table_markdown


ENSEMBLE = "AAX"  # the ensemble's name in tables


MEMBER_TITLES = {"resnet50": "ResNet-50", "efficientnet-b0": "EfficientNet-B0", "densenet121": "DenseNet-121",
                 "efficientnet-lite0": "EfficientNet-Lite0", "efficientnet-lite1": "EfficientNet-Lite1",
                 "efficientnet-lite2": "EfficientNet-Lite2"}


Tau = float | str | dict[str, float | str]  # one threshold ("otsu": per image), or one per positive class


def method_label(name: str) -> str:
    """How tables, the report and the README name a method: one name everywhere."""
    if name == ENSEMBLE:
        return f"{ENSEMBLE} (fused maps of the agreeing members)"
    return f"{MEMBER_TITLES.get(name, name)} with XGrad-CAM and MC Dropout"


def masks_text(settings: Mapping[str, Any], members_too: bool = True) -> str:
    """How the masks of these results were made, in words (fusion, mask members,
    refinement; ``members_too``: say that members' own masks are refined as well)."""
    members = settings.get("mask_members")
    among = f" among {', '.join(members)} (chosen on validation masks)" if members else ""
    refined = (", averaged over the image's superpixels" + (" (members' masks too)" if members_too else "")
               if settings.get("refine", "none") == "superpixels" else "")
    return f"AAX's masks: {settings.get('fusion', 'min')} fusion of the agreeing members' maps{among}{refined}."


def tau_text(tau: Tau) -> str:
    """``0.5`` or ``fire: 0.4, smoke: 0.6``."""
    if isinstance(tau, dict):
        return ", ".join(f"{k}: {tau_text(v)}" for k, v in tau.items())
    return tau if isinstance(tau, str) else f"{tau:g}"


def members_text(settings: Mapping[str, Any]) -> str:
    """How a member alone is flagged in these tables (it depends on the novelty step)."""
    if settings.get("novelty"):
        return ("A member alone is flagged when its own u > theta or it finds the image novel "
                "(the ensemble's checks with a quorum of one). ")
    return "A member alone is flagged when its own u > theta (no novelty step: the paper's protocol). "


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _num(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def tables_markdown(result: dict[str, Any]) -> str:
    """The paper's tables for this data: accuracy (tables 1, 3) and IoU (tables 2, 4) of
    each member and of AAX, with the flag rate, and the open-set check when present."""
    s = result["settings"]
    rows = [(method_label(n), m) for n, m in result["members"].items()]
    rows.append((f"**{method_label(ENSEMBLE)}**", result["ensemble"]))
    out = [f"# AAX evaluation: {s['data']}", "",
           f"{s['n_images']} images, {s['n_errors']} input errors (listed in metrics.json), classes {', '.join(s['classes'])} "
           f"(negative: {s['negative_class']}); theta = {s['theta']:g}, tau = {tau_text(s['tau'])}, "
           f"K = {s['mc_passes']} MC passes, quorum {s['quorum']}. Flagged images count as wrong "
           f"in accuracy; 'kept' is the accuracy on the images not flagged. {members_text(s)}{masks_text(s)}", "",
           "## Classification (paper tables 1 and 3)", "",
           "| Method | Accuracy (%) | Accuracy kept (%) | Flag rate (%) | Precision (%) | Recall (%) | F1 (%) |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for label, m in rows:
        out.append(f"| {label} | {_pct(m['accuracy'])} | {_pct(m['accuracy_kept'])} | {_pct(m['flag_rate'])} "
                   f"| {_pct(m['precision'])} | {_pct(m['recall'])} | {_pct(m['f1'])} |")
    out.append("")
    if s.get("has_masks"):
        n_masks = result["ensemble"].get("n_masks", 0)
        out += ["## Masks (paper tables 2 and 4)", "",
                f"On the {n_masks} positive images with a ground-truth mask; an image without a "
                "predicted mask (called negative, or flagged) scores IoU 0. Mean = average of per-image "
                "IoU; micro = summed intersection / summed union. 'Given' = mean IoU of the masks the "
                "method did give, on the images it annotated (n of them): what a reviewer receives; for "
                "a trivial mask, on the images AAX gave a mask for.", "",
                "| Method | IoU mean (%) | IoU micro (%) | Pixel precision (%) | Pixel recall (%) | Pixel F1 (%) "
                "| IoU given (%) (n) |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        trivial = [(f"{name} (trivial)", m) for name, m in (result.get("trivial") or {}).items()]
        for label, m in rows + trivial:
            given = f"{_pct(m['iou_mean_given'])} ({m['n_masks_given']})" if "n_masks_given" in m else ""
            out.append(f"| {label} | {_pct(m.get('iou_mean'))} | {_pct(m.get('iou_micro'))} "
                       f"| {_pct(m.get('pixel_precision'))} | {_pct(m.get('pixel_recall'))} | {_pct(m.get('pixel_f1'))} "
                       f"| {given} |")
        out.append("")
        e = result["ensemble"]
        if e.get("n_drafts"):
            out += [f"Drafts: {e['n_drafts']} flagged positive images got a draft mask for the reviewer "
                    f"(mean IoU {_pct(e['iou_mean_drafts'])}); with the drafts in place of nothing, AAX's "
                    f"mean IoU over all positives is {_pct(e['iou_mean_with_drafts'])}. A draft is not an "
                    "annotation: the image stays flagged.", ""]
    else:
        out += ["No ground-truth masks in this data: no IoU tables.", ""]
    u = result.get("unseen")
    nov = (u or {}).get("novelty") or {}
    if u and nov.get("available"):
        out += ["## Open set: unseen images", "",
                f"{u['n']} images of a kind never trained on ({u['data']}). Flag rate: "
                f"{_pct(u['flag_rate_unseen'])}% on them vs {_pct(u['flag_rate_seen'])}% on the evaluation data; "
                f"sent to review as novel: {_pct(nov['novel_rate_unseen'])}% vs {_pct(nov['novel_rate_seen'])}%. "
                f"Every score side by side (higher = more novel; flagged = over the stored threshold: theta "
                f"for u, else the {_pct(nov['pass_rate'])}% quantile on the validation split; the protocol "
                f"thresholds {nov['score']}):", "", *table_markdown(nov), ""]
    elif u:
        out += ["## Open set: unseen images", "",
                f"{u['n']} images of a kind never trained on ({u['data']}). Flag rate: "
                f"{_pct(u['flag_rate_unseen'])}% on them vs {_pct(u['flag_rate_seen'])}% on the evaluation data.",
                "", "| Uncertainty score | AUROC seen vs unseen | score > theta, seen (%) | score > theta, unseen (%) |",
                "|---|---:|---:|---:|"]
        for name, value in u["auroc"].items():
            rates = u["over_theta"][name]
            out.append(f"| {name} | {_num(value)} | {_pct(rates['seen'])} | {_pct(rates['unseen'])} |")
        out.append("")
    return "\n".join(out)


CSV_LEAD = ["set", "image", "status", "error", "label", "decision", "reason", "agreeing", "correct", "iou"]


def per_image_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The per-image table as CSV text (fixed leading columns, then per-member ones)."""
    extra: list[str] = []
    for row in rows:
        for k in row:
            if k not in CSV_LEAD and k not in extra:
                extra.append(k)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_LEAD + extra, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


COMPARED = (("accuracy", "accuracy"), ("accuracy_kept", "kept accuracy"), ("flag_rate", "flag rate"),
            ("iou_mean", "mean IoU, all positives"), ("iou_mean_given", "mean IoU of the masks given"),
            ("iou_mean_with_drafts", "mean IoU, all positives, drafts counted"))


def comparison_markdown(before: Mapping[str, Any], after: Mapping[str, Any],
                        names: tuple[str, str] = ("before", "after")) -> str:
    """Two evaluations of the same images side by side (``aax evaluate --against``): AAX's
    figures for each, their difference in points, and the trivial masks' IoU once."""
    rows = [f"| {ENSEMBLE} | {names[0]} | {names[1]} | change |", "|---|---|---|---|"]
    for key, label in COMPARED:
        a, b = before["ensemble"].get(key), after["ensemble"].get(key)
        change = "" if a is None or b is None else f"{100 * (b - a):+.1f} points"
        rows.append(f"| {label} | {_pct(a)} | {_pct(b)} | {change} |")
    for name, m in (after.get("trivial") or {}).items():
        rows.append(f"| trivial mask: {name}, mean IoU | {_pct(m.get('iou_mean'))} | "
                    f"{_pct(m.get('iou_mean'))} | |")
    n = after["settings"]["n_images"]
    excluded = after["settings"].get("excluded_reviewed") or 0
    note = f"\n\n{n} images" + (f"; {excluded} reviewed images left out of both" if excluded else "") + "."
    return "\n".join(rows) + note
