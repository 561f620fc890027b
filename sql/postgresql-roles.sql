-- Least-privilege roles for callindex on PostgreSQL.
--
-- Run it as the role that owns callindex's tables (the one that ran
-- `callindex db upgrade`), in the database, after the upgrade:
--
--     psql -v ON_ERROR_STOP=1 -d DATABASE -f sql/postgresql-roles.sql
--
-- It is idempotent: run it again after every upgrade. It creates two NOLOGIN
-- group roles; grant them to the roles your workers and auditors log in as:
--
--     CREATE ROLE pipeline_worker LOGIN PASSWORD '...' IN ROLE callindex_app;
--     CREATE ROLE audit_reader LOGIN PASSWORD '...' IN ROLE callindex_auditor;
--
-- callindex_app, the pipelines' role, may
--   * SELECT calls and INSERT them, with every column but recorded_by, which
--     the database sets to the login role (session_user), and only at an index
--     its state's counter has handed out (trigger callindex_vouch_index);
--   * read the counters and move one forward (UPDATE of next_index), as
--     callindex's write path does: the counter guard refuses a move back, a
--     move of more than 1,000,000 at once (each step is bounded, not their
--     sum, so grant the role to your pipelines only), another state_id, and
--     any DELETE or TRUNCATE;
--   * open states and finish its own pending calls only through callindex's
--     SECURITY DEFINER functions (callindex_open_state_v2,
--     callindex_finish_call_v2; callindex_allocate_v2, callindex_reserve_v2
--     and callindex_record_call_v2 serve SQL callers), each pinned to this
--     schema's search_path. A pending call is finished only by the login
--     role that recorded it (calls.recorded_by).
-- In legacy-writers mode (`callindex db legacy-writers on`) every insert goes
-- through the numbering trigger: without a call_index it gets the counter's
-- next; an index already recorded is renumbered; one ahead of the counter
-- moves it (at most 1,000,000 ahead).
-- It may not UPDATE, DELETE or TRUNCATE calls, nor create or delete a counter.
-- Sweeping, purging, repairing and migrating stay with the owner.
--
-- callindex_auditor may read calls, counters, seals, purge records and the schema revision,
-- and run `callindex verify` (with --seals); nothing else. Sealing
-- (`callindex seal`) stays with the owner.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'callindex_app') THEN
        CREATE ROLE callindex_app NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'callindex_auditor') THEN
        CREATE ROLE callindex_auditor NOLOGIN;
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO callindex_app, callindex_auditor',
                   current_schema());
    -- The SECURITY DEFINER functions resolve names in this schema (after
    -- pg_catalog): nobody but its owner may create objects in it, or an
    -- operator or function planted there would run with the owner's rights.
    -- (PostgreSQL 15 made this the default for public; older clusters did not.)
    EXECUTE format('REVOKE CREATE ON SCHEMA %I FROM PUBLIC', current_schema());
END;
$$;

REVOKE ALL ON calls, call_index_counters, callindex_alembic_version,
    callindex_schema_interfaces, call_seals, call_purges FROM callindex_app, callindex_auditor;

GRANT SELECT ON calls TO callindex_app;
GRANT INSERT (call_id, state_id, call_index, call_type, status, request, request_hash,
              response, response_hash, error, error_hash, latency_ms, created_at,
              completed_at, hash_scheme)
    ON calls TO callindex_app;
GRANT SELECT, UPDATE (next_index) ON call_index_counters TO callindex_app;
-- CallRecorder(auto_open=True) opens a state in the statement that records
-- its first call. A new counter holds no calls yet (calls reference it), so
-- inserting one cannot put a recorded call out of the counter's reach.
GRANT INSERT (state_id, next_index) ON call_index_counters TO callindex_app;
GRANT SELECT ON callindex_alembic_version, callindex_schema_interfaces, call_seals, call_purges
    TO callindex_app;
GRANT EXECUTE ON FUNCTION
    callindex_open_state_v2(text),
    callindex_reserve_v2(text, integer),
    callindex_allocate_v2(text, integer),
    callindex_record_call_v2(text, text, text, text, text, text, text, text, text, text,
                             double precision),
    callindex_finish_call_v2(text, text, text, text, text, text, double precision)
    TO callindex_app;

GRANT SELECT ON calls, call_index_counters, callindex_alembic_version,
    callindex_schema_interfaces, call_seals, call_purges TO callindex_auditor;
