#!/usr/bin/env bash
# Installs every build dependency of flexcp from Debian packages. Idempotent: a second run on a
# ready machine installs nothing and takes a second.
set -euo pipefail

PKGS=(build-essential cmake ninja-build ccache pkg-config git
      libtorch-dev catch2 libcli11-dev libyaml-cpp-dev libspdlog-dev libfmt-dev
      nlohmann-json3-dev libpcre2-dev libopenmpi-dev openmpi-bin gnuplot-nox nodejs npm
      libopenblas0-pthread)  # LibTorch on CPU calls BLAS: OpenBLAS is ~20x the reference libblas

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# nodejs/npm may come from elsewhere (e.g. a preinstalled Node): accept any working npm.
if command -v npm >/dev/null 2>&1; then
  missing=("${missing[@]/nodejs}"); missing=("${missing[@]/npm}")
fi
want=()
for p in "${missing[@]}"; do [ -n "$p" ] && want+=("$p"); done
if [ ${#want[@]} -gt 0 ]; then
  echo "setup: installing ${want[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
fi
echo "setup: build dependencies ready"
