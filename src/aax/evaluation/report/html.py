"""The report page: one self-contained HTML file (styles inline, images as data URIs)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from aax.annotation.records import REVIEW
from aax.evaluation.report import figures
from aax.evaluation.report.example import Example
from aax.evaluation.tables import ENSEMBLE, Tau, masks_text, members_text, method_label, tau_text

STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1280px; padding: 0 16px; color: #1d1d1f; background: #fff; line-height: 1.4; }
h1 { font-size: 24px; margin-bottom: 4px; }
h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
p.note, .settings { color: #555; font-size: 13px; }
table.metrics { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
table.metrics th, table.metrics td { border: 1px solid #ddd; padding: 4px 10px; }
table.metrics th { background: #f4f4f6; text-align: left; }
table.metrics td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.metrics tr.aax td { font-weight: 600; background: #f7fbff; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; margin: 12px 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px 14px; min-width: 120px; }
.card .v { font-size: 22px; font-weight: 600; }
.card .k { font-size: 12px; color: #666; }
table.grid { border-collapse: collapse; font-size: 11px; }
table.grid th { font-size: 11px; padding: 2px 4px; background: #f4f4f6; }
table.grid td { padding: 2px; text-align: center; vertical-align: top; }
table.grid td.rowlabel { text-align: left; width: 120px; font-size: 11px; padding-right: 6px; }
table.grid img { display: block; margin: 0 auto; width: 112px; height: auto; }
table.grid .cap { color: #444; max-width: 118px; overflow-wrap: normal; word-break: keep-all; }
.tag { display: inline-block; border-radius: 3px; padding: 0 5px; color: #fff; font-weight: 600; }
.tag.correct { background: #2e7d32; } .tag.wrong { background: #c62828; } .tag.flagged { background: #ef6c00; }
img.fig { max-width: 100%; border: 1px solid #eee; }
.legend span { display: inline-block; margin-right: 14px; }
.swatch { display: inline-block; width: 12px; height: 12px; vertical-align: middle; margin-right: 4px; }
"""


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _num(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def _table(header: Sequence[str], rows: Sequence[tuple[str, Sequence[str], bool]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for label, cells, strong in rows:
        tds = "".join(f'<td class="num">{escape(c)}</td>' for c in cells)
        body.append(f'<tr{" class=aax" if strong else ""}><td>{escape(label)}</td>{tds}</tr>')
    return f'<table class="metrics"><tr>{head}</tr>{"".join(body)}</table>'


def _methods(result: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any], bool]]:
    rows = [(method_label(name), m, False) for name, m in result["members"].items()]
    return rows + [(method_label(ENSEMBLE), result["ensemble"], True)]


def classification_table(result: Mapping[str, Any]) -> str:
    """Paper tables 1 and 3 (with flag rate, kept accuracy, P/R/F1)."""
    header = ["Method", "Accuracy %", "Accuracy kept %", "Flag rate %", "Precision %", "Recall %", "F1 %"]
    rows = [(label, [_pct(m["accuracy"]), _pct(m["accuracy_kept"]), _pct(m["flag_rate"]),
                     _pct(m["precision"]), _pct(m["recall"]), _pct(m["f1"])], strong)
            for label, m, strong in _methods(result)]
    return _table(header, rows)


def mask_table(result: Mapping[str, Any]) -> str:
    """Paper tables 2 and 4 (IoU mean and micro, pixel P/R/F1), and the IoU of the masks
    each method did give (on the images it annotated; a trivial mask: on the images AAX
    gave a mask for)."""
    header = ["Method", "IoU mean %", "IoU micro %", "Pixel precision %", "Pixel recall %", "Pixel F1 %",
              "IoU of the masks given % (n)"]
    trivial = [(f"{name} (trivial)", m, False) for name, m in (result.get("trivial") or {}).items()]

    def given(m: Mapping[str, Any]) -> str:
        return f"{_pct(m['iou_mean_given'])} ({m['n_masks_given']})" if "n_masks_given" in m else ""

    rows = [(label, [_pct(m.get("iou_mean")), _pct(m.get("iou_micro")), _pct(m.get("pixel_precision")),
                     _pct(m.get("pixel_recall")), _pct(m.get("pixel_f1")), given(m)], strong)
            for label, m, strong in _methods(result) + trivial]
    return _table(header, rows)


def open_set_table(unseen: Mapping[str, Any]) -> str:
    """AUROC of each uncertainty score for telling unseen images from the data."""
    rows = []
    for name, value in unseen["auroc"].items():
        rates = unseen["over_theta"][name]
        rows.append((name, [_num(value), _pct(rates["seen"]), _pct(rates["unseen"])], name.startswith(ENSEMBLE)))
    return _table(["Uncertainty score", "AUROC", "score > theta on data %", "score > theta on unseen %"], rows)


def _img(png: bytes, alt: str) -> str:
    return f'<img src="{figures.data_uri(png)}" alt="{escape(alt)}">'


def _cell(tile, caption: str, alt: str) -> str:
    return f'<td>{_img(figures.png_bytes(tile), alt)}<div class="cap">{escape(caption)}</div></td>'


def _status(example: Example) -> tuple[str, str]:
    if example.decision == REVIEW:
        return "flagged", "flagged"
    return ("correct", "correct") if example.correct else ("wrong", "wrong")


MAP_NAMES = {"cam": "XGrad-CAM", "patch": "patch-feature novelty (distance to the negative training patches)"}


def example_grid(examples: Sequence[Example], names: Sequence[str], tau: Tau, negative: str,
                 source: str = "cam") -> str:
    """The paper's figures 2 and 3: input, ground truth, each member's map and mask,
    the AAX mask; one row per image, labelled correct / wrong / flagged."""
    if not examples:
        return '<p class="note">No example images (maps were not kept).</p>'
    head = ["", "input", "ground truth"]
    for n in names:
        head += [f"{n} map", f"{n} mask"]
    head.append(f"{ENSEMBLE} mask")
    rows = ["<tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"]
    for ex in examples:
        image = ex.preview
        if image is None:
            image = _read_preview(ex.image)
        image = figures.shrink_image(image)
        kind, css = _status(ex)
        label = (f'<td class="rowlabel"><span class="tag {css}">{kind}</span><br>'
                 f"true: {escape(ex.label)}<br>AAX: {escape(ex.decision)}"
                 f"{f' ({escape(ex.reason)})' if ex.reason and ex.decision == REVIEW else ''}"
                 f'<br><span class="cap">{escape(_short(ex.image)).replace("/", "/<wbr>")}</span></td>')
        cells = [label, _cell(image, "", "input")]
        if ex.gt_mask is not None:
            cells.append(_cell(figures.mask_tile(image, ex.gt_mask, colour=figures.GT_RGB), "", "ground truth"))
        else:
            cells.append(_cell(figures.mask_tile(image, None), "none" if ex.label == negative else "no mask given",
                               "ground truth"))
        for n in names:
            sal = ex.saliency.get(n)
            cap = f"{ex.member_decisions.get(n, '?')}, u={ex.member_uncertainty.get(n, float('nan')):.3f}"
            cells.append(_cell(figures.heat_tile(image, sal) if sal is not None else figures.mask_tile(image, None),
                               cap, f"{n} saliency"))
            m = ex.member_masks.get(n)
            iou = ex.member_iou.get(n)
            cells.append(_cell(figures.mask_tile(image, m, ex.gt_mask),
                               "no mask" if m is None else (f"IoU {iou:.2f}" if iou is not None else ""),
                               f"{n} mask"))
        if ex.mask is None and ex.draft is not None:  # flagged: the draft the reviewer starts from, in yellow
            cap = "draft" + (f", IoU {ex.draft_iou:.2f}" if ex.draft_iou is not None else "")
            cells.append(_cell(figures.mask_tile(image, ex.draft, ex.gt_mask, colour=figures.DRAFT_RGB), cap,
                               "AAX draft for the reviewer"))
        else:
            cap = "no mask" if ex.mask is None else (f"IoU {ex.iou:.2f}" if ex.iou is not None else "")
            cells.append(_cell(figures.mask_tile(image, ex.mask, ex.gt_mask), cap, "AAX mask"))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    legend = ('<p class="legend note"><span><span class="swatch" style="background:rgb(255,48,48)"></span>'
              'predicted mask</span><span><span class="swatch" style="background:rgb(255,200,0)"></span>'
              'draft (flagged images)</span><span><span class="swatch" style="background:rgb(40,220,40)"></span>'
              f'ground truth (outlined over masks)</span><span>maps: {MAP_NAMES.get(source, escape(source))}, jet colours; '
              f'masks: map &gt; tau = {escape(tau_text(tau))} '
              "(a member's mask only when it alone predicts a positive class with u &le; theta)</span></p>")
    return legend + '<table class="grid">' + "".join(rows) + "</table>"


def _short(path: str, keep: int = 28) -> str:
    """The end of a path, cut at a folder boundary so that no name is cut mid-way; the
    caption may break only after a ``/`` (a word-break opportunity), never inside a number."""
    parts = path.replace("\\", "/").split("/")
    tail = parts[-1]
    for part in reversed(parts[:-1]):
        if len(tail) + len(part) + 1 > keep:
            break
        tail = f"{part}/{tail}"
    return tail if tail == path else "…/" + tail


def _read_preview(path: str):
    """The image itself when the record carried no preview; a grey tile if unreadable."""
    import numpy as np

    try:
        from aax.data import read_image

        return figures.shrink_image(read_image(path))
    except Exception:  # noqa: BLE001 - a picture that will not load must not stop the report
        try:
            from PIL import Image

            with Image.open(path) as im:
                return figures.shrink_image(np.asarray(im.convert("RGB")))
        except Exception:  # noqa: BLE001
            return np.full((figures.THUMB, figures.THUMB, 3), 200, np.uint8)


def page(result: Mapping[str, Any], examples: Sequence[Example]) -> str:
    """The whole report as HTML text."""
    s = result["settings"]
    names = list(result["members"])
    e = result["ensemble"]
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>AAX evaluation</title>"
             f"<style>{STYLE}</style></head><body>",
             "<h1>AAX evaluation</h1>",
             f'<p class="settings">data: {escape(str(s["data"]))} · run: {escape(str(s["run"]))} · '
             f"{s['n_images']} images, {s['n_errors']} input errors · classes: {escape(', '.join(s['classes']))} "
             f"(negative: {escape(s['negative_class'])}) · theta = {s['theta']:g} · tau = {escape(tau_text(s['tau']))} · "
             f"K = {s['mc_passes']} · quorum {s['quorum']} · {escape(str(s.get('date', '')))}</p>"]
    cards = [("accuracy", _pct(e["accuracy"]) + " %"), ("accuracy kept", _pct(e["accuracy_kept"]) + " %"),
             ("flag rate", _pct(e["flag_rate"]) + " %")]
    if s.get("has_masks"):
        cards += [("IoU mean", _pct(e.get("iou_mean")) + " %"), ("IoU micro", _pct(e.get("iou_micro")) + " %")]
    if result.get("unseen"):
        cards.append(("flag rate, unseen", _pct(result["unseen"]["flag_rate_unseen"]) + " %"))
    parts.append('<div class="cards">' + "".join(
        f'<div class="card"><div class="v">{escape(v)}</div><div class="k">{escape(k)} (AAX)</div></div>'
        for k, v in cards) + "</div>")

    parts += ["<h2>Classification (paper tables 1 and 3)</h2>", classification_table(result),
              '<p class="note">A flagged image counts as wrong in accuracy; "kept" is the accuracy on the '
              f"images not flagged. {escape(members_text(s))}</p>"]
    if s.get("has_masks"):
        parts += ["<h2>Masks (paper tables 2 and 4)</h2>", mask_table(result),
                  f'<p class="note">On the {e.get("n_masks", 0)} positive images with a ground-truth mask; '
                  "an image without a predicted mask scores IoU 0. Mean: average of per-image IoU; micro: "
                  "summed intersection over summed union. Given: on the images the method annotated; for a "
                  f"trivial mask, on the images AAX gave a mask for. {escape(masks_text(s))}</p>"]
    parts += ["<h2>Examples (paper figures 2 and 3)</h2>", example_grid(examples, names, s["tau"], s["negative_class"],
                                                                   s.get("map_source", "cam"))]

    conf = result["confusion"]
    matrices = {f"{ENSEMBLE}": conf["ensemble"], **conf["members"]}
    parts += ["<h2>Confusion matrices</h2>",
              _fig(figures.confusion_figure(matrices, conf["rows"], conf["columns"]), "confusion matrices")]
    parts += ["<h2>Risk and coverage as theta moves</h2>",
              _fig(figures.risk_coverage_figure(result["risk_coverage"], s["theta"]), "risk-coverage curve"),
              '<p class="note">Each point is one theta; lowering theta flags more images and raises the '
              "accuracy on the rest when the uncertainty is informative.</p>"]
    seen, unseen = _uncertainties(result, names)
    parts += ["<h2>Uncertainty per member</h2>",
              _fig(figures.histogram_figure(seen, unseen, s["theta"]), "uncertainty histograms")]
    if result.get("unseen"):
        u = result["unseen"]
        parts += ["<h2>Open set: images of a kind never trained on</h2>",
                  f'<p>{u["n"]} unseen images ({escape(str(u.get("data", "")))}): flag rate '
                  f"<b>{_pct(u['flag_rate_unseen'])} %</b> vs {_pct(u['flag_rate_seen'])} % on the data.</p>",
                  open_set_table(u)]
        nov = u.get("novelty") or {}
        if nov.get("available"):
            parts += ["<h3>Novelty scores side by side</h3>", novelty_table(nov),
                      f'<p class="note">Higher = more novel. Flagged: over the stored threshold (theta for u; '
                      f"else the quantile that lets {_pct(nov['pass_rate'])} % of the validation images pass, "
                      f"among those the member predicts as the image's class when there are enough). "
                      f"Sent to review as novel: {_pct(nov['novel_rate_unseen'])} % of the unseen images, "
                      f"{_pct(nov['novel_rate_seen'])} % of the data.</p>"]
            chosen = nov.get("score")
            seen_s, unseen_s = _column(result, names, chosen)
            limits = _thresholds(result, names, chosen)
            if chosen and any(seen_s.values()):
                parts += [f"<h3>{escape(str(chosen))}: seen vs unseen, per member</h3>",
                          _fig(figures.score_histogram_figure(seen_s, unseen_s, limits, str(chosen),
                                                              _class_thresholds(result, names)),
                               f"{chosen} histograms")]
    errors = result.get("errors") or []
    if errors:
        items = "".join(f"<li>{escape(err['image'])}: {escape(err['error'])}</li>" for err in errors[:50])
        more = f"<li>… and {len(errors) - 50} more</li>" if len(errors) > 50 else ""
        parts += [f"<h2>Input errors ({len(errors)})</h2><ul class=note>{items}{more}</ul>"]
    parts.append("</body></html>")
    return "\n".join(parts)


def novelty_table(nov: Mapping[str, Any]) -> str:
    """Every novelty score and MC Dropout's u, per member and for the ensemble rule."""
    rows = [(f"{r['label']} · {r['method']}",
             [_num(r["auroc"]), _pct(r["fpr95"]), _pct(r["flag_seen"]), _pct(r["flag_unseen"])],
             r["method"].startswith(ENSEMBLE)) for r in nov["rows"]]
    return _table(["Score · member / rule", "AUROC", "FPR at 95 % TPR %", "flagged, data %", "flagged, unseen %"],
                  rows)


def _column(result: Mapping[str, Any], names: Sequence[str], score: str | None) -> tuple[dict, dict]:
    rows = [r for r in result.get("per_image") or [] if r.get("status") == "ok"]
    pick = (lambda part: {n: [r[f"{n}_{score}"] for r in rows if r.get("set") == part and f"{n}_{score}" in r]
                          for n in names})
    return pick("data"), pick("unseen")


def _thresholds(result: Mapping[str, Any], names: Sequence[str], score: str | None) -> dict[str, float]:
    stored = ((result.get("settings") or {}).get("novelty") or {}).get("thresholds") or {}
    return {n: stored[n] for n in names if n in stored}


def _class_thresholds(result: Mapping[str, Any], names: Sequence[str]) -> dict[str, dict[str, float]]:
    stored = ((result.get("settings") or {}).get("novelty") or {}).get("by_class") or {}
    return {n: stored[n] for n in names if n in stored}


def _fig(fig: Any, alt: str) -> str:
    return f'<img class="fig" src="{figures.data_uri(figures.figure_png(fig))}" alt="{escape(alt)}">'


def _uncertainties(result: Mapping[str, Any], names: Sequence[str]) -> tuple[dict, dict | None]:
    rows = result.get("per_image") or []
    seen = {n: [r[f"{n}_u"] for r in rows if r.get("set") == "data" and r.get("status") == "ok"] for n in names}
    unseen = {n: [r[f"{n}_u"] for r in rows if r.get("set") == "unseen" and r.get("status") == "ok"] for n in names}
    return seen, (unseen if any(unseen.values()) else None)
