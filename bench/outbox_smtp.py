"""Outbox delivery to an SMTP relay: mailgate's sender beside plain aiosmtplib, same run.

    .venv/bin/python bench/outbox_smtp.py [--mails 500]

Queues N outgoing mails (confirmations of N ingested customer messages, each
with its agent notices left out: no agents are configured) in a fresh SQLite
database, then times (a) `outbox.send_due` passes until the outbox is empty,
against a local aiosmtpd relay that only answers 250, and (b) as the
reference, the same composed bytes sent with `aiosmtplib.send` one after
another to the same relay, with no database at all. Prints mails/s for both
and the ratio: what claiming, renewing each claim and recording each result
cost beside the SMTP conversation itself. Run by hand; never in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import CaptureRelay, cli, free_port, mail, write_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mails", type=int, default=500)
    args = parser.parse_args()

    import aiosmtplib
    from aiosmtpd.controller import Controller
    from sqlmodel import select

    from mailgate.config import load_settings
    from mailgate.outbox import send_due
    from mailgate.runtime import Runtime
    from mailgate.store.engine import session_scope
    from mailgate.store.tables import Outbox

    port = free_port()
    relay = CaptureRelay(port=port)
    controller = Controller(relay, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = write_config(Path(tmp), outbound=f"smtp://127.0.0.1:{port}", agents="")
            mbox = Path(tmp) / "in.mbox"
            with open(mbox, "wb") as fh:
                for i in range(args.mails):
                    fh.write(b"From bench@customer.org Sat Nov 28 00:00:00 2026\n")
                    fh.write(bytes(mail(sender=f"c{i}@customer.org", subject=f"bench {i}")) + b"\n")
            cli(config, "import", "--notify", str(mbox), timeout=600)  # live mail: its confirmations go out
            rt = Runtime.build(load_settings(config))
            with session_scope(rt.engine) as session:
                rows = [(r.mail_from, r.recipients, r.raw) for r in session.exec(select(Outbox)).all()]
            assert len(rows) == args.mails, len(rows)

            started = time.perf_counter()
            while asyncio.run(send_due(rt.engine, rt.settings, "bench")):
                pass
            ours = time.perf_counter() - started
            assert len(relay.messages) == args.mails, len(relay.messages)

            async def reference() -> None:
                for mail_from, recipients, raw in rows:
                    await aiosmtplib.send(raw, sender=mail_from, recipients=recipients.split(","),
                                          hostname="127.0.0.1", port=port)

            started = time.perf_counter()
            asyncio.run(reference())
            plain = time.perf_counter() - started
    finally:
        controller.stop()
    print(f"mails: {args.mails}")
    print(f"mailgate outbox (claim, renew, send, record): {args.mails / ours:8.1f} mails/s  ({ours:.2f} s)")
    print(f"reference, aiosmtplib.send one by one, no DB: {args.mails / plain:8.1f} mails/s  ({plain:.2f} s)")
    print(f"ratio: {plain / ours:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
