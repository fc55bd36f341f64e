"""The distribution installs every core subpackage and exposes the CLI and the manifest."""

import configparser
import subprocess
import sys
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


def test_core_does_not_import_qt():
    code = ("import sys, ctp2mri, ctp2mri.io, ctp2mri.casefolder, ctp2mri.cli, ctp2mri.preprocess, "
            "ctp2mri.phantom, ctp2mri.training.child; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('napari', 'qtpy', 'PyQt5', 'PySide2', 'PySide6', 'magicgui')]; print(bad); "
            "sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
