#!/usr/bin/env python3
"""Best-of-N with the asyncio client: branch N sandboxes from one node, let each try
its own attempt, keep the winner and remove the rest.

A python session loads a small optimisation task (pick 8 of 40 weighted items under
a weight budget, maximise value) into memory and the sandbox checkpoints it. N
branches — each a copy of that session and its files, made concurrently — run a
randomised greedy search with their own seed, write their answer to a file and keep
it in memory. The best branch wins; the others are removed. The check: the winner
still holds its answer in memory and on disk, the losers are gone, and the original
sandbox saw none of it.

    python3 best_of_n.py [--short] [-n N] [--socket PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import deltabox

TASK = """\
import json, random
rng = random.Random(7)
items = [(rng.randint(1, 30), rng.randint(1, 50)) for _ in range(40)]  # (weight, value)
BUDGET = 80
best = None
"""

ATTEMPT = """\
rng = random.Random({seed})
answer, weight, value = [], 0, 0
for i in sorted(range(len(items)), key=lambda i: -items[i][1] / items[i][0] * rng.uniform(0.5, 1.5)):
    w, v = items[i]
    if len(answer) < 8 and weight + w <= BUDGET:
        answer.append(i); weight += w; value += v
best = {{"seed": {seed}, "value": value, "items": sorted(answer)}}
open("/workspace/answer.json", "w").write(json.dumps(best))
print(value)
"""


async def attempt(branch: deltabox.AsyncSandbox, seed: int) -> int:
    (session,) = await branch.sessions()
    result = await session.run(ATTEMPT.format(seed=seed), timeout=60)
    if not result.ok:
        raise RuntimeError(f"branch {branch.id}: {result.stderr}")
    return int(result.stdout)


async def run(n: int, socket: str | None) -> int:
    async with deltabox.AsyncClient(socket) as client, await client.create(memory="1G") as sb:
        task = await sb.session("python")
        await task.run(TASK)
        node = await sb.checkpoint(label="task loaded")

        began = time.monotonic()
        outcomes = await node.branch(n)
        branched = time.monotonic() - began
        branches = [o.unwrap() for o in outcomes if o.ok]
        for o in outcomes:
            if not o.ok:
                print(f"branch {o.index} failed: {o.error}")
        if not branches:
            print("FAIL: no branch was made")
            return 1
        try:
            values = await asyncio.gather(*(attempt(b, seed) for seed, b in enumerate(branches)))
            winner_index = max(range(len(branches)), key=lambda i: values[i])
            winner = branches[winner_index]
            print(f"{len(branches)} branches in {branched * 1000:.0f} ms; values {values}")
            for i, b in enumerate(branches):
                if i != winner_index:
                    await b.remove()
            remaining = {s.id for s in await client.sandboxes()}
            (session,) = await winner.sessions()
            in_memory = (await session.run("print(best['value'])")).stdout.strip()
            on_disk = (await winner.exec("cat /workspace/answer.json")).stdout
            original = await sb.exec("ls /workspace")
            ok = (
                in_memory == str(values[winner_index])
                and f'"value": {values[winner_index]}' in on_disk
                and remaining & {b.id for b in branches} == {winner.id}
                and original.stdout == ""
                and (await task.run("print(best)")).stdout == "None\n"
            )
            print(f"winner {winner.id} (seed {winner_index}): value {in_memory}, answer {on_disk.strip()}")
            if not ok:
                print("FAIL: the winner lost its answer, a loser survived, or the original saw a branch")
                return 1
            print("OK: best of", len(branches), "kept")
            return 0
        finally:
            for b in branches:
                try:
                    await b.remove()
                except deltabox.UnknownSandbox:
                    pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="3 branches (CI)")
    parser.add_argument("-n", type=int, help="branches (default 8, --short 3)")
    parser.add_argument("--socket", help="deltaboxd's socket (default $DELTABOX_SOCKET)")
    args = parser.parse_args()
    return asyncio.run(run(args.n or (3 if args.short else 8), args.socket))


if __name__ == "__main__":
    sys.exit(main())
