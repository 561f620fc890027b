"""Sealed states: the head of a hash chain over a state's finished calls.

``callindex seal`` stores, per state, the head of a SHA-256 chain over its
calls in index order (see callindex/seals.py for the links), one row per seal:
a state sealed up to index 9 and extended later is sealed again from 10 on,
chaining to the earlier head. ``callindex verify --seals`` recomputes every
chain. A seal is never changed or deleted (``CX007``), but an owner who can
disable triggers could rewrite one: export the heads (``seal --json``) to
somewhere they cannot, and verify against that file (``--heads``).

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

SEALS = """
CREATE TABLE call_seals (
    state_id TEXT NOT NULL,
    last_index BIGINT NOT NULL,
    head VARCHAR(64) NOT NULL,
    calls BIGINT NOT NULL,
    sealed_at {timestamp} NOT NULL DEFAULT {now},
    CONSTRAINT pk_call_seals PRIMARY KEY (state_id, last_index),
    CONSTRAINT ck_call_seals_head_sha256 CHECK (length(head) = 64),
    CONSTRAINT ck_call_seals_calls_positive CHECK (calls >= 1)
)
"""
SERVED = "INSERT INTO callindex_schema_interfaces (revision, interface) VALUES ('0011', 2)"

# record_call(call_index=k) reads the seals of its state: whoever may read
# calls may read call_seals (sql/postgresql-roles.sql grants the same).
PG_GRANT_READERS = """
DO $$
DECLARE
    grantee name;
BEGIN
    FOR grantee IN
        SELECT DISTINCT pg_get_userbyid(acl.grantee)
        FROM pg_class, aclexplode(pg_class.relacl) AS acl
        WHERE pg_class.oid = 'calls'::regclass AND acl.privilege_type = 'SELECT'
          AND acl.grantee NOT IN (0, pg_class.relowner)
    LOOP
        EXECUTE format('GRANT SELECT ON call_seals TO %I', grantee);
    END LOOP;
END;
$$
"""

PG_GUARD = (
    """
CREATE FUNCTION callindex_guard_seals() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'callindex: a seal is never changed or deleted (% on call_seals)', TG_OP
        USING ERRCODE = 'CX007';
END;
$$
""",
    "CREATE TRIGGER callindex_guard_seals BEFORE UPDATE OR DELETE ON call_seals "
    "FOR EACH ROW EXECUTE FUNCTION callindex_guard_seals()",
    "CREATE TRIGGER callindex_guard_seals_truncate BEFORE TRUNCATE ON call_seals "
    "FOR EACH STATEMENT EXECUTE FUNCTION callindex_guard_seals()",
)
_SQLITE_REFUSAL = "SELECT RAISE(ABORT, 'callindex: [CX007] a seal is never changed or deleted');"
SQLITE_GUARD = (
    *(
        f"""
CREATE TRIGGER callindex_guard_seals_{operation.lower()} BEFORE {operation} ON call_seals
BEGIN
    {_SQLITE_REFUSAL}
END
"""
        for operation in ("UPDATE", "DELETE")
    ),
    # INSERT OR REPLACE would delete the old seal without a DELETE trigger.
    f"""
CREATE TRIGGER callindex_guard_seals_replace BEFORE INSERT ON call_seals
WHEN EXISTS (SELECT 1 FROM call_seals
             WHERE state_id = NEW.state_id AND last_index = NEW.last_index)
BEGIN
    {_SQLITE_REFUSAL}
END
""",
)


def upgrade() -> None:
    postgresql = op.get_context().dialect.name == "postgresql"
    op.execute(
        SEALS.format(
            timestamp="TIMESTAMP WITH TIME ZONE" if postgresql else "DATETIME",
            now="now()" if postgresql else "(strftime('%Y-%m-%d %H:%M:%f', 'now'))",
        )
    )
    op.execute(SERVED)
    for statement in PG_GUARD if postgresql else SQLITE_GUARD:
        op.execute(statement)
    if postgresql:
        op.execute(PG_GRANT_READERS)


def downgrade() -> None:
    postgresql = op.get_context().dialect.name == "postgresql"
    op.execute("DELETE FROM callindex_schema_interfaces WHERE revision = '0011'")
    op.execute("DROP TABLE call_seals")
    if postgresql:
        op.execute("DROP FUNCTION callindex_guard_seals()")
