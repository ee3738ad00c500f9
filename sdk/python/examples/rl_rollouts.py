#!/usr/bin/env python3
"""RL-style rollouts: reset a sandbox to one node hundreds of times.

A python session builds an environment (a seeded random-walk "game" in memory and a
few files on disk), the sandbox checkpoints it, and each episode then:

1. rolls the sandbox back to that node (files and the live interpreter),
2. fingerprints the state — the game's memory including the RNG's state, and the
   files — and compares it with the fingerprint taken at the checkpoint,
3. plays random steps that change memory and files (so the next reset has work to do).

Reports resets per second (rollback calls only, and whole episodes) and exits 1 if
any reset did not give back the identical state.

    python3 rl_rollouts.py [--short] [--episodes N] [--socket PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import deltabox

SETUP = """\
import hashlib, os, random
random.seed(1234)
board = [random.randint(0, 9) for _ in range(64)]
score = 0
os.makedirs("/workspace/env", exist_ok=True)
for i in range(4):
    with open(f"/workspace/env/level{i}.txt", "w") as f:
        f.write(" ".join(map(str, board[i * 16:(i + 1) * 16])))

def fingerprint():
    h = hashlib.sha256(repr((board, score, random.getstate())).encode())
    for name in sorted(os.listdir("/workspace/env")):
        with open(os.path.join("/workspace/env", name), "rb") as f:
            h.update(name.encode() + b"\\0" + f.read())
    return h.hexdigest()
"""

EPISODE = """\
for step in range({steps}):
    i = random.randrange(64)
    board[i] = (board[i] + random.randint(1, 9)) % 10
    score += board[i]
with open("/workspace/env/level0.txt", "a") as f:
    f.write(" " + str(score))
with open("/workspace/env/scratch.txt", "w") as f:
    f.write(str(board))
print(score)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="30 episodes (CI)")
    parser.add_argument("--episodes", type=int, help="episodes (default 300, --short 30)")
    parser.add_argument("--steps", type=int, default=200, help="random steps per episode")
    parser.add_argument("--socket", help="deltaboxd's socket (default $DELTABOX_SOCKET)")
    args = parser.parse_args()
    episodes = args.episodes or (30 if args.short else 300)

    with deltabox.Client(args.socket) as client, client.create(memory="1G") as sb:
        env = sb.session("python")
        setup = env.run(SETUP)
        if not setup.ok:
            print(f"FAIL: setup: {setup.stderr}")
            return 1
        reference = env.run("print(fingerprint())").stdout.strip()
        start = sb.checkpoint(label="episode start")
        print(f"node {start.id}: state {reference[:16]}…, checkpoint {start.info.timings.total_ms:.1f} ms")

        rollback_s: list[float] = []
        mismatches = 0
        scores: set[str] = set()
        began = time.monotonic()
        for episode in range(episodes):
            t0 = time.monotonic()
            sb.rollback(start)
            rollback_s.append(time.monotonic() - t0)
            got = env.run("print(fingerprint())").stdout.strip()
            if got != reference:
                mismatches += 1
                print(f"episode {episode}: state {got[:16]}… differs from {reference[:16]}…")
            result = env.run(EPISODE.format(steps=args.steps))
            if not result.ok:
                print(f"FAIL: episode {episode}: {result.stderr}")
                return 1
            scores.add(result.stdout.strip())
        elapsed = time.monotonic() - began

        resets_per_s = len(rollback_s) / sum(rollback_s)
        print(
            f"{episodes} resets: {resets_per_s:.0f} resets/s of rollback time "
            f"(median {statistics.median(rollback_s) * 1000:.2f} ms, "
            f"max {max(rollback_s) * 1000:.2f} ms); "
            f"{episodes / elapsed:.1f} episodes/s end to end"
        )
        # Every episode starts from the same RNG state, so every episode scores the same.
        if mismatches or len(scores) != 1:
            print(f"FAIL: {mismatches} resets gave another state; {len(scores)} distinct episode scores")
            return 1
        print("OK: every reset restored the identical state")
        return 0


if __name__ == "__main__":
    sys.exit(main())
