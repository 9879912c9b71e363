#!/usr/bin/env bash
# The compose end-to-end test in one command (.ci/run runs it after the workspace tests):
# builds the images without a registry from the host's debug build (deploy/offline-images.sh),
# then runs deploy/e2e/compose_e2e.py against `docker compose up` (see that file for what it
# proves). Skipped, with a message saying why, on a machine with no Docker engine or Compose.
#
#   deploy/e2e/run.sh            # BIN_DIR=target/release to test a release build instead
#   deploy/e2e/run.sh --keep     # leave the project (mailsuite-e2e) running afterwards
set -euo pipefail
cd "$(dirname "$0")/../.."

skip() { echo "SKIPPED: compose end-to-end test: $*"; exit 0; }
command -v docker >/dev/null 2>&1 || skip "no docker command"
docker info >/dev/null 2>&1 || skip "no Docker engine reachable (docker info failed)"
docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1 \
  || skip "neither 'docker compose' nor 'docker-compose' is installed"

export BIN_DIR="${BIN_DIR:-target/debug}"
if [ "$BIN_DIR" = target/debug ]; then
  cargo build --workspace --bins --quiet
fi
if ! docker image inspect "debian:${DEBIAN_RELEASE:-bookworm}-slim" >/dev/null 2>&1 \
   && ! command -v debootstrap >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  echo "installing debootstrap (Debian's package) to make the base image"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi
deploy/offline-images.sh
DOCKER_BUILDKIT=0 docker build -q -t mailsuite-e2e/sink:dev -f deploy/e2e/Dockerfile.sink deploy/e2e >/dev/null 2>&1
python3 deploy/e2e/compose_e2e.py "$@"
