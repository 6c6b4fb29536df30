"""The installer child: ``python -m provisioner.build.installer_child``.

Reads a JSON request (:func:`provisioner.build.installer.request_for`) on stdin,
installs it with rattler, prints progress lines on stdout and, on failure, one
``error: ...`` line last on stderr. It dies with its parent (Linux
``PR_SET_PDEATHSIG``) and imports as little as it can: it starts on every build.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from provisioner.lock.lockfile import LockedPackage

PROGRESS = "provisioner-progress"


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(137)


def _say(line: str, stream: Any = None) -> None:
    out = stream or sys.stdout
    out.write(line + "\n")
    out.flush()


def _reporter() -> Any:
    import rattler

    # One line per callback that the parent turns into the extract and link phases
    # (provisioner.build.installer); rattler fills the cache and links concurrently.
    class _Reporter(rattler.InstallerReporter):  # type: ignore[misc]
        def on_transaction_start(self, total_operations: int) -> None:
            _say(f"{PROGRESS} start {total_operations}")

        def on_populate_cache_complete(self, cache_entry: int) -> None:
            _say(f"{PROGRESS} cached")
            # Test hook: stall mid-install (a package is cached, others may be extracting).
            pause = os.environ.get("PROVISIONER_TEST_INSTALL_PAUSE")
            if pause:
                _say(f"{PROGRESS} paused")
                time.sleep(float(pause))

        def on_link_complete(self, index: int) -> None:
            _say(f"{PROGRESS} linked")

    return _Reporter()  # type: ignore[abstract]


def _package(data: dict[str, Any]) -> LockedPackage:
    data = dict(data)
    data["dependencies"] = tuple(tuple(d) for d in data.get("dependencies", ()))
    data["categories"] = tuple(data.get("categories", ("main",)))
    return LockedPackage(**data)


def child_main() -> int:
    """Entry point of ``python -m provisioner.build.installer``."""
    request = json.loads(sys.stdin.read())
    _die_with_parent(int(request["parent"]))
    import rattler

    from provisioner.lock.solve import locked_to_record, run_rattler

    records = [locked_to_record(_package(p["package"]), p["url"], p["url"].rsplit("/", 2)[0])
               for p in request["packages"]]
    target, final = Path(request["target"]), Path(request["final"])
    if os.environ.get("PROVISIONER_TEST_FAULT") == "installer-abort":
        os.abort()
    try:
        run_rattler(rattler.install(
            records, target_prefix=target,
            alternative_target_prefix=None if target == final else final,
            cache_dir=Path(request["cache_dir"]), show_progress=False,
            execute_link_scripts=False, reporter=_reporter()))
    except Exception as exc:
        text = str(exc).strip().splitlines()
        _say(f"error: {text[0] if text else type(exc).__name__}", sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    code = child_main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: rattler's threads are done, nothing to flush
