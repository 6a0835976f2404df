"""The plan file: versioned, hashed JSON, read with the standard library.

The planner writes it (``tilec.plan``); every device reads and validates it
before allocating anything. Two devices work together only if their plan
hashes agree. The hash is the SHA-256 of the canonical JSON (sorted keys,
no spaces) of the plan without its ``hash`` field.
"""
import hashlib
import json
import os

from tilec_runtime.errors import ProgramError
from tilec_runtime.program import validate as validate_program

FORMAT = "tilec-plan"
VERSION = 1
DTYPES = ("float32", "float64")


def canonical(plan):
    body = {k: v for k, v in plan.items() if k != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def plan_hash(plan):
    return hashlib.sha256(canonical(plan).encode()).hexdigest()


def seal(plan):
    """Return ``plan`` with its hash filled in."""
    plan = dict(plan)
    plan["hash"] = plan_hash(plan)
    return plan


def write_plan(plan, directory):
    """Write ``directory/plan.json`` atomically; returns the path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "plan.json")
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(plan, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _range(value, n, where):
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value)
            and 0 <= value[0] <= value[1] < n):
        raise ProgramError(f"{where}: bad range {value!r} (map size {n})")


def validate(plan):
    """Check structure, version and hash of a plan dict; raise ProgramError."""
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise ProgramError("not a tilec plan (missing format 'tilec-plan')")
    if plan.get("version") != VERSION:
        raise ProgramError(f"plan version {plan.get('version')!r} is not supported (this runtime reads {VERSION})")
    if plan.get("hash") != plan_hash(plan):
        raise ProgramError("plan hash does not match its contents (edited or corrupted)")
    if plan.get("dtype") not in DTYPES:
        raise ProgramError(f"plan dtype {plan.get('dtype')!r} must be one of {DTYPES}")
    if not isinstance(plan.get("batch"), int) or plan["batch"] < 1:
        raise ProgramError(f"plan batch {plan.get('batch')!r} must be a positive integer")
    program = validate_program(plan.get("program"))
    ndev = len(plan.get("devices", []))
    if ndev < 1:
        raise ProgramError("plan has no devices")
    covered = 0
    for g, group in enumerate(plan.get("groups", [])):
        first, last = group["layers"]
        if first != covered or last < first or last >= len(program):
            raise ProgramError(f"group {g}: layers {group['layers']} do not continue at layer {covered}")
        covered = last + 1
        seen = set()
        for t, tile in enumerate(group["tiles"]):
            d = tile.get("device")
            if not isinstance(d, int) or not 0 <= d < ndev or d in seen:
                raise ProgramError(f"group {g} tile {t}: bad or repeated device {d!r}")
            seen.add(d)
            if group["kind"] == "tiled":
                out = program[last]["out_shape"]
                _range(tile["rows"], out[1], f"group {g} tile {t} rows")
                _range(tile["cols"], out[2], f"group {g} tile {t} cols")
    if covered != len(program):
        raise ProgramError(f"groups cover layers 0..{covered - 1} of {len(program)}")
    return plan


def read_plan(path):
    """Load and validate a plan from a file or a directory holding plan.json."""
    if os.path.isdir(path):
        path = os.path.join(path, "plan.json")
    try:
        with open(path) as f:
            plan = json.load(f)
    except (OSError, ValueError) as exc:
        raise ProgramError(f"{path}: cannot read plan: {exc}") from None
    try:
        return validate(plan)
    except (KeyError, TypeError) as exc:
        raise ProgramError(f"{path}: malformed plan ({exc!r})") from None
    except ProgramError as exc:
        raise ProgramError(f"{path}: {exc}") from None
