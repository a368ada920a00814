#!/usr/bin/env bash
# Makes the two base images the compose file needs, from Debian's packages, for machines that
# cannot pull from Docker Hub (an air-gapped site, a CI runner behind a registry mirror):
#   luminagrid-local/python:bookworm   Debian's python3 in a venv on PATH (pip works as in python:*-slim)
#   luminagrid-local/redis:bookworm    Debian's redis-server, working directory /data
# Then: PYTHON_IMAGE=luminagrid-local/python:bookworm REDIS_IMAGE=luminagrid-local/redis:bookworm
# in .env (or the environment) and `docker compose up` as usual.
#
# Images that exist already are kept (delete them to remake). Needs root, debootstrap and the
# Debian mirror apt is configured with. The host's CA bundle goes into the images so that builds
# reach PyPI the way the host does (behind a TLS-inspecting proxy too); it never goes into the
# project's Dockerfile.
set -euo pipefail

PYTHON_IMAGE=${1:-luminagrid-local/python:bookworm}
REDIS_IMAGE=${2:-luminagrid-local/redis:bookworm}
SUITE=bookworm
CA=/etc/ssl/certs/ca-certificates.crt

have() { docker image inspect "$1" >/dev/null 2>&1; }
if have "$PYTHON_IMAGE" && have "$REDIS_IMAGE"; then
    echo "base images: $PYTHON_IMAGE and $REDIS_IMAGE already exist"
    exit 0
fi

# The mirror apt already uses (deb822 .sources or one-line sources.list).
mirror=$(grep -h -E '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
         | grep -v security | head -1 | sed -E 's/^URIs: *//; s/^deb (\[[^]]*\] )?//' | awk '{print $1}' || true)
mirror=${mirror:-http://deb.debian.org/debian}

work=$(mktemp -d /tmp/luminagrid-base.XXXXXX)
trap 'umount "$work"/*/proc 2>/dev/null || true; rm -rf "$work"' EXIT
started=$(date +%s)

debootstrap --variant=minbase "$SUITE" "$work/root" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
# The host's apt configuration (sources, snapshot settings) and CA bundle.
cp -a /etc/apt/sources.list.d/. "$work/root/etc/apt/sources.list.d/"
find "$work/root/etc/apt/sources.list.d" -type f ! -name '*.sources' ! -name '*.list' -delete
[ -f /etc/apt/sources.list ] && cp /etc/apt/sources.list "$work/root/etc/apt/sources.list"
cp -a /etc/apt/apt.conf.d/. "$work/root/etc/apt/apt.conf.d/"
mkdir -p "$work/root/usr/local/share/luminagrid"
cp "$CA" "$work/root/usr/local/share/luminagrid/host-ca.crt"
cp /etc/resolv.conf "$work/root/etc/resolv.conf"

# One image: install packages in a copy of the root, clean it, import it with its settings.
image() {  # image NAME SCRIPT CHANGE...
    local name=$1 script=$2 root="$work/$(echo "$1" | tr '/:' '__')"
    shift 2
    if have "$name"; then echo "base images: keeping $name"; return; fi
    cp -a "$work/root" "$root"
    mount -t proc proc "$root/proc"
    chroot "$root" /bin/sh -ec "export DEBIAN_FRONTEND=noninteractive; apt-get update -q >/dev/null;
        $script; apt-get clean; rm -rf /var/lib/apt/lists/*" >"$work/$(basename "$root").log" 2>&1 \
        || { tail -20 "$work/$(basename "$root").log" >&2; umount "$root/proc"; exit 1; }
    umount "$root/proc"
    : >"$root/etc/resolv.conf"
    local changes=() c
    for c in "$@"; do changes+=(--change "$c"); done
    tar -C "$root" -c . | docker import "${changes[@]}" - "$name" >/dev/null
    echo "base images: made $name"
}

host_ca=/usr/local/share/luminagrid/host-ca.crt
image "$PYTHON_IMAGE" \
    "apt-get install -y -q --no-install-recommends python3 python3-venv >/dev/null; python3 -m venv /opt/venv" \
    "ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    "ENV PIP_CERT=$host_ca" "ENV SSL_CERT_FILE=$host_ca" "ENV LANG=C.UTF-8" \
    'CMD ["python3"]'
image "$REDIS_IMAGE" \
    "apt-get install -y -q --no-install-recommends redis-server >/dev/null; mkdir -p /data; chown redis:redis /data" \
    "WORKDIR /data" "USER redis" "VOLUME /data" "EXPOSE 6379" 'CMD ["redis-server", "--protected-mode", "no"]'
echo "base images: $(( $(date +%s) - started )) s"
