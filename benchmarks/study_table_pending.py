"""Which of several study-table selections are finished, checked in one process: the device script's table
stages, so that a call skips the finished ones without starting Python for each (a study_table.py process
spends 12-17 s of imports and checks on the H100 before it finds a stage finished).

    python benchmarks/study_table_pending.py STAGES

STAGES holds one selection per line, the arguments of one study_table.py call (shell words; blank lines and
lines starting with # are not selections but keep the numbering). Prints the 1-based numbers of the
finished selections, one per line: `study_table.py … --check` exits 0 for them. A selection with work left,
or one that study_table.py refuses (its own call then says why), is not printed.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import study_table  # noqa: E402


def finished_selections(lines: list[str], *, loader=None, tasks: dict | None = None) -> list[int]:
    """The 1-based numbers of the lines whose selection has nothing left to do. ``loader`` and ``tasks`` as
    for ``study_table.main`` (tests); --check never calls the loader."""
    finished = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        with contextlib.redirect_stderr(io.StringIO()):  # one line per selection is noise at this point
            try:
                status = study_table.main(shlex.split(line) + ["--check"], loader=loader, tasks=tasks)
            except SystemExit as refused:  # argparse refuses a bad argument by exiting
                status = refused.code
        if status == 0:
            finished.append(number)
    return finished


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stages", type=Path, help="file of study_table.py argument lines, one selection each")
    args = parser.parse_args(argv)
    try:
        lines = args.stages.read_text().splitlines()
    except OSError as error:
        print(f"study_table_pending: error: {args.stages}: {error.strerror or error}", file=sys.stderr)
        return 2
    for number in finished_selections(lines):
        print(number)
    return 0


if __name__ == "__main__":
    sys.exit(main())
