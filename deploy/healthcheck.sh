#!/bin/bash
# Container health check without curl in the image: GET http://127.0.0.1:PORT/PATH on the
# service's ops endpoint and succeed only on "HTTP/1.x 200".
#   mailsuite-healthcheck 9051            # /readyz
#   mailsuite-healthcheck 9051 /healthz
set -eu
port="${1:?usage: mailsuite-healthcheck PORT [PATH]}"
path="${2:-/readyz}"
exec 3<>"/dev/tcp/127.0.0.1/${port}"
printf 'GET %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' "$path" >&3
IFS= read -r -t 3 status <&3
case "$status" in
  "HTTP/1."?" 200"*) exit 0 ;;
  *) echo "unhealthy: ${status:-no answer}" >&2; exit 1 ;;
esac
