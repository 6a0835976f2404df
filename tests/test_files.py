"""Files are written atomically, through one helper (``tilec_runtime.files``)."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

from tilec_runtime.files import atomic_json, atomic_open, atomic_path, atomic_savez, atomic_write

ROOT = Path(__file__).resolve().parent.parent


def test_text_bytes_json_and_npz_land_whole(tmp_path):
    atomic_write(tmp_path / "a.txt", "text")
    atomic_write(tmp_path / "b.bin", b"\x00\x01")
    atomic_json(tmp_path / "c.json", {"b": 1, "a": [2]}, sort_keys=True)
    atomic_savez(tmp_path / "d.npz", {"x": np.arange(3)}, sync_dir=True)
    assert (tmp_path / "a.txt").read_text() == "text" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "c.json").read_text() == '{"a": [2], "b": 1}\n'
    with np.load(tmp_path / "d.npz") as z:
        assert z["x"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.json", "d.npz"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "plan.json"
    atomic_json(target, {"version": 1})
    with pytest.raises(RuntimeError):
        with atomic_open(target, "w") as f:
            f.write('{"version": 2, "half')
            raise RuntimeError("the writer died")
    assert json.loads(target.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_a_directory_appears_complete_or_not_at_all(tmp_path):
    target = tmp_path / "dataset"
    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            Path(tmp).mkdir()
            (Path(tmp) / "part").write_text("1")
            raise OSError("disk full")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        Path(tmp).mkdir()
        (Path(tmp) / "dataset.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["dataset"] and (target / "dataset.json").exists()


def test_nothing_else_renames_files_into_place():
    """One helper: no hand-written write-fsync-rename elsewhere."""
    offenders = [str(p.relative_to(ROOT)) for d in ("runtime", "tilec") for p in (ROOT / d).rglob("*.py")
                 if p.name != "files.py" and re.search(r"os\.(replace|rename)\(|\.fsync\(", p.read_text())]
    assert offenders == []
