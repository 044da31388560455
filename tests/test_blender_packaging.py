"""``make addon``'s zip: manifest fields Blender requires, layout, vendored protocol, and
the add-on imported from the zip the way Blender imports an extension."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from blender_addon import packaging

REQUIRED = (
    "schema_version",
    "id",
    "version",
    "name",
    "tagline",
    "maintainer",
    "type",
    "blender_version_min",
    "license",
)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def test_manifest_has_what_blender_validates():
    m = packaging.manifest()
    missing = [k for k in REQUIRED if k not in m]
    assert not missing, missing
    assert m["schema_version"] == "1.0.0" and m["type"] == "add-on"
    assert re.fullmatch(r"[a-z][a-z0-9_]*", m["id"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", m["version"])
    assert len(m["tagline"]) <= 64 and m["tagline"][-1] not in ".!?,;:"
    assert _version(m["blender_version_min"]) >= (4, 2, 0)
    assert m["license"] and all(lic.startswith("SPDX:") for lic in m["license"])
    assert "network" in m["permissions"]
    assert set(m["platforms"]) == set(packaging.PLATFORM_TAGS)


def test_zip_layout_and_wheels_listed_match_the_files(tmp_path):
    fake = tmp_path / "wheels"
    fake.mkdir()
    names = ["pyzmq-27.1.0-cp311-cp311-win_amd64.whl", "msgpack-1.1.2-cp311-cp311-win_amd64.whl"]
    for n in names:
        (fake / n).write_bytes(b"PK")
    target = packaging.build(tmp_path / "dist", sorted(fake.iterdir()))
    assert target.name == "splatface-0.1.0.zip"
    with zipfile.ZipFile(target) as z:
        files = set(z.namelist())
        shipped = tomllib.loads(z.read("blender_manifest.toml").decode())
    assert {
        "blender_manifest.toml",
        "__init__.py",
        "engine.py",
        "core/camera.py",
        "protocol/__init__.py",
        "protocol/client.py",
        "protocol/SPEC.md",
    } <= files
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)
    assert "packaging.py" not in files
    assert sorted(shipped["wheels"]) == sorted(f"./wheels/{n}" for n in names)
    assert {f for f in files if f.startswith("wheels/")} == {f"wheels/{n}" for n in names}
    # every requirement downloaded is one the manifest's wheels are named after
    assert {r.split("==")[0] for r in packaging.WHEEL_REQUIREMENTS} == {"pyzmq", "msgpack"}


def test_only_the_addons_modules_ship(tmp_path, monkeypatch):
    import shutil

    addon = tmp_path / "blender_addon"
    shutil.copytree(packaging.ADDON_DIR, addon, ignore=shutil.ignore_patterns("__pycache__"))
    expected = {"blender_manifest.toml"} | {
        p.relative_to(addon).as_posix() for p in addon.rglob("*.py") if p.name != "packaging.py"
    }
    strays = ["ops.py~", ".ops.py.swp", ".DS_Store", "notes.txt", "ops.py.orig",
              "core/__pycache__/camera.cpython-311.pyc", "core/scratch copy.py"]  # fmt: skip
    for name in strays:
        (addon / name).parent.mkdir(parents=True, exist_ok=True)
        (addon / name).write_text("stray")
    monkeypatch.setattr(packaging, "ADDON_DIR", addon)
    with zipfile.ZipFile(packaging.build(tmp_path / "dist")) as z:
        shipped = {f for f in z.namelist() if not f.startswith("protocol/")}
    assert shipped == expected


def test_a_failed_build_leaves_no_zip(tmp_path):
    out = tmp_path / "dist"
    with pytest.raises(FileNotFoundError):
        packaging.build(out, [tmp_path / "missing-1.0-py3-none-any.whl"])
    assert list(out.iterdir()) == []


def unpacked_as_extension(tmp_path: Path) -> Path:
    """The built zip unpacked as ``ext_test.user_default.splatface`` under the returned
    folder (bpy owns ``bl_ext`` itself), as Blender lays out an installed extension."""
    target = packaging.build(tmp_path / "dist")
    root = tmp_path / "ext"
    pkg = root / "ext_test" / "user_default" / "splatface"
    pkg.mkdir(parents=True)
    for p in (root / "ext_test", root / "ext_test" / "user_default"):
        (p / "__init__.py").write_text("")
    zipfile.ZipFile(target).extractall(pkg)
    return root


@pytest.mark.slow
def test_extension_from_zip_registers_with_vendored_protocol(tmp_path):
    root = unpacked_as_extension(tmp_path)
    script = f"""
import sys
sys.path.insert(0, {str(root)!r})
sys.path = [p for p in sys.path if p not in ("", {str(Path.cwd())!r})]
import bpy, importlib
mod = importlib.import_module("ext_test.user_default.splatface")
mod.register()
from ext_test.user_default.splatface import _protocol
assert _protocol._impl.__name__ == "ext_test.user_default.splatface.protocol", _protocol._impl
assert "protocol" not in sys.modules, "the repository's protocol leaked in"
assert "torch" not in sys.modules
bpy.context.scene.render.engine = "SPLATFACE"
assert hasattr(bpy.ops.splatface, "build")
mod.unregister()
print("OK")
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_a_module_the_extension_lacks_is_named(tmp_path):
    """Blender's Python has no pyzmq without the zip's wheels: the error names it (it said
    "No module named 'protocol'", from a fallback meant for checkouts)."""
    root = unpacked_as_extension(tmp_path)
    script = f"""
import sys
sys.path.insert(0, {str(root)!r})
sys.modules["zmq"] = None  # as if absent
try:
    import ext_test.user_default.splatface._protocol
except ImportError as exc:
    print("ERROR", exc)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert "ERROR splatface needs the Python module 'zmq'" in out.stdout, out.stdout + out.stderr
