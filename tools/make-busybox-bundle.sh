#!/usr/bin/env bash
# Makes an OCI bundle with a busybox-static rootfs: make-busybox-bundle.sh DIR [ARGS...]
# The process runs ARGS (default: sh) without a terminal.
set -euo pipefail
dir=$1; shift
busybox=${BUSYBOX:-/bin/busybox}
rm -rf "$dir" && mkdir -p "$dir/rootfs/bin" "$dir/rootfs/etc" "$dir/rootfs/tmp" "$dir/rootfs/root"
install -m 0755 "$busybox" "$dir/rootfs/bin/busybox"
for applet in $("$busybox" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$dir/rootfs/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n' >"$dir/rootfs/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$dir/rootfs/etc/group"
args=$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1:] or ["sh"]))' "$@")
(cd "$dir" && python3 -m pyrunv spec 2>/dev/null || pyrunv spec)
python3 - "$dir/config.json" "$args" <<'PY'
import json, sys
path, args = sys.argv[1], json.loads(sys.argv[2])
config = json.load(open(path))
config["process"]["terminal"] = False
config["process"]["args"] = args
config["root"]["readonly"] = False
json.dump(config, open(path, "w"), indent=2)
PY
