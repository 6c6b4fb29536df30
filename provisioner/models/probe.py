"""Health probes: run an env's python, ask it what it has, and judge it. Returns data.

The probe runs the interpreter contained (``contained.run_contained``: its own
session, a timeout, the group and every marked descendant killed after it, at
most 1 MiB of output read), isolated (``-I``) for legacy venvs, and prints
JSON: python version, platform, each import's version or error, and the CUDA
facts (``torch.version.cuda``, ``torch.cuda.is_available()``, whether
bitsandbytes loaded a CUDA library).

Judging against the key's ``provides``:

* **strict**: every requirement is satisfied (``cuda==12.1`` is checked
  against ``torch.version.cuda``);
* **lenient**: every import succeeds and major versions match.

``healthy`` = strict, ``degraded`` = lenient only, ``broken`` = neither (or the
probe failed), ``missing`` = no interpreter.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROBE_SCRIPT = r"""
import importlib, json, platform, sys
out = {"python": "%d.%d.%d" % sys.version_info[:3], "platform": sys.platform,
       "machine": platform.machine(), "imports": {}}
for name in json.loads(sys.argv[1]):
    try:
        mod = importlib.import_module(name)
        out["imports"][name] = {"ok": True, "version": str(getattr(mod, "__version__", ""))}
    except BaseException as exc:
        out["imports"][name] = {"ok": False, "error": type(exc).__name__ + ": " + str(exc)[:300]}
torch = sys.modules.get("torch")
if torch is not None:
    out["torch_cuda"] = getattr(getattr(torch, "version", None), "cuda", None)
    try:
        out["cuda_available"] = bool(torch.cuda.is_available())
    except BaseException as exc:
        out["cuda_available"] = False
bnb = sys.modules.get("bitsandbytes")
if bnb is not None:
    ext = sys.modules.get("bitsandbytes.cextension")
    if ext is None:
        try:
            ext = importlib.import_module("bitsandbytes.cextension")
        except BaseException:
            ext = None
    out["bnb_cuda"] = bool(getattr(ext, "COMPILED_WITH_CUDA", False)) or (
        str(getattr(ext, "BNB_BACKEND", "")).upper() == "CUDA")
print("PROVISIONER-PROBE " + json.dumps(out))
"""
MARK = "PROVISIONER-PROBE "
#: provides name -> the module whose __version__ tells it
MODULE_FOR = {"torch": "torch", "pytorch": "torch", "transformers": "transformers",
              "accelerate": "accelerate", "bitsandbytes": "bitsandbytes", "numpy": "numpy"}


@dataclass(frozen=True)
class Health:
    """The verdict on one env."""

    status: str  # healthy | degraded | broken | missing
    reasons: tuple[str, ...] = ()
    strict: bool = False
    lenient: bool = False
    facts: dict[str, object] = field(default_factory=dict)
    seconds: float = 0.0
    checked_at: float = 0.0

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["reasons"] = list(self.reasons)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Health:
        reasons = data.get("reasons") or []
        facts = data.get("facts") or {}
        return cls(
            status=str(data.get("status", "broken")),
            reasons=tuple(str(r) for r in reasons) if isinstance(reasons, list) else (),
            strict=bool(data.get("strict")), lenient=bool(data.get("lenient")),
            facts=facts if isinstance(facts, dict) else {},
            seconds=float(data.get("seconds", 0.0)),  # type: ignore[arg-type]
            checked_at=float(data.get("checked_at", 0.0)),  # type: ignore[arg-type]
        )


def run_probe(python: Path | None, imports: Sequence[str], *, timeout: float = 60.0,
              isolated: bool = True) -> tuple[dict[str, object] | None, str]:
    """Run the probe; return (facts, error). Never raises."""
    from provisioner import contained
    from provisioner.errors import ToolMissingError

    if python is None or not python.exists():
        return None, "missing"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    argv = [str(python), "-I" if isolated else "-s", "-c", PROBE_SCRIPT, json.dumps(list(imports))]
    try:
        # Contained: the group is killed after every probe, setsid grandchildren too,
        # and at most 1 MiB of output is read (a probe runs untrusted env code).
        result = contained.run_contained(argv, timeout=timeout, env=env)
    except (ToolMissingError, OSError) as exc:
        return None, f"cannot run {python}: {exc}"
    if result.timed_out:
        return None, f"probe timed out after {timeout:g} s"
    if result.truncated:
        return None, (f"probe printed more than {contained.MAX_CONTAINED_OUTPUT} bytes; "
                      "stopped reading and killed it")
    line = next((ln for ln in reversed(result.stdout.splitlines()) if ln.startswith(MARK)), None)
    if line is None:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"probe gave no result (exit {result.returncode}): {tail[:200]}"
    try:
        facts = json.loads(line[len(MARK):])
    except ValueError:
        return None, "probe printed malformed JSON"
    if not isinstance(facts, dict):
        return None, "probe printed malformed JSON"
    return facts, ""


def _version_of(name: str, facts: dict[str, object]) -> str | None:
    imports = facts.get("imports")
    if not isinstance(imports, dict):
        return None
    if name == "cuda":
        cuda = facts.get("torch_cuda")
        return str(cuda) if cuda else None
    info = imports.get(MODULE_FOR.get(name, name))
    if not isinstance(info, dict) or not info.get("ok"):
        return None
    return str(info.get("version") or "").split("+")[0] or None


def _major(text: str) -> str:
    return text.strip().lstrip("=<>!~ ").split(".")[0]


def judge(facts: dict[str, object], provides: Sequence[str], imports: Sequence[str]) -> Health:
    """Judge probe facts against a key's ``provides`` and ``imports``."""
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version

    reasons: list[str] = []
    strict = True
    lenient = True
    imp = facts.get("imports") if isinstance(facts.get("imports"), dict) else {}
    assert isinstance(imp, dict)
    for name in imports:
        info = imp.get(name)
        if not isinstance(info, dict) or not info.get("ok"):
            err = info.get("error") if isinstance(info, dict) else "not probed"
            reasons.append(f"import {name} failed: {err}")
            strict = lenient = False
    for text in provides:
        req = Requirement(text)
        have = _version_of(req.name, facts)
        if have is None:
            reasons.append(f"{req.name}: not found")
            strict = lenient = False
            continue
        try:
            ok = req.specifier.contains(Version(have), prereleases=True)
        except InvalidVersion:
            ok = False
        if not ok:
            strict = False
            reasons.append(f"{req.name} {have} does not satisfy {text}")
            wanted = [_major(s.version) for s in req.specifier]
            if wanted and _major(have) not in wanted:
                lenient = False
    status = "healthy" if strict else ("degraded" if lenient else "broken")
    return Health(status, tuple(reasons), strict, lenient, facts)


def probe_env(python: Path | None, provides: Sequence[str], imports: Sequence[str], *,
              timeout: float = 60.0, isolated: bool = True) -> Health:
    """Probe and judge one env; never raises."""
    start = time.monotonic()
    facts, error = run_probe(python, imports, timeout=timeout, isolated=isolated)
    took = time.monotonic() - start
    if facts is None:
        status = "missing" if error == "missing" else "broken"
        reason = "interpreter not found" if status == "missing" else error
        return Health(status, (reason,), seconds=took, checked_at=time.time())
    health = judge(facts, provides, imports)
    return Health(health.status, health.reasons, health.strict, health.lenient, health.facts,
                  took, time.time())
