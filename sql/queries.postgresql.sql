-- PostgreSQL versions of the queries that differ between backends.

-- record_call --
-- Allocate and insert in one statement (callindex_record_call, migration 0003).
-- When :call_id is recorded already the counter is left alone and the recorded
-- call comes back. No row at all: the state is unknown. A concurrent insert of
-- the same :call_id fails this statement as a whole on pk_calls, so its counter
-- bump rolls back too; the caller then retries and finds the call.
SELECT * FROM callindex_record_call(
    CAST(:call_id AS text), CAST(:state_id AS text), CAST(:call_type AS text),
    CAST(:status AS text), CAST(:request AS jsonb), CAST(:request_hash AS text),
    CAST(:response AS jsonb), CAST(:response_hash AS text), CAST(:error AS jsonb),
    CAST(:error_hash AS text), CAST(:latency_ms AS double precision)
);

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
