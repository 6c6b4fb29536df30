"""Project and user configuration.

A *project* is a directory holding ``environment-specs/``, ``lockfiles/`` and an
optional ``provisioner.toml``. Settings are taken, strongest first, from
command-line options, ``PROVISIONER_*`` environment variables, the project's
``provisioner.toml`` and built-in defaults. Relative paths in the file are
relative to the project directory.

Example ``provisioner.toml``::

    home = ".provisioner"               # where envs are built (default: per-user data dir;
                                        # %LOCALAPPDATA%\\pvn on Windows, see default_home)
    backend = "rattler"                 # or "micromamba", "mamba", "conda"
    channel-root = "tests/data/conda-mirror"  # <root>/<channel name> mirrors each channel

    [channels]                          # explicit mirrors win over channel-root
    pytorch = "/mirrors/pytorch"

    [pip]
    find-links = ["wheels"]             # local wheel dirs for the pip layer
    no-index = true

    [build]                             # limits on what packages unpack to (defaults shown)
    package-bytes = "64GiB"
    package-files = 40000
    env-bytes = "512GiB"
    env-files = 2000000
    max-ratio = 1000                    # unpacked / archive size (bz2 bombs)
    link-scripts = "refuse"             # or "skip": install, never run them
    import-check = "memo"               # or "always": import the spec's modules every build

    [legacy]
    root = "environments"
    policy = "prefer"                   # prefer | fallback | ignore
    probe-timeout = 60                  # seconds for one health probe
    health-ttl = 86400                  # seconds a cached health result stays valid
    [legacy.models]                     # local_<id> dir id -> model id, where not derivable
    "llama7b" = "meta-llama/Llama-2-7b-hf"

    [gc]
    keep = 1                            # previous generations per key kept for rollback

    [s3-options.my-bucket]              # an S3-compatible store for s3:// mirrors (as pixi)
    endpoint-url = "https://minio.example.com"
    region = "us-east-1"
    force-path-style = true             # bucket in the path, not the host name
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from provisioner.errors import SpecError

CONFIG_FILE_NAME = "provisioner.toml"
SPECS_DIR_NAME = "environment-specs"
LOCKS_DIR_NAME = "lockfiles"
LEGACY_POLICIES = ("prefer", "fallback", "ignore")
_KNOWN_KEYS = {"home", "backend", "channel-root", "channels", "pip", "legacy", "build", "gc",
               "s3-options"}


@dataclass(frozen=True)
class PipSettings:
    """Where the pip layer looks for wheels; empty means uv's own configuration."""

    index_url: str | None = None
    find_links: tuple[str, ...] = ()
    no_index: bool = False


@dataclass(frozen=True)
class S3Options:
    """Where one bucket of ``s3://`` URLs lives (``[s3-options.<bucket>]``, pixi's keys)."""

    endpoint_url: str
    region: str
    force_path_style: bool = False


def _s3_options(raw: object) -> dict[str, S3Options]:
    if not isinstance(raw, dict):
        raise SpecError(f"{CONFIG_FILE_NAME}: [s3-options] must hold one table per bucket")
    result = {}
    for bucket, opts in raw.items():
        where = f"{CONFIG_FILE_NAME}: [s3-options.{bucket}]"
        if not isinstance(opts, dict) or set(opts) - {"endpoint-url", "region",
                                                       "force-path-style"}:
            raise SpecError(f"{where} takes endpoint-url, region and force-path-style only")
        endpoint, region = opts.get("endpoint-url"), opts.get("region")
        style = opts.get("force-path-style", False)
        if not isinstance(endpoint, str) or "://" not in endpoint or not isinstance(region, str) \
                or not region or not isinstance(style, bool):
            raise SpecError(f"{where} needs endpoint-url (a URL) and region (a string); "
                            "force-path-style is true or false")
        result[str(bucket)] = S3Options(endpoint, region, style)
    return result


GIB = 1 << 30
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


@dataclass(frozen=True)
class PackageLimits:
    """What one package, and one env, may unpack to (``[build]`` in provisioner.toml)."""

    package_bytes: int = 64 * GIB
    package_files: int = 40_000
    env_bytes: int = 512 * GIB
    env_files: int = 2_000_000
    # Unpacked / archive size, checked once a package unpacks past ``ratio_floor``:
    # real packages compress 2-20x, a bz2 bomb 100,000x.
    max_ratio: int = 1000
    ratio_floor: int = 64 << 20
    link_scripts: str = "refuse"  # or "skip": install without running them


def _size(value: object, what: str) -> int:
    match = _SIZE_RE.match(str(value)) if isinstance(value, (int, str)) else None
    if match is None or isinstance(value, bool):
        raise SpecError(f"{CONFIG_FILE_NAME}: build.{what} must be a size such as 8GiB or 500MB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])


def _fetch_timeout(value: object) -> float:
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        seconds = 0.0
    if not 0 < seconds <= 86400:
        raise SpecError(f"fetch timeout {value!r} is not a number of seconds above 0",
                        hint="set [build] fetch-timeout or PROVISIONER_FETCH_TIMEOUT, e.g. 120")
    return seconds


def _limits(raw: dict[str, Any]) -> PackageLimits:
    base = PackageLimits()
    changes: dict[str, Any] = {}
    for key in ("package-bytes", "env-bytes"):
        if key in raw:
            changes[key.replace("-", "_")] = _size(raw[key], key)
    for key in ("package-files", "env-files", "max-ratio"):
        if key in raw:
            if not isinstance(raw[key], int) or isinstance(raw[key], bool) or raw[key] < 1:
                raise SpecError(f"{CONFIG_FILE_NAME}: build.{key} must be a positive integer")
            changes[key.replace("-", "_")] = raw[key]
    if "link-scripts" in raw:
        if raw["link-scripts"] not in ("refuse", "skip"):
            raise SpecError(f"{CONFIG_FILE_NAME}: build.link-scripts must be refuse or skip")
        changes["link_scripts"] = raw["link-scripts"]
    return replace(base, **changes)


@dataclass(frozen=True)
class Config:
    """Resolved settings for one project."""

    project: Path
    home: Path
    backend: str | None = None
    channel_root: Path | None = None
    channel_mirrors: Mapping[str, str] = field(default_factory=dict)
    pip: PipSettings = PipSettings()
    legacy_root: Path | None = None
    legacy_policy: str = "prefer"
    legacy_models: Mapping[str, str] = field(default_factory=dict)
    probe_timeout: float = 60.0
    health_ttl: float = 86400.0
    force_copy: bool = False
    package_limits: PackageLimits = PackageLimits()
    gc_keep: int = 1
    fetch_timeout: float = 120.0
    import_check: str = "memo"
    s3_options: Mapping[str, S3Options] = field(default_factory=dict)

    @property
    def specs_dir(self) -> Path:
        return self.project / SPECS_DIR_NAME

    @property
    def locks_dir(self) -> Path:
        return self.project / LOCKS_DIR_NAME

    def with_overrides(self, **changes: Any) -> Config:
        """Return a copy with the given non-``None`` fields replaced."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


#: the Windows home's folder name: short, because every env, staging and cache path starts
#: with the home, and Windows paths stop at 260 characters unless long paths are enabled
WINDOWS_HOME_NAME = "pvn"


def default_home(platform: str | None = None,
                 environ: Mapping[str, str] | None = None) -> Path:
    """The per-user data directory used when no home is configured.

    On Windows ``%LOCALAPPDATA%\\pvn`` (:data:`WINDOWS_HOME_NAME`), 8 characters
    shorter than the earlier ``%LOCALAPPDATA%\\provisioner``, which is kept where
    it already exists (its envs stay where they are). Never a drive root such
    as ``C:\\pvn``, however short: a folder made there inherits the root's ACL,
    which lets every authenticated user change it, so another user could put
    code into the envs. Where even the short default leaves too little room
    (a long user name), the build's ``MAX_PATH`` check refuses with a hint
    to set ``PROVISIONER_HOME``. ``platform`` and ``environ`` default to this host's.
    """
    platform = sys.platform if platform is None else platform
    env = os.environ if environ is None else environ
    if platform == "win32":
        base = Path(env.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local"))
        earlier = base / "provisioner"
        return earlier if earlier.is_dir() else base / WINDOWS_HOME_NAME
    if platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "provisioner"
    base = Path(env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share"))
    return base / "provisioner"


def _read_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib
    try:
        with path.open("rb") as fh:
            data: dict[str, Any] = tomllib.load(fh)
            return data
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path.name}: invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: invalid TOML: not UTF-8 text") from None


def _resolve(project: Path, value: object, what: str) -> Path:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise SpecError(f"{CONFIG_FILE_NAME}: '{what}' must be a non-empty string")
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else (project / path)


def _mirror_location(project: Path, value: object, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(f"{CONFIG_FILE_NAME}: channel mirror for '{name}' must be a string")
    if "://" in value:
        return value
    return str(_resolve(project, value, f"channels.{name}"))


def load_config(
    project: Path | str | None = None,
    *,
    home: Path | str | None = None,
    channel_root: Path | str | None = None,
    backend: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Load the configuration of ``project`` (default: the current directory)."""
    env = os.environ if environ is None else environ
    project_dir = Path(project if project is not None else os.getcwd()).absolute()
    data: dict[str, Any] = {}
    cfg_path = project_dir / CONFIG_FILE_NAME
    if cfg_path.is_file():
        data = _read_toml(cfg_path)
        unknown = sorted(set(data) - _KNOWN_KEYS)
        if unknown:
            raise SpecError(
                f"{CONFIG_FILE_NAME}: unknown setting(s) {', '.join(unknown)}",
                hint=f"known settings: {', '.join(sorted(_KNOWN_KEYS))}",
            )

    mirrors_raw = data.get("channels", {})
    if not isinstance(mirrors_raw, dict):
        raise SpecError(f"{CONFIG_FILE_NAME}: [channels] must be a table of name = location")
    mirrors = {str(k): _mirror_location(project_dir, v, str(k)) for k, v in mirrors_raw.items()}

    pip_raw = data.get("pip", {})
    if not isinstance(pip_raw, dict):
        raise SpecError(f"{CONFIG_FILE_NAME}: [pip] must be a table")
    find_links = pip_raw.get("find-links", [])
    if not isinstance(find_links, list):
        raise SpecError(f"{CONFIG_FILE_NAME}: pip.find-links must be a list")
    pip = PipSettings(
        index_url=pip_raw.get("index-url"),
        find_links=tuple(
            v
            if isinstance(v, str) and "://" in v
            else str(_resolve(project_dir, v, "pip.find-links"))
            for v in find_links
        ),
        no_index=bool(pip_raw.get("no-index", False)),
    )

    legacy_raw = data.get("legacy", {})
    if not isinstance(legacy_raw, dict):
        raise SpecError(f"{CONFIG_FILE_NAME}: [legacy] must be a table")
    policy = str(env.get("PROVISIONER_LEGACY_POLICY") or legacy_raw.get("policy", "prefer"))
    if policy not in LEGACY_POLICIES:
        raise SpecError(
            f"legacy policy {policy!r} is not one of {', '.join(LEGACY_POLICIES)}"
        )
    legacy_root_value = env.get("PROVISIONER_LEGACY_ROOT") or legacy_raw.get("root")
    legacy_root = (
        _resolve(project_dir, legacy_root_value, "legacy.root")
        if legacy_root_value
        else project_dir / "environments"
    )

    legacy_models = legacy_raw.get("models", {})
    if not isinstance(legacy_models, dict) or not all(
        isinstance(v, str) for v in legacy_models.values()
    ):
        raise SpecError(f"{CONFIG_FILE_NAME}: [legacy.models] must map dir ids to model ids")
    try:
        probe_timeout = float(legacy_raw.get("probe-timeout", 60.0))
        health_ttl = float(legacy_raw.get("health-ttl", 86400.0))
    except (TypeError, ValueError):
        raise SpecError(f"{CONFIG_FILE_NAME}: legacy probe-timeout/health-ttl must be numbers"
                        ) from None

    home_value = home or env.get("PROVISIONER_HOME") or data.get("home")
    home_path = (
        _resolve(project_dir, home_value, "home") if home_value else default_home()
    )
    root_value = channel_root or env.get("PROVISIONER_CHANNEL_ROOT") or data.get("channel-root")
    root_path = _resolve(project_dir, root_value, "channel-root") if root_value else None
    build_raw = data.get("build", {})
    if not isinstance(build_raw, dict):
        raise SpecError(f"{CONFIG_FILE_NAME}: [build] must be a table")
    force_copy = bool(build_raw.get("force-copy", False))
    fetch_timeout = _fetch_timeout(env.get("PROVISIONER_FETCH_TIMEOUT")
                                   or build_raw.get("fetch-timeout", 120.0))

    import_check = build_raw.get("import-check", "memo")
    if import_check not in ("memo", "always"):
        raise SpecError(f"{CONFIG_FILE_NAME}: build.import-check must be memo or always")

    gc_raw = data.get("gc", {})
    gc_keep = gc_raw.get("keep", 1) if isinstance(gc_raw, dict) else None
    if not isinstance(gc_keep, int) or isinstance(gc_keep, bool) or not 0 <= gc_keep <= 1000:
        raise SpecError(f"{CONFIG_FILE_NAME}: [gc] keep must be a whole number from 0 to 1000")

    return Config(
        project=project_dir,
        home=home_path.absolute(),
        backend=backend or env.get("PROVISIONER_BACKEND") or data.get("backend"),
        channel_root=root_path,
        channel_mirrors=mirrors,
        pip=pip,
        legacy_root=legacy_root,
        legacy_policy=policy,
        legacy_models={str(k): str(v) for k, v in legacy_models.items()},
        probe_timeout=probe_timeout,
        health_ttl=health_ttl,
        force_copy=force_copy or env.get("PROVISIONER_FORCE_COPY") == "1",
        package_limits=_limits(build_raw),
        gc_keep=gc_keep,
        fetch_timeout=fetch_timeout,
        import_check=import_check,
        s3_options=_s3_options(data.get("s3-options", {})),
    )
