"""imap oversize, 64-bit UIDVALIDITY and UIDs

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 20:15:00
"""

import json
import re
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


_IMAP_STATE = sa.table('imapstate', sa.column('id', sa.Integer), sa.column('uidvalidity', sa.Integer),
                       sa.column('last_error', sa.Text), sa.column('oversize', sa.Text))
# The report the code before this revision kept in last_error alone.
_OLD_REPORT = re.compile(r"message UID (\d+) in .* is (\d+) bytes, over max_message_bytes")


def upgrade() -> None:
    # The messages too large to fetch that still wait in the folder: a doctor warning each
    # until it is gone (last_error alone was overwritten by the next report).
    with op.batch_alter_table('imapstate', schema=None) as batch_op:
        batch_op.add_column(sa.Column('oversize', sa.Text(), nullable=True))
        # IMAP's UIDVALIDITY and UIDs run to 2^32 - 1: over PostgreSQL's integer.
        batch_op.alter_column('uidvalidity', type_=sa.BigInteger(), existing_type=sa.Integer(),
                              existing_nullable=True)
        batch_op.alter_column('last_uid', type_=sa.BigInteger(), existing_type=sa.Integer(),
                              existing_nullable=False)
    # One that was waiting at the upgrade is kept: last_uid is past it, and nothing would
    # report it again. The next pass forgets it if it is gone.
    conn = op.get_bind()
    for row_id, uidvalidity, last_error in conn.execute(sa.select(
            _IMAP_STATE.c.id, _IMAP_STATE.c.uidvalidity, _IMAP_STATE.c.last_error)).all():
        found = _OLD_REPORT.match(last_error or '')
        if found and uidvalidity is not None:
            conn.execute(_IMAP_STATE.update().where(_IMAP_STATE.c.id == row_id).values(
                oversize=json.dumps([[uidvalidity, int(found.group(1)), int(found.group(2))]])))


def downgrade() -> None:
    with op.batch_alter_table('imapstate', schema=None) as batch_op:
        batch_op.alter_column('last_uid', type_=sa.Integer(), existing_type=sa.BigInteger(),
                              existing_nullable=False)
        batch_op.alter_column('uidvalidity', type_=sa.Integer(), existing_type=sa.BigInteger(),
                              existing_nullable=True)
        batch_op.drop_column('oversize')
