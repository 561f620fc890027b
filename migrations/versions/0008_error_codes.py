"""One SQLSTATE per refusal, so errors are told apart by code, not by message.

PostgreSQL: callindex's triggers and functions raised ``CX001`` for every
guard, ``numeric_value_out_of_range`` for an index too far ahead and
``insufficient_privilege`` for a finish by another role. Each condition now
has a code of its own (callindex/translation.py maps them to typed errors):

- ``CX001`` a recorded call cannot be changed or deleted (ImmutableCallError)
- ``CX002`` a counter may only move forward, within the step (CounterGuardError)
- ``CX003`` an index the counter did not hand out, or too far ahead of it
  (IndexAheadError)
- ``CX004`` a pending call finished by a role other than the one that
  recorded it (CallOwnedByAnotherRoleError)

SQLite raises no SQLSTATE: its triggers' messages start with the same code
(``callindex: [CX002] ...``) for the same translation. Those of this library's
SQLite triggers that can refuse a counter or an index are created again
with it.

The functions are the earlier revisions' definitions with only the code
changed; each is named below with the revision it comes from.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from pathlib import Path

from alembic import op
from alembic.script import ScriptDirectory

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

MAX_STEP = 1_000_000


def _revision(revision_id: str) -> object:
    scripts = ScriptDirectory(str(Path(__file__).resolve().parents[1]))
    return scripts.get_revision(revision_id).module  # type: ignore[union-attr]


def _replaceable(definition: str) -> str:
    return definition.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)


def _postgresql_definitions() -> list[tuple[str, str]]:
    """(earlier definition, this revision's) for each function whose code changes."""
    r4, r5, r6, r7 = (_revision(r) for r in ("0004", "0005", "0006", "0007"))
    pairs = [
        (r5.PG_GUARD_COUNTERS, "'CX001'", "'CX002'"),  # type: ignore[attr-defined]
        (r6.PG_GUARD_NEW_COUNTER, "'CX001'", "'CX002'"),  # type: ignore[attr-defined]
        (r7.PG_VOUCH_INDEX, "'CX001'", "'CX003'"),  # type: ignore[attr-defined]
        (r4.NUMBER_CALL, "'numeric_value_out_of_range'", "'CX003'"),  # type: ignore[attr-defined]
        (r4.FINISH_CALL, "'insufficient_privilege'", "'CX004'"),  # type: ignore[attr-defined]
        (r6.PG_FINISH_CALL, "'insufficient_privilege'", "'CX004'"),  # type: ignore[attr-defined]
    ]
    definitions = []
    for earlier, old_code, new_code in pairs:
        assert f"ERRCODE = {old_code}" in earlier, "the earlier definition raises that code"
        earlier = _replaceable(earlier)
        definitions.append((earlier, earlier.replace(old_code, new_code)))
    return definitions


# CREATE OR REPLACE resets a function's settings: the SECURITY DEFINER ones
# are pinned to the tables' schema again (as 0004 and 0006 did).
DEFINERS = (
    "callindex_vouch_index()",
    "callindex_number_call()",
    "callindex_finish_call(text, text, jsonb, text, jsonb, text, double precision)",
    "callindex_finish_call(text, text, text, text, text, text, double precision)",
)
PG_PIN_DEFINERS = """
DO $$
DECLARE
    fn text;
BEGIN
    FOREACH fn IN ARRAY ARRAY['{functions}'] LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_temp', fn, current_schema());
    END LOOP;
END;
$$
""".replace("{functions}", "', '".join(DEFINERS))

SQLITE_GUARD_COUNTERS = f"""
CREATE TRIGGER callindex_guard_counters BEFORE UPDATE ON call_index_counters
WHEN NEW.next_index < OLD.next_index OR NEW.next_index > OLD.next_index + {MAX_STEP}
     OR NEW.state_id IS NOT OLD.state_id
BEGIN
    SELECT RAISE(ABORT, 'callindex: [CX002] a counter may only move forward, by at most {MAX_STEP} at a time');
END
"""  # noqa: E501
SQLITE_GUARD_COUNTERS_REPLACE = f"""
CREATE TRIGGER callindex_guard_counters_replace BEFORE INSERT ON call_index_counters
WHEN NEW.next_index < (SELECT next_index FROM call_index_counters WHERE state_id = NEW.state_id)
  OR NEW.next_index > {MAX_STEP} + (
      SELECT next_index FROM call_index_counters WHERE state_id = NEW.state_id)
BEGIN
    SELECT RAISE(ABORT, 'callindex: [CX002] a counter may only move forward, by at most {MAX_STEP} at a time (INSERT OR REPLACE on call_index_counters)');
END
"""  # noqa: E501


def upgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        for _, definition in _postgresql_definitions():
            op.execute(definition)
        op.execute(PG_PIN_DEFINERS)
        return
    op.execute("DROP TRIGGER callindex_guard_counters")
    op.execute(SQLITE_GUARD_COUNTERS)
    op.execute("DROP TRIGGER callindex_guard_counters_replace")
    op.execute(SQLITE_GUARD_COUNTERS_REPLACE)


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        for definition, _ in _postgresql_definitions():
            op.execute(definition)
        op.execute(PG_PIN_DEFINERS)
        return
    op.execute("DROP TRIGGER callindex_guard_counters_replace")
    op.execute(_revision("0007").SQLITE_GUARD_COUNTERS_REPLACE)  # type: ignore[attr-defined]
    op.execute("DROP TRIGGER callindex_guard_counters")
    op.execute(_revision("0005").SQLITE_MOVES)  # type: ignore[attr-defined]
