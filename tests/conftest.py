"""Test configuration: hermetic caches, a pinned device profile, and a
deterministic hypothesis profile for CI.

Nothing a test does may depend on what the user's ``~/.cache/tilec`` holds
(a profile measured under load once made the optimiser drop a device and a
test fail in a fresh clone): every test session plans with the pinned
profile ``tests/profiles/test-host.json`` and keeps its caches in a fresh
temporary directory. The variables are set in ``os.environ`` so that worker
processes the tests start inherit them. ``TILEC_TEST_KERNEL_CACHE`` may name
a kernel build cache to reuse between local runs (built modules are keyed by
their source and toolchain, so a reused one is never stale); CI leaves it
unset and builds from scratch.

On CI (``CI=true``) hypothesis derandomises, so a submission is judged on
the same examples every run; locally it explores new ones each run and
keeps failures in .hypothesis/.
"""
import os
import tempfile
from pathlib import Path

from hypothesis import settings

PINNED_PROFILE = Path(__file__).resolve().parent / "profiles" / "test-host.json"

_session_dir = tempfile.TemporaryDirectory(prefix="tilec-tests-")
os.environ["TILEC_PROFILE"] = str(PINNED_PROFILE)
os.environ["XDG_CACHE_HOME"] = os.path.join(_session_dir.name, "xdg")
os.environ["TILEC_CACHE"] = os.environ.get("TILEC_TEST_KERNEL_CACHE") or os.path.join(_session_dir.name, "tilec")

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    settings.load_profile("ci")
