-- PostgreSQL versions of the queries that differ between backends.

-- open_state --
-- Create the counter row of a state (past any calls it already has); a no-op
-- when it exists. callindex_open_state_v2 (migration 0009).
SELECT callindex_open_state_v2(CAST(:state_id AS text))
FROM (SELECT set_config('synchronous_commit', CAST(:synchronous_commit AS text), true)) AS durable;

-- allocate_call_index --
-- Reserve :count consecutive indices in one atomic UPDATE and return the first;
-- no row for an unknown state. Every write statement sets synchronous_commit
-- for its own transaction ('on' unless early lock release flushes after it),
-- whatever the server, database, role or session default.
WITH durable AS (
    SELECT set_config('synchronous_commit', CAST(:synchronous_commit AS text), true)
)
UPDATE call_index_counters
SET next_index = next_index + CAST(:count AS bigint)
FROM durable
WHERE state_id = CAST(:state_id AS text)
RETURNING next_index - CAST(:count AS bigint) AS first_index;

-- allocate_opening --
-- allocate_call_index for CallRecorder(auto_open=True): an unknown state is
-- opened (past any calls it has) and allocated from in the same statement.
WITH durable AS (
    SELECT set_config('synchronous_commit', CAST(:synchronous_commit AS text), true)
)
INSERT INTO call_index_counters AS counters (state_id, next_index)
SELECT CAST(:state_id AS text), coalesce(max(calls.call_index) + 1, 0) + CAST(:count AS bigint)
FROM durable LEFT JOIN calls ON calls.state_id = CAST(:state_id AS text)
ON CONFLICT (state_id) DO UPDATE SET next_index = counters.next_index + CAST(:count AS bigint)
RETURNING next_index - CAST(:count AS bigint) AS first_index;

-- insert_call --
-- record_call and begin_call: allocate the state's next index and insert the
-- call with it, in one statement. No row: the state is unknown. A call_id
-- recorded already fails the statement as a whole (its counter bump too).
-- waited_ms (the statement's time before its commit, mostly a wait for the
-- counter row) tells the recorder when early lock release would pay.
WITH counter AS (
    UPDATE call_index_counters SET next_index = next_index + 1
    WHERE state_id = CAST(:state_id AS text)
    RETURNING next_index - 1 AS call_index
), durable AS (
    SELECT set_config('synchronous_commit', CAST(:synchronous_commit AS text), true)
)
INSERT INTO calls (
    call_id, state_id, call_index, call_type, status,
    request, request_hash, response, response_hash, error, error_hash,
    latency_ms, created_at, completed_at, hash_scheme
)
SELECT CAST(:call_id AS text), CAST(:state_id AS text), counter.call_index,
       CAST(:call_type AS text), CAST(:status AS text),
       CAST(:request AS json), CAST(:request_hash AS text),
       CAST(:response AS json), CAST(:response_hash AS text),
       CAST(:error AS json), CAST(:error_hash AS text),
       CAST(:latency_ms AS double precision),
       now(), CASE WHEN CAST(:status AS text) = 'pending' THEN NULL ELSE now() END,
       'rfc8785'
FROM counter, durable
RETURNING call_index, created_at, completed_at,
          1000 * extract(epoch FROM clock_timestamp() - statement_timestamp()) AS waited_ms;

-- insert_call_opening --
-- insert_call for CallRecorder(auto_open=True): an unknown state is opened
-- in the same statement that records its first call.
WITH counter AS (
    INSERT INTO call_index_counters AS counters (state_id, next_index)
    SELECT CAST(:state_id AS text), coalesce(max(calls.call_index) + 1, 0) + 1
    FROM calls WHERE calls.state_id = CAST(:state_id AS text)
    ON CONFLICT (state_id) DO UPDATE SET next_index = counters.next_index + 1
    RETURNING next_index - 1 AS call_index
), durable AS (
    SELECT set_config('synchronous_commit', CAST(:synchronous_commit AS text), true)
)
INSERT INTO calls (
    call_id, state_id, call_index, call_type, status,
    request, request_hash, response, response_hash, error, error_hash,
    latency_ms, created_at, completed_at, hash_scheme
)
SELECT CAST(:call_id AS text), CAST(:state_id AS text), counter.call_index,
       CAST(:call_type AS text), CAST(:status AS text),
       CAST(:request AS json), CAST(:request_hash AS text),
       CAST(:response AS json), CAST(:response_hash AS text),
       CAST(:error AS json), CAST(:error_hash AS text),
       CAST(:latency_ms AS double precision),
       now(), CASE WHEN CAST(:status AS text) = 'pending' THEN NULL ELSE now() END,
       'rfc8785'
FROM counter, durable
RETURNING call_index, created_at, completed_at,
          1000 * extract(epoch FROM clock_timestamp() - statement_timestamp()) AS waited_ms;

-- insert_call_at --
-- record_call(call_index=k): insert the call at an index its state's counter
-- handed out before (k below next_index) and no call holds. No row: the
-- state is unknown, k was not handed out, or it is taken. The counter is
-- not moved.
WITH durable AS (
    SELECT set_config('synchronous_commit', CAST(:synchronous_commit AS text), true)
)
INSERT INTO calls (
    call_id, state_id, call_index, call_type, status,
    request, request_hash, response, response_hash, error, error_hash,
    latency_ms, created_at, completed_at, hash_scheme
)
SELECT CAST(:call_id AS text), counters.state_id, CAST(:call_index AS bigint),
       CAST(:call_type AS text), CAST(:status AS text),
       CAST(:request AS json), CAST(:request_hash AS text),
       CAST(:response AS json), CAST(:response_hash AS text),
       CAST(:error AS json), CAST(:error_hash AS text),
       CAST(:latency_ms AS double precision),
       now(), CASE WHEN CAST(:status AS text) = 'pending' THEN NULL ELSE now() END,
       'rfc8785'
FROM call_index_counters AS counters, durable
WHERE counters.state_id = CAST(:state_id AS text)
  AND CAST(:call_index AS bigint) < counters.next_index
  AND NOT EXISTS (
      SELECT 1 FROM calls
      WHERE calls.state_id = CAST(:state_id AS text)
        AND calls.call_index = CAST(:call_index AS bigint))
  AND NOT EXISTS (
      SELECT 1 FROM call_seals
      WHERE call_seals.state_id = CAST(:state_id AS text)
        AND call_seals.last_index >= CAST(:call_index AS bigint))
  AND NOT EXISTS (
      SELECT 1 FROM call_purges
      WHERE call_purges.state_id = CAST(:state_id AS text)
        AND call_purges.first_index <= CAST(:call_index AS bigint)
        AND CAST(:call_index AS bigint) <= call_purges.last_index)
-- Held until commit: a seal of the state waits for this call (lock_counter).
FOR KEY SHARE OF counters
RETURNING call_index, created_at, completed_at, 0.0 AS waited_ms;

-- record_released --
-- insert_call with early lock release (callindex_record_released_v2, migration
-- 0009): the call commits asynchronously, releasing the counter row at once,
-- and the procedure returns once a synchronous commit after it is on disk.
CALL callindex_record_released_v2(
    CAST(:call_id AS text), CAST(:state_id AS text), CAST(:call_type AS text),
    CAST(:status AS text), CAST(:request AS text), CAST(:request_hash AS text),
    CAST(:response AS text), CAST(:response_hash AS text), CAST(:error AS text),
    CAST(:error_hash AS text), CAST(:latency_ms AS double precision),
    CAST(NULL AS bigint), CAST(NULL AS timestamptz), CAST(NULL AS timestamptz),
    CAST(NULL AS double precision)
);

-- flush_commits --
-- A transaction that writes one WAL record and commits synchronously: it
-- returns once the log is on disk past every commit before it.
SELECT pg_logical_emit_message(true, 'callindex', '')
FROM (SELECT set_config('synchronous_commit', CAST(:synchronous_commit AS text), true))
    AS durable;

-- finish_call --
-- Complete a pending call; no row when it is not pending (or unknown).
-- callindex_finish_call_v2 (migration 0009).
WITH durable AS (
    SELECT set_config('synchronous_commit', CAST(:synchronous_commit AS text), true)
)
SELECT finished.call_id, finished.state_id, finished.call_index, finished.call_type,
       finished.request, finished.request_hash, finished.created_at, finished.completed_at,
       finished.hash_scheme
FROM durable, callindex_finish_call_v2(
    CAST(:call_id AS text), CAST(:status AS text), CAST(:response AS text),
    CAST(:response_hash AS text), CAST(:error AS text), CAST(:error_hash AS text),
    CAST(:latency_ms AS double precision)
) AS finished;

-- sweep_pending --
-- Mark pending calls older than :seconds abandoned, oldest first; only those of
-- states whose id starts with :state_prefix ('' for all).
UPDATE calls
SET status = 'abandoned', completed_at = now()
WHERE status = 'pending'
  AND created_at <= now() - make_interval(secs => CAST(:seconds AS double precision))
  AND starts_with(state_id, CAST(:state_prefix AS text))
RETURNING call_id, state_id, call_index;

-- stale_pending --
SELECT call_id, state_id, call_index, created_at
FROM calls
WHERE status = 'pending'
  AND created_at <= now() - make_interval(secs => CAST(:seconds AS double precision))
ORDER BY created_at;

-- stored_payloads --
-- verify --hashes: the next :batch calls after :after_call_id (in call_id
-- order), with their payloads as the text stored and the hashes recorded.
SELECT call_id, state_id, call_index, hash_scheme,
       CAST(request AS text) AS request, request_hash,
       CAST(response AS text) AS response, response_hash,
       CAST(error AS text) AS error, error_hash
FROM calls
WHERE call_id > :after_call_id
ORDER BY call_id
LIMIT :batch;

-- chained_calls --
-- Sealing and verifying seals: the next :batch calls of :state_id after
-- :after_index, in index order, with every column a seal covers and the
-- payloads as the text stored.
SELECT call_id, call_index, call_type, status, latency_ms, created_at, completed_at,
       recorded_by, hash_scheme,
       CAST(request AS text) AS request, request_hash,
       CAST(response AS text) AS response, response_hash,
       CAST(error AS text) AS error, error_hash
FROM calls
WHERE state_id = :state_id AND call_index > :after_index
ORDER BY call_index
LIMIT :batch;

-- lock_calls --
-- A transaction that goes on to lock a counter row takes calls first, as a
-- single INSERT INTO calls does: dropping a month's partition (calls first,
-- then counters) never deadlocks with it. ONLY: the partitions need no lock
-- for that.
LOCK TABLE ONLY calls IN ACCESS SHARE MODE;

-- lock_counter --
-- Sealing, purging: no record_call(call_index=k) of the state lands meanwhile.
-- After lock_calls.
SELECT next_index FROM call_index_counters WHERE state_id = :state_id FOR UPDATE;

-- lock_counter_shared --
-- record_call(call_index=k), before insert_call_at (after lock_calls): what
-- it reads of seals and purges of the state is what committed before the
-- lock; a seal or purge after it waits for the call.
SELECT next_index FROM call_index_counters WHERE state_id = :state_id FOR KEY SHARE;

-- seal_candidates --
-- States with finished calls beyond their last seal and no pending call;
-- only :state_id when given; only those whose last call finished before
-- :finished_before when given.
SELECT calls.state_id,
       coalesce((SELECT max(last_index) FROM call_seals
                 WHERE call_seals.state_id = calls.state_id), -1) AS sealed_to
FROM calls
WHERE calls.state_id IS NOT NULL
  AND (CAST(:state_id AS TEXT) IS NULL OR calls.state_id = :state_id)
GROUP BY calls.state_id
HAVING sum(CASE WHEN calls.status = 'pending' THEN 1 ELSE 0 END) = 0
   AND max(calls.call_index) > coalesce((SELECT max(last_index) FROM call_seals
                                         WHERE call_seals.state_id = calls.state_id), -1)
   AND (CAST(:finished_before AS TEXT) IS NULL
        OR max(calls.completed_at) < CAST(:finished_before AS timestamptz))
ORDER BY calls.state_id;

-- purge_candidates --
-- States with calls a purge removes: finished, created before :before, of
-- states whose id starts with :state_prefix; in a sealed state only those at
-- or below its last seal.
SELECT calls.state_id
FROM calls
LEFT JOIN (
    SELECT state_id, max(last_index) AS through FROM call_seals GROUP BY state_id
) AS sealed ON sealed.state_id = calls.state_id
WHERE calls.state_id IS NOT NULL
  AND starts_with(calls.state_id, CAST(:state_prefix AS text))
  AND calls.status <> 'pending'
  AND calls.created_at < CAST(:before AS timestamptz)
  AND calls.call_index <= coalesce(sealed.through, 9223372036854775807)
GROUP BY calls.state_id
ORDER BY calls.state_id;


-- write_isolation --
-- Database.run: first in its transaction, whatever the role's or database's
-- default: each statement after a lock sees what committed before it
-- (purges, seals).
SET TRANSACTION ISOLATION LEVEL READ COMMITTED;

-- read_snapshot --
-- Database.read: first in its transaction, so all its statements read one
-- snapshot (a check never sees a purge, a seal or a call half-way).
SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY;

-- begin_purge --
-- The guard of calls lets this transaction's DELETE through.
SELECT set_config('callindex.purging', 'on', true);

-- end_purge --
SELECT set_config('callindex.purging', 'off', true);

-- purger --
-- Who purges, and whether they own calls (only the owner may).
SELECT session_user AS purged_by,
       pg_has_role(current_user, relowner, 'USAGE') AS owner
FROM pg_class
WHERE oid = 'calls'::regclass;

-- calls_is_partitioned --
SELECT EXISTS (SELECT 1 FROM pg_partitioned_table
               WHERE partrelid = to_regclass('calls')) AS partitioned;

-- calls_referenced_by --
-- Foreign keys of other tables that reference calls.
SELECT conname AS name, CAST(CAST(conrelid AS regclass) AS text) AS table_name
FROM pg_constraint
WHERE contype = 'f' AND confrelid = CAST('calls' AS regclass) AND conrelid <> confrelid;

-- indexes_of_calls --
SELECT index.relname AS name, pg_get_indexdef(pg_index.indexrelid) AS definition,
       pg_index.indisunique AS is_unique,
       ARRAY(SELECT attribute.attname
             FROM unnest(pg_index.indkey) AS key(attnum)
             JOIN pg_attribute AS attribute
               ON attribute.attrelid = pg_index.indrelid AND attribute.attnum = key.attnum)
           AS columns,
       quote_ident(namespace.nspname) || '.' || quote_ident(tab.relname) AS table_reference
FROM pg_index
JOIN pg_class AS index ON index.oid = pg_index.indexrelid
JOIN pg_class AS tab ON tab.oid = pg_index.indrelid
JOIN pg_namespace AS namespace ON namespace.oid = tab.relnamespace
WHERE pg_index.indrelid = CAST('calls' AS regclass)
ORDER BY index.relname;

-- triggers_of_calls --
SELECT pg_get_triggerdef(oid) AS definition
FROM pg_trigger
WHERE tgrelid = CAST('calls' AS regclass) AND NOT tgisinternal
ORDER BY tgname;

-- foreign_keys_of_calls --
SELECT conname AS name, pg_get_constraintdef(oid) AS definition
FROM pg_constraint
WHERE conrelid = CAST('calls' AS regclass) AND contype = 'f'
ORDER BY conname;

-- table_grants_of_calls --
SELECT CASE WHEN acl.grantee = 0 THEN 'PUBLIC'
            ELSE quote_ident(pg_get_userbyid(acl.grantee)) END AS grantee,
       acl.privilege_type AS privilege
FROM pg_class, aclexplode(pg_class.relacl) AS acl
WHERE pg_class.oid = CAST('calls' AS regclass) AND acl.grantee <> pg_class.relowner;

-- column_grants_of_calls --
SELECT CASE WHEN acl.grantee = 0 THEN 'PUBLIC'
            ELSE quote_ident(pg_get_userbyid(acl.grantee)) END AS grantee,
       acl.privilege_type AS privilege, attribute.attname AS column_name
FROM pg_attribute AS attribute, aclexplode(attribute.attacl) AS acl
WHERE attribute.attrelid = CAST('calls' AS regclass) AND attribute.attacl IS NOT NULL;

-- months_of_calls --
SELECT DISTINCT date_trunc('month', created_at AT TIME ZONE 'UTC') AS month
FROM calls
ORDER BY month;

-- partitions_of_calls --
SELECT child.relname AS name
FROM pg_inherits
JOIN pg_class AS child ON child.oid = pg_inherits.inhrelid
WHERE pg_inherits.inhparent = CAST('calls' AS regclass);

-- default_partition_rows_between --
SELECT count(*) AS rows FROM calls_p_default WHERE created_at >= :low AND created_at < :high;

-- functions_of_calls_type --
-- Functions whose signature uses the row type of calls, with whom they are
-- granted to (NULL: the default, PUBLIC).
SELECT CAST(CAST(pg_proc.oid AS regprocedure) AS text) AS signature,
       pg_get_functiondef(pg_proc.oid) AS definition,
       CASE WHEN pg_proc.proacl IS NULL THEN NULL
            ELSE ARRAY(SELECT CASE WHEN acl.grantee = 0 THEN 'PUBLIC'
                                   ELSE quote_ident(pg_get_userbyid(acl.grantee)) END
                       FROM aclexplode(pg_proc.proacl) AS acl
                       WHERE acl.privilege_type = 'EXECUTE'
                         AND acl.grantee <> pg_proc.proowner) END AS grants
FROM pg_depend
JOIN pg_proc ON pg_proc.oid = pg_depend.objid
WHERE pg_depend.classid = CAST('pg_proc' AS regclass)
  AND pg_depend.refobjid = (SELECT reltype FROM pg_class WHERE oid = CAST('calls' AS regclass))
ORDER BY signature;
