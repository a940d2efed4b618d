"""`mailgate import` throughput on a folder of real mail, against the per-message way.

    .venv/bin/python bench/import_folder.py [--folder ../shared/corpus/spamassassin/easy-ham-1] [--runs 2]

Ours: `mailgate import FOLDER --json` as an operator runs it (a subprocess, start-up
included), on a fresh SQLite database. Reference, in the same run and on a fresh
database too: the same messages stored and processed one at a time in one process
(`spool.accept`, then `run_one`), as `import` did before it stored them in batches.
The two alternate, so drift on a busy machine hits both. Run by hand; never in CI.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import MAILGATE, write_config  # noqa: E402


def ours(folder: Path) -> tuple[float, dict[str, int]]:
    config = write_config(Path(tempfile.mkdtemp(prefix="mg.bench.")), spam_enabled=True)
    started = time.perf_counter()
    proc = subprocess.run([*MAILGATE, "import", str(folder), "--json", "--config", str(config)],
                          capture_output=True, check=True, cwd=config.parent)
    return time.perf_counter() - started, json.loads(proc.stdout)


def one_at_a_time(folder: Path) -> tuple[float, dict[str, int]]:
    from mailgate import spool
    from mailgate.config import load_settings
    from mailgate.ingest.pipeline import run_one
    from mailgate.mailsource import iter_messages
    from mailgate.runtime import Runtime
    from mailgate.store import migrate

    config = write_config(Path(tempfile.mkdtemp(prefix="mg.bench.")), spam_enabled=True)
    started = time.perf_counter()
    rt = Runtime.build(load_settings(config))
    migrate.upgrade(rt.engine)
    outcomes: dict[str, int] = {}
    for key, raw in iter_messages(folder):
        accepted = spool.accept(rt.spool_engine, rt.blobs, raw, source="import", source_key=f"import:{key}")
        result = run_one(rt, "bench", only_id=accepted.inbound_id)
        name = result.outcome if result else "queued"
        outcomes[name] = outcomes.get(name, 0) + 1
    return time.perf_counter() - started, outcomes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", type=Path, default=REPO.parent / "shared" / "corpus" / "spamassassin" / "easy-ham-1")
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    n = sum(1 for p in args.folder.iterdir() if p.is_file() and not p.name.startswith("."))
    for run in range(1, args.runs + 1):
        reference, ref_outcomes = one_at_a_time(args.folder)
        seconds, outcomes = ours(args.folder)
        same = "same outcomes" if outcomes == ref_outcomes else f"OUTCOMES DIFFER: {outcomes} vs {ref_outcomes}"
        print(f"run {run}: {n} messages; mailgate import {seconds:.1f} s = {n / seconds:.1f} msg/s; "
              f"reference, one at a time in one process {reference:.1f} s = {n / reference:.1f} msg/s; {same}",
              flush=True)


if __name__ == "__main__":
    main()
