#!/usr/bin/env python3
"""Best-first tree search that fixes a small buggy Python project.

A python session writes the project (three functions, three bugs, a test script)
into /workspace and the sandbox checkpoints it. Then, best node first (most tests
passing), the search branches one sandbox per candidate patch group from that node,
applies each candidate patch, runs the tests, and keeps a patch only if more tests
pass: the branch checkpoints it as a child node and the node joins the frontier. A
patch that does not help is undone by rolling the branch back to the node it started
from, and the branch tries its next candidate. When a node passes every test, the
original sandbox rolls back (over) to it and runs the tests there: the fix is in the
files, and the session that wrote the project knows where the search ended.

    python3 tree_search.py [--short] [--socket PATH]

Exits 0 when the search found a node that passes every test (and the check in the
original sandbox agrees), 1 otherwise. ``--short`` branches at most two sandboxes per
expansion (CI).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import sys
import time

import deltabox

PROJECT = {
    "calc.py": """\
def mean(xs):
    return sum(xs) / (len(xs) - 1)


def clamp(x, lo, hi):
    return max(hi, min(lo, x))


def is_palindrome(s):
    s = "".join(c.lower() for c in s if c.isalnum())
    return s == s[1:][::-1]
""",
    "run_tests.py": """\
import json
import calc

CASES = [
    ("mean", lambda: calc.mean([1, 2, 3, 4]) == 2.5),
    ("mean1", lambda: calc.mean([5]) == 5),
    ("clamp_in", lambda: calc.clamp(5, 0, 10) == 5),
    ("clamp_lo", lambda: calc.clamp(-3, 0, 10) == 0),
    ("clamp_hi", lambda: calc.clamp(42, 0, 10) == 10),
    ("pal", lambda: calc.is_palindrome("A man, a plan, a canal: Panama")),
    ("not_pal", lambda: not calc.is_palindrome("deltabox")),
]
passed = []
for name, case in CASES:
    try:
        if case():
            passed.append(name)
    except Exception:
        pass
print(json.dumps({"passed": passed, "total": len(CASES)}))
""",
}

# Candidate patches: (old line, new line). Some fix a bug, some do not.
CANDIDATES = [
    ("    return sum(xs) / (len(xs) - 1)", "    return sum(xs) / (len(xs) + 1)"),
    ("    return sum(xs) / (len(xs) - 1)", "    return sum(xs) / len(xs)"),
    ("    return max(hi, min(lo, x))", "    return min(hi, min(lo, x))"),
    ("    return max(hi, min(lo, x))", "    return max(lo, min(hi, x))"),
    ("    return s == s[1:][::-1]", "    return s == s[::-1][1:]"),
    ("    return s == s[1:][::-1]", "    return s == s[::-1]"),
]

APPLY = """\
import sys
old, new = sys.argv[1], sys.argv[2]
src = open("calc.py").read()
if old not in src:
    sys.exit(3)
open("calc.py", "w").write(src.replace(old, new, 1))
"""


def run_tests(sb: deltabox.Sandbox) -> tuple[int, int]:
    result = sb.exec(["python3", "run_tests.py"], cwd="/workspace/proj", timeout=30)
    if not result.ok:
        return 0, 1
    report = json.loads(result.stdout)
    return len(report["passed"]), report["total"]


def apply(sb: deltabox.Sandbox, old: str, new: str) -> bool:
    result = sb.exec(["python3", "-c", APPLY, old, new], cwd="/workspace/proj", timeout=30)
    return result.exit_code == 0


def search(sb: deltabox.Sandbox, width: int, log: list[str]) -> deltabox.Node | None:
    score, total = run_tests(sb)
    root = sb.checkpoint(label=f"start {score}/{total}")
    log.append(f"root {root.id[:13]}: {score}/{total} tests pass")
    order = itertools.count()
    frontier: list[tuple[int, int, str, deltabox.Node, frozenset[int]]] = [
        (-score, next(order), root.id, root, frozenset())
    ]
    expansions = 0
    while frontier:
        neg, _, _, node, applied = heapq.heappop(frontier)
        if -neg == total:
            return node
        expansions += 1
        todo = [i for i in range(len(CANDIDATES)) if i not in applied]
        groups = [todo[i::width] for i in range(min(width, len(todo)))]
        outcomes = node.branch(len(groups))
        for outcome, group in zip(outcomes, groups, strict=True):
            if not outcome.ok:
                log.append(f"  branch failed: {outcome.error}")
                continue
            # The branch goes when its candidates are tried; its nodes stay in the tree.
            with outcome.unwrap() as branch:
                for i in group:
                    old, new = CANDIDATES[i]
                    if not apply(branch, old, new):
                        branch.rollback(node)
                        continue
                    got, _ = run_tests(branch)
                    if got > -neg:
                        child = branch.checkpoint(label=f"patch {i}: {got}/{total}")
                        log.append(f"  {node.id[:13]} + patch {i} -> {got}/{total} (node {child.id[:13]})")
                        heapq.heappush(frontier, (-got, next(order), child.id, child, applied | {i}))
                    else:
                        log.append(f"  {node.id[:13]} + patch {i} -> {got}/{total}: rolled back")
                    branch.rollback(node)  # the next candidate starts from the node again
        if expansions > 20:
            break
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="small search for CI")
    parser.add_argument("--socket", help="deltaboxd's socket (default $DELTABOX_SOCKET)")
    args = parser.parse_args()
    width = 2 if args.short else 3
    start = time.monotonic()
    with deltabox.Client(args.socket) as client, client.create(memory="1G") as sb:
        py = sb.session("python")
        files = json.dumps(PROJECT)
        py.run(
            "import json, os\n"
            "os.makedirs('/workspace/proj', exist_ok=True)\n"
            f"for name, text in json.loads({files!r}).items():\n"
            "    open(os.path.join('/workspace/proj', name), 'w').write(text)\n"
            "phase = 'written'\n"
        )
        log: list[str] = []
        best = search(sb, width, log)
        print("\n".join(log))
        if best is None:
            print("FAIL: no node passes every test")
            return 1
        sb.rollback(best)  # a node taken in a branch that is gone by now
        score, total = run_tests(sb)
        phase = py.run("print(phase)").stdout.strip()
        print(sb.tree().text)
        print(f"best node {best.id} ({best.label})")
        print(f"in the original sandbox: {score}/{total} tests pass, session phase {phase!r}")
        print(f"{time.monotonic() - start:.1f} s")
        if score != total or phase != "written":
            print("FAIL: the original sandbox, rolled back to the best node, does not pass")
            return 1
        print("OK: the tree search found the fix")
        return 0


if __name__ == "__main__":
    sys.exit(main())
