#!/usr/bin/env bash
# Set up napari-ctp2mri in ./.venv on a fresh Debian/Ubuntu machine.
#   bash scripts/setup.sh          # the plugin, the CLI and napari
#   bash scripts/setup.sh --test   # + headless-Qt system packages and the test extras
# Safe to re-run: every step is idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

mode="${1:-}"
PY="${PYTHON:-python3}"

if [ "$mode" = "--test" ]; then
  # napari under Xvfb needs OpenGL and xcb libraries (QT_QPA_PLATFORM=offscreen breaks vispy).
  pkgs="xvfb libgl1 libegl1 libgl1-mesa-dri libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0
        libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0
        libxcb-shape0 libxcb-cursor0 libdbus-1-3 libfontconfig1"
  missing=$(dpkg-query -W -f='${Package} ${Status}\n' $pkgs 2>/dev/null | grep -vc "install ok installed" || true)
  if ! command -v xvfb-run >/dev/null || [ "$missing" != "0" ]; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $pkgs >/dev/null
  fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
if [ "$mode" = "--test" ]; then
  .venv/bin/python -m pip install -q -e ".[testing]"
else
  .venv/bin/python -m pip install -q -e ".[napari]"
fi
echo "napari-ctp2mri is set up in .venv (activate with: source .venv/bin/activate)"
