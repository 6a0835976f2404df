"""Detection data: the synthetic dataset, the YOLO loader with bad files,
letterbox and augmentation, deterministic prefetched batches, VOC conversion."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from tilec.cli import main
from tilec.data import DatasetError
from tilec.data.augment import letterbox, placement, transform_boxes, unletterbox
from tilec.data.batches import DetectionBatches, Prefetcher, pad_boxes
from tilec.data.synth import CLASSES, make_dataset
from tilec.data.voc import convert_voc
from tilec.data.yolo import label_path, load_split, parse_labels


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    make_dataset(str(root), n=12, val_fraction=0.25, seed=3)
    return root


def copy_tree(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


# -- the synthetic dataset ---------------------------------------------------------

def test_synth_layout_and_real_image_files(synth):
    train = sorted(os.listdir(synth / "images" / "train"))
    val = sorted(os.listdir(synth / "images" / "val"))
    assert len(train) == 9 and len(val) == 3
    assert (synth / "classes.txt").read_text().split() == list(CLASSES)
    formats = set()
    for name in train + val:
        split = "train" if name in train else "val"
        with Image.open(synth / "images" / split / name) as img:
            formats.add(img.format)
            img.load()
        labels = parse_labels(label_path(str(synth / "images" / split / name)), len(CLASSES))
        assert 1 <= len(labels) <= 4
        # boxes lie inside the image
        assert np.all(labels[:, 1] - labels[:, 3] / 2 >= -1e-6) and np.all(labels[:, 1] + labels[:, 3] / 2 <= 1 + 1e-6)
    assert formats == {"JPEG", "PNG"}


def test_synth_is_reproducible_and_the_boxes_hold_the_shapes(synth, tmp_path):
    make_dataset(str(tmp_path), n=12, val_fraction=0.25, seed=3)
    for split in ("train", "val"):
        for name in os.listdir(synth / "labels" / split):
            assert (tmp_path / "labels" / split / name).read_text() == (synth / "labels" / split / name).read_text()
    # a square alone in its box fills it: one flat colour inside (JPEG noise aside)
    from tilec.eval.map import iou_matrix
    found = [(it, b) for it in load_split(str(synth), "train").items for b in it.boxes
             if b[0] == 1 and np.sum(iou_matrix(b[None, 1:], it.boxes[:, 1:])[0] > 0) == 1]
    assert found, "the fixture has a square that overlaps nothing"
    item, box = found[0]
    with Image.open(item.image) as img:
        pixels = np.asarray(img.convert("RGB"), dtype=float)
    h, w = pixels.shape[:2]
    x0, x1 = int((box[1] - box[3] / 2) * w) + 2, int((box[1] + box[3] / 2) * w) - 2
    y0, y1 = int((box[2] - box[4] / 2) * h) + 2, int((box[2] + box[4] / 2) * h) - 2
    inside = pixels[y0:y1, x0:x1].reshape(-1, 3)
    assert np.mean(np.abs(inside - np.median(inside, axis=0)).max(axis=1) < 12) > 0.95


# -- the loader and bad files ---------------------------------------------------------

def test_loader_reads_every_good_item(synth):
    d = load_split(str(synth), "train")
    assert len(d.items) == 9 and d.classes == list(CLASSES) and d.problems == []


@pytest.fixture
def broken(synth, tmp_path):
    """A copy of the train split with one file of each kind of fault."""
    root = copy_tree(synth, tmp_path / "broken")
    images, labels = root / "images" / "train", root / "labels" / "train"
    names = sorted(os.listdir(images))
    faults = {}
    png = next(n for n in names if n.endswith(".png"))
    data = (images / png).read_bytes()
    (images / png).write_bytes(data[: len(data) // 2])                   # truncated PNG
    faults["truncated"] = images / png
    jpgs = [n for n in names if n.endswith(".jpg")]
    (images / jpgs[0]).write_text("this is not an image")                 # not an image at all
    faults["not an image"] = images / jpgs[0]
    os.unlink(labels / (jpgs[1][:-4] + ".txt"))                           # missing label file
    faults["missing label"] = labels / (jpgs[1][:-4] + ".txt")
    (labels / (jpgs[2][:-4] + ".txt")).write_text("0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.1 0.1\n")  # class 7 of 4
    faults["class"] = labels / (jpgs[2][:-4] + ".txt")
    (labels / (jpgs[3][:-4] + ".txt")).write_text("1 0.5 0.5 0.2\n")     # four fields
    faults["fields"] = labels / (jpgs[3][:-4] + ".txt")
    return root, faults


def test_bad_files_are_reported_by_path_and_skipped(broken):
    root, faults = broken
    log = io.StringIO()
    d = load_split(str(root), "train", log=log)
    assert len(d.items) == 9 - 5
    text = log.getvalue()
    assert text.count("\n") == 5
    for path in faults.values():
        assert f"skipping {path}" in text
    assert f"{faults['class']}:2: class 7 out of range 0..3" in text
    assert f"{faults['fields']}:1: expected 'class cx cy w h'" in text
    assert "label file missing" in text and "cannot read image" in text
    assert {p for p, _ in d.problems} == {str(faults["truncated"]), str(faults["not an image"]),
                                          str(faults["missing label"]), f"{faults['class']}:2",
                                          f"{faults['fields']}:1"}


def test_bad_files_are_fatal_on_request(broken):
    root, faults = broken
    with pytest.raises(DatasetError) as err:
        load_split(str(root), "train", on_error="fail")
    assert str(err.value).startswith(str(root))
    assert any(str(err.value).startswith(str(p)) for p in faults.values())


def test_a_list_file_with_a_missing_image(synth, tmp_path):
    listed = tmp_path / "train.txt"
    good = sorted(os.listdir(synth / "images" / "train"))[:2]
    listed.write_text("".join(f"{synth / 'images' / 'train' / n}\n" for n in good)
                      + f"{synth / 'images' / 'train' / 'gone.jpg'}\n")
    log = io.StringIO()
    d = load_split(str(synth), str(listed), log=log)
    gone = synth / "images" / "train" / "gone.jpg"
    assert len(d.items) == 2 and f"skipping {gone}: image file missing" in log.getvalue()


def test_an_image_that_fails_only_when_decoded_is_replaced_and_reported(synth, tmp_path):
    root = copy_tree(synth, tmp_path / "late")
    d = load_split(str(root), "train")
    jpg = next(i for i, it in enumerate(d.items) if it.image.endswith(".jpg"))
    data = open(d.items[jpg].image, "rb").read()
    with open(d.items[jpg].image, "wb") as f:
        f.write(data[: len(data) // 3])  # header intact, scan data cut: found at decode time
    log = io.StringIO()
    batches = DetectionBatches(d, (32, 32), 1, 4, augment=False, log=log)
    image, truth = batches.item(jpg)
    expected = batches.item((jpg + 1) % len(d.items))
    np.testing.assert_array_equal(image, expected[0])
    np.testing.assert_array_equal(truth, expected[1])
    assert log.getvalue().count(d.items[jpg].image) == 1
    batches.item(jpg)
    assert log.getvalue().count(d.items[jpg].image) == 1  # reported once
    strict = DetectionBatches(d, (32, 32), 1, 4, augment=False, on_error="fail")
    with pytest.raises(DatasetError, match="cannot read image"):
        strict.item(jpg)


# -- letterbox and augmentation -------------------------------------------------------

def test_letterbox_keeps_the_aspect_ratio_and_moves_the_boxes():
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    img.paste((255, 255, 255), (50, 20, 90, 60))  # a white box x 50..90, y 20..60
    box = np.array([[2, 70 / 200, 40 / 100, 40 / 200, 40 / 100]])
    array, boxes = letterbox(img, (64, 64), box)
    # scale 0.32: the image is 64 x 32, centred: 16 grey rows above and below
    assert placement((200, 100), (64, 64)) == (64, 32, 0, 16)
    assert array.shape == (3, 64, 64) and np.allclose(array[:, :15], 128 / 255)
    np.testing.assert_allclose(boxes, [[2, 70 * 0.32 / 64, (40 * 0.32 + 16) / 64, 12.8 / 64, 12.8 / 64]])
    cx, cy, bw, bh = boxes[0, 1:] * 64
    assert array[:, int(cy - bh / 2) + 1:int(cy + bh / 2) - 1, int(cx - bw / 2) + 1:int(cx + bw / 2) - 1].min() > 0.95
    np.testing.assert_allclose(unletterbox(boxes[:, 1:], (200, 100), (64, 64)), box[:, 1:], atol=1e-12)


def test_flip_and_jitter_move_boxes_with_the_pixels():
    img = Image.new("RGB", (100, 100), (0, 0, 0))
    img.paste((255, 255, 255), (10, 30, 40, 70))
    box = np.array([[0, 0.25, 0.5, 0.3, 0.4]])
    array, boxes = letterbox(img, (50, 50), box, scale=1.3, offset=(0.2, 0.7), flip=True)
    cx, cy, bw, bh = boxes[0, 1:] * 50
    inside = array[0, int(cy - bh / 2) + 1:int(cy + bh / 2) - 1, int(cx - bw / 2) + 1:int(cx + bw / 2) - 1]
    assert inside.min() > 0.95
    # the white pixels are exactly those the box covers (up to the resampled edge)
    white = array[0] > 0.5
    assert white.sum() == pytest.approx(bw * bh, rel=0.15)


def test_boxes_that_leave_the_canvas_are_clipped_or_dropped():
    boxes = np.array([[0, 0.05, 0.5, 0.1, 0.2], [1, 0.5, 0.5, 0.2, 0.2]])
    # placed 30 px to the left of a 100 px canvas at scale 1: the first box is gone, the second stays
    out = transform_boxes(boxes, (100, 100), (100, 100), (100, 100, -30, 0))
    assert out[:, 0].tolist() == [1] and out[0, 1] == pytest.approx(0.2)
    # half of a box outside: clipped to the canvas
    out = transform_boxes(np.array([[0, 0.35, 0.5, 0.2, 0.2]]), (100, 100), (100, 100), (100, 100, -30, 0))
    np.testing.assert_allclose(out, [[0, 0.05 + 0.025, 0.5, 0.15, 0.2]])


# -- batches --------------------------------------------------------------------------

def test_batches_depend_on_the_step_alone(synth):
    d = load_split(str(synth), "train")
    a = DetectionBatches(d, (48, 48), 4, 6, seed=5)
    b = DetectionBatches(d, (48, 48), 4, 6, seed=5)
    for step in (3, 0, 3, 7):
        ia, ta = a.get(step)
        ib, tb = b.get(step)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ta, tb)
    assert ia.shape == (4, 3, 48, 48) and ta.shape == (4, 6, 5) and ia.dtype == np.float32
    assert not np.array_equal(a.get(0)[0], a.get(1)[0])
    # each epoch visits every item once
    seen = sum((a.indices(s) for s in range(9)), [])  # 36 positions = 4 epochs of 9
    assert sorted(seen) == sorted(list(range(9)) * 4)
    # padding rows follow the real ones
    for rows in a.get(2)[1]:
        real = rows[:, 0] >= 0
        k = int(real.sum())
        assert k >= 1 and real[:k].all() and not real[k:].any()


def test_prefetcher_serves_the_same_batches(synth):
    d = load_split(str(synth), "train")
    source = DetectionBatches(d, (32, 32), 2, 4, seed=1)
    with Prefetcher(DetectionBatches(d, (32, 32), 2, 4, seed=1), depth=3) as fetched:
        for step in (0, 1, 2, 5, 6, 1):
            np.testing.assert_array_equal(fetched.get(step)[0], source.get(step)[0])
            np.testing.assert_array_equal(fetched.get(step)[1], source.get(step)[1])


def test_pad_boxes_truncates_to_max_boxes():
    boxes = np.arange(15, dtype=float).reshape(3, 5)
    out = pad_boxes(boxes, 2)
    np.testing.assert_array_equal(out, boxes[:2])
    out = pad_boxes(boxes[:1], 3)
    assert out[1:, 0].tolist() == [-1, -1]


# -- Pascal VOC --------------------------------------------------------------------------

def _voc_xml(width, height, objects):
    rows = "".join(
        f"<object><name>{name}</name><difficult>{int(diff)}</difficult><bndbox><xmin>{x0}</xmin>"
        f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for name, diff, (x0, y0, x1, y1) in objects)
    size = f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
    return f"<annotation>{size}{rows}</annotation>"


@pytest.fixture
def voc(tmp_path):
    root = tmp_path / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    (root / "Annotations" / "000001.xml").write_text(_voc_xml(500, 375, [
        ("dog", False, (48, 240, 195, 371)), ("person", False, (8, 12, 352, 498 - 150)),
        ("cat", True, (1, 1, 10, 10)), ("unicorn", False, (5, 5, 50, 50))]))
    (root / "Annotations" / "000002.xml").write_text(_voc_xml(100, 100, [("car", False, (11, 21, 51, 81))]))
    (root / "Annotations" / "000003.xml").write_text("<annotation><size>")             # malformed
    (root / "Annotations" / "000004.xml").write_text(_voc_xml(100, 100, [("car", False, (1, 1, 5, 5))]))
    for i in (1, 2, 3):
        Image.new("RGB", (100, 100)).save(root / "JPEGImages" / f"00000{i}.jpg")       # 000004.jpg missing
    (root / "ImageSets" / "Main" / "train.txt").write_text("000001\n000002\n000003\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("000004\n")
    return root


def test_voc_conversion_by_darknets_formula(voc, tmp_path):
    log = io.StringIO()
    out = tmp_path / "yolo"
    result = convert_voc(str(voc), str(out), log=log)
    assert result["images"] == {"train": 2, "val": 0}
    assert result["left_out"] == {"difficult": 1, "class 'unicorn'": 1}
    assert {p for p, _ in result["bad"]} == {str(voc / "Annotations" / "000003.xml"),
                                             str(voc / "JPEGImages" / "000004.jpg")}
    assert "000003.xml: cannot read annotation" in log.getvalue()
    labels = parse_labels(str(out / "labels" / "train" / "000001.txt"), 20)
    # darknet: x = ((xmin + xmax)/2 - 1)/w, w = (xmax - xmin)/w; dog is class 11, person 14
    np.testing.assert_allclose(labels, [[11, (121.5 - 1) / 500, (305.5 - 1) / 375, 147 / 500, 131 / 375],
                                        [14, (180 - 1) / 500, (180 - 1) / 375, 344 / 500, 336 / 375]], atol=1e-6)
    assert os.path.islink(out / "images" / "train" / "000001.jpg")
    d = load_split(str(out), "train")
    assert len(d.items) == 2 and d.classes[11] == "dog"
    with pytest.raises(DatasetError, match="000003.xml: cannot read annotation"):
        convert_voc(str(voc), str(tmp_path / "strict"), on_error="fail")


# -- the command line --------------------------------------------------------------------

def test_data_commands(tmp_path, capsys, broken):
    assert main(["data", "synth", str(tmp_path / "s"), "--n", "4"]) == 0
    assert "wrote 4 images" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "s"), "--split", "val"]) == 0
    root, _ = broken
    assert main(["data", "check", str(root)]) == 1
    captured = capsys.readouterr()
    assert "5 bad files" in captured.out and captured.err.count("skipping") == 5
    assert main(["data", "synth", str(tmp_path / "t"), "--n", "1"]) == 1
