"""Plan files: build, seal, validate, and the message list's accounting."""
import json

import pytest

from programs import ProgramBuilder
from tilec.errors import PlanError
from tilec.plan.build import GroupChoice, build_plan, default_grid, parse_groups
from tilec_runtime.errors import ProgramError
from tilec_runtime.planfile import read_plan, seal, validate, write_plan

OPT = {"lr": 0.01, "momentum": 0.9, "decay": 0.0}


def program():
    b = ProgramBuilder(3, 12, 10)
    b.conv(4, 3, 1, "same", bn=True, act="leaky")
    b.maxpool(2, 2)
    b.conv(2, 3, 1, "same", bn=False, act="relu")
    b.avgpool()
    b.connected(3)
    b.softmax()
    return b.build()


def make(choices=None, n=4):
    choices = choices or [GroupChoice(0, 1, [0, 3, 6], [0, 2, 5], [0, 1, 2, 3]), GroupChoice(2, 2, [0, 6], [0, 5], [1])]
    return build_plan(program(), choices, model="m", batch=2, dtype="float32",
                      devices=[f"d{i}" for i in range(n)], optimizer=OPT)


def test_round_trip_and_hash(tmp_path):
    plan = make()
    write_plan(plan, tmp_path)
    assert read_plan(tmp_path) == plan
    text = (tmp_path / "plan.json").read_text()
    (tmp_path / "plan.json").write_text(text.replace('"lr": 0.01', '"lr": 0.02'))
    with pytest.raises(ProgramError, match="hash"):
        read_plan(tmp_path)


def test_messages_carry_exactly_what_is_needed():
    plan = make()
    fwd = [m for m in plan["messages"] if m["phase"] == "forward"]
    # group 1 (one tile on device 1) reads the whole 6x5 map of layer 1 from its four owners
    into_g1 = [m for m in fwd if m["group"] == 1]
    assert sorted(m["sender"] for m in into_g1) == [0, 1, 2, 3]
    assert sum((m["rows"][1] - m["rows"][0] + 1) * (m["cols"][1] - m["cols"][0] + 1) for m in into_g1) == 30
    assert all(m["bytes"] == 0 for m in into_g1 if m["sender"] == m["receiver"])
    # backward mirrors the non-image forward messages
    bwd = [m for m in plan["messages"] if m["phase"] == "backward"]
    assert len(bwd) == len([m for m in fwd if m["tensor"] >= 0])
    # the image reaches group 0 from rank 0 only
    assert {m["sender"] for m in fwd if m["tensor"] == -1} == {0}


def test_bad_plans_are_refused():
    plan = make()
    for edit, match in [(lambda p: p.update(version=99), "version"),
                        (lambda p: p.update(format="x"), "not a tilec plan"),
                        (lambda p: p["groups"][0]["tiles"][1].update(device=0), "hash|repeated")]:
        p = json.loads(json.dumps(plan))
        edit(p)
        with pytest.raises(ProgramError, match=match):
            validate(p)


def test_every_device_takes_its_pieces_of_the_image_from_the_data_source():
    """No device sends the image: each of group 0's tiles has an input op for
    its piece, in place of a receive; a schedule that receives or sends a
    piece, or takes anything else as input, is refused."""
    plan = make()
    image = {k for k, m in enumerate(plan["messages"]) if m["tensor"] == -1}
    for r, ops in enumerate(plan["schedule"]):
        assert [op["msg"] for op in ops if op["op"] == "input"] == sorted(
            k for k in image if plan["messages"][k]["receiver"] == r)
        assert not [op for op in ops if op["op"] in ("send", "recv") and op["msg"] in image]
    k = min(image)
    receiver = plan["messages"][k]["receiver"]
    first = next(i for i, op in enumerate(plan["schedule"][receiver]) if op["op"] == "input")
    other = next(i for i, m in enumerate(plan["messages"]) if m["tensor"] >= 0 and m["receiver"] == receiver)
    for edit, match in [({"op": "recv", "msg": k}, "input ops"), ({"op": "input", "msg": other}, "input ops")]:
        p = json.loads(json.dumps(plan))
        p["schedule"][receiver][first] = edit
        with pytest.raises(ProgramError, match=match):
            validate(seal(p))


def test_build_errors_name_the_problem():
    with pytest.raises(PlanError, match="distinct devices"):
        make([GroupChoice(0, 2, [0, 6], [0, 5], [0, 0])])
    with pytest.raises(PlanError, match="spatial prefix"):
        make([GroupChoice(0, 1, [0, 6], [0, 5], [0])])
    with pytest.raises(PlanError, match="split lines"):
        make([GroupChoice(0, 2, [0, 7], [0, 5], [0])])


def test_group_specs():
    assert parse_groups("all", 4) == [(0, 3)]
    assert parse_groups("each", 3) == [(0, 0), (1, 1), (2, 2)]
    assert parse_groups("0-1,2,3-3", 4) == [(0, 1), (2, 2), (3, 3)]
    for bad in ("0-1,3", "1-3", "0-1", "a-b"):
        with pytest.raises(PlanError):
            parse_groups(bad, 4)
    assert default_grid(6) == (3, 2) and default_grid(5) == (5, 1) and default_grid(4) == (2, 2)


def test_reading_what_is_not_a_current_plan_says_what_to_do(tmp_path):
    from tilec_runtime.errors import ProgramError
    from tilec_runtime.planfile import read_plan
    cfg = tmp_path / "model.cfg"
    cfg.write_text("[net]\nheight=8\n")
    with pytest.raises(ProgramError, match=r"model.cfg: not a plan \(the plan.json that `tilec compile -o DIR` "
                                           r"writes\)"):
        read_plan(cfg)
    with pytest.raises(ProgramError, match=r"missing.json: cannot read plan: No such file"):
        read_plan(tmp_path / "missing.json")
    (tmp_path / "old.json").write_text('{"format": "tilec-plan", "version": 3}')
    with pytest.raises(ProgramError, match=r"plan version 3 is not supported \(this runtime reads \d+\): compile it "
                                           r"again with this tilec"):
        read_plan(tmp_path / "old.json")
