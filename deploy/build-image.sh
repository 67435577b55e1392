#!/usr/bin/env bash
# Builds the CPU image the tests run, without a Docker engine: a Debian base made
# with debootstrap and imported with podman, then the Dockerfile built by buildah
# (chroot isolation). The GPU image is the same Dockerfile on vLLM's image:
#   docker build -t IMAGE .            (BASE defaults to vllm/vllm-openai)
#
# usage: deploy/build-image.sh [TAG]   (default localhost/vgate:cpu)
# Downloads are kept between builds: the Debian base (an image in podman's
# store), and every wheel the CPU image installs (build/wheels, mounted at
# /wheels during the build: pip installs from there without the network).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
tag="${1:-localhost/vgate:cpu}"
base="localhost/vgate-debian-min:bookworm"
wheels="$root/build/wheels"
python="${PYTHON:-$root/.venv/bin/python}"

missing=()
for tool in buildah podman debootstrap; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "build-image.sh: installing ${missing[*]} from the system packages"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    buildah podman debootstrap fuse-overlayfs uidmap >/dev/null
fi

if ! podman image exists "$base"; then
  rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs"' EXIT
  echo "build-image.sh: making the Debian base $base (debootstrap)"
  debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
  tar -C "$rootfs" -c . | podman import - "$base" >/dev/null
fi

# The wheels of vgate's dependencies and of vLLM's CPU build, downloaded once for the
# Debian base's Python (3.11 on Debian 12, as here); again only when those change.
needs=$("$python" -c 'import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
print(project["dependencies"], project["optional-dependencies"]["cpu"])' "$root/pyproject.toml")
stamp="$wheels/.requirements"
if [ "$needs" != "$(cat "$stamp" 2>/dev/null)" ]; then
  echo "build-image.sh: downloading the wheels into $wheels"
  mkdir -p "$wheels"
  # setuptools and wheel: pip builds vgate itself in the image from them. `pip wheel`
  # also builds the few dependencies PyPI has only as sources (same Debian release).
  "$python" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$wheels" \
    "$root[cpu]" "setuptools>=77" wheel
  rm -f "$wheels"/vgate-*  # vgate itself comes from the build context
  echo "$needs" > "$stamp"
fi

echo "build-image.sh: building $tag"
buildah bud --isolation chroot --layers --quiet --format docker \
  --build-arg "BASE=$base" --build-arg EXTRAS=cpu --build-arg VENV=/opt/vgate/venv \
  --build-arg PIP_FIND_LINKS=/wheels --build-arg PIP_NO_INDEX=1 \
  --volume "$wheels:/wheels:ro" \
  -t "$tag" "$root" >/dev/null
echo "build-image.sh: built $tag"
