#!/bin/bash
# A/B of DeltaFS builds on the metadata-heavy steps of `cargo xtask bench fs`, as root:
#   ab-metadata.sh TARBALL DELTAFS_BIN...
# Per round (ROUNDS, default 5), ext4 (a directory under $EXT4_DIR, default /var/tmp)
# then each `deltafs` binary (a fresh store under $STORE_DIR, default
# /var/lib/deltabox/store, the xfs store): `tar -xf`, `find -exec stat`, `git add -A &&
# git commit` of the tree, each timed in ms after a `sync`. Prints one line per run:
#   r<round> <name> <untar ms> <find ms> <git ms>
# and for DeltaFS the daemon's CPU time (user + system) during each step:
#   cpu <untar ms> <find ms> <git ms>
# Rounds alternate the filesystems so background load spreads over all of them.
set -euo pipefail
TAR=$1; shift
export GIT_CONFIG_GLOBAL=/dev/null GIT_AUTHOR_NAME=b GIT_AUTHOR_EMAIL=b@b \
    GIT_COMMITTER_NAME=b GIT_COMMITTER_EMAIL=b@b
ms() { local s; s=$(date +%s%N); "$@" >/dev/null 2>&1; echo $(( ($(date +%s%N) - s) / 1000000 )); }
TICK_MS=$(( 1000 / $(getconf CLK_TCK) ))
# CPU time of process $1 so far, ms (0 without a process).
cpu() { if [ -n "${1:-}" ]; then awk -v t="$TICK_MS" '{print ($14 + $15) * t}' "/proc/$1/stat"; else echo 0; fi; }
one() {
    local d=$1 pid=${2:-} u f g c0 c1 c2 c3
    c0=$(cpu "$pid"); sync; u=$(ms tar -xf "$TAR" -C "$d")
    c1=$(cpu "$pid"); sync; f=$(ms find "$d" -exec stat --format=%s {} +)
    git -C "$d" init -q
    c2=$(cpu "$pid"); sync; g=$(ms sh -c "git -C $d add -A && git -C $d commit -qm x")
    c3=$(cpu "$pid")
    echo "$u $f $g"
    if [ -n "$pid" ]; then echo "  cpu $((c1 - c0)) $((c2 - c1)) $((c3 - c2))"; fi
}
cat "$TAR" >/dev/null
for r in $(seq "${ROUNDS:-5}"); do
    E=$(mktemp -d "${EXT4_DIR:-/var/tmp}/ab-ext4.XXXXXX")
    echo "r$r ext4 $(one "$E")"
    rm -rf "$E"
    for BIN in "$@"; do
        R=$(mktemp -d "${STORE_DIR:-/var/lib/deltabox/store}/ab.XXXXXX")
        mkdir -p "$R/store" "$R/base" "$R/mnt"
        coproc D { exec "$BIN" mount --store "$R/store" --base "$R/base" "$R/mnt" 2>/dev/null; }
        read -r _ <&"${D[0]}"
        echo "r$r $(basename "$BIN") $(one "$R/mnt" "$D_PID")"
        echo quit >&"${D[1]}"
        read -r _ <&"${D[0]}"
        wait "$D_PID" || true
        rm -rf "$R"
    done
done
