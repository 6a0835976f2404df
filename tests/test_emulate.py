"""An emulated slower device (``tilec worker --emulate-speed``): compute
stretched by sleeps, the numbers unchanged; and the profile's in-step
correction of the fitted kernel costs."""
import numpy as np
import pytest

from built import module
from programs import ProgramBuilder
from test_tiled import OPT
from tilec.plan.build import GroupChoice, build_plan
from tilec.profiles import KernelCost, ProfileError, load_profile, profile_from_dict
from tilec_runtime import data, emulate, weights
from tilec_runtime.comm import InProcessHub
from tilec_runtime.executor import RankExecutor
from tilec_runtime.trace import category


def test_stretch_sleeps_the_rest_of_a_slower_devices_time(monkeypatch):
    slept = []
    monkeypatch.setattr(emulate.time, "sleep", slept.append)
    emulate.Stretch(0.25).after(0.01)
    emulate.Stretch(1.0).after(0.01)
    assert slept == [pytest.approx(0.03), 0.0]
    for bad in (0.0, -1.0, 1.5):
        with pytest.raises(ValueError, match=r"in \(0, 1\]"):
            emulate.Stretch(bad)


class Recorder(emulate.Stretch):
    """A Stretch that records what it would sleep after, and sleeps nothing."""

    def __init__(self):
        super().__init__(1.0)
        self.calls = []

    def after(self, seconds):
        self.calls.append(seconds)


def _run(stretch, steps=2):
    b = ProgramBuilder(2, 12, 12)
    b.conv(4, 3, bn=True, act="leaky")
    b.maxpool(2, 2)
    b.conv(3, 3)
    b.cost()
    program = b.build()
    params, buffers = weights.init_params(program, 1, "float64")
    batches = data.generated_batches(program, 2, 1, "float64")
    plan = build_plan(program, [GroupChoice(0, 2, [0, 6], [0, 6], [0])], model="t", batch=2, dtype="float64",
                      devices=["d0"], optimizer=OPT)
    ex = RankExecutor(plan, 0, InProcessHub(1, 10).comm(0), module("float64"), params, buffers, stretch=stretch)
    losses = [ex.step(*batches.get(step)) for step in range(steps)]
    ex.close()
    return plan, losses, ex.params


def test_a_stretched_device_computes_the_same_numbers_and_stretches_every_compute_op():
    rec = Recorder()
    plan, losses, params = _run(rec)
    _, want_losses, want_params = _run(None)
    assert losses == want_losses
    for key, want in want_params.items():
        np.testing.assert_array_equal(params[key], want)
    computes = sum(category(op) == "compute" for op in plan["schedule"][0])
    updates = sum(1 for op in plan["schedule"][0] if op["op"] == "grad_start")
    assert computes > 0 and updates > 0
    assert len(rec.calls) == 2 * (computes + updates) and all(s >= 0 for s in rec.calls)


def test_in_step_correction_and_dispatch_price_a_call():
    cost = KernelCost(1e-6, 1e-9, 2e-10, in_step=1.5, dispatch_s=1e-5)
    assert cost.seconds(1000, 500) == pytest.approx((1e-6 + 1e-6 + 1e-7) * 1.5 + 1e-5)
    assert KernelCost(1e-6, 1e-9, 0.0).seconds(1000, 0) == pytest.approx(2e-6)
    raw = load_profile("rpi3b").raw
    data_ = {**raw, "kernels": {**raw["kernels"], "conv": {**raw["kernels"]["conv"], "forward": {
        **raw["kernels"]["conv"]["forward"], "in_step": 1.25, "dispatch_us": 40.0}}}}
    prof = profile_from_dict(data_, "x.json")
    base = load_profile("rpi3b").cost("conv", "forward")
    got = prof.cost("conv", "forward")
    assert got.seconds(1e6, 1e5) == pytest.approx(base.seconds(1e6, 1e5) * 1.25 + 40e-6)
    bad = {**data_, "kernels": {**data_["kernels"], "conv": {**data_["kernels"]["conv"], "forward": {
        **data_["kernels"]["conv"]["forward"], "in_step": 0}}}}
    with pytest.raises(ProfileError, match=r"x\.json: kernels\.conv\.forward: field 'in_step' must be a number > 0"):
        profile_from_dict(bad, "x.json")
