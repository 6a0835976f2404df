"""`tilec dot`: one cluster per group, tiles coloured by device, edges with the bytes sent."""
import re
import shutil
import subprocess

import pytest

from tilec.cli import main
from tilec.errors import TilecError
from tilec.frontend.models import load_model
from tilec.inspect.dot import PALETTE, human_bytes, plan_dot, render
from tilec.plan.build import GroupChoice, build_plan
from tilec_runtime.planfile import write_plan


def plan_of(choices, n):
    program = load_model("tiny").to_program()
    return build_plan(program, choices, model="tiny", batch=2, dtype="float32",
                      devices=[f"dev{r}" for r in range(n)], optimizer={"lr": 0.1, "momentum": 0.9, "decay": 0})


PLAN = plan_of([GroupChoice(0, 2, [0, 8, 16], [0, 16], [0, 1]),
                GroupChoice(3, 6, [0, 2, 4], [0, 2, 4], [0, 1, 2, 3], recompute=True)], 4)


def test_one_cluster_per_group_and_one_node_per_tile_coloured_by_device():
    text = plan_dot(PLAN)
    assert text.count("subgraph cluster_") == len(PLAN["groups"])
    assert "recompute" in text
    nodes = re.findall(r"(g\d+t\d+) \[label=\"(dev\d)\\n[^\"]*\", fillcolor=\"(#[0-9a-f]+)\"", text)
    assert len(nodes) == sum(len(g["tiles"]) for g in PLAN["groups"])
    for _, dev, colour in nodes:
        assert colour == PALETTE[int(dev[3:])]


def test_edges_carry_the_bytes_of_the_plans_messages():
    text = plan_dot(PLAN)
    edges = re.findall(r"(\w+) -> (\w+) \[label=\"([^\"]+)\"\]", text)
    total = {}
    for m in PLAN["messages"]:
        if m["phase"] == "forward" and m["sender"] != m["receiver"]:
            key = (m["group"], m["sender"], m["receiver"], m["tensor"] < 0)
            total[key] = total.get(key, 0) + m["bytes"]
    assert len(edges) == len(total)
    labels = sorted(label for _, _, label in edges)
    assert labels == sorted(human_bytes(v) for v in total.values())
    assert any(src == "input" for src, _, _ in edges)
    assert human_bytes(1500) == "1.5 kB" and human_bytes(12) == "12 B" and human_bytes(3.2e9) == "3.2 GB"


def test_render_without_graphviz_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(TilecError, match="Graphviz.*not installed.*apt-get install graphviz.*--format dot"):
        render(plan_dot(PLAN), "svg", tmp_path / "p.svg")
    with pytest.raises(TilecError, match="unknown format"):
        render("", "pdf", tmp_path / "p.pdf")
    render(plan_dot(PLAN), "dot", tmp_path / "p.dot")
    assert (tmp_path / "p.dot").read_text().startswith("digraph plan {")


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz not installed")
def test_graphviz_accepts_the_graph(tmp_path):
    render(plan_dot(PLAN), "svg", tmp_path / "p.svg")
    assert "<svg" in (tmp_path / "p.svg").read_text()
    res = subprocess.run(["dot", "-Tcanon"], input=plan_dot(PLAN).encode(), capture_output=True)
    assert res.returncode == 0, res.stderr


def test_cli_dot(tmp_path, capsys, monkeypatch):
    write_plan(PLAN, tmp_path)
    assert main(["dot", str(tmp_path)]) == 0
    assert (tmp_path / "plan.dot").read_text() == plan_dot(PLAN)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert main(["dot", str(tmp_path), "-o", str(tmp_path / "x.png")]) == 1
    assert "Graphviz" in capsys.readouterr().err
