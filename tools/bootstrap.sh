#!/usr/bin/env bash
# Set-up for `make test` / `make demo`: system packages (when root with apt), a virtual environment in
# .venv, and the project installed in it with every extra this machine can build. Idempotent: the pip
# step is skipped when setup.cfg, the extras and the Python version are unchanged since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
SYS_PKGS=(pkg-config libturbojpeg0-dev libopencv-dev dataset-fashion-mnist slurm-wlm munge)
FMNIST_DIR=/usr/share/datasets/fashion-mnist

is_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

missing=()
if command -v dpkg-query >/dev/null; then
  for p in "${SYS_PKGS[@]}"; do is_installed "$p" || missing+=("$p"); done
else
  missing=("${SYS_PKGS[@]}")
fi
if ((${#missing[@]})) && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "setup: installing system packages: ${missing[*]}"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}") >/tmp/rsb-apt.log 2>&1 || echo "setup: apt-get failed (log: /tmp/rsb-apt.log)"
  missing=()
  for p in "${SYS_PKGS[@]}"; do is_installed "$p" || missing+=("$p"); done
fi

extras=dali,wandb,sweep,dev
have_ffcv_deps=1
pkg-config --exists libturbojpeg 2>/dev/null && pkg-config --exists opencv4 2>/dev/null || have_ffcv_deps=0
if ((have_ffcv_deps)); then
  extras="ffcv,$extras"
fi
if ((${#missing[@]})); then
  echo "setup: missing system packages: ${missing[*]} (as root: apt-get install ${missing[*]})"
  ((have_ffcv_deps)) || echo "setup: FFCV is OFF (needs pkg-config, libturbojpeg0-dev, libopencv-dev); ffcv recipes and tests will say so"
  [ -d "$FMNIST_DIR" ] || echo "setup: demo data is OFF (needs dataset-fashion-mnist in $FMNIST_DIR); make demo cannot run"
  command -v slurmd >/dev/null || echo "setup: the Slurm tests are OFF (need slurm-wlm and munge, and root to start a throwaway cluster); CI fails without them"
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
stamp="$VENV/.setup-stamp"
want="$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1) extras=$extras py=$("$VENV/bin/python" -V 2>&1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: .venv up to date (extras: $extras)"
  exit 0
fi
echo "setup: installing the project into .venv with extras [$extras] (first time: a few minutes)"
"$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel 2>&1 | grep -v "^WARNING: Location" || true
# numpy and Cython first: FFCV's source build imports numpy in its setup.py.
"$VENV/bin/python" -m pip install -q "numpy>=2.0,<3" Cython 2>&1 | grep -v "^WARNING: Location" || true
set -o pipefail
"$VENV/bin/python" -m pip install -q -e ".[$extras]" 2>&1 | grep -v "^WARNING: Location" || {
  echo "setup: pip install failed; see the lines above"; exit 1; }
echo "$want" > "$stamp"
echo "setup: done (extras: $extras)"
