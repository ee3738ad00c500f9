#!/bin/bash
# The probe of docs/deltacr.md "Huge pages": a daemon built from BIN_DIR (deltaboxd,
# deltabox), a sandbox whose python session holds a touched 256 MiB bytearray; ROUNDS x
# {write 16 random bytes, 100 ms, checkpoint}, then ROUNDS x {write 16 random bytes,
# 100 ms, roll back to the first node}; prints the session's AnonHugePages and the
# medians of the daemon's timings (`--json`). Needs root and `cargo xtask setup`'s store.
#   controller/scripts/huge-pages-probe.sh target/release 20
set -u
BIN=$(realpath "${1:?usage: $0 BIN_DIR [ROUNDS]}")
N=${2:-20}
D=$(mktemp -d /tmp/hp-probe.XXXXXX)
DATA=$(mktemp -d /var/lib/deltabox/store/hp-probe.XXXXXX)
export DELTABOX_SOCKET=$D/api.sock
"$BIN/deltaboxd" serve --socket "$D/api.sock" --metrics-addr "127.0.0.1:$((20000 + $$ % 10000))" \
  --pin-dir "/sys/fs/bpf/hp-probe-$$" --unload-on-exit --data-dir "$DATA" --run-dir "$D/run" \
  --sandbox-cgroup "/sys/fs/cgroup/unified/hp-probe-$$" > "$D/log" 2>&1 &
DPID=$!
sb=""
cleanup() {
  [ -n "$sb" ] && "$BIN/deltabox" rm "$sb" > /dev/null 2>&1
  kill "$DPID" 2> /dev/null && wait "$DPID"
  rm -rf "$D" "$DATA"
  # The daemon leaves its --sandbox-cgroup directory (empty once its sandboxes are gone).
  rmdir "/sys/fs/cgroup/unified/hp-probe-$$" 2> /dev/null
}
trap cleanup EXIT
for _ in $(seq 100); do [ -S "$D/api.sock" ] && break; sleep 0.1; done
C=$BIN/deltabox
sb=$($C create --memory 2G)
py=$($C session start "$sb" --kind python | head -1)
$C session run "$sb" "$py" 'import random
x = bytearray(256 << 20)
for i in range(0, len(x), 4096): x[i] = 1
def huge():
    for l in open("/proc/self/smaps_rollup"):
        if l.startswith("AnonHuge"): return l.split()[1]
print("AnonHugePages kB", huge())'
W='for _ in range(16): x[random.randrange(len(x))] += 1'
first=""
for _ in $(seq "$N"); do
  $C session run "$sb" "$py" "$W" > /dev/null
  sleep 0.1
  out=$($C checkpoint "$sb" --json)
  echo "$out" >> "$D/ck.json"
  [ -z "$first" ] && first=$(echo "$out" | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
done
for _ in $(seq "$N"); do
  $C session run "$sb" "$py" "$W" > /dev/null
  sleep 0.1
  $C rollback "$sb" "$first" --json >> "$D/rb.json"
done
python3 - "$D" <<'PY'
import json, statistics, sys
d = sys.argv[1]
def objects(path):
    dec, text, i, out = json.JSONDecoder(), open(path).read(), 0, []
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text):
            return out
        o, i = dec.raw_decode(text, i)
        out.append(o)
for name, what in (("ck", "checkpoint"), ("rb", "rollback")):
    timings = {}
    for o in objects(f"{d}/{name}.json"):
        for k, v in o.get("timings", {}).items():
            timings.setdefault(k, []).append(v)
    print(what, {k: round(statistics.median(v), 2) for k, v in timings.items()})
PY
