#!/usr/bin/env bash
# Build the container base image locally from Debian packages, for machines that cannot pull from a public
# registry (this project's build machines, hospital networks behind an allow-list). The result is a Debian
# bookworm "minbase" with python3.11 and venv support: the same runtime the Dockerfile expects from
# python:3.11-slim-bookworm, only with the interpreter at /usr/bin instead of /usr/local/bin.
#
#   deploy/container/build-base.sh [TAG]        (default localhost/retinagrade-base:bookworm-py311)
#
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian), CONTAINER_ENGINE (default podman).
# Needs root, debootstrap and podman (apt-get install debootstrap podman runc).
set -euo pipefail

tag="${1:-localhost/retinagrade-base:bookworm-py311}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
engine="${CONTAINER_ENGINE:-podman}"

if "$engine" image exists "$tag" 2>/dev/null; then
    echo "base image $tag already present"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap missing: apt-get install debootstrap" >&2; exit 1; }

root="$(mktemp -d /var/tmp/retinagrade-base.XXXXXX)"
trap 'rm -rf "$root"' EXIT

echo "debootstrap bookworm minbase into $root (from $mirror)"
debootstrap --variant=minbase --include=python3-venv,ca-certificates bookworm "$root" "$mirror" >"$root.log" 2>&1 \
    || { tail -30 "$root.log" >&2; exit 1; }
rm -f "$root.log"

# What a runtime image never needs: package lists, docs, man pages, translations, apt caches.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
       "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* \
       "$root"/var/log/*.log "$root"/tmp/*
# Debian's python3.11 is externally managed; images install into their own venv, which is exempt.

tar --numeric-owner -C "$root" -c . | "$engine" import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/usr/bin/python3"]' \
    --message "debootstrap bookworm minbase + python3-venv + ca-certificates" \
    - "$tag" >/dev/null
echo "built base image $tag: $("$engine" image inspect --format '{{.Size}}' "$tag") bytes"
