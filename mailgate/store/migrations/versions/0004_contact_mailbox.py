"""contact mailbox

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 15:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

from mailgate.domain import mailbox_of

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CONTACT = sa.table('contact', sa.column('id', sa.Integer), sa.column('email', sa.String),
                    sa.column('mailbox', sa.String))
_AUTO_REPLY_LOG = sa.table('autoreplylog', sa.column('recipient', sa.String))


def upgrade() -> None:
    with op.batch_alter_table('contact', schema=None) as batch_op:
        batch_op.add_column(sa.Column('mailbox', sqlmodel.sql.sqltypes.AutoString(length=320), nullable=False,
                                      server_default=''))
    # Existing contacts get theirs now: the new-ticket cap compares mailboxes only.
    conn = op.get_bind()
    rows = conn.execute(sa.select(_CONTACT.c.id, _CONTACT.c.email)).all()
    if rows:
        conn.execute(_CONTACT.update().where(_CONTACT.c.id == sa.bindparam('contact_id')).values(
            mailbox=sa.bindparam('new_mailbox')),
            [{'contact_id': id_, 'new_mailbox': mailbox_of(email)} for id_, email in rows])
    with op.batch_alter_table('contact', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_contact_mailbox'), ['mailbox'], unique=False)
    # The loop guard counts by the same key now: its rows of the last day keep counting.
    recipients = conn.execute(sa.select(_AUTO_REPLY_LOG.c.recipient).distinct()).scalars().all()
    renamed = [{'old': r, 'new': mailbox_of(r)} for r in recipients if mailbox_of(r) != r]
    if renamed:
        conn.execute(_AUTO_REPLY_LOG.update().where(_AUTO_REPLY_LOG.c.recipient == sa.bindparam('old')).values(
            recipient=sa.bindparam('new')), renamed)


def downgrade() -> None:
    with op.batch_alter_table('contact', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_contact_mailbox'))
        batch_op.drop_column('mailbox')
