-- SQLite versions of the queries that differ between backends. Timestamps are
-- UTC text with milliseconds, 'YYYY-MM-DD HH:MM:SS.SSS', which sorts in time order.

-- insert_call --
-- The second half of record_call, after find_call and allocate_call_index
-- in the same BEGIN IMMEDIATE transaction.
INSERT INTO calls (
    call_id, state_id, call_index, call_type, status,
    request, request_hash, response, response_hash, error, error_hash,
    latency_ms, completed_at
)
VALUES (
    :call_id, :state_id, :call_index, :call_type, :status,
    :request, :request_hash, :response, :response_hash, :error, :error_hash,
    :latency_ms,
    CASE WHEN :status = 'pending' THEN NULL ELSE strftime('%Y-%m-%d %H:%M:%f', 'now') END
)
RETURNING call_id, state_id, call_index, call_type, status,
          request, request_hash, response, response_hash, error, error_hash,
          latency_ms, created_at, completed_at;

-- finish_call --
UPDATE calls
SET status = :status,
    response = :response, response_hash = :response_hash,
    error = :error, error_hash = :error_hash,
    latency_ms = :latency_ms,
    completed_at = strftime('%Y-%m-%d %H:%M:%f', 'now')
WHERE call_id = :call_id AND status = 'pending'
RETURNING call_id, state_id, call_index, call_type, status,
          request, request_hash, response, response_hash, error, error_hash,
          latency_ms, created_at, completed_at;

-- sweep_pending --
UPDATE calls
SET status = 'abandoned', completed_at = strftime('%Y-%m-%d %H:%M:%f', 'now')
WHERE status = 'pending'
  AND created_at <= strftime('%Y-%m-%d %H:%M:%f', 'now', '-' || :seconds || ' seconds')
RETURNING call_id, state_id, call_index;

-- stale_pending --
SELECT call_id, state_id, call_index, created_at
FROM calls
WHERE status = 'pending'
  AND created_at <= strftime('%Y-%m-%d %H:%M:%f', 'now', '-' || :seconds || ' seconds')
ORDER BY created_at;
