"""The distribution installs every core subpackage and exposes the CLI and the manifest."""

import configparser
import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _declared_packages() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return {p.strip() for p in cfg["options"]["packages"].split() if p.strip()}


def test_every_subpackage_is_declared():
    # setup.cfg lists packages explicitly (two roots: src_core/ctp2mri and napari_ctp2mri);
    # a subpackage missing there would vanish from a non-editable install.
    found = {"napari_ctp2mri"}
    core = ROOT / "src_core" / "ctp2mri"
    for init in core.rglob("__init__.py"):
        rel = init.parent.relative_to(core.parent)
        found.add(".".join(rel.parts))
    assert found == _declared_packages()


def test_cli_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "ctp2mri.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("phantom", "preprocess", "bench"):
        assert command in out.stdout


GUI_PACKAGES = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "magicgui", "superqt")

# Run in a fresh interpreter: import every module of the ctp2mri package, then print (last line,
# JSON) the modules walked, those that failed to import and the GUI packages that came along.
IMPORT_EVERY_MODULE = textwrap.dedent("""
    import importlib, json, pkgutil, sys
    import ctp2mri
    modules, failed = ["ctp2mri"], []
    for info in pkgutil.walk_packages(ctp2mri.__path__, "ctp2mri.", onerror=failed.append):
        if info.name.endswith(".__main__"):  # runs the command line when imported
            continue
        modules.append(info.name)
        try:
            importlib.import_module(info.name)
        except Exception as exc:
            failed.append(f"{info.name}: {exc!r}")
    gui = sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[1:])
    print(json.dumps({"modules": modules, "failed": failed, "gui": gui}))
""")


def test_no_core_module_imports_qt_or_napari():
    """The core is Qt-free: no module of ctp2mri imports Qt, napari, magicgui or superqt."""
    out = subprocess.run([sys.executable, "-c", IMPORT_EVERY_MODULE, *GUI_PACKAGES], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["failed"] == []
    core = ROOT / "src_core" / "ctp2mri"
    files = {".".join(path.relative_to(core.parent).with_suffix("").parts).removesuffix(".__init__")
             for path in core.rglob("*.py") if path.name != "__main__.py"}
    assert sorted(result["modules"]) == sorted(files)  # the walk reached every source file
    assert result["gui"] == [], f"importing the core brought in {result['gui']}"
