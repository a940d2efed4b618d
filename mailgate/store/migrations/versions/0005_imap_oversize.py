"""imap oversize

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 20:15:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The messages too large to fetch that still wait in the folder: a doctor warning each
    # until it is gone (last_error alone was overwritten by the next report).
    with op.batch_alter_table('imapstate', schema=None) as batch_op:
        batch_op.add_column(sa.Column('oversize', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('imapstate', schema=None) as batch_op:
        batch_op.drop_column('oversize')
