#!/bin/sh
# Install the image's Python dependencies into /opt/venv (run by docker/Dockerfile's first stage).
# With wheels in /wheels (docker/download-wheels.sh put them in docker/wheels/) it installs offline from
# them alone; with none it installs from the package index: PyPI, or the build arguments PIP_INDEX_URL,
# PIP_EXTRA_INDEX_URL and PIP_TRUSTED_HOST (a mirror, or PyTorch's own index for another CUDA build).
# SIAM_WHEELS, SIAM_VENV and SIAM_REQUIREMENTS move the three paths (tests run it outside Docker).
set -eu
wheels_dir="${SIAM_WHEELS:-/wheels}"
venv="${SIAM_VENV:-/opt/venv}"
requirements="${SIAM_REQUIREMENTS:-/build/requirements.txt}"  # made from pyproject.toml by docker/requirements.py
# Build arguments that were not given reach us as empty strings, which pip would take literally.
[ -n "${PIP_INDEX_URL:-}" ] || unset PIP_INDEX_URL
[ -n "${PIP_EXTRA_INDEX_URL:-}" ] || unset PIP_EXTRA_INDEX_URL
[ -n "${PIP_TRUSTED_HOST:-}" ] || unset PIP_TRUSTED_HOST
wheels=$(find "$wheels_dir" -maxdepth 1 -name '*.whl' | wc -l)
if [ "$wheels" -gt 0 ]; then
  echo "install-deps: from the $wheels wheels of docker/wheels/ (offline)"
  exec "$venv/bin/pip" install --no-index --find-links "$wheels_dir" --requirement "$requirements"
fi
echo "install-deps: docker/wheels/ holds no wheels; from ${PIP_INDEX_URL:-https://pypi.org/simple}"
exec "$venv/bin/pip" install --requirement "$requirements"
