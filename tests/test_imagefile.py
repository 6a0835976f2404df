"""Local workers read their pieces of the images from a file the launcher
wrote (``tilec_runtime.imagefile``): the pieces equal the ones it would
send, for any rectangle, batch and step (wrapping round the data set);
a file that does not match the plan is refused before anything is
allocated; and training that way ends bit for bit where sending them does."""
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
from tilec_runtime.executor import input_piece
from tilec_runtime.imagefile import ImagePieces, write_images


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


@settings(max_examples=60, deadline=None)
@given(cases())
def test_pieces_read_from_the_file_equal_the_pieces_sent(tmp_path_factory, case):
    c, h, w, count, batch, dtype, rects, step = case
    rng = np.random.default_rng(count * 31 + step)
    source = BatchSource(rng.standard_normal((count, c, h, w)).astype(dtype), np.zeros(count), batch)
    spec = write_images(source, tmp_path_factory.mktemp("img"))
    plan, pieces = fake_plan(c, h, w, batch, dtype, rects)
    reader = ImagePieces(spec, plan, pieces)
    try:
        got = reader.read(step)
    finally:
        reader.close()
    images, _ = source.get(step)
    assert sorted(got) == list(range(len(rects)))
    for k, m in enumerate(plan["messages"]):
        want = input_piece(images, m)
        assert got[k].shape == want.shape and got[k].dtype == want.dtype
        assert np.array_equal(got[k], want)


def test_a_file_that_does_not_match_the_plan_is_refused(tmp_path):
    source = BatchSource(np.zeros((3, 2, 5, 6), np.float32), np.zeros(3), 2)
    spec = write_images(source, tmp_path)
    plan, pieces = fake_plan(2, 5, 6, 2, "float32", [(0, 4, 0, 5)])
    ImagePieces(spec, plan, pieces).close()
    with pytest.raises(DataError, match=r"float32 \(3, 2, 5, 6\), the job needs float64"):
        ImagePieces(spec, dict(plan, dtype="float64"), pieces)
    with pytest.raises(DataError, match="the plan's batch is 4"):
        ImagePieces(spec, dict(plan, batch=4), pieces)
    bad, _ = fake_plan(2, 5, 6, 2, "float32", [(0, 5, 0, 5)])  # a row past the image
    with pytest.raises(DataError, match="does not lie in the 5 x 6 image"):
        ImagePieces(spec, bad, [(0, (2, 2, 6, 6))])
    with open(spec["images"], "r+b") as f:  # cut short: the header says more than is there
        f.truncate(f.seek(0, 2) - 4)
    with pytest.raises(DataError, match="is not .* whole"):
        ImagePieces(spec, plan, pieces)


def test_workers_that_read_the_images_train_as_workers_sent_them(tmp_path):
    """Four local workers, each image split 2 x 2 (pieces narrower than the
    image): reading the file and being sent the pieces end bit for bit
    alike; a file that does not match stops the job with the worker's
    one line naming it."""
    program = small_program()
    params, buffers, batches = setup(program, batch=2)
    plan = make_plan(program, 4)
    runs = []
    for data_dir in (None, tmp_path / "data"):
        if data_dir is not None:
            data_dir.mkdir()
        key = new_key()
        with launch.LocalWorkers(4, key) as workers:
            runs.append(launch.run_job(plan, workers.addresses, key.encode(), params, buffers, batches, steps=3,
                                       timeout=30, kernel_source=kernel_source("float64"), data_dir=data_dir))
    (sent_losses, sent_p, sent_b, _), (read_losses, read_p, read_b, _) = runs
    assert read_losses == sent_losses
    assert all(np.array_equal(read_p[k], sent_p[k]) for k in sent_p)
    assert all(np.array_equal(read_b[k], sent_b[k]) for k in sent_b)
    # what the workers read is the file: one of other images is refused there
    other = tmp_path / "other"
    other.mkdir()
    wrong = BatchSource(np.zeros((4, 2, 12, 12)), np.zeros(4), 2)  # 2 channels, the model takes 3
    key = new_key()
    with launch.LocalWorkers(4, key) as workers:
        job = launch.Job(plan, workers.addresses, key.encode(), 30.0)
        with pytest.raises(launch.JobFailed, match=r"refused the job: .*images\.npy: float64 \(4, 2, 12, 12\), "
                                                   r"the job needs float64 \(4, 3, 12, 12\)"):
            job.start(params, buffers, None, 0, 1, 0, 30.0, kernel_source("float64"), None, False,
                      data=write_images(wrong, other))
