"""The demo runs end to end (in its quick form) and leaves what the README promises."""

from __future__ import annotations

import json

import pytest

from aax.demo import DemoConfig, run_demo
from aax.models.members import DEFAULT_MEMBERS

pytestmark = pytest.mark.slow


def test_demo_end_to_end_on_the_shared_run(trained_run, tmp_path, capsys):
    """Every step after training (which tests/test_train.py covers) on the suite's run;
    `make demo` itself is run and timed by hand (see the README)."""
    out = tmp_path / "demo"
    config = DemoConfig.quick()
    config.run = str(trained_run)
    run_demo(out, config)
    printed = capsys.readouterr().out
    for step in ("1/6", "2/6", "3/6", "4/6", "5/6", "6/6"):
        assert step in printed
    assert "report:" in printed and "| **AAX (fused maps of the agreeing members)** |" in printed
    # the open-set rows: every score side by side, far (fire) and near (implant) OOD
    assert "| Mahalanobis (shrunk) | **AAX (2 of 3)** |" in printed and "near OOD" in printed
    near = json.loads((out / "evaluation" / "near_ood.json").read_text())
    assert near["n"] == config.near_unseen and {r["score"] for r in near["rows"]} >= {"u", "knn", "rmd"}
    manifest = json.loads((out / "run" / "aax.json").read_text())
    assert manifest["calibration"] and set(m["name"] for m in manifest["members"]) == set(DEFAULT_MEMBERS)
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert set(metrics["members"]) == set(DEFAULT_MEMBERS)
    assert 0 <= metrics["ensemble"]["accuracy"] <= 1 and "unseen" in metrics
    html = (out / "evaluation" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3
    summary = json.loads((out / "annotations" / "summary.json").read_text())
    assert summary["images"] == 16 and summary["errors"] == 0
    assert summary["masks"] == len(list((out / "annotations" / "masks").rglob("*.png")))
