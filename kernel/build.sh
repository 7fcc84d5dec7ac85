#!/usr/bin/env bash
# Builds the guest: a minimal kernel and the agent's initrd, cached by a hash of their inputs.
#   PYRUNV_KERNEL_SRC  kernel source: a tree or a .tar.xz (default: Debian's linux-source-*.tar.xz, the newest)
#   PYRUNV_CACHE       build cache, outside the work tree (default: /var/cache/pyrunv)
#   PYRUNV_GUEST_DIR   where the runtime finds vmlinux, bzImage and initrd.img (default: /var/lib/pyrunv/guest)
#   CC, AGENT_CC       compilers for the kernel (default: gcc) and the static agent (default: musl-gcc)
# `build.sh --keys` prints the keys of the kernel and initrd the inputs make, without building anything;
# a build writes them to PYRUNV_GUEST_DIR/build.txt, where `pyrunv check` compares them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
src=${PYRUNV_KERNEL_SRC:-$(ls /usr/src/linux-source-*.tar.xz 2>/dev/null | sort -V | tail -n 1)}
cache=${PYRUNV_CACHE:-/var/cache/pyrunv}
dest=${PYRUNV_GUEST_DIR:-/var/lib/pyrunv/guest}
cc=${CC:-gcc}
agent_cc=${AGENT_CC:-musl-gcc}
jobs=$(nproc)
mkdir -p "$cache" "$dest"

say() { printf 'guest build: %s\n' "$*" >&2; }
hash_of() { sha256sum | cut -c1-16; }

source_id() {
  if [ -d "$src" ]; then
    (cd "$src" && printf '%s %s' "$src" "$(make -s kernelversion)" \
      && (git rev-parse HEAD 2>/dev/null || true))
  else
    stat -c '%n %s %Y' "$src"
  fi
}

kernel_tree() {
  if [ -d "$src" ]; then echo "$src"; return; fi
  local tree="$cache/src-$(source_id | hash_of)"
  if [ ! -f "$tree/.extracted" ]; then
    say "unpacking $src"
    rm -rf "$tree" && mkdir -p "$tree"
    tar -xf "$src" -C "$tree" --strip-components=1
    touch "$tree/.extracted"
  fi
  echo "$tree"
}

# A build's key: its inputs, and the text of the function that builds it.
kernel_key() { { cat "$here/guest.config"; source_id; $cc --version | head -1; sed -n '/^build_kernel/,/^}/p' "$here/build.sh"; } | hash_of; }
initrd_key() { { cat "$here"/agent/*.c "$here"/agent/*.h "$here/agent/Makefile"; $agent_cc --version | head -1; sed -n '/^build_initrd/,/^}/p' "$here/build.sh"; } | hash_of; }

build_kernel() {
  local out tree key
  key=$(kernel_key)
  out="$cache/kernel-$key"
  if [ -f "$out/vmlinux" ]; then KERNEL_OUT=$out; return; fi
  tree=$(kernel_tree)
  local obj="$cache/obj-$key"
  rm -rf "$obj" && mkdir -p "$obj"
  say "configuring kernel in $obj"
  make -s -C "$tree" O="$obj" CC="$cc" tinyconfig >/dev/null
  "$tree/scripts/kconfig/merge_config.sh" -m -O "$obj" "$obj/.config" "$here/guest.config" >"$obj/merge.log"
  make -s -C "$tree" O="$obj" CC="$cc" olddefconfig >/dev/null
  local missing
  missing=$(grep -E '^CONFIG_[A-Z0-9_]+=y' "$here/guest.config" | while read -r opt; do
    grep -qx "$opt" "$obj/.config" || echo "$opt"; done)
  if [ -n "$missing" ]; then say "options the kernel tree did not take:" $missing; fi
  say "building kernel with $jobs jobs (several minutes on 2 cores; log: $obj/build.log)"
  make -C "$tree" O="$obj" CC="$cc" -j"$jobs" vmlinux bzImage 2>&1 | tee "$obj/build.log" \
    | awk '/^  (CC|AR|LD|AS)/ { n++; if (n % 250 == 0) { printf "guest build: %d files compiled\n", n; fflush() } }'
  mkdir -p "$out.tmp"
  cp "$obj/vmlinux" "$obj/arch/x86/boot/bzImage" "$obj/.config" "$out.tmp/"
  rm -rf "$out" && mv "$out.tmp" "$out" && rm -rf "$obj"
  KERNEL_OUT=$out
}

build_initrd() {
  local out stage key
  key=$(initrd_key)
  out="$cache/initrd-$key"
  if [ -f "$out/initrd.img" ]; then INITRD_OUT=$out; return; fi
  say "building agent"
  stage=$(mktemp -d)
  make -s -C "$here/agent" CC="$agent_cc" O="$stage/build" >&2
  mkdir -p "$stage/root"
  install -m 0755 "$stage/build/pyrunv-agent" "$stage/root/init"
  mkdir -p "$out.tmp"
  (cd "$stage/root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc --owner=0:0 --reproducible) >"$out.tmp/initrd.img"
  rm -rf "$stage" "$out" && mv "$out.tmp" "$out"
  INITRD_OUT=$out
}

install_if_changed() {
  local f
  for f in "$@"; do
    cmp -s "$f" "$dest/$(basename "$f")" && continue
    cp "$f" "$dest/.$(basename "$f").tmp" && mv "$dest/.$(basename "$f").tmp" "$dest/$(basename "$f")"
    say "installed $dest/$(basename "$f")"
  done
}

keys() { printf 'kernel-%s initrd-%s\n' "$(kernel_key)" "$(initrd_key)"; }
if [ "${1:-}" = --keys ]; then keys; exit 0; fi

build_initrd
build_kernel
install_if_changed "$KERNEL_OUT/vmlinux" "$KERNEL_OUT/bzImage" "$INITRD_OUT/initrd.img"
keys >"$dest/build.txt"
say "ready: $dest ($(cat "$dest/build.txt"))"
