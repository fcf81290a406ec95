#!/usr/bin/env bash
# Download every wheel the image needs into docker/wheels/, on the host, so that `docker build`
# installs them with `pip install --no-index` and never touches the network (without them it installs
# from the package index instead).
#
# The image's Python must have the same minor version as the host's (docker/build-base.sh picks a
# Debian release that matches), because pip selects wheels for the interpreter that runs it.
# torch from PyPI is the CUDA build: expect several GB (the NVIDIA libraries come with it).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${SIAM_WHEELS_DIR:-$root/docker/wheels}"
python="${PYTHON:-python3}"
mkdir -p "$dest"

# The list the image installs (docker/requirements.py: pyproject.toml's dependencies and the build tools).
requirements="$dest/requirements.txt"
"$python" "$root/docker/requirements.py" "$root/pyproject.toml" >"$requirements"

echo "downloading wheels for: $(tr '\n' ' ' <"$requirements")"
"$python" -m pip download --quiet --only-binary=:all: --dest "$dest" --requirement "$requirements" 2>&1 |
  { grep -v "is ignored: it is neither a file nor a directory" || true; }
echo "wheels in $dest: $(find "$dest" -name '*.whl' | wc -l) files, $(du -sh "$dest" | cut -f1)"
