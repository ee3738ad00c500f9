#!/usr/bin/env python3
"""Client-side latency of deltaboxd's API against the daemon's own timings.

Usage: api-latency-probe.py DELTABOXD [ROUNDS] [--rl] [--rl-wait SECONDS]

Starts DELTABOXD (its deltabox-init beside it) on a socket, store directory and cgroup
of its own, and measures over raw HTTP/1.1 (one connection per request, as the bench
does):
  - the round trip of an unknown route (404), back to back and after 20 ms idle;
  - without --rl: ROUNDS x {session run, 20 ms, checkpoint, 20 ms, rollback to the
    first node}: client time, the daemon's total_ms, the difference, and the median
    of each phase the daemon reports;
  - with --rl: after --rl-wait seconds (the first node's dump is written meanwhile),
    ROUNDS x {4 session runs, rollback to the first node}: client and daemon medians
    and how many rollbacks a standby fork served.
Everything it made (daemon, socket, store directory, cgroup) is removed at the end.
"""
import json
import os
import shutil
import signal
import socket
import statistics as st
import subprocess
import sys
import tempfile
import time


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    rl = "--rl" in sys.argv
    wait = 0.0
    if "--rl-wait" in sys.argv:
        wait = float(sys.argv[sys.argv.index("--rl-wait") + 1])
        args.remove(sys.argv[sys.argv.index("--rl-wait") + 1])
    binary, rounds = args[0], int(args[1]) if len(args) > 1 else 50
    run = tempfile.mkdtemp(prefix="api-probe-")
    os.makedirs("/var/lib/deltabox", exist_ok=True)
    data = tempfile.mkdtemp(prefix="api-probe-", dir="/var/lib/deltabox")
    sock = os.path.join(run, "api.sock")
    tag = f"api-probe-{os.getpid()}"
    daemon = subprocess.Popen(
        [binary, "serve", "--socket", sock, "--metrics-addr", "127.0.0.1:0",
         "--pin-dir", f"/sys/fs/bpf/{tag}", "--unload-on-exit", "--data-dir", data,
         "--run-dir", os.path.join(run, "run"),
         "--sandbox-cgroup", f"/sys/fs/cgroup/unified/{tag}"],
        stdout=open(os.path.join(run, "log"), "w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        for _ in range(600):
            if os.path.exists(sock) or daemon.poll() is not None:
                break
            time.sleep(0.05)
        if not os.path.exists(sock):
            sys.exit("deltaboxd did not start:\n" + open(os.path.join(run, "log")).read())
        probe(sock, rounds, rl, wait)
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)
        cgroup = f"/sys/fs/cgroup/unified/{tag}"
        if os.path.isdir(cgroup):
            os.rmdir(cgroup)


def call(sock, method, path, body=None, ok=True):
    payload = json.dumps(body).encode() if body is not None else b""
    head = (f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            f"Content-Length: {len(payload)}\r\n")
    if payload:
        head += "Content-Type: application/json\r\n"
    start = time.perf_counter()
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(sock)
        s.sendall(head.encode() + b"\r\n" + payload)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    elapsed = (time.perf_counter() - start) * 1e3
    head, _, raw = out.partition(b"\r\n\r\n")
    if ok and b" 2" not in head.split(b"\r\n")[0]:
        sys.exit(f"{method} {path}: {out[:500]!r}")
    if b"chunked" in head.lower():
        body, raw = b"", raw
        while raw:
            size, _, raw = raw.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            body, raw = body + raw[:n], raw[n + 2:]
        raw = body
    return (json.loads(raw) if raw else None), elapsed


def probe(sock, rounds, rl, wait):
    hot = [call(sock, "GET", "/v1/nope", ok=False)[1] for _ in range(rounds)]
    idle = []
    for _ in range(rounds):
        time.sleep(0.02)
        idle.append(call(sock, "GET", "/v1/nope", ok=False)[1])
    print(f"404 round trip: back to back {st.median(hot):.3f} ms, after 20 ms idle "
          f"{st.median(idle):.3f} ms")
    sandbox = call(sock, "POST", "/v1/sandboxes", {})[0]["id"]
    base = f"/v1/sandboxes/{sandbox}"
    session = call(sock, "POST", f"{base}/sessions", {"kind": "python"})[0]["id"]
    run = f"{base}/sessions/{session}/run"
    call(sock, "POST", run, {"code": "x = 0"})
    first = call(sock, "POST", f"{base}/checkpoint", {})[0]["id"]
    if rl:
        time.sleep(wait)
        resets, served = [], 0
        for _ in range(rounds):
            for _ in range(4):
                call(sock, "POST", run, {"code": "x += 1"})
            answer, elapsed = call(sock, "POST", f"{base}/rollback", {"node": first})
            resets.append((elapsed, answer["timings"]["total_ms"]))
            served += answer.get("standby_sessions", 0)
        print(f"RL reset: client {st.median(a for a, _ in resets):.3f} ms, daemon "
              f"{st.median(b for _, b in resets):.3f} ms, served by a standby "
              f"{served}/{rounds}")
    else:
        ops = {"checkpoint": [], "rollback": []}
        for i in range(rounds):
            call(sock, "POST", run, {"code": f"x = {i}"})
            time.sleep(0.02)
            node, elapsed = call(sock, "POST", f"{base}/checkpoint", {})
            ops["checkpoint"].append((elapsed, node["timings"]))
            time.sleep(0.02)
            rolled, elapsed = call(sock, "POST", f"{base}/rollback", {"node": first})
            ops["rollback"].append((elapsed, rolled["timings"]))
        for name, v in ops.items():
            print(f"{name}: client {st.median(a for a, _ in v):.3f} ms, daemon "
                  f"{st.median(b['total_ms'] for _, b in v):.3f} ms, client - daemon "
                  f"{st.median(a - b['total_ms'] for a, b in v):.3f} ms")
            phases = [k for k, x in v[0][1].items()
                      if k != "total_ms" and isinstance(x, (int, float))]
            print("  daemon phases (median): " + ", ".join(
                f"{k} {st.median(b[k] for _, b in v):.3f}" for k in phases))
    call(sock, "DELETE", base)


if __name__ == "__main__":
    main()
