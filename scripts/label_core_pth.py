"""Let the MONAI Label venv see the core environment's packages (torch, MONAI, ignite, ...), after its own.

Run with the CORE interpreter (stdlib only)::

    CORE_PYTHON scripts/label_core_pth.py LABEL_VENV

It asks the running (core) interpreter where its packages live -- ``sysconfig`` purelib/platlib, then the
other ``site.getsitepackages()`` folders (e.g. Debian's dist-packages) and the user site when enabled -- and
writes ``zz-qgssl-core-environment.pth`` into the label venv's site-packages. That file runs
``site.addsitedir`` on each folder, which APPENDS it to ``sys.path`` and processes its own ``.pth`` files, so
the label venv's own packages (numpy<2, pandas<3) stay first. This works whether the core environment is a
venv or the system Python; ``venv --system-site-packages`` does not, because a venv's "system" site-packages
are its base interpreter's, not the venv's. Prints the folders it added, one per line.
"""

from __future__ import annotations

import site
import subprocess
import sys
import sysconfig
from pathlib import Path

PTH_NAME = "zz-qgssl-core-environment.pth"  # "zz": processed after the label venv's own .pth files


def core_site_dirs() -> list[str]:
    """The running interpreter's package folders, in its own ``sys.path`` priority, existing ones only."""
    paths = sysconfig.get_paths()
    candidates = [paths["purelib"], paths["platlib"], *site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        candidates.append(site.getusersitepackages())
    dirs: list[str] = []
    for candidate in candidates:
        resolved = str(Path(candidate).resolve())
        if Path(resolved).is_dir() and resolved not in dirs:
            dirs.append(resolved)
    return dirs


def label_site_packages(label_venv: Path) -> Path:
    """The label venv's purelib, asked from its own interpreter."""
    python = label_venv / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"label_core_pth.py: {python} does not exist (create the venv first)")
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    )
    return Path(out.stdout.strip())


def write_pth(label_venv: Path, dirs: list[str]) -> Path:
    target = label_site_packages(label_venv)
    own = str(target.resolve())
    lines = [
        "# written by scripts/label_core_pth.py: the core environment's packages, after this venv's own",
        *(f"import site; site.addsitedir({d!r})" for d in dirs if d != own),
    ]
    path = target / PTH_NAME
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    dirs = core_site_dirs()
    write_pth(Path(argv[0]), dirs)
    print("\n".join(dirs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
