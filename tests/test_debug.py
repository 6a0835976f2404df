"""``TILEC_DEBUG``: the pipeline's stages with their times (1), and what they
made (2: regions, per-rank schedules, the CP-SAT log), on stderr only."""
import re

import pytest

from tilec import debug
from tilec.cli import main

STAGES = ["frontend", "ir", "analysis", "cost", "solver", "plan", "codegen render", "codegen cythonize",
          "codegen build"]


def stage_lines(err):
    return [m.group(1).strip() for m in re.finditer(r"^\[tilec\] (\S+(?: \S+)?) +\d+\.\d{3} s", err, re.M)]


@pytest.mark.parametrize("value, want", [("", 0), ("0", 0), ("1", 1), ("2", 2), ("yes", 1), ("-3", 0)])
def test_level(monkeypatch, value, want):
    monkeypatch.setenv("TILEC_DEBUG", value)
    assert debug.level() == want


def test_level_0_says_nothing(monkeypatch, capsys):
    monkeypatch.delenv("TILEC_DEBUG", raising=False)
    assert main(["train", "tiny", "--steps", "1"]) == 0
    out, err = capsys.readouterr()
    assert "[tilec]" not in out + err and "CP-SAT" not in out + err


def test_level_1_times_every_stage_in_pipeline_order(monkeypatch, capsys):
    monkeypatch.setenv("TILEC_DEBUG", "1")
    assert main(["train", "tiny", "--steps", "1"]) == 0
    out, err = capsys.readouterr()
    assert "[tilec]" not in out  # stdout stays the command's own
    assert stage_lines(err) == STAGES
    assert re.search(r"^\[tilec\] codegen build +\d+\.\d{3} s  tilec_kernels_\w+: (built|cached) at ", err, re.M)
    assert "regions" not in err and "schedule" not in err


def test_level_2_shows_regions_schedules_and_asks_cp_sat_for_its_log(monkeypatch, capsys, tmp_path):
    import tilec.solve.cpsat as cpsat
    asked = []
    real = cpsat.solve
    monkeypatch.setattr(cpsat, "solve", lambda *a, **kw: asked.append(kw.get("log")) or real(*a, **kw))
    monkeypatch.setenv("TILEC_DEBUG", "2")
    assert main(["compile", "tiny", "--devices", "2", "-o", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert asked == [True]
    assert stage_lines(err) == STAGES[:6]
    assert "[tilec]   regions (per group, per tile):" in err
    assert re.search(r"^\[tilec\]       layer 0: region rows 0-\d+ cols 0-\d+, owned rows", err, re.M)
    assert "[tilec]   schedule (per rank, one step):" in err
    for rank in (0, 1):
        assert f"[tilec]   rank {rank} (dev{rank}): " in err
    assert re.search(r"^\[tilec\]   +\d+ recv msg \d+: tensor -?\d+ rows \d+-\d+ cols \d+-\d+ from rank \d", err, re.M)


def test_the_cp_sat_log_goes_to_stderr(capsys):
    from tilec.cluster import uniform_cluster
    from tilec.cost.candidates import enumerate_candidates
    from tilec.cost.layouts import layouts
    from tilec.cost.model import CostModel
    from tilec.frontend import load_model
    from tilec.profiles import load_profile
    from tilec.solve.cpsat import PlanModel
    cl = uniform_cluster(load_profile("rpi3b"), 2)
    cands = enumerate_candidates(CostModel(load_model("tiny").to_program(), cl, 1, 4), layouts(cl))
    PlanModel(cands).solve(5, workers=1, log=True)
    out, err = capsys.readouterr()
    assert "CP-SAT" in err and "CP-SAT" not in out
