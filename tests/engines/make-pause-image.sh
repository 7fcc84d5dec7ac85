#!/usr/bin/env bash
# Derives localhost/pause:latest, a stand-in for Kubernetes' pause image, from the busybox image that
# make-image.sh builds: make-pause-image.sh BUSYBOX_ARCHIVE FILE (both docker-archives).
# Like the real pause it does nothing until SIGTERM or SIGINT, then exits 0. As PID 1 of its PID namespace sh
# gets only the signals it traps; `wait` returns as soon as one arrives.
set -euo pipefail
in=$1 out=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
skopeo copy -q "docker-archive:$in" "oci:$work/oci:latest"
umoci config --image "$work/oci:latest" --clear config.cmd \
  --config.entrypoint /bin/sh --config.entrypoint -c \
  --config.entrypoint 'trap "exit 0" TERM INT; while :; do sleep 2147483647 & wait $!; done' >/dev/null
rm -f "$out"
skopeo copy -q "oci:$work/oci:latest" "docker-archive:$out:localhost/pause:latest"
