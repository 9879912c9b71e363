#!/usr/bin/env bash
# Builds every image docker-compose.yml runs, on a host that cannot reach a container registry:
#
#   1. debian:bookworm-slim (the tag deploy/Dockerfile's FROM lines use) made locally: a
#      minimal Debian root file system from `debootstrap --variant=minbase`, `docker import`ed.
#      Skipped when the engine already has that tag (pulled or made before).
#   2. PostgreSQL and HAProxy from Debian's packages on that base (deploy/postgres,
#      deploy/haproxy), tagged as docker-compose.yml names them.
#   3. The service images from the host's own build: the binaries are copied into
#      deploy/prebuilt/ and the `<service>-prebuilt` targets of deploy/Dockerfile are built,
#      so the Rust build is not done a second time inside Docker.
#
#   cargo build --release -p mailsuite-smtp-ingress ... (or the whole workspace)
#   deploy/offline-images.sh                      # binaries from target/release
#   BIN_DIR=target/debug deploy/offline-images.sh # e.g. CI, which has a debug build already
#
# Needs: docker, debootstrap (Debian package) for step 1, a Debian mirror (DEBIAN_MIRROR).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN_DIR="${BIN_DIR:-target/release}"
PREFIX="${MAILSUITE_IMAGE_PREFIX:-mailsuite}"
TAG="${MAILSUITE_TAG:-dev}"
RELEASE="${DEBIAN_RELEASE:-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
WORK="${OFFLINE_WORK_DIR:-var/offline-images}"
BASE="debian:${RELEASE}-slim"
SERVICES=(mailbox-store relay-queue smtp-ingress pop3-gateway imap-gateway mailctl mailsuite)

log() { printf '=== %s\n' "$*"; }
# Docker's legacy builder is the one this engine may have; BuildKit works the same way here.
build() { DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}" docker build -q "$@" >/dev/null; }

for b in "${SERVICES[@]}"; do
  [ -x "$BIN_DIR/$b" ] || { echo "no $BIN_DIR/$b: build the workspace first (cargo build --release)" >&2; exit 1; }
done

if docker image inspect "$BASE" >/dev/null 2>&1; then
  log "base $BASE: present"
else
  command -v debootstrap >/dev/null || { echo "debootstrap is needed to make $BASE (apt-get install debootstrap)" >&2; exit 1; }
  log "base $BASE: debootstrap $RELEASE from $MIRROR"
  rootfs="$WORK/rootfs-$RELEASE"
  rm -rf "$rootfs"
  mkdir -p "$WORK"
  debootstrap --variant=minbase "$RELEASE" "$rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
  # As the official slim image: updates and security sources, no recommends, no apt cache.
  cat > "$rootfs/etc/apt/sources.list" <<SOURCES
deb $MIRROR $RELEASE main
deb $MIRROR $RELEASE-updates main
deb ${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security} $RELEASE-security main
SOURCES
  printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' > "$rootfs/etc/apt/apt.conf.d/99no-recommends"
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/*.log
  tar --numeric-owner -C "$rootfs" -c . \
    | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' - "$BASE" >/dev/null
  rm -rf "$rootfs"
fi

log "postgres and haproxy from Debian's packages"
build -t "$PREFIX/postgres:$TAG" deploy/postgres
build -t "$PREFIX/haproxy:$TAG" deploy/haproxy

log "service images from $BIN_DIR"
find deploy/prebuilt -mindepth 1 ! -name README.md -delete
for b in "${SERVICES[@]}"; do
  # Debug sections are not needed to run, and keep the build context small.
  objcopy --strip-debug "$BIN_DIR/$b" "deploy/prebuilt/$b"
done
for b in "${SERVICES[@]}"; do
  build -f deploy/Dockerfile --target "$b-prebuilt" -t "$PREFIX/$b:$TAG" .
done
log "images: $(docker images --format '{{.Repository}}:{{.Tag}}' | grep -c "^$PREFIX/.*:$TAG$") tagged $PREFIX/*:$TAG"
