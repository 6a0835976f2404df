"""Local workers read their pieces of the images from a file the launcher
writes (``tilec_runtime.imagefile``): the pieces equal the ones it would
send, for any rectangle, batch and step (wrapping round the data set);
a file that does not match the plan is refused before anything is
allocated; and training that way ends bit for bit where sending them does."""
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from built import kernel_source
from test_socket_training import setup
from test_transport import make_plan, small_program
from tilec_runtime import launch
from tilec_runtime.auth import new_key
from tilec_runtime.data import BatchSource
from tilec_runtime.errors import DataError
from tilec_runtime.executor import BATCHES_AHEAD, LANDED, input_piece
from tilec_runtime.imagefile import ImagePieces, ImageRing


def fake_plan(c, h, w, batch, dtype, rects):
    messages = [{"rows": [r0, r1], "cols": [c0, c1]} for r0, r1, c0, c1 in rects]
    plan = {"dtype": dtype, "batch": batch, "program": [{"in_shape": [c, h, w]}], "messages": messages}
    pieces = [(k, (batch, c, r1 - r0 + 1, c1 - c0 + 1)) for k, (r0, r1, c0, c1) in enumerate(rects)]
    return plan, pieces


@st.composite
def cases(draw):
    c, h, w = draw(st.integers(1, 4)), draw(st.integers(1, 13)), draw(st.integers(1, 13))
    rects = []
    for _ in range(draw(st.integers(1, 4))):
        r0, c0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        rects.append((r0, draw(st.integers(r0, h - 1)), c0, draw(st.integers(c0, w - 1))))
    return c, h, w, draw(st.integers(1, 7)), draw(st.integers(1, 4)), draw(st.sampled_from(["float32", "float64"])), \
        rects, draw(st.integers(0, 20))


class Augmented:
    """Batches made step by step (as the demo's augmented ones are): not a ``BatchSource``."""

    def __init__(self, source):
        self.source = source

    def get(self, step):
        images, target = self.source.get(step)
        return images * (1.0 + step), target


@settings(max_examples=60, deadline=None)
@given(cases(), st.booleans())
def test_pieces_read_from_the_file_equal_the_pieces_sent(tmp_path_factory, case, augmented):
    """Of a fixed data set or of batches made step by step, each step's
    images written to the ring ahead of the workers (``BATCHES_AHEAD``
    steps at most in it)."""
    c, h, w, count, batch, dtype, rects, step = case
    rng = np.random.default_rng(count * 31 + step)
    source = BatchSource(rng.standard_normal((count, c, h, w)).astype(dtype), np.zeros(count), batch)
    if augmented:
        source = Augmented(source)
    ring = ImageRing(tmp_path_factory.mktemp("img"), (c, h, w), dtype, batch)
    steps = range(step, step + BATCHES_AHEAD)
    plan, pieces = fake_plan(c, h, w, batch, dtype, rects)
    reader = ImagePieces(ring.spec, plan, pieces)
    try:
        for s in steps:
            ring.put(s, source.get(s)[0])
        for s in steps:
            got = reader.read(s)
            images, _ = source.get(s)
            assert sorted(got) == list(range(len(rects)))
            # and into views of larger buffers, as a tile's input region is: rows and columns around them
            cols = {k: slice(None) if k % 2 == 0 else slice(1, -1) for k, _ in pieces}  # (whole rows, or not)
            frames = {k: np.full((batch, c, p[2] + 2, p[3] + 2 * (k % 2)), np.nan, dtype) for k, p in pieces}
            into = {k: f[:, :, 1:-1, cols[k]] for k, f in frames.items()}
            landed = reader.read(s, into)
            for k, m in enumerate(plan["messages"]):
                want = input_piece(images, m)
                assert got[k].shape == want.shape and got[k].dtype == want.dtype
                assert np.array_equal(got[k], want)
                assert landed[k] is LANDED and np.array_equal(into[k], want)
                rest = frames[k].copy()
                rest[:, :, 1:-1, cols[k]] = np.nan
                assert np.isnan(rest).all()  # nothing written around it
    finally:
        reader.close()
        ring.close()


def open_files():
    return len(os.listdir("/proc/self/fd"))


def test_a_file_that_does_not_match_the_plan_is_refused(tmp_path):
    """Refused with its path, and nothing left open."""
    ring = ImageRing(tmp_path, (2, 5, 6), "float32", 2)
    ring.close()
    spec = ring.spec
    plan, pieces = fake_plan(2, 5, 6, 2, "float32", [(0, 4, 0, 5)])
    ImagePieces(spec, plan, pieces).close()
    held = open_files()
    with pytest.raises(DataError, match=r"float32 \(4, 2, 5, 6\), the job needs float64"):
        ImagePieces(spec, dict(plan, dtype="float64"), pieces)
    with pytest.raises(DataError, match=r"the job needs float32 \(8, 2, 5, 6\)"):  # another batch
        ImagePieces(spec, dict(plan, batch=4), [(0, (4, 2, 5, 6))])
    bad, _ = fake_plan(2, 5, 6, 2, "float32", [(0, 5, 0, 5)])  # a row past the image
    with pytest.raises(DataError, match="does not lie in the 5 x 6 image"):
        ImagePieces(spec, bad, [(0, (2, 2, 6, 6))])
    with pytest.raises(DataError, match="nothere.npy: cannot read images"):
        ImagePieces({"images": str(tmp_path / "nothere.npy")}, plan, pieces)
    (tmp_path / "text.npy").write_text("not an array")
    with pytest.raises(DataError, match="text.npy: cannot read images"):
        ImagePieces({"images": str(tmp_path / "text.npy")}, plan, pieces)
    with open(spec["images"], "r+b") as f:  # cut short: the header says more than is there
        f.truncate(f.seek(0, 2) - 4)
    with pytest.raises(DataError, match="is not .* whole"):
        ImagePieces(spec, plan, pieces)
    assert open_files() == held


def test_workers_that_read_the_images_train_as_workers_sent_them(tmp_path):
    """Four local workers, each image split 2 x 2 (pieces narrower than the
    image, read through a buffer), and two, split by rows (whole rows, read
    straight into the tiles' input regions): reading the file and being
    sent the pieces end bit for bit alike; a file that does not match stops
    the job with the worker's one line naming it."""
    program = small_program()
    params, buffers, batches = setup(program, batch=2)
    plan = make_plan(program, 4)
    for n, source in ((4, batches), (4, Augmented(batches)), (2, batches)):  # (batches made step by step too)
        runs = []
        for data_dir in (None, tmp_path / f"data{len(runs)}{id(source)}{n}"):
            if data_dir is not None:
                data_dir.mkdir()
            key = new_key()
            with launch.LocalWorkers(n, key) as workers:
                runs.append(launch.run_job(make_plan(program, n), workers.addresses, key.encode(), params, buffers, source,
                                           steps=5, timeout=30, kernel_source=kernel_source("float64"),
                                           data_dir=data_dir))
        (sent_losses, sent_p, sent_b, _), (read_losses, read_p, read_b, _) = runs
        assert read_losses == sent_losses
        assert all(np.array_equal(read_p[k], sent_p[k]) for k in sent_p)
        assert all(np.array_equal(read_b[k], sent_b[k]) for k in sent_b)
    # what the workers read is the file: one of other images is refused there
    other = tmp_path / "other"
    other.mkdir()
    wrong = ImageRing(other, (2, 12, 12), "float64", 2)  # 2 channels, the model takes 3
    key = new_key()
    with launch.LocalWorkers(4, key) as workers:
        job = launch.Job(plan, workers.addresses, key.encode(), 30.0)
        with pytest.raises(launch.JobFailed, match=r"refused the job: .*images\.npy: float64 \(4, 2, 12, 12\), "
                                                   r"the job needs float64 \(4, 3, 12, 12\)"):
            job.start(params, buffers, None, 0, 1, 0, 30.0, kernel_source("float64"), None, False,
                      data=wrong)


def test_local_workers_are_planned_holding_no_images_ahead():
    """Devices apart hold the pieces the launcher streams ahead
    (``BATCHES_AHEAD`` of them); local workers, which read theirs from the
    launcher's file as each step starts, none."""
    from math import prod

    from tilec.cluster import uniform_cluster
    from tilec.compile import compile_plan
    from tilec.cost.memory import plan_memory
    from tilec.frontend.models import load_model
    from tilec.profiles import load_profile
    from tilec_runtime.executor import BATCHES_AHEAD, input_messages
    prof = load_profile("rpi4")
    for shared in (False, True):
        plan = compile_plan(load_model("tiny"), cluster=uniform_cluster(prof, 2, threads=2, shared=shared), batch=2,
                            dtype="float32")
        pieces = [sum(prod(shape) for _, shape in input_messages(plan, r)) for r in range(2)]
        assert sum(pieces) > 0
        for r in range(2):
            assert plan_memory(plan, r)["inputs"] == (0 if shared else BATCHES_AHEAD * 4 * pieces[r])
