"""Write and check the exact-version lock the README's two commands install from.

Standard library only: it runs before anything else is installed.

    python tools/lockfile.py freeze OUT   # OUT := this venv's packages, exact versions (make lock)
    python tools/lockfile.py check LOCK   # exit 1 unless this venv holds exactly LOCK's versions

A local version label (``torch==2.13.0+cpu``) is written without it (``torch==2.13.0``): pip then
takes the CPU build where one lies beside the registry (as on our CPU machines) and the registry's
build elsewhere, and both are the locked release. The project itself is not in the lock (it is
installed editable on top, with ``--no-deps``).
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

PROJECT = "tvc-lightning"
HEADER = """\
# Exact versions of every package `make demo` / `make test` install (CPython 3.11, Linux x86-64).
# Written by `make lock` (tools/lockfile.py freeze) from a fresh venv resolved to the newest versions
# pyproject.toml allows; checked after every install by `tools/lockfile.py check`. Edit the ranges in
# pyproject.toml, not this file.
"""


def canonical(name: str) -> str:
    """PEP 503 normalized project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def public(version: str) -> str:
    """A version without its local label: ``2.13.0+cpu`` -> ``2.13.0``."""
    return version.split("+", 1)[0]


def installed() -> dict[str, str]:
    """Canonical name -> public version of every distribution in this interpreter's environment."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found[canonical(name)] = public(dist.version)
    for tool in ("pip", "setuptools", "wheel", PROJECT):  # the venv's own tools and the project
        found.pop(tool, None)
    return found


def read_lock(path: Path) -> dict[str, str]:
    """Canonical name -> version of a lock file's ``name==version`` lines."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if match is None:
            raise SystemExit(f"{path}:{number}: not an exact pin (name==version): {raw!r}")
        pins[canonical(match[1])] = match[2]
    return pins


def freeze(out: Path) -> None:
    pins = installed()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(HEADER + "".join(f"{name}=={pins[name]}\n" for name in sorted(pins)))
    print(f"wrote {len(pins)} pins to {out}")


def check(lock: Path) -> int:
    pins, have = read_lock(lock), installed()
    wrong = [f"  {n}: locked {v}, installed {have[n]}"
             for n, v in sorted(pins.items()) if n in have and have[n] != v]
    missing = [f"  {n}=={v}" for n, v in sorted(pins.items()) if n not in have]
    extra = [f"  {n}=={v}" for n, v in sorted(have.items()) if n not in pins]
    if extra:  # e.g. a CUDA build of torch pulls nvidia-* libraries the CPU lock does not list
        print(f"note: installed but not in {lock}:\n" + "\n".join(extra), file=sys.stderr)
    if wrong or missing:
        print(f"the environment does not match {lock}:", file=sys.stderr)
        print("\n".join(wrong + [f"  missing {m.strip()}" for m in missing]), file=sys.stderr)
        print("rebuild it (`rm -rf .venv && make test`), or re-resolve the lock with `make lock`",
              file=sys.stderr)
        return 1
    print(f"environment matches {lock} ({len(pins)} packages)")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("freeze", "check"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "freeze":
        freeze(Path(argv[1]))
        return 0
    return check(Path(argv[1]))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
