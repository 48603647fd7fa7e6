"""What a careless command line gets: a one-line error, exit status 2, and nothing written."""

from __future__ import annotations

import pytest

from aax.cli import main


@pytest.mark.parametrize("argv, wrong", [
    (["annotate", "RUN", "IN", "--out", "{out}", "--theta", "-1"], "--theta"),
    (["annotate", "RUN", "IN", "--out", "{out}", "--tau", "5"], "--tau"),
    (["annotate", "RUN", "IN", "--out", "{out}", "--mc-passes", "0"], "--mc-passes"),
    (["annotate", "RUN", "IN", "--out", "{out}", "--batch-size", "-3"], "--batch-size"),
    (["annotate", "RUN", "IN", "--out", "{out}", "--workers", "-1"], "--workers"),
    (["annotate", "RUN", "IN", "--out", "{out}", "--threads", "0"], "--threads"),
    (["annotate", "RUN", "IN", "--out", "{out}", "--theta", "nan"], "--theta"),
    (["train", "DATA", "--out", "{out}", "--epochs", "0"], "--epochs"),
    (["train", "DATA", "--out", "{out}", "--val-split", "1"], "--val-split"),
    (["train", "DATA", "--out", "{out}", "--dropout", "1"], "--dropout"),
    (["train", "DATA", "--out", "{out}", "--lr", "0"], "--lr"),
    (["train", "DATA", "--out", "{out}", "--image-size", "8"], "--image-size"),
    (["train", "DATA", "--out", "{out}", "--var-passes", "1"], "--var-passes"),
    (["train", "DATA", "--out", "{out}", "--label-map", "tb"], "--label-map"),
    (["evaluate", "RUN", "DATA", "--out", "{out}", "--mc-passes", "-2"], "--mc-passes"),
    (["calibrate", "RUN", "--max-flag-rate", "1.5"], "--max-flag-rate"),
    (["synth", "--out", "{out}", "--n-per-class", "0"], "--n-per-class"),
    (["demo", "--out", "{out}", "--epochs", "0"], "--epochs"),
])
def test_out_of_range_options_are_refused_at_parse_time(argv, wrong, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [a.replace("{out}", str(out)) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert wrong in err and "Traceback" not in err
    assert not out.exists(), "nothing is written before the arguments are valid"


def test_known_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    assert main(["annotate", str(tmp_path), str(tmp_path / "in"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "aax annotate: error:" in err and "aax.json" in err
    assert main(["export", str(tmp_path / "nothing"), "--format", "coco", "--to", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such folder" in err and "aax annotate" in err
    assert main(["review", str(tmp_path / "nothing")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_debug_variable_shows_the_traceback(tmp_path, monkeypatch):
    from aax.models.runfiles import RunError

    monkeypatch.setenv("AAX_DEBUG", "1")
    with pytest.raises(RunError):
        main(["annotate", str(tmp_path), str(tmp_path), "--out", str(tmp_path / "o")])


def test_label_map_parsing():
    import argparse

    from aax.cli._common import parse_label_map

    assert parse_label_map("tb=diseased, health=healthy") == {"tb": "diseased", "health": "healthy"}
    for bad in ("tb", "=x", "a=b,a=c", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_label_map(bad)
