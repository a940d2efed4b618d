"""Outcomes that end the pipeline early: exceptions the driver catches."""

from __future__ import annotations


class Stop(Exception):
    """Processing ends early with this outcome; the message stays recorded in the spool."""

    def __init__(self, outcome: str, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason
