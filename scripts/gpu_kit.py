"""The GPU check as a kit for an air-gapped GPU host: wheels fetched beforehand, then one offline command.

Why: the NVML hook has only ever run against a stand-in. GPU hosts are the hardest machines to get: often no
network, a fixed image, a short reservation. The image this plans for has Python 3.12 with torch (CUDA),
nvidia-ml-py, numpy, matplotlib, httpx, requests, prometheus-client, psutil, uvloop, werkzeug and msgpack, but
not locust, gevent, geventhttpclient, openai, fastapi, starlette, uvicorn, orjson or flask. So:

    python scripts/gpu_kit.py download gpu-kit-wheels            # on a connected machine
    python scripts/gpu_kit.py run gpu-kit-wheels gpu-kit-out     # on the GPU host, offline, < 8 minutes
    python scripts/gpu_kit.py run --dry-run gpu-kit-wheels OUT [--local-wheels DIR]   # on any CPU machine

`download` resolves stopstorm's dependencies (pyproject.toml) together with the image's packages for CPython
3.12 manylinux x86-64, keeps only what the image lacks (each exclusion said, with why), fetches those wheels
hash-pinned, and adds small "spare" wheels of image packages the kit's packages need, for an image whose copy is
too old. `run` installs the wheels with no network into a temporary target, puts it and the working tree in
front of the image's packages, checks every requirement (installing a spare only where the image falls short)
and every import, then runs the README's two GPU commands (the probe and a 60 s load run, both against the
simulator in `--gpu-work` mode) and writes their reports, GPU timelines and a one-page summary.

The kit drives stopstorm only through its command lines (`python -m locust -f probe.py ...`), never imports it:
the checkout is the thing under test, and its module layout is allowed to change. Only the standard library,
pip and `packaging` (pip's vendored copy where the image has none) are used here.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.tags import Tag, compatible_tags, cpython_tags, sys_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename
except ImportError:  # an image without packaging still has pip
    from pip._vendor.packaging.markers import default_environment  # type: ignore[no-redef]
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.specifiers import SpecifierSet  # type: ignore[no-redef]
    from pip._vendor.packaging.tags import Tag, compatible_tags, cpython_tags, sys_tags  # type: ignore[no-redef]
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename  # type: ignore[no-redef]

__all__ = ["IMAGE", "NO_SPARE", "KitPlan", "Node", "check_requirements", "plan_kit", "summary_page",
           "target_tags", "wheel_fits"]

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = "kit-manifest.json"
SPARE_DIR = "spare"
KIT_SCHEMA = 1
TARGET_PYTHON = "3.12"
# torch needs glibc 2.28 (manylinux_2_28) since 2.6, so an image with a current CUDA torch has at least that.
GLIBC = (2, 28)
MAX_KIT_MIB = 48.0  # well under the 64 MiB a carried folder may take

# The image issue #23 plans for: what it has (torch aside, resolved with stopstorm's deps to see what they bring).
IMAGE = ("nvidia-ml-py", "numpy", "matplotlib", "httpx", "requests", "prometheus-client", "psutil", "uvloop",
         "werkzeug", "msgpack")
IMAGE_TORCH_NOTE = ("torch is in the image but not resolved here (its CUDA build is the image's, with GBs of "
                    "nvidia-* wheels); what only torch would bring (jinja2, typing-extensions, ...) is not "
                    "counted as present")
# Image packages never carried as spares: the image's numeric stack, built against its own numpy and torch.
NO_SPARE = frozenset({"torch", "numpy", "matplotlib", "contourpy", "fonttools", "kiwisolver", "pillow"})

# The README's GPU section: its two commands, as argv after `python -m locust`.
# The probe without its early-stop rows: against the simulator (which acts on every close at once) they would
# only repeat its close rows, and at --probe-gap 2 each stream costs 2 s of the budget.
PROBE_ARGS = ["-f", "probe.py", "--headless", "-u", "1", "-r", "1", "--ignore-eos", "--max-tokens", "200",
              "--probe-gap", "2", "--probe-early", "none"]
LOAD_ARGS = ["-f", "locustfile.py", "--headless", "-u", "8", "-r", "8", "-t", "60s"]
BUDGET_S = 480.0
LOAD_RESERVE_S = 110.0  # what the load step needs: 60 s of load, the simulator's start with torch, the report

EXIT_USAGE, EXIT_NO_GPU, EXIT_KIT, EXIT_RUN = 2, 3, 4, 5


class KitError(Exception):
    """A failure said in one line; `main` prints it and exits with `code`."""

    def __init__(self, message: str, code: int = EXIT_KIT) -> None:
        super().__init__(message)
        self.code = code


def _say(line: str = "") -> None:
    print(line, flush=True)


# --- platform: marker environments and wheel tags ---------------------------------------------------------------


def marker_env(python_version: str) -> dict[str, str]:
    """Marker values for CPython `python_version` on Linux x86-64 (the GPU host), wherever this runs."""
    return {"python_version": python_version, "python_full_version": f"{python_version}.0",
            "implementation_name": "cpython", "implementation_version": f"{python_version}.0",
            "platform_python_implementation": "CPython", "platform_system": "Linux", "platform_machine": "x86_64",
            "sys_platform": "linux", "os_name": "posix", "platform_release": "", "platform_version": ""}


def manylinux_platforms(glibc: tuple[int, int] = GLIBC) -> list[str]:
    """Every manylinux x86-64 platform tag a host with this glibc accepts, newest first (PEP 600 and legacy)."""
    out = [f"manylinux_2_{minor}_x86_64" for minor in range(glibc[1], 4, -1)]
    legacy = {17: "manylinux2014_x86_64", 12: "manylinux2010_x86_64", 5: "manylinux1_x86_64"}
    return out + [name for minor, name in legacy.items() if minor <= glibc[1]]


def target_tags(python_version: str, glibc: tuple[int, int] = GLIBC) -> set[Tag]:
    """The wheel tags CPython `python_version` on manylinux x86-64 installs (what pip's --platform set means)."""
    major, minor = (int(x) for x in python_version.split(".")[:2])
    plats = [*manylinux_platforms(glibc), "linux_x86_64"]
    abi = f"cp{major}{minor}"
    tags = set(cpython_tags((major, minor), [abi], plats))
    tags |= set(compatible_tags((major, minor), abi, plats))
    return tags


def wheel_fits(filename: str, tags: set[Tag]) -> bool:
    """Whether a wheel file installs where `tags` are supported."""
    try:
        _name, _ver, _build, wheel_tags = parse_wheel_filename(filename)
    except Exception:
        return False
    return any(t in tags for t in wheel_tags)


def _pip_target_args(python_version: str, glibc: tuple[int, int] = GLIBC) -> list[str]:
    abi = "cp" + "".join(python_version.split(".")[:2])
    args = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp", "--abi", abi]
    for plat in manylinux_platforms(glibc):
        args += ["--platform", plat]
    return args


def _running_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


# --- the plan: which wheels the image lacks --------------------------------------------------------------------


@dataclass
class Node:
    """One resolved distribution: what pip chose and what it requires (markers unevaluated)."""

    name: str  # canonical
    version: str
    requires: list[str]
    filename: str = ""
    sha256: str = ""


@dataclass
class KitPlan:
    """The kit: wheels to carry (name → why), image packages left out (name → why), spares (name → why)."""

    wheels: dict[str, str] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)
    spares: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # requirements nothing in the resolution provides


def _edges(node: Node, extras: Iterable[str], env: dict[str, str]) -> list[Requirement]:
    """`node`'s requirements that apply on the target, with the given extras of it requested."""
    out = []
    wanted = {"", *extras}
    for text in node.requires:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in wanted):
            out.append(req)
    return out


def plan_kit(resolved: dict[str, Node], roots: Sequence[str], image: Sequence[str], python_version: str,
             no_spare: Iterable[str] = NO_SPARE) -> KitPlan:
    """From one joint resolution: the closure of `roots` the image lacks, what was left out and why, and spares.

    An image package counts as present together with everything it requires (pip installed those with it);
    those are excluded with the reason "brought by X". Every kit package's and root's requirement that lands
    on a present package makes that package (and what it in turn requires from the image) a spare, unless it
    belongs to the image's numeric stack (`no_spare`). Markers are evaluated for CPython `python_version` on
    Linux x86-64, not for the machine that resolves.
    """
    env = marker_env(python_version)
    plan = KitPlan()
    image_set = {canonicalize_name(n) for n in image}

    def walk(starts: list[tuple[str, frozenset[str], str | None]], stop: set[str] | None,
             ) -> tuple[dict[str, str | None], dict[str, set[str]]]:
        """Breadth first from `starts`: each name reached → the package that first needed it (None for a
        start), and the extras it was asked for; names in `stop` are not entered."""
        seen: dict[str, set[str]] = {}
        parent: dict[str, str | None] = {}
        todo = list(starts)
        while todo:
            name, extras, by = todo.pop(0)
            if stop is not None and name in stop:
                continue
            node = resolved.get(name)
            if node is None:
                plan.missing.append(f"{name} (needed by {by or 'stopstorm'})")
                continue
            wanted = {"", *extras}
            if name in seen and wanted <= seen[name]:
                continue
            seen[name] = seen.get(name, set()) | wanted
            parent.setdefault(name, by)
            for req in _edges(node, seen[name], env):
                todo.append((canonicalize_name(req.name), frozenset(req.extras), name))
        return parent, seen

    present, _ = walk([(n, frozenset(), None) for n in sorted(image_set)], None)
    for name, by in present.items():
        plan.excluded[name] = "in the image" if by is None else f"brought by {by} (in the image)"
    root_reqs = [Requirement(r) for r in roots]
    starts: list[tuple[str, frozenset[str], str | None]] = [
        (canonicalize_name(r.name), frozenset(r.extras), None) for r in root_reqs
        if r.marker is None or r.marker.evaluate({**env, "extra": ""})]
    kit, kit_extras = walk(starts, set(present))
    plan.wheels = {n: "stopstorm needs it" if by is None else f"{by} needs it" for n, by in kit.items()}
    # Spares: present packages the kit (or stopstorm itself) requires directly, then their present closure.
    needs: dict[str, list[str]] = {}

    def need(name: str, text: str) -> None:
        if text not in needs.setdefault(name, []):
            needs[name].append(text)

    for r in root_reqs:
        n = canonicalize_name(r.name)
        if n in present and str(r.specifier):
            need(n, f"stopstorm needs {r.specifier}")
    for name in plan.wheels:
        for req in _edges(resolved[name], kit_extras[name], env):
            n = canonicalize_name(req.name)
            if n in present:
                need(n, f"{name} needs {req.specifier or 'it'}")
    skip = {canonicalize_name(n) for n in no_spare}
    todo = sorted(n for n in needs if n not in skip)
    while todo:
        name = todo.pop(0)
        if name in plan.spares or name in skip:
            continue
        plan.spares[name] = ""
        for req in _edges(resolved[name], set(), env):
            n = canonicalize_name(req.name)
            if n in present and n not in plan.spares:
                need(n, f"{name} (a spare) needs {req.specifier or 'it'}")
                todo.append(n)
    for name in plan.spares:
        texts = needs[name]
        plan.spares[name] = "; ".join(texts[:3]) + (f"; +{len(texts) - 3} more" if len(texts) > 3 else "")
    return plan


def _stopstorm_requirements(root: Path = ROOT) -> list[str]:
    with (root / "pyproject.toml").open("rb") as fh:
        return list(tomllib.load(fh)["project"]["dependencies"])


def _resolve(roots: Sequence[str], python_version: str, constraints: Path | None, work: Path) -> dict[str, Node]:
    """One pip resolution of stopstorm's deps with the image's packages, for the target; metadata only."""
    report = work / "resolution.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--disable-pip-version-check", "--report", str(report), "--target", str(work / "unused-target"),
           *_pip_target_args(python_version), *roots, *IMAGE]
    if constraints is not None:
        cmd += ["-c", str(constraints)]
    _pip(cmd, "resolving the dependencies")
    doc = json.loads(report.read_text())
    nodes = {}
    for item in doc["install"]:
        meta = item["metadata"]
        url = item["download_info"]["url"]
        archive = item["download_info"].get("archive_info", {})
        sha = archive.get("hashes", {}).get("sha256") or archive.get("hash", "sha256=").split("=", 1)[1]
        name = canonicalize_name(meta["name"])
        nodes[name] = Node(name, meta["version"], list(meta.get("requires_dist", [])),
                           url.rsplit("/", 1)[-1].split("#")[0], sha)
    return nodes


def _pip(cmd: list[str], what: str, timeout: float = 900.0) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise KitError(f"pip took over {timeout:.0f} s {what}") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines()
                 if ln.strip() and "is ignored: it is neither a file nor a directory" not in ln]
        tail = " | ".join(lines[-6:])
        raise KitError(f"pip failed {what} (exit {proc.returncode}): {tail}")
    return proc.stdout


# --- download --------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch(nodes: list[Node], dest: Path, python_version: str, work: Path) -> None:
    """pip download exactly these files (hash-pinned, no dependencies) into `dest`."""
    if not nodes:
        return
    req = work / f"pins-{dest.name}.txt"
    req.write_text("".join(f"{n.name}=={n.version} --hash=sha256:{n.sha256}\n" for n in nodes))
    _pip([sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--quiet",
          "--disable-pip-version-check", "-d", str(dest), *_pip_target_args(python_version), "-r", str(req)],
         f"downloading into {dest}")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def cmd_download(args: argparse.Namespace) -> int:
    dest = Path(args.dir)
    if dest.exists() and not dest.is_dir():
        raise KitError(f"{dest} exists and is not a folder", EXIT_USAGE)
    started = time.monotonic()
    roots = _stopstorm_requirements()
    constraints = None
    same: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="stopstorm-gpu-kit-dl-") as tmp:
        work = Path(tmp)
        if args.same_as:
            same = _read_manifest(Path(args.same_as))
            constraints = work / "same-as.txt"
            constraints.write_text("".join(f"{w['name']}=={w['version']}\n"
                                           for w in same["wheels"] + same["spares"]))
        _say(f"resolving stopstorm's {len(roots)} dependencies with the image's {len(IMAGE)} packages for "
             f"CPython {args.python_version} manylinux x86-64 (glibc >= {GLIBC[0]}.{GLIBC[1]}) ...")
        resolved = _resolve(roots, args.python_version, constraints, work)
        plan = plan_kit(resolved, roots, IMAGE, args.python_version)
        if plan.missing:
            raise KitError("the resolution lacks what these need on the target: " + "; ".join(plan.missing))
        if same is not None:
            theirs = {w["name"]: w["version"] for w in same["wheels"]}
            ours = {n: resolved[n].version for n in plan.wheels}
            if ours != theirs:
                diff = sorted(set(ours.items()) ^ set(theirs.items()))
                raise KitError(f"for Python {args.python_version} the kit differs from {args.same_as}: {diff}")
        if dest.exists():  # a re-download replaces the folder's wheels, nothing else of the user's
            for old in [*dest.glob("*.whl"), *(dest / SPARE_DIR).glob("*.whl")]:
                old.unlink()
        dest.mkdir(parents=True, exist_ok=True)
        _say(f"downloading {len(plan.wheels)} wheels and {len(plan.spares)} spares into {dest} ...")
        _fetch([resolved[n] for n in sorted(plan.wheels)], dest, args.python_version, work)
        _fetch([resolved[n] for n in sorted(plan.spares)], dest / SPARE_DIR, args.python_version, work)
    manifest = _manifest(dest, resolved, plan, roots, args.python_version)
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _print_manifest(manifest)
    total = manifest["sizes"]["total_bytes"]
    _say(f"kit: {dest} ({_mib(total)}: wheels {_mib(manifest['sizes']['wheels_bytes'])}, spares "
         f"{_mib(manifest['sizes']['spares_bytes'])}) in {time.monotonic() - started:.1f} s")
    if total > MAX_KIT_MIB * 2**20:
        raise KitError(f"the kit is {_mib(total)}, over the {MAX_KIT_MIB:.0f} MiB it must stay under")
    return 0


def _manifest(dest: Path, resolved: dict[str, Node], plan: KitPlan, roots: list[str],
              python_version: str) -> dict[str, Any]:
    def entry(name: str, folder: Path, why: str) -> dict[str, Any]:
        node = resolved[name]
        path = folder / node.filename
        if not path.is_file():
            raise KitError(f"pip did not leave {node.filename} in {folder}")
        sha = _sha256(path)
        if sha != node.sha256:
            raise KitError(f"{path} has sha256 {sha}, not the resolved {node.sha256}")
        return {"name": name, "version": node.version, "file": node.filename, "sha256": sha,
                "bytes": path.stat().st_size, "why": why}

    wheels = [entry(n, dest, plan.wheels[n]) for n in sorted(plan.wheels)]
    spares = [entry(n, dest / SPARE_DIR, plan.spares[n]) for n in sorted(plan.spares)]
    excluded = [{"name": n, "version": resolved[n].version, "why": plan.excluded[n]} for n in sorted(plan.excluded)]
    wb, sb = sum(w["bytes"] for w in wheels), sum(s["bytes"] for s in spares)
    return {"kit_schema": KIT_SCHEMA, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python_version": python_version, "glibc": list(GLIBC), "platforms": manylinux_platforms(),
            "made_with": {"python": platform.python_version(), "pip": _pip_version(), "checkout": _git_rev()},
            "stopstorm_requirements": roots, "image": list(IMAGE), "image_note": IMAGE_TORCH_NOTE,
            "wheels": wheels, "spares": spares, "excluded": excluded,
            "sizes": {"wheels_bytes": wb, "spares_bytes": sb, "total_bytes": wb + sb}}


def _pip_version() -> str:
    try:
        from importlib.metadata import version

        return version("pip")
    except Exception:
        return "unknown"


def _print_manifest(m: dict[str, Any]) -> None:
    _say(f"\ncarried ({len(m['wheels'])} wheels, for CPython {m['python_version']}; the image lacks them):")
    for w in m["wheels"]:
        _say(f"  {w['name']:<20} {w['version']:<17} {w['bytes'] / 1024:>6.0f} KiB  {w['why']}")
    _say(f"\nleft out ({len(m['excluded'])}: the image has them):")
    for e in m["excluded"]:
        _say(f"  {e['name']:<20} {e['version']:<17} {e['why']}")
    _say(f"  (torch: {m['image_note']})")
    _say(f"\nspares ({len(m['spares'])}, in {SPARE_DIR}/: installed only where the image's copy falls short):")
    for s in m["spares"]:
        _say(f"  {s['name']:<20} {s['version']:<17} {s['bytes'] / 1024:>6.0f} KiB  {s['why']}")
    _say()


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise KitError(f"{folder} is not a folder (make it with: python scripts/gpu_kit.py download {folder})",
                       EXIT_USAGE)
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KitError(f"{path} cannot be read ({exc}); was {folder} made by `gpu_kit.py download`?",
                       EXIT_USAGE) from None
    if doc.get("kit_schema") != KIT_SCHEMA:
        raise KitError(f"{path} is kit schema {doc.get('kit_schema')}, this script reads {KIT_SCHEMA}", EXIT_USAGE)
    return doc


# --- run: checks ------------------------------------------------------------------------------------------------


def verify_kit(folder: Path, manifest: dict[str, Any], tags: set[Tag]) -> list[str]:
    """Every file the manifest names is there, has its hash and fits `tags`; returns the problems."""
    problems = []
    for group, sub in (("wheels", folder), ("spares", folder / SPARE_DIR)):
        for w in manifest[group]:
            path = sub / w["file"]
            if not path.is_file():
                problems.append(f"{path} is missing")
            elif _sha256(path) != w["sha256"]:
                problems.append(f"{path} does not match its sha256 (damaged in transit?)")
            elif not wheel_fits(w["file"], tags):
                problems.append(f"{w['file']} does not install on this target")
    return problems


def check_requirements(requirements: Iterable[tuple[str, str]], installed: dict[str, str],
                       env: dict[str, str]) -> list[dict[str, Any]]:
    """Pure: each (requirement, who wants it) against installed {canonical name: version}; the unmet ones.

    A requirement text may carry `[extra]` context as `name[extra]` only for roots; markers are evaluated with
    `env` (and the empty extra)."""
    unmet = []
    for text, by in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
            continue
        name = canonicalize_name(req.name)
        have = installed.get(name)
        spec = SpecifierSet(str(req.specifier))
        if have is None or not spec.contains(have, prereleases=True):
            unmet.append({"name": name, "need": f"{req.name}{req.specifier}", "by": by, "have": have})
    return unmet


def _child_requirements(target: Path) -> dict[str, Any]:
    """In the run's environment: every requirement of what the target holds and of stopstorm, checked against
    the first copy of each distribution on sys.path (the target shadows the image)."""
    from importlib import metadata

    installed: dict[str, str] = {}
    for d in metadata.distributions():  # sys.path order: the first copy of a name is the one imported
        name = canonicalize_name(d.metadata["Name"] or "")
        installed.setdefault(name, d.version)
    env = {k: str(v) for k, v in _this_marker_env().items()}
    roots = _stopstorm_requirements()
    root_extras = {canonicalize_name(Requirement(r).name): set(Requirement(r).extras) for r in roots}
    wanted = [(r, "stopstorm") for r in roots]
    for d in metadata.distributions(path=[str(target)]):
        name = canonicalize_name(d.metadata["Name"] or "")
        for text in d.requires or []:
            req = Requirement(text)
            if req.marker is not None:
                extras = {"", *root_extras.get(name, set())}
                if not any(req.marker.evaluate({**env, "extra": e}) for e in extras):
                    continue
                req.marker = None
            wanted.append((str(req), name))
    return {"unmet": check_requirements(wanted, installed, env), "distributions": len(installed)}


def _this_marker_env() -> dict[str, str]:
    return dict(default_environment())


def checkout_packages(root: Path = ROOT) -> tuple[list[str], dict[str, Path]]:
    """The checkout's import packages (top-level names), and aliases the target must carry for a layout that
    maps an import name onto another folder (`[tool.setuptools] package-dir`)."""
    with (root / "pyproject.toml").open("rb") as fh:
        tool = tomllib.load(fh).get("tool", {}).get("setuptools", {})
    pkg_dir: dict[str, str] = tool.get("package-dir", {}) or {}
    packages = tool.get("packages")
    if isinstance(packages, list):
        names = sorted({p.split(".")[0] for p in packages})
    else:  # packages.find or none: every top-level folder that is a package, bar the ones that never ship
        names = sorted(p.name for p in root.iterdir() if (p / "__init__.py").is_file()
                       and p.name not in {"tests", "benchmarks", "scripts", "docs"})
    # Only a top-level name needs carrying; a dotted one (stopstorm.users = "users") is reached through its parent,
    # which in a checkout holds symlinks to those folders.
    aliases = {name: (root / d).resolve() for name, d in pkg_dir.items()
               if name and "." not in name and not (root / name).exists()}
    return names, aliases


def _child_imports(packages: Sequence[str], gpu: int | None) -> dict[str, Any]:
    """In the run's environment: import locust first (gevent patches, as every locustfile does), then every
    module of the checkout's packages; on a GPU run also torch on that device and NVML."""
    import importlib
    import pkgutil
    import traceback

    done, failed = 0, []
    versions: dict[str, str] = {}
    try:
        import locust  # noqa: F401
    except Exception as exc:
        return {"ok": 0, "failed": [{"module": "locust", "error": f"{type(exc).__name__}: {exc}"}], "versions": {}}
    for pkg in packages:
        try:
            mod = importlib.import_module(pkg)
            done += 1
        except Exception as exc:
            failed.append({"module": pkg, "error": f"{type(exc).__name__}: {exc}"})
            continue
        for info in pkgutil.walk_packages(getattr(mod, "__path__", []), prefix=f"{pkg}."):
            if info.name.rsplit(".", 1)[-1] == "__main__":
                continue
            try:
                importlib.import_module(info.name)
                done += 1
            except Exception as exc:
                failed.append({"module": info.name, "error": f"{type(exc).__name__}: {exc}",
                               "where": traceback.format_exc(limit=-2).strip().splitlines()[-3:]})
    from importlib import metadata

    for dist in ("locust", "gevent", "geventhttpclient", "openai", "httpx", "requests", "fastapi", "uvicorn",
                 "orjson", "nvidia-ml-py", "matplotlib", "torch"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    if gpu is not None:
        try:
            import torch

            x = torch.ones(64, 64, device=f"cuda:{gpu}", dtype=torch.float16)
            torch.mm(x, x)
            torch.cuda.synchronize(gpu)
            done += 1
        except Exception as exc:
            failed.append({"module": "torch (cuda)", "error": f"{type(exc).__name__}: {exc}"})
        try:
            import pynvml

            pynvml.nvmlInit()
            versions["nvidia driver"] = str(pynvml.nvmlSystemGetDriverVersion())
            pynvml.nvmlShutdown()
            done += 1
        except Exception as exc:
            failed.append({"module": "pynvml (NVML)", "error": f"{type(exc).__name__}: {exc}"})
    return {"ok": done, "failed": failed, "versions": versions}


def _child_gpu_info(gpu: int) -> dict[str, Any]:
    """torch and CUDA as the image has them, before anything of the kit is on the path."""
    out: dict[str, Any] = {"python": platform.python_version()}
    try:
        import torch
    except Exception as exc:
        out["error"] = f"torch is not importable ({type(exc).__name__}: {exc})"
        return out
    out["torch"] = torch.__version__
    out["cuda"] = torch.version.cuda
    try:
        if not torch.cuda.is_available():
            out["error"] = f"torch {torch.__version__} sees no CUDA device (built for CUDA {torch.version.cuda})"
            return out
        count = torch.cuda.device_count()
        out["devices"] = [torch.cuda.get_device_name(i) for i in range(count)]
        if not 0 <= gpu < count:
            out["error"] = f"CUDA device {gpu} is not there ({count} visible)"
    except Exception as exc:
        out["error"] = f"CUDA does not start ({type(exc).__name__}: {exc})"
    return out


def _child(args: argparse.Namespace) -> int:
    """A hidden subcommand run in the run's environment; prints one JSON document."""
    if args.what == "requirements":
        doc = _child_requirements(Path(args.target))
    elif args.what == "imports":
        doc = _child_imports(args.packages.split(",") if args.packages else [], args.gpu)
    else:
        doc = _child_gpu_info(args.gpu if args.gpu is not None else 0)
    sys.stdout.write("\n" + json.dumps(doc) + "\n")
    return 0


# --- run: the steps ---------------------------------------------------------------------------------------------


@dataclass
class Steps:
    """Each step's name and seconds, printed as it ends and kept for kit-run.json."""

    started: float = field(default_factory=time.monotonic)
    done: list[dict[str, Any]] = field(default_factory=list)

    def run(self, name: str, fn: Any, *a: Any) -> Any:
        n = len(self.done) + 1
        _say(f"[{n}] {name} ...")
        t0 = time.monotonic()
        try:
            result = fn(*a)
        except KitError:
            self.done.append({"step": name, "seconds": round(time.monotonic() - t0, 2), "ok": False})
            _say(f"[{n}] {name}: failed after {time.monotonic() - t0:.1f} s")
            raise
        self.done.append({"step": name, "seconds": round(time.monotonic() - t0, 2), "ok": True})
        _say(f"[{n}] {name}: {time.monotonic() - t0:.1f} s")
        return result

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def _env_for(target: Path | None) -> dict[str, str]:
    """The children's environment: the target, then the checkout, in front of the image (and any PYTHONPATH
    the image already sets, e.g. for its torch). CUDA numbered as NVML numbers GPUs, so `--gpu N` is one GPU."""
    env = dict(os.environ)
    front = [str(target)] if target is not None else []
    env["PYTHONPATH"] = os.pathsep.join([*front, str(ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env["PYTHONNOUSERSITE"] = "1"
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env["MPLBACKEND"] = "Agg"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _child_json(what: str, env: dict[str, str], extra: Sequence[str] = (), timeout: float = 180.0) -> dict[str, Any]:
    cmd = [sys.executable, "-s", str(Path(__file__).resolve()), "_child", what, *extra]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise KitError(f"the {what} check took over {timeout:.0f} s") from None
    last = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    try:
        doc: dict[str, Any] = json.loads(last[0])
        return doc
    except (IndexError, ValueError):
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
        raise KitError(f"the {what} check failed (exit {proc.returncode}): {tail}") from None


def _install(wheels: list[Path], target: Path, python_version: str | None) -> int:
    """pip install these files into `target`, no index, no dependencies (each dependency is a file here too).
    With `python_version` (not this interpreter's), only unpacked for that target: pip's cross-install."""
    if not wheels:
        return 0
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet", "--no-compile",
           "--disable-pip-version-check", "--target", str(target)]
    if python_version is not None:
        cmd += _pip_target_args(python_version)
    _pip([*cmd, *map(str, wheels)], f"installing {len(wheels)} wheels into {target}")
    return len(wheels)


def _kit_files(folder: Path, manifest: dict[str, Any], group: str, names: Iterable[str] | None = None) -> list[Path]:
    sub = folder if group == "wheels" else folder / SPARE_DIR
    keep = None if names is None else set(names)
    return [sub / w["file"] for w in manifest[group] if keep is None or w["name"] in keep]


def _settle_requirements(folder: Path, manifest: dict[str, Any], target: Path, env: dict[str, str],
                         cross: str | None = None) -> dict[str, Any]:
    """Check every requirement; install the spares the image falls short on; check again. Fails if any stays
    unmet. Returns {"spares_installed": [...], "unmet": []}."""
    spares = {s["name"] for s in manifest["spares"]}
    installed: list[str] = []
    for _ in range(4):
        doc = _child_json("requirements", env, ["--target", str(target)])
        unmet = doc["unmet"]
        fixable = sorted({u["name"] for u in unmet if u["name"] in spares and u["name"] not in installed})
        if not unmet:
            return {"spares_installed": installed, "unmet": [], "distributions": doc["distributions"]}
        if not fixable:
            text = "; ".join(f"{u['need']} for {u['by']} (have {u['have'] or 'none'})" for u in unmet)
            raise KitError(f"requirements the image and the kit leave unmet: {text}")
        for name in fixable:
            mine = [u for u in unmet if u["name"] == name]
            wants = ", ".join(sorted({f"{u['need']} ({u['by']})" for u in mine}))
            _say(f"  the image's {name} {mine[0]['have'] or '(none)'} falls short of {wants}: installing the spare")
        _install(_kit_files(folder, manifest, "spares", fixable), target, cross)
        installed += fixable
    raise KitError("the requirements did not settle after installing spares")


def _check_imports(env: dict[str, str], packages: list[str], gpu: int | None) -> dict[str, Any]:
    extra = ["--packages", ",".join(packages)] + (["--gpu", str(gpu)] if gpu is not None else [])
    doc = _child_json("imports", env, extra)
    if doc["failed"]:
        text = "; ".join(f"{f['module']}: {f['error']}" for f in doc["failed"][:6])
        raise KitError(f"{len(doc['failed'])} imports failed in the kit's environment: {text}")
    v = doc["versions"]
    _say(f"  {doc['ok']} modules import; " + ", ".join(f"{k} {val}" for k, val in v.items()))
    return doc


def _locust_step(name: str, argv: list[str], log: Path, env: dict[str, str], timeout_s: float) -> dict[str, Any]:
    """`python -m locust ARGV` from the checkout, its output to `log`; SIGTERM at the deadline (Locust then
    writes a partial report), SIGKILL 30 s later. Prints a line every 30 s so a short reservation sees it live."""
    cmd = [sys.executable, "-s", "-m", "locust", *argv]
    _say(f"  $ {shlex.join(['python', '-m', 'locust', *argv])}")
    _say(f"  (log: {log}; limit {timeout_s:.0f} s)")
    t0 = time.monotonic()
    cut = threading.Event()
    with log.open("w") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def stop() -> None:
            cut.set()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

        timer = threading.Timer(timeout_s, stop)
        timer.start()
        try:
            while True:
                try:
                    rc = proc.wait(timeout=30)
                    break
                except subprocess.TimeoutExpired:
                    if cut.is_set() and time.monotonic() - t0 > timeout_s + 30:
                        proc.kill()
                    _say(f"  ... {name}: {time.monotonic() - t0:.0f} s")
        finally:
            timer.cancel()
    took = time.monotonic() - t0
    result = {"step": name, "exit": rc, "seconds": round(took, 1), "cut": cut.is_set(), "log": str(log)}
    if rc != 0 or cut.is_set():
        tail = log.read_text(errors="replace").strip().splitlines()[-12:]
        for line in tail:
            _say(f"  | {line}")
    return result


def _gpu_sim_args(gpu: int) -> str:
    return "--gpu-work" if gpu == 0 else f"--gpu-work --gpu-work-device {gpu}"


def cmd_run(args: argparse.Namespace) -> int:
    folder, out = Path(args.wheels), Path(args.outdir)
    manifest = _read_manifest(folder)
    local = _read_manifest(Path(args.local_wheels)) if args.local_wheels else None
    if out.exists() and not out.is_dir():
        raise KitError(f"{out} exists and is not a folder", EXIT_USAGE)
    kit_py, here_py = manifest["python_version"], _running_python()
    native = kit_py == here_py and platform.system() == "Linux" and platform.machine() == "x86_64"
    steps = Steps()
    info: dict[str, Any] = {}
    if not args.dry_run:
        if not native:
            raise KitError(f"this kit is for CPython {kit_py} on Linux x86-64, and this is Python {here_py} on "
                           f"{platform.system()} {platform.machine()}; use `run --dry-run` here", EXIT_USAGE)
        info = _child_json("gpu", _env_for(None), ["--gpu", str(args.gpu)], timeout=180)
        if "error" in info:
            raise KitError(f"no GPU to check here: {info['error']}. This step needs a GPU host with torch+CUDA; "
                           "`run --dry-run` checks the rest", EXIT_NO_GPU)
        _say(f"GPU {args.gpu}: {info['devices'][args.gpu]} (torch {info['torch']}, CUDA {info['cuda']}; "
             f"{steps.elapsed():.1f} s to check)")
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"kit": str(folder), "dry_run": args.dry_run, "python": platform.python_version(),
                              "kit_python": kit_py, "checkout": _checkout_rev(manifest), "gpu": info,
                              "steps": steps.done,
                              "not_proven": []}
    target = Path(tempfile.mkdtemp(prefix="stopstorm-gpu-kit-"))
    try:
        return _run_steps(args, folder, out, manifest, local, native, steps, record, target)
    finally:
        record["seconds"] = round(steps.elapsed(), 1)
        (out / "kit-run.json").write_text(json.dumps(record, indent=2) + "\n")
        if args.keep_target:
            _say(f"kept the target: {target}")
        else:
            shutil.rmtree(target, ignore_errors=True)


def _run_steps(args: argparse.Namespace, folder: Path, out: Path, manifest: dict[str, Any],
               local: dict[str, Any] | None, native: bool, steps: Steps, record: dict[str, Any],
               target: Path) -> int:
    kit_py = manifest["python_version"]
    glibc = tuple(manifest.get("glibc", GLIBC))
    not_proven: list[str] = record["not_proven"]

    def check_folder() -> None:
        problems = verify_kit(folder, manifest, target_tags(kit_py, (glibc[0], glibc[1])))
        if local is not None:
            problems += verify_kit(Path(args.local_wheels), local, set(sys_tags()))
            pins = {(w["name"], w["version"]) for w in manifest["wheels"]}
            theirs = {(w["name"], w["version"]) for w in local["wheels"]}
            if pins != theirs:
                problems.append(f"--local-wheels holds another set: {sorted(pins ^ theirs)}")
        if problems:
            raise KitError("the kit folder is not right: " + "; ".join(problems[:5]))
        _say(f"  {len(manifest['wheels'])} wheels and {len(manifest['spares'])} spares, hashes match, every one "
             f"fits CPython {kit_py} manylinux x86-64 (glibc >= {glibc[0]}.{glibc[1]})")

    steps.run("check the kit folder", check_folder)
    names, aliases = checkout_packages()
    use = target  # the target the children import from
    if native:
        steps.run(f"install {len(manifest['wheels'])} wheels offline", _install,
                  _kit_files(folder, manifest, "wheels"), target, None)
        kit_dir, kit_manifest = folder, manifest
    else:
        cross = target / f"cp{kit_py.replace('.', '')}"
        steps.run(f"unpack the {kit_py} wheels offline (pip --target for {kit_py}: not importable here)", _install,
                  _kit_files(folder, manifest, "wheels") + _kit_files(folder, manifest, "spares"), cross, kit_py)
        not_proven.append(f"importing the CPython {kit_py} wheels (this is Python {_running_python()}): their "
                          f"extension modules load only on {kit_py}")
        if local is None:
            not_proven.append("imports and a short run: no --local-wheels for this Python (make them with "
                              f"`gpu_kit.py download DIR --python-version {_running_python()} --same-as {folder}`)")
            _say("  no --local-wheels for this Python: requirements, imports and the short runs are not checked")
            _finish(out, None, None, record, steps)
            return 0
        use = target / "here"
        steps.run(f"install the same {len(local['wheels'])} versions for Python {_running_python()} offline",
                  _install, _kit_files(Path(args.local_wheels), local, "wheels"), use, None)
        kit_dir, kit_manifest = Path(args.local_wheels), local
    for alias, path in aliases.items():  # an import name the checkout maps onto another folder
        (use / alias).symlink_to(path, target_is_directory=True)
    env = _env_for(use)
    req = steps.run("check every requirement against the image (spares where it falls short)",
                    _settle_requirements, kit_dir, kit_manifest, use, env)
    record["spares_installed"] = req["spares_installed"]
    imports = steps.run("import every module of the checkout" + ("" if args.dry_run else ", torch on CUDA, NVML"),
                        _check_imports, env, names, None if args.dry_run else args.gpu)
    record["versions"] = imports["versions"]
    if args.dry_run:
        info = steps.run("look for a GPU (informational in a dry run)", _child_json, "gpu", _env_for(None),
                         ["--gpu", str(args.gpu)])
        record["gpu"] = info
        _say(f"  {info['error']}" if "error" in info else f"  GPUs: {', '.join(info.get('devices', []))}")
        not_proven += ["torch+CUDA, NVML on a real GPU, and the simulator's --gpu-work calibration",
                       "the probe and load run with --gpu-work, their gpu sections, timelines and the 8-minute "
                       "budget (here: short runs without --gpu-work)"]
        probe_argv = ["-f", "probe.py", "--headless", "-u", "1", "-r", "1", "--ignore-eos", "--max-tokens", "40",
                      "--probe-stacks", "requests,openai-async", "--probe-modes", "close", "--probe-repeats", "1",
                      "--probe-stop-tokens", "5", "--probe-early", "none"]
        load_argv = ["-f", "locustfile.py", "--headless", "-u", "2", "-r", "2", "-t", "4s", "--max-tokens", "40",
                     "--think-time", "0.2"]
        sim = ""
        budget = 150.0
    else:
        probe_argv, load_argv, sim, budget = list(PROBE_ARGS), list(LOAD_ARGS), _gpu_sim_args(args.gpu), args.budget_s
        probe_argv += ["--gpu-indices", str(args.gpu)]
        load_argv += ["--gpu-indices", str(args.gpu)]
    runs = {}
    for name, argv in (("probe", probe_argv), ("load", load_argv)):
        report = out / f"{name}-report.json"
        # The probe writes its own report (--probe-report: its records, its GPU section), never --stopstorm-report
        flag = "--probe-report" if name == "probe" else "--stopstorm-report"
        argv = [*argv, flag, str(report), "--sim-log", str(out / f"{name}-simulator.log")]
        if name == "probe":
            argv += ["--probe-json", str(out / "probe.json")]
        if sim:  # with "=": a lone "--gpu-work" after "--sim-args" is read by argparse as an option of its own
            argv.append(f"--sim-args={sim}")
        left = budget - steps.elapsed()
        limit = max(60.0, left - LOAD_RESERVE_S) if name == "probe" else max(30.0, left - 10.0)
        label = ("a short " if args.dry_run else "the ") + ("probe" if name == "probe" else "load run") + \
            ("" if args.dry_run else " with --gpu-work")
        runs[name] = steps.run(label, _locust_step, name, argv, out / f"{name}.log", env, limit)
        if not report.is_file():
            _say(f"  {name}: no report at {report}")
    record["runs"] = runs
    return _finish(out, out / "probe-report.json", out / "load-report.json", record, steps)


def _finish(out: Path, probe: Path | None, load: Path | None, record: dict[str, Any], steps: Steps) -> int:
    docs = {}
    with contextlib.suppress(OSError, ValueError):  # the probe's own count and verdict; its report holds the matrix
        probe_doc = json.loads((out / "probe.json").read_text())
        record["probe_streams"] = sum(1 for s in probe_doc.get("streams", []) if not s.get("early"))
        record["probe_verdict"] = list(probe_doc.get("verdict") or [])
    for name, path in (("probe", probe), ("load", load)):
        if path is not None and path.is_file():
            docs[name] = json.loads(path.read_text())
    record["files"] = sorted(p.name for p in out.iterdir() if p.is_file())
    page = summary_page(docs.get("probe"), docs.get("load"), record)
    (out / "summary.md").write_text(page)
    _say("\n" + page)
    _say(f"written to {out}: summary.md, kit-run.json" + (", the reports, GPU timelines and logs" if docs else ""))
    bad = [r for r in record.get("runs", {}).values() if r["exit"] != 0 or r["cut"]]
    if record.get("not_proven"):
        _say("not proven by this run:")
        for line in record["not_proven"]:
            _say(f"  - {line}")
    _say(f"total {steps.elapsed():.1f} s")
    if bad:
        _say("gpu_kit: " + "; ".join(f"{r['step']} exited {r['exit']}" + (" (cut at its limit)" if r["cut"] else "")
                                     for r in bad))
        return EXIT_RUN
    if not record["dry_run"] and not (len(docs) == 2 and all("gpu" in d for d in docs.values())):
        _say("gpu_kit: a report has no gpu section (see meta.gpu.off in it)")
        return EXIT_RUN
    return 0


def _checkout_rev(manifest: dict[str, Any]) -> str:
    """This checkout's revision; a copy carried without .git says the one the kit was downloaded in."""
    rev = _git_rev()
    made = manifest.get("made_with", {}).get("checkout")
    return rev if rev != "unknown" or not made else f"{made} (when the kit was downloaded; no git here)"


def _git_rev() -> str:
    try:
        proc = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=10)
        return proc.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


# --- the one-page summary ---------------------------------------------------------------------------------------


def _val(fig: Any) -> Any:
    return fig.get("value") if isinstance(fig, dict) else None


def _n(fig: Any, digits: int = 1, scale: float = 1.0) -> str:
    v = _val(fig)
    return f"{v * scale:,.{digits}f}" if isinstance(v, int | float) and not isinstance(v, bool) else "–"


def _ms(fig: Any, which: str) -> str:
    v = _val(fig)
    return f"{v[which] * 1e3:,.0f}" if isinstance(v, dict) and isinstance(v.get(which), int | float) else "–"


def _cell_figures(doc: dict[str, Any], stack: str, mode: str) -> dict[str, Any]:
    for c in doc.get("cells", []):
        if c.get("stack") == stack and c.get("close_mode") == mode:
            figures: dict[str, Any] = c.get("figures", {})
            return figures
    return {}


def summary_page(probe: dict[str, Any] | None, load: dict[str, Any] | None, record: dict[str, Any]) -> str:
    """One page from the two report JSONs (schema: metrics/run_report.py `to_json`): per client stack × close
    mode, Stop → GPU idle beside the server's Stop → slot freed, and the wasted energy; per run, energy per
    delivered token and wasted energy. Pure: reads the documents, writes nothing."""
    runs = [("probe", probe), ("load", load)]
    versions = record.get("versions") or {}
    gpu_info = record.get("gpu") or {}
    devices = next((d["gpu"].get("devices") for _, d in runs if d and d.get("gpu")), None)
    dev = (", ".join(f"{x.get('index')}: {x.get('name')}" for x in devices) if devices
           else ", ".join(gpu_info.get("devices", [])) or gpu_info.get("error") or "none read")
    lines = ["# stopstorm GPU check" + (" (dry run: short runs, no GPU work)" if record.get("dry_run") else ""), "",
             f"- GPU: {dev}; NVIDIA driver {versions.get('nvidia driver', '–')}; torch {gpu_info.get('torch', '–')}, "
             f"CUDA {gpu_info.get('cuda', '–')}",
             f"- Python {record.get('python')}; checkout {record.get('checkout')}; "
             f"locust {versions.get('locust', '–')}, "
             f"gevent {versions.get('gevent', '–')}, openai {versions.get('openai', '–')}, nvidia-ml-py "
             f"{versions.get('nvidia-ml-py', '–')}"]
    if record.get("steps"):
        lines.append("- steps: " + "; ".join(f"{s['step']} {s['seconds']:.1f} s" for s in record["steps"]) +
                     f" (total {sum(s['seconds'] for s in record['steps']):.1f} s)")
    for name, doc in runs:
        if doc is None:
            lines.append(f"- {name}: no report")
        elif not doc.get("gpu"):
            off = (doc.get("meta", {}).get("gpu") or {}).get("off", "no GPU source was read")
            lines.append(f"- {name}: no GPU figures ({off})")
        if doc is not None and doc.get("meta", {}).get("partial"):
            lines.append(f"- {name}: partial ({doc['meta'].get('partial_reason')}): figures cover it until then")
    judged = record.get("probe_streams")
    if probe is not None and judged and not _val(probe.get("overall", {}).get("figures", {}).get("streams")):
        lines.append(f"- probe: its {judged} streams are in probe.json but not in its report (a probe that does not "
                     "write its own report, --probe-report), so the report has no Stop marks: no per-stack Stop → "
                     "GPU idle and no energy per delivered token from the probe")
    lines.append("")
    if record.get("probe_verdict"):
        lines += ["## The probe's verdict", "", *(f"- {v}" for v in record["probe_verdict"]), ""]
    cells = [(name, doc, c) for name, doc in runs if doc and doc.get("gpu") for c in doc["gpu"].get("cells", [])]
    if cells:
        lines += ["## Per client stack × close mode", "",
                  "| run | stack | close mode | Stop → slot freed p50 ms | stops that left the GPU idle | "
                  "Stop → GPU idle p50 ms | max ms | wasted energy J | wasted GPU-s |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for name, doc, c in cells:
            freed = _cell_figures(doc, c["stack"], c["close_mode"]).get("abort_latency")
            lines.append(f"| {name} | {c['stack']} | {c['close_mode']} | {_ms(freed, 'p50')} | "
                         f"{_n(c.get('idle_stops'), 0)} | {_ms(c.get('stop_to_idle'), 'p50')} | "
                         f"{_ms(c.get('stop_to_idle'), 'max')} | {_n(c.get('wasted_energy'))} | "
                         f"{_n(c.get('wasted_gpu_seconds'), 2)} |")
        lines.append("")
    lines += ["## Per run", "", "| figure | probe | load |", "|---|---:|---:|"]

    def row(label: str, get: Any) -> None:
        lines.append(f"| {label} | " + " | ".join(get(d) if d else "–" for _, d in runs) + " |")

    def gpu(key: str, digits: int) -> Any:
        return lambda d: _n(d["gpu"].get(key), digits) if d.get("gpu") else "–"

    def overall(key: str) -> Any:
        return lambda d: _n(d.get("overall", {}).get("figures", {}).get(key), 0)

    row("energy per delivered token J", gpu("energy_per_delivered_token", 4))
    row("wasted energy J", gpu("wasted_energy", 1))
    row("energy J", gpu("energy", 1))
    row("mean power W", gpu("mean_power", 1))
    row("GPU-busy seconds", gpu("gpu_busy_seconds", 2))
    row("wasted GPU-seconds", gpu("wasted_gpu_seconds", 2))
    row("Stop → GPU idle p50 / max ms", lambda d: f"{_ms(d['gpu'].get('stop_to_idle'), 'p50')} / "
        f"{_ms(d['gpu'].get('stop_to_idle'), 'max')} ({_n(d['gpu'].get('idle_stops'), 0)} stops)"
        if d.get("gpu") else "–")
    row("streams / stopped / aborted", lambda d: " / ".join(overall(k)(d) for k in ("streams", "stopped", "aborted")))
    row("tokens read / wasted", lambda d: f"{overall('goodput_tokens')(d)} / {overall('wasted_tokens')(d)}")
    row("run seconds", lambda d: _n(d.get("run", {}).get("figures", {}).get("duration"), 1))
    lines.append("")
    with_gpu = [(name, d["gpu"]) for name, d in runs if d and d.get("gpu")]
    if with_gpu:
        def source(key: str) -> str:
            known = [g[key]["source"] for _, g in with_gpu if isinstance(g.get(key), dict) and _val(g[key]) is not None]
            return known[0] if known else "unavailable"

        g0 = with_gpu[0][1]
        lines.append(f"Sources: energy {source('energy')}; wasted energy {source('wasted_energy')}; Stop → GPU idle "
                     f"{source('stop_to_idle')}. Idle = utilisation ≤ {g0.get('idle_pct')} % on every GPU read, read "
                     f"every {g0.get('interval_s')} s. Wasted = energy × wasted ÷ generated tokens (an attribution, "
                     "idle power included).")
        for name, g in with_gpu:  # why a figure is "–": its note, once per run
            why = sorted({f"{k.replace('_', ' ')}: {f['note']}" for k, f in g.items()
                          if isinstance(f, dict) and f.get("note") and _val(f) is None})
            if why:
                lines.append(f"- {name}, no value for " + "; ".join(why))
        lines += [f"- {name}: {g['errors']} GPU read errors (last: {g.get('last_error')})"
                  for name, g in with_gpu if g.get("errors")]
        lines.append("")
    if record.get("files"):
        lines += ["Files: " + ", ".join(record["files"]), ""]
    return "\n".join(lines)


# --- the command line -------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_kit.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="on a connected machine: fetch the wheels the GPU image lacks into DIR")
    d.add_argument("dir", metavar="DIR", help="the kit folder (git-ignored as gpu-kit*/ in the checkout)")
    d.add_argument("--python-version", default=TARGET_PYTHON,
                   help=f"CPython the kit is for (default {TARGET_PYTHON}, the image's)")
    d.add_argument("--same-as", metavar="KIT", default="",
                   help="pin every version to another kit's (for a dry run's wheels on a machine with another Python)")
    r = sub.add_parser("run", help="on the GPU host, offline: install the kit, run the probe and a load run on the GPU")
    r.add_argument("wheels", metavar="WHEELS", help="the kit folder `download` made")
    r.add_argument("outdir", metavar="OUTDIR", help="where the reports, timelines and summary go")
    r.add_argument("--dry-run", action="store_true",
                   help="check everything but the GPU: install, requirements, imports, short runs without --gpu-work")
    r.add_argument("--local-wheels", metavar="DIR", default="",
                   help="dry runs on another Python: the same versions for this Python (download --python-version "
                   "X --same-as WHEELS)")
    r.add_argument("--gpu", type=int, default=0, help="the GPU to load and read (NVML / PCI order; default 0)")
    r.add_argument("--budget-s", type=float, default=BUDGET_S, help=f"the whole run's limit (default {BUDGET_S:.0f})")
    r.add_argument("--keep-target", action="store_true", help="keep the temporary install (its path is printed)")
    c = sub.add_parser("_child")  # run in the kit's environment by `run`; not for people
    c.add_argument("what", choices=["requirements", "imports", "gpu"])
    c.add_argument("--target", default="")
    c.add_argument("--packages", default="")
    c.add_argument("--gpu", type=int, default=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "download":
            return cmd_download(args)
        if args.command == "run":
            return cmd_run(args)
        return _child(args)
    except KitError as exc:
        print(f"gpu_kit: {exc}", file=sys.stderr, flush=True)
        return exc.code
    except KeyboardInterrupt:
        print("gpu_kit: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
