-- SQLite versions of the queries that differ between backends. Timestamps are
-- UTC text with milliseconds, 'YYYY-MM-DD HH:MM:SS.SSS', which sorts in time order.

-- open_state --
-- Create the counter row of a state (past any calls it already has); a no-op
-- when it exists. The row offered is never behind an existing one, which the
-- guard against INSERT OR REPLACE would refuse.
INSERT INTO call_index_counters (state_id, next_index)
SELECT :state_id, max(coalesce(max(call_index) + 1, 0), coalesce(
    (SELECT next_index FROM call_index_counters WHERE state_id = :state_id), 0))
FROM calls WHERE state_id = :state_id
ON CONFLICT (state_id) DO NOTHING;

-- allocate_call_index --
-- Reserve :count consecutive indices in one atomic statement and return the first.
-- No row comes back for an unknown state.
UPDATE call_index_counters
SET next_index = next_index + :count
WHERE state_id = :state_id
RETURNING next_index - :count AS first_index;

-- allocate_opening --
-- allocate_call_index for CallRecorder(auto_open=True): an unknown state is
-- opened (past any calls it has) and allocated from in the same statement.
INSERT INTO call_index_counters (state_id, next_index)
SELECT :state_id, max(coalesce(max(call_index) + 1, 0) + :count, coalesce(
    (SELECT next_index + :count FROM call_index_counters WHERE state_id = :state_id), 0))
FROM calls WHERE state_id = :state_id
ON CONFLICT (state_id) DO UPDATE SET next_index = next_index + :count
RETURNING next_index - :count AS first_index;

-- insert_call --
-- The second half of record_call and begin_call, after allocate_call_index
-- in the same BEGIN IMMEDIATE transaction. No row: the numbering trigger of
-- legacy-writers mode found the index taken and recorded the call at the next.
INSERT INTO calls (
    call_id, state_id, call_index, call_type, status,
    request, request_hash, response, response_hash, error, error_hash,
    latency_ms, created_at, completed_at, hash_scheme
)
VALUES (
    :call_id, :state_id, :call_index, :call_type, :status,
    :request, :request_hash, :response, :response_hash, :error, :error_hash,
    :latency_ms, strftime('%Y-%m-%d %H:%M:%f', 'now'),
    CASE WHEN :status = 'pending' THEN NULL ELSE strftime('%Y-%m-%d %H:%M:%f', 'now') END,
    'rfc8785'
)
RETURNING call_index, created_at, completed_at;

-- finish_call --
UPDATE calls
SET status = :status,
    response = :response, response_hash = :response_hash,
    error = :error, error_hash = :error_hash,
    latency_ms = :latency_ms,
    completed_at = strftime('%Y-%m-%d %H:%M:%f', 'now')
WHERE call_id = :call_id AND status = 'pending'
RETURNING call_id, state_id, call_index, call_type, request, request_hash,
          created_at, completed_at, hash_scheme;

-- sweep_pending --
UPDATE calls
SET status = 'abandoned', completed_at = strftime('%Y-%m-%d %H:%M:%f', 'now')
WHERE status = 'pending'
  AND created_at <= strftime('%Y-%m-%d %H:%M:%f', 'now', '-' || :seconds || ' seconds')
  AND substr(state_id, 1, length(:state_prefix)) = :state_prefix
RETURNING call_id, state_id, call_index;

-- stale_pending --
SELECT call_id, state_id, call_index, created_at
FROM calls
WHERE status = 'pending'
  AND created_at <= strftime('%Y-%m-%d %H:%M:%f', 'now', '-' || :seconds || ' seconds')
ORDER BY created_at;

-- stored_payloads --
-- verify --hashes: the next :batch calls after :after_call_id (in call_id
-- order), with their payloads as stored and the hashes recorded. As stored:
-- a top-level number payload is a REAL or INTEGER (the JSON column's numeric
-- affinity), which CAST AS text would print with 15 digits only.
SELECT call_id, state_id, call_index, hash_scheme,
       request, request_hash,
       response, response_hash,
       error, error_hash
FROM calls
WHERE call_id > :after_call_id
ORDER BY call_id
LIMIT :batch;

-- chained_calls --
-- Sealing and verifying seals: the next :batch calls of :state_id after
-- :after_index, in index order, with every column a seal covers and the
-- payloads as stored.
SELECT call_id, call_index, call_type, status, latency_ms, created_at, completed_at,
       recorded_by, hash_scheme, request, request_hash, response, response_hash, error, error_hash
FROM calls
WHERE state_id = :state_id AND call_index > :after_index
ORDER BY call_index
LIMIT :batch;

-- lock_calls --
-- SQLite's write transaction (BEGIN IMMEDIATE) holds the database already.
SELECT 1;

-- lock_counter --
-- Sealing, purging: SQLite's write transaction (BEGIN IMMEDIATE) holds the lock already.
SELECT next_index FROM call_index_counters WHERE state_id = :state_id;

-- seal_candidates --
-- States with finished calls beyond their last seal and no pending call;
-- only :state_id when given; only those whose last call finished before
-- :finished_before when given (UTC text, as SQLite stores times).
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
        OR max(calls.completed_at) < :finished_before)
ORDER BY calls.state_id;

-- purge_candidates --
-- States with calls a purge removes: finished, created before :before (UTC
-- text, as SQLite stores times), of states whose id starts with
-- :state_prefix; in a sealed state only those at or below its last seal.
SELECT calls.state_id
FROM calls
LEFT JOIN (
    SELECT state_id, max(last_index) AS through FROM call_seals GROUP BY state_id
) AS sealed ON sealed.state_id = calls.state_id
WHERE calls.state_id IS NOT NULL
  AND substr(calls.state_id, 1, length(:state_prefix)) = :state_prefix
  AND calls.status <> 'pending'
  AND calls.created_at < :before
  AND calls.call_index <= coalesce(sealed.through, 9223372036854775807)
GROUP BY calls.state_id
ORDER BY calls.state_id;


-- begin_purge --
-- The guard of calls lets a DELETE through while this row exists; only this
-- write transaction ever sees it.
INSERT INTO callindex_purging (purge) VALUES (1);

-- end_purge --
DELETE FROM callindex_purging;
