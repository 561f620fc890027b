-- The queries callindex runs, one named block each ("-- name --").
-- This file holds the blocks that run unchanged on PostgreSQL and SQLite;
-- queries.postgresql.sql and queries.sqlite.sql hold the rest, under the same names.
-- Parameters use the :name form.

-- find_call --
SELECT call_id, state_id, call_index, call_type, status,
       request, request_hash, response, response_hash, error, error_hash,
       latency_ms, created_at, completed_at, hash_scheme
FROM calls
WHERE call_id = :call_id;

-- find_call_index --
SELECT call_index, created_at, completed_at FROM calls WHERE call_id = :call_id;

-- reservation_of --
-- Why record_call(call_index=k) wrote nothing: the state's next index,
-- whether k is taken (by a call, or by a call since purged), and whether a
-- seal covers k.
SELECT next_index,
       EXISTS (SELECT 1 FROM calls WHERE state_id = :state_id AND call_index = :call_index)
       OR EXISTS (SELECT 1 FROM call_purges
                  WHERE state_id = :state_id
                    AND first_index <= :call_index AND :call_index <= last_index)
           AS taken,
       EXISTS (SELECT 1 FROM call_seals
               WHERE state_id = :state_id AND last_index >= :call_index) AS sealed
FROM call_index_counters
WHERE state_id = :state_id;

-- state_is_open --
SELECT 1 FROM call_index_counters WHERE state_id = :state_id;

-- calls_of_state --
SELECT call_id, state_id, call_index, call_type, status,
       request, request_hash, response, response_hash, error, error_hash,
       latency_ms, created_at, completed_at, hash_scheme
FROM calls
WHERE state_id = :state_id
ORDER BY call_index;

-- calls_with_request_hash --
-- Replay: the calls whose request hashes to :request_hash, of one call type
-- (or any, with :call_type NULL), in (state_id, call_index) order.
SELECT call_id, state_id, call_index, call_type, status,
       request, request_hash, response, response_hash, error, error_hash,
       latency_ms, created_at, completed_at, hash_scheme
FROM calls
WHERE request_hash = :request_hash
  AND (CAST(:call_type AS text) IS NULL OR call_type = :call_type)
ORDER BY state_id, call_index;

-- repair_counters --
-- Move every counter that is behind its calls to max(call_index) + 1.
UPDATE call_index_counters
SET next_index = recorded.next_index
FROM (
    SELECT state_id, max(call_index) + 1 AS next_index
    FROM calls
    WHERE state_id IS NOT NULL
    GROUP BY state_id
) AS recorded
WHERE call_index_counters.state_id = recorded.state_id
  AND call_index_counters.next_index < recorded.next_index
RETURNING call_index_counters.state_id, call_index_counters.next_index;

-- duplicate_indices --
-- Impossible while UNIQUE(state_id, call_index) stands; checked all the same.
SELECT state_id, call_index, count(*) AS copies
FROM calls
WHERE state_id IS NOT NULL
GROUP BY state_id, call_index
HAVING count(*) > 1
ORDER BY state_id, call_index;

-- counters_behind --
SELECT counters.state_id, counters.next_index, recorded.max_index
FROM call_index_counters AS counters
JOIN (
    SELECT state_id, max(call_index) AS max_index FROM calls GROUP BY state_id
) AS recorded ON recorded.state_id = counters.state_id
WHERE counters.next_index <= recorded.max_index
ORDER BY counters.state_id;

-- index_gaps --
-- Missing indices below the highest recorded call of each state.
SELECT state_id, previous_index + 1 AS first_missing, call_index - 1 AS last_missing
FROM (
    SELECT state_id, call_index,
           lag(call_index, 1, -1) OVER (PARTITION BY state_id ORDER BY call_index)
               AS previous_index
    FROM calls
    WHERE state_id IS NOT NULL
) AS ordered
WHERE call_index > previous_index + 1
ORDER BY state_id, first_missing;

-- unused_reservations --
-- Indices a counter handed out above the highest recorded call of its state.
SELECT counters.state_id,
       coalesce(recorded.max_index, -1) + 1 AS first_unused,
       counters.next_index - 1 AS last_unused
FROM call_index_counters AS counters
LEFT JOIN (
    SELECT state_id, max(call_index) AS max_index FROM calls GROUP BY state_id
) AS recorded ON recorded.state_id = counters.state_id
WHERE counters.next_index > coalesce(recorded.max_index, -1) + 1
ORDER BY counters.state_id;

-- next_state_batch --
-- The last of the next :batch states (in state_id order) after :after, and how
-- many there are; read from the unique index on (state_id, call_index).
SELECT max(state_id) AS last_state, count(*) AS states
FROM (
    SELECT DISTINCT state_id FROM calls
    WHERE state_id > :after
    ORDER BY state_id
    LIMIT :batch
) AS batch;

-- backfill_counters --
-- Counters for the states in (:after, :last], past their recorded calls. A
-- counter that exists already was started by open_state or the numbering
-- trigger, past the calls it could see, and moved with every insert since:
-- it is left alone.
INSERT INTO call_index_counters (state_id, next_index)
SELECT state_id, max(call_index) + 1
FROM calls
WHERE state_id > :after AND state_id <= :last
  AND NOT EXISTS (
      SELECT 1 FROM call_index_counters AS counters WHERE counters.state_id = calls.state_id)
GROUP BY state_id
ON CONFLICT (state_id) DO NOTHING;

-- status_counts --
SELECT status, count(*) AS calls FROM calls GROUP BY status ORDER BY status;

-- state_count --
SELECT count(*) AS states FROM call_index_counters;


-- calls_through --
-- Sealing re-checks, under the counter's lock, that the calls it chained are
-- all there is up to the index it seals (counting the sealed calls purged since).
SELECT (SELECT count(*) FROM calls WHERE state_id = :state_id AND call_index <= :last_index)
     + (SELECT coalesce(sum(calls), 0) FROM call_purges
        WHERE state_id = :state_id AND last_index <= :last_index AND head IS NOT NULL)
       AS calls;

-- seals_of_state --
SELECT state_id, last_index, head, calls, sealed_at
FROM call_seals
WHERE state_id = :state_id
ORDER BY last_index;

-- sealed_states --
-- The next :batch sealed states after :after_state_id.
SELECT DISTINCT state_id FROM call_seals
WHERE state_id > :after_state_id
ORDER BY state_id
LIMIT :batch;

-- insert_seal --
INSERT INTO call_seals (state_id, last_index, head, calls)
VALUES (:state_id, :last_index, :head, :calls)
ON CONFLICT (state_id, last_index) DO NOTHING
RETURNING state_id, last_index, head, calls, sealed_at;

-- purges_of_state --
SELECT state_id, first_index, last_index, calls, head, purged_before, purged_at, purged_by
FROM call_purges
WHERE state_id = :state_id
ORDER BY first_index;

-- all_purges --
-- Every purged range, for verify.
SELECT state_id, first_index, last_index, calls, head, purged_before, purged_at, purged_by
FROM call_purges
ORDER BY state_id, first_index;

-- purge_ranges --
-- The runs of :state_id's calls a purge removes: finished, created before
-- :before, at or below :through (a sealed state's last seal). A run ends at
-- a call that stays; indices never recorded do not end it.
SELECT min(call_index) AS first_index, max(call_index) AS last_index, count(*) AS calls
FROM (
    SELECT call_index, purged,
           row_number() OVER (ORDER BY call_index)
           - row_number() OVER (PARTITION BY purged ORDER BY call_index) AS run
    FROM (
        SELECT call_index,
               CASE WHEN status <> 'pending' AND created_at < :before
                         AND call_index <= :through THEN 1 ELSE 0 END AS purged
        FROM calls
        WHERE state_id = :state_id
    ) AS marked
) AS runs
WHERE purged = 1
GROUP BY run
ORDER BY first_index;

-- delete_run --
-- The calls of one run purge_ranges found (read under the counter's lock:
-- no call lands in the run meanwhile, and a call finished meanwhile is not
-- in it).
DELETE FROM calls
WHERE state_id = :state_id AND :first_index <= call_index AND call_index <= :last_index
  AND status <> 'pending' AND created_at < :before;

-- insert_purge --
INSERT INTO call_purges
    (state_id, first_index, last_index, calls, head, purged_before, purged_by)
VALUES (:state_id, :first_index, :last_index, :calls, :head, :before, :purged_by)
RETURNING state_id, first_index, last_index, calls, head, purged_before, purged_at, purged_by;
