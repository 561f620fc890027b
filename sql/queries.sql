-- The queries callindex runs, one named block each ("-- name --").
-- Parameters use the :name form; every block runs unchanged on PostgreSQL and SQLite.

-- open_state --
-- Create the counter row of a state; a no-op when it already exists.
INSERT INTO call_index_counters (state_id)
VALUES (:state_id)
ON CONFLICT (state_id) DO NOTHING;

-- allocate_call_index --
-- Reserve :count consecutive indices in one atomic statement and return the first.
-- No row comes back for an unknown state.
UPDATE call_index_counters
SET next_index = next_index + :count
WHERE state_id = :state_id
RETURNING next_index - :count AS first_index;
