"""SMTP ingest throughput: mailgate beside a do-nothing aiosmtpd handler, same mail, same run.

    .venv/bin/python bench/smtp_ingest.py [--messages 2000] [--connections 4]

Sends the same N real messages from ../shared/corpus/spamassassin over C
connections to (a) an aiosmtpd server whose handler only answers 250 and
(b) `mailgate run` on SQLite (spam filter on, outgoing mail to a maildir).
Prints messages/s for both, the ratio, p50/p99 accept latency (end of DATA
to 250), the time until the last ticket was committed, the daemon's memory
(peak PSS summed over its processes, sampled every 50 ms: the memory it
holds, pages shared after the parse helper's fork counted once; and each
process's peak RSS, which counts those pages in each) and the CPU time of
each process. Run by hand; never in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import smtplib
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import CORPUS, free_port, start_daemon, write_config  # noqa: E402


def corpus_messages(n: int) -> list[bytes]:
    files = sorted(p for d in ("easy-ham-1", "hard-ham-1", "spam-1") for p in (CORPUS / d).iterdir())
    # interleave folders so spam and ham mix as in real traffic
    files.sort(key=lambda p: p.name)
    out = [p.read_bytes() for p in files[:n]]
    # the corpus has bare LF; smtplib's sendmail normalises line endings itself
    return out


def send_all(port: int, messages: list[bytes], connections: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    lock = threading.Lock()
    chunks = [messages[i::connections] for i in range(connections)]

    def worker(chunk: list[bytes]) -> None:
        mine: list[float] = []
        with smtplib.SMTP("127.0.0.1", port, timeout=120) as smtp:
            for raw in chunk:
                t0 = time.perf_counter()
                smtp.sendmail("bench@customer.org", ["support@example.com"], raw)
                mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(c,)) for c in chunks]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, latencies


class Nothing:
    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: ANN001
        return "250 OK"


def run_reference(messages: list[bytes], connections: int) -> tuple[float, list[float]]:
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import SMTP

    class LongLines(SMTP):
        line_length_limit = 1024 * 1024

    port = free_port()

    class C(Controller):
        def factory(self) -> SMTP:
            return LongLines(self.handler, data_size_limit=None, enable_SMTPUTF8=True)

    controller = C(Nothing(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        return send_all(port, messages, connections)
    finally:
        controller.stop()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU time of a process so far (clock ticks of /proc/PID/stat)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def children(pid: int) -> list[int]:
    """Every descendant: the work process and its parse-ahead helpers."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (int(c) for c in (task / "children").read_text().split()):
            out += [child, *children(child)]
    return out


def roles(main_pid: int) -> dict[int, str]:
    out = {main_pid: "main"}
    for pid in children(main_pid):
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        out[pid] = "work process" if parent == main_pid else "parse helper"
    return out


def pss_mb(pid: int) -> float:
    """Proportional set size: a page shared by k processes counts 1/k in each, so the sum
    over the daemon's processes is the memory it really holds (forked helpers share most)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


class PssPeak(threading.Thread):
    """Samples the summed PSS of the daemon's processes every 50 ms; keeps the highest."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids, self.peak, self.done = pids, 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            try:
                self.peak = max(self.peak, sum(pss_mb(p) for p in self.pids))
            except OSError:
                return


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--connections", type=int, default=4)
    args = ap.parse_args()
    messages = corpus_messages(args.messages)
    n = len(messages)

    ref_time, ref_lat = run_reference(messages, args.connections)

    work = Path(tempfile.mkdtemp(prefix="mgbench."))
    daemon = start_daemon(write_config(work, spam_enabled=True))
    try:
        # The work process forks its parse helper once it has loaded the spam model.
        deadline = time.monotonic() + 15
        while "parse helper" not in (procs := roles(daemon.proc.pid)).values() and time.monotonic() < deadline:
            time.sleep(0.1)
        cpu_before = {pid: cpu_seconds(pid) for pid in procs}
        pss = PssPeak(list(procs))
        pss.start()
        t0 = time.perf_counter()
        mg_time, mg_lat = send_all(daemon.port, messages, args.connections)
        cpu_accepting = {pid: sum(cpu_seconds(pid)) - sum(before) for pid, before in cpu_before.items()}
        db = sqlite3.connect(work / "mailgate.db", timeout=30)
        journal = sqlite3.connect(work / "data" / "accept-journal.db", timeout=30)
        while True:
            waiting = journal.execute("select count(*) from journal").fetchone()[0]
            left = db.execute("select count(*) from inbound where state in ('queued','processing')").fetchone()[0]
            if waiting == 0 and left == 0:
                break
            time.sleep(0.05)
        journal.close()
        end_to_end = time.perf_counter() - t0
        pss.done.set()
        pss.join()
        outcomes = dict(db.execute("select coalesce(outcome, state), count(*) from inbound group by 1").fetchall())
        db.close()
        cpu = {pid: tuple(a - b for a, b in zip(cpu_seconds(pid), before, strict=True))
               for pid, before in cpu_before.items()}
        rss = {pid: peak_rss_mb(pid) for pid in procs}
    finally:
        daemon.stop()

    print(f"messages: {n} over {args.connections} connections (corpus: {CORPUS})")
    for name, took, lat in (("do-nothing aiosmtpd", ref_time, ref_lat), ("mailgate accept", mg_time, mg_lat)):
        print(f"{name:20}: {n / took:8.1f} msg/s   p50 {pct(lat, .5):6.2f} ms  p99 {pct(lat, .99):6.2f} ms")
    print(f"accept ratio        : {(n / mg_time) / (n / ref_time):8.2f}  (target >= 0.5)")
    print(f"end to end          : {n / end_to_end:8.1f} msg/s  (last message processed after {end_to_end:.1f} s; "
          "target >= 150)")
    print(f"peak memory         : PSS {pss.peak:.1f} MB summed (target < 200); RSS summed "
          f"{sum(rss.values()):.1f} MB = " + " + ".join(f"{procs[p]} {rss[p]:.1f}" for p in procs)
          + " (each process's own peak, pages shared after fork counted in each)")
    for pid, role in procs.items():
        user, system = cpu[pid]
        print(f"CPU {role:16}: {user + system:5.1f} s (user {user:.1f}, system {system:.1f}; "
              f"{1000 * (user + system) / n:.1f} ms per message; {cpu_accepting[pid]:.1f} s while accepting)")
    print(f"outcomes            : {outcomes}")
    print(f"median latency      : {statistics.median(mg_lat) * 1000:.2f} ms")


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
