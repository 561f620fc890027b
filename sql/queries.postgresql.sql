-- PostgreSQL versions of the queries that differ between backends.

-- open_state --
-- Create the counter row of a state (past any calls it already has); a no-op
-- when it exists. callindex_open_state (migration 0004).
SELECT callindex_open_state(CAST(:state_id AS text));

-- allocate_call_index --
-- Reserve :count consecutive indices in one atomic UPDATE and return the first;
-- no row for an unknown state. callindex_reserve (migration 0004).
SELECT callindex_reserve AS first_index
FROM callindex_reserve(CAST(:state_id AS text), CAST(:count AS integer));

-- record_call --
-- Allocate and insert in one statement (callindex_record_call, migration 0004).
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
-- callindex_finish_call (migration 0004).
SELECT * FROM callindex_finish_call(
    CAST(:call_id AS text), CAST(:status AS text), CAST(:response AS jsonb),
    CAST(:response_hash AS text), CAST(:error AS jsonb), CAST(:error_hash AS text),
    CAST(:latency_ms AS double precision)
);

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
