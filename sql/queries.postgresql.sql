-- PostgreSQL versions of the queries that differ between backends.

-- record_call --
-- Allocate and insert in one statement (one round trip). When :call_id is
-- already recorded the counter is left alone and the recorded call comes back
-- (created = false). No row at all: the state is unknown. A concurrent insert
-- of the same :call_id fails this statement as a whole on pk_calls, so its
-- counter bump rolls back too; the caller then retries and finds the call.
WITH existing AS (
    SELECT call_id FROM calls WHERE call_id = CAST(:call_id AS text)
), allocated AS (
    UPDATE call_index_counters
    SET next_index = next_index + 1
    WHERE state_id = CAST(:state_id AS text)
      AND NOT EXISTS (SELECT FROM existing)
    RETURNING next_index - 1 AS call_index
), inserted AS (
    INSERT INTO calls (
        call_id, state_id, call_index, call_type, status,
        request, request_hash, response, response_hash, error, error_hash,
        latency_ms, completed_at
    )
    SELECT CAST(:call_id AS text), CAST(:state_id AS text), allocated.call_index,
           CAST(:call_type AS varchar), CAST(:status AS varchar),
           CAST(:request AS jsonb), CAST(:request_hash AS varchar),
           CAST(:response AS jsonb), CAST(:response_hash AS varchar),
           CAST(:error AS jsonb), CAST(:error_hash AS varchar),
           CAST(:latency_ms AS double precision),
           CASE WHEN CAST(:status AS varchar) = 'pending' THEN NULL ELSE now() END
    FROM allocated
    RETURNING call_id, state_id, call_index, call_type, status,
              request, request_hash, response, response_hash, error, error_hash,
              latency_ms, created_at, completed_at
)
SELECT inserted.*, true AS created FROM inserted
UNION ALL
SELECT calls.call_id, calls.state_id, calls.call_index, calls.call_type, calls.status,
       calls.request, calls.request_hash, calls.response, calls.response_hash,
       calls.error, calls.error_hash, calls.latency_ms, calls.created_at, calls.completed_at,
       false AS created
FROM calls JOIN existing ON existing.call_id = calls.call_id;

-- finish_call --
-- Complete a pending call; no row when it is not pending (or unknown).
UPDATE calls
SET status = CAST(:status AS varchar),
    response = CAST(:response AS jsonb), response_hash = CAST(:response_hash AS varchar),
    error = CAST(:error AS jsonb), error_hash = CAST(:error_hash AS varchar),
    latency_ms = CAST(:latency_ms AS double precision),
    completed_at = now()
WHERE call_id = CAST(:call_id AS text) AND status = 'pending'
RETURNING call_id, state_id, call_index, call_type, status,
          request, request_hash, response, response_hash, error, error_hash,
          latency_ms, created_at, completed_at;

-- sweep_pending --
-- Mark pending calls older than :seconds abandoned, oldest first.
UPDATE calls
SET status = 'abandoned', completed_at = now()
WHERE status = 'pending'
  AND created_at <= now() - make_interval(secs => CAST(:seconds AS double precision))
RETURNING call_id, state_id, call_index;

-- stale_pending --
SELECT call_id, state_id, call_index, created_at
FROM calls
WHERE status = 'pending'
  AND created_at <= now() - make_interval(secs => CAST(:seconds AS double precision))
ORDER BY created_at;
