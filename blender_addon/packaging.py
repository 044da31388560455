"""Build the installable extension zip (``make addon``) without Blender.

``blender --command extension build`` needs the full Blender program, so this assembles
the same layout itself: ``blender_manifest.toml`` at the zip root (with ``wheels`` filled
in), the add-on's modules, the ``protocol`` package vendored as a subpackage (extensions
may use relative imports only; ``_protocol.py`` prefers it), and ``wheels/`` with pyzmq
and msgpack for every platform, fetched with ``pip download`` from the package index.

Run: ``python -m blender_addon.packaging --out dist [--no-wheels]``.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

ADDON_DIR = Path(__file__).resolve().parent
REPO = ADDON_DIR.parent
MANIFEST = ADDON_DIR / "blender_manifest.toml"
#: Pinned so a build is repeatable; Blender 4.2-5.0 embed Python 3.11.
WHEEL_REQUIREMENTS = ("pyzmq==27.1.0", "msgpack==1.1.2")
#: Manifest platform → pip ``--platform`` tags to accept.
PLATFORM_TAGS = {
    "linux-x64": ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"),
    "windows-x64": ("win_amd64",),
    "macos-arm64": ("macosx_11_0_arm64", "macosx_10_15_universal2"),
    "macos-x64": ("macosx_10_15_x86_64", "macosx_10_9_x86_64", "macosx_10_15_universal2"),
}
#: What of the add-on's folder ships: its modules only, so an editor's backups, notes or a
#: ``.DS_Store`` lying beside them stay out of the zip. This builder itself stays out.
SHIPPED = re.compile(r"^(?!packaging\.py$)([a-z_][a-z0-9_]*/)*[a-z_][a-z0-9_]*\.py$")


def manifest() -> dict:
    with open(MANIFEST, "rb") as f:
        return tomllib.load(f)


def download_wheels(folder: Path) -> list[Path]:
    """pyzmq and msgpack wheels for every platform of the manifest (network: the index)."""
    folder.mkdir(parents=True, exist_ok=True)
    for platform in manifest()["platforms"]:
        tags = [a for tag in PLATFORM_TAGS[platform] for a in ("--platform", tag)]
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--only-binary=:all:",
                "--no-deps",
                "--python-version",
                "3.11",
                *tags,
                "-d",
                str(folder),
                *WHEEL_REQUIREMENTS,
            ],
            check=True,
        )
    return sorted(folder.glob("*.whl"))


def manifest_text(wheels: list[str]) -> str:
    """The manifest as shipped: the template plus ``wheels = [...]``."""
    text = MANIFEST.read_text(encoding="utf-8")
    if not wheels:
        return text
    listed = ",\n".join(f'  "./wheels/{name}"' for name in wheels)
    line = "# `make addon` fills in `wheels` with the pyzmq and msgpack wheels it bundles.\n"
    return text.replace(line, f"wheels = [\n{listed},\n]\n")


def build(out_dir: Path, wheels: list[Path] | None = None) -> Path:
    """Write ``<out_dir>/splatface-<version>.zip``; returns its path."""
    meta = manifest()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{meta['id']}-{meta['version']}.zip"
    wheels = wheels or []
    partial = target.with_name(f".{target.name}.partial")
    try:  # a build that fails part-way leaves no zip to install
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("blender_manifest.toml", manifest_text([w.name for w in wheels]))
            for path in sorted(ADDON_DIR.rglob("*.py")):
                rel = path.relative_to(ADDON_DIR).as_posix()
                if path.is_file() and SHIPPED.match(rel):
                    z.write(path, rel)
            for path in sorted((REPO / "protocol").iterdir()):
                if path.is_file() and (SHIPPED.match(path.name) or path.name == "SPEC.md"):
                    z.write(path, f"protocol/{path.name}")
            for wheel in wheels:
                z.write(wheel, f"wheels/{wheel.name}")
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "dist")
    parser.add_argument("--no-wheels", action="store_true", help="skip pip download")
    args = parser.parse_args(argv)
    if args.no_wheels:
        wheels: list[Path] = []
        target = build(args.out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            wheels = download_wheels(Path(tmp))
            target = build(args.out, wheels)
    print(f"{target} ({len(wheels)} wheels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
