"""Scores and survivors of the last `mutmut run` (scripts/mutation.sh), per core module.

Writes docs/mutation.md (the score per module, equivalent mutants left out) and
docs/mutation-survivors.txt (each surviving mutant with its diff). Reads mutmut's own result
files through its API, pinned in requirements/mutation.txt.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from mutmut.__main__ import SourceFileMutationData, walk_mutatable_files
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code

REPO = Path(__file__).resolve().parents[1]
# A timeout or a crash means a test noticed the change.
DETECTED = {"killed", "timeout", "segfault"}


def equivalents() -> dict[str, str]:
    """Mutant name -> why it cannot change behaviour (docs/mutation-equivalent.txt)."""
    path = REPO / "docs" / "mutation-equivalent.txt"
    if not path.exists():
        return {}
    listed = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, reason = line.partition(" ")
            listed[name] = reason.strip()
    return listed


def main() -> int:
    equivalent = equivalents()
    counts: dict[str, Counter[str]] = {}
    survivors: list[tuple[str, str, Path]] = []
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        for name, exit_code in data.exit_code_by_key.items():
            status = status_by_exit_code[exit_code]
            module = name.split(".x", 1)[0].rsplit("__mutmut_", 1)[0]
            if name in equivalent:
                status = "equivalent"
            elif status == "not checked":  # a run stopped early: left out, and shown
                status = "not run"
            counts.setdefault(module, Counter())[status] += 1
            if status not in DETECTED and status not in ("equivalent", "not run"):
                survivors.append((name, status, path))
    if not counts:
        print("mutation: no results; run scripts/mutation.sh", file=sys.stderr)
        return 1
    lines = ["# Mutation score of the core", "",
             ("`bash scripts/mutation.sh` regenerates this file and docs/mutation-survivors.txt. "
             "Score: mutants a test detected (killed, timeout) over all mutants except the "
             "equivalent ones (docs/mutation-equivalent.txt). \"no tests\": no selected test "
             "reaches the changed function."), "",
             "| module | mutants | not run | detected | survived | no tests | equivalent | score |",
             "|---|---|---|---|---|---|---|---|"]
    total = Counter()
    for module, counter in sorted(counts.items()):
        total.update(counter)
        lines.append(_row(module, counter))
    lines.append(_row("**all**", total))
    (REPO / "docs" / "mutation.md").write_text("\n".join(lines) + "\n")
    with open(REPO / "docs" / "mutation-survivors.txt", "w") as out:
        out.write("# Surviving mutants of the last scripts/mutation.sh run: a test to kill "
                  "each, or a line in docs/mutation-equivalent.txt saying why it is equivalent.\n")
        for name, status, path in survivors:
            out.write(f"\n## {name}: {status}\n{get_diff_for_mutant(name, path=path)}\n")
    print("\n".join(lines))
    return 0


def _row(module: str, counter: Counter[str]) -> str:
    detected = sum(counter[s] for s in DETECTED)
    scored = sum(counter.values()) - counter["equivalent"] - counter["not run"]
    score = f"{100 * detected / scored:.1f}%" if scored else "-"
    return (f"| {module} | {sum(counter.values())} | {counter['not run']} | {detected} | "
            f"{counter['survived']} | {counter['no tests']} | {counter['equivalent']} | "
            f"{score} |")


if __name__ == "__main__":
    sys.exit(main())
