#!/usr/bin/env bash
# Build a minimal Debian base image (python3 + venv) with debootstrap and `docker import`, for hosts
# that can reach a Debian mirror but no image registry.
#   docker/build-base.sh [TAG [EXTRA_DEBIAN_PACKAGE...]]
# docker/smoke-test.sh also makes siam-tools:local this way (with prometheus and nginx-light), to stand
# in for the Prometheus and nginx images where no registry is reachable.
#
# The Debian release is chosen so that its python3 has the host's minor version: docker/wheels/ is
# downloaded by the host's pip, for the host's interpreter. Needs root, debootstrap and docker.
set -euo pipefail

tag="${1:-${SIAM_BASE_IMAGE:-siam-base:local}}"
packages="python3,python3-venv,ca-certificates"
for extra in "${@:2}"; do packages="$packages,$extra"; done
python="${PYTHON:-python3}"

minor="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
case "$minor" in
  3.11) suite=bookworm ;;
  3.13) suite=trixie ;;
  *) echo "build-base: no Debian release ships Python $minor; use a python:$minor-slim base instead" >&2
     exit 2 ;;
esac

# The Debian mirror: SIAM_DEBIAN_MIRROR, else the one this host's apt uses (its sources files).
mirror="${SIAM_DEBIAN_MIRROR:-$("$python" "$(dirname "$0")/debian_mirror.py" --suite "$suite" || true)}"
if [[ -z "$mirror" ]]; then
  echo "build-base: no Debian mirror: this host's apt sources (/etc/apt/sources.list, sources.list.d/) list" \
    "none, and SIAM_DEBIAN_MIRROR is unset; set it to your Debian archive mirror's URL," \
    "e.g. SIAM_DEBIAN_MIRROR=http://<your-mirror>/debian docker/build-base.sh" >&2
  exit 2
fi

if docker image inspect "$tag" >/dev/null 2>&1 && [[ "${SIAM_REBUILD_BASE:-0}" != 1 ]]; then
  echo "build-base: $tag already exists (SIAM_REBUILD_BASE=1 rebuilds it)"
  exit 0
fi

rootfs="$(mktemp -d)"
log="$(mktemp)"
trap 'rm -rf "$rootfs" "$log"' EXIT
echo "build-base: debootstrap $suite (Python $minor) with $packages from $mirror"
debootstrap --variant=minbase --include="$packages" \
  "$suite" "$rootfs" "$mirror" >"$log" 2>&1 || { tail -20 "$log" >&2; exit 1; }
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*

tar -C "$rootfs" --numeric-owner -c . |
  docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$tag" >/dev/null
echo "build-base: $tag ($(docker image inspect --format '{{.Size}}' "$tag" | numfmt --to=iec)) with" \
  "$(docker run --rm "$tag" python3 --version)"
