#!/usr/bin/env bash
# Installs Debian's dataset-fashion-mnist (idx files in /usr/share/datasets/fashion-mnist) when missing.
set -u
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ] || [ -f "$dir/train-images-idx3-ubyte" ]; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  echo "Fashion-MNIST not found in $dir: installing dataset-fashion-mnist with apt-get"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo_cmd="sudo"
  $sudo_cmd apt-get update -q >/dev/null && $sudo_cmd apt-get install -y -q dataset-fashion-mnist >/dev/null \
    || echo "warning: could not install dataset-fashion-mnist; tests that need it will be skipped"
else
  echo "warning: Fashion-MNIST not found in $dir and apt-get is not available; set OPENSEER_FASHION_MNIST=/path/to/idx-files"
fi
exit 0
