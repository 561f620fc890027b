BEGIN;

CREATE TABLE callindex_alembic_version (
    version_num VARCHAR(32) NOT NULL, 
    CONSTRAINT callindex_alembic_version_pkc PRIMARY KEY (version_num)
);

-- Running upgrade  -> 0001

CREATE TABLE call_index_counters (
    state_id TEXT NOT NULL, 
    next_index BIGINT DEFAULT '0' NOT NULL, 
    created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
    CONSTRAINT pk_call_index_counters PRIMARY KEY (state_id), 
    CONSTRAINT ck_call_index_counters_next_index_non_negative CHECK (next_index >= 0), 
    CONSTRAINT ck_call_index_counters_state_id_length CHECK (length(state_id) BETWEEN 1 AND 255)
)
 WITH (fillfactor = 20);

CREATE TABLE calls (
    call_id TEXT NOT NULL, 
    state_id TEXT NOT NULL, 
    call_index BIGINT NOT NULL, 
    call_type VARCHAR(64) NOT NULL, 
    status VARCHAR(16) NOT NULL, 
    request JSONB, 
    request_hash VARCHAR(64), 
    response JSONB, 
    response_hash VARCHAR(64), 
    error JSONB, 
    error_hash VARCHAR(64), 
    latency_ms FLOAT, 
    created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
    completed_at TIMESTAMP WITH TIME ZONE, 
    CONSTRAINT pk_calls PRIMARY KEY (call_id), 
    CONSTRAINT ck_calls_call_index_non_negative CHECK (call_index >= 0), 
    CONSTRAINT ck_calls_status_known CHECK (status IN ('pending', 'success', 'error', 'abandoned')), 
    CONSTRAINT fk_calls_state_id_call_index_counters FOREIGN KEY(state_id) REFERENCES call_index_counters (state_id) ON DELETE RESTRICT, 
    CONSTRAINT uq_calls_state_id_call_index UNIQUE (state_id, call_index)
);

CREATE FUNCTION callindex_allocate(state_id text, count integer DEFAULT 1)
RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    first_index bigint;
BEGIN
    IF callindex_allocate.count IS NULL OR callindex_allocate.count < 1 THEN
        RAISE EXCEPTION 'callindex_allocate: count must be at least 1, not %',
            callindex_allocate.count
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE call_index_counters AS counters
    SET next_index = counters.next_index + callindex_allocate.count
    WHERE counters.state_id = callindex_allocate.state_id
    RETURNING counters.next_index - callindex_allocate.count INTO first_index;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'callindex_allocate: unknown state %', callindex_allocate.state_id
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN first_index;
END;
$$;

INSERT INTO callindex_alembic_version (version_num) VALUES ('0001') RETURNING callindex_alembic_version.version_num;

-- Running upgrade 0001 -> 0002

CREATE INDEX IF NOT EXISTS ix_calls_pending_created_at ON calls (created_at) WHERE status = 'pending';

CREATE FUNCTION callindex_guard_calls() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        RAISE EXCEPTION 'callindex: % cannot be truncated: the audit trail is append-only',
            TG_TABLE_NAME USING ERRCODE = 'CX001';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'callindex: call % cannot be deleted: the audit trail is append-only',
            OLD.call_id USING ERRCODE = 'CX001';
    END IF;
    IF OLD.status <> 'pending' THEN
        RAISE EXCEPTION 'callindex: call % is %, and a finished call cannot be changed',
            OLD.call_id, OLD.status USING ERRCODE = 'CX001';
    END IF;
    IF NEW.status = 'pending'
       OR NEW.completed_at IS NULL
       OR NEW.call_id IS DISTINCT FROM OLD.call_id
       OR NEW.state_id IS DISTINCT FROM OLD.state_id
       OR NEW.call_index IS DISTINCT FROM OLD.call_index
       OR NEW.call_type IS DISTINCT FROM OLD.call_type
       OR NEW.request IS DISTINCT FROM OLD.request
       OR NEW.request_hash IS DISTINCT FROM OLD.request_hash
       OR NEW.created_at IS DISTINCT FROM OLD.created_at THEN
        RAISE EXCEPTION 'callindex: pending call % may only be finished or abandoned, '
            'with its completed_at', OLD.call_id USING ERRCODE = 'CX001';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER callindex_guard_calls BEFORE UPDATE OR DELETE ON calls FOR EACH ROW EXECUTE FUNCTION callindex_guard_calls();

CREATE TRIGGER callindex_guard_calls_truncate BEFORE TRUNCATE ON calls FOR EACH STATEMENT EXECUTE FUNCTION callindex_guard_calls();

CREATE FUNCTION callindex_guard_counters() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'callindex: a counter may only move forward and is never deleted '
        '(% on call_index_counters)', TG_OP USING ERRCODE = 'CX001';
END;
$$;

CREATE TRIGGER callindex_guard_counters BEFORE UPDATE ON call_index_counters FOR EACH ROW WHEN (NEW.next_index < OLD.next_index OR NEW.state_id <> OLD.state_id) EXECUTE FUNCTION callindex_guard_counters();

CREATE TRIGGER callindex_guard_counters_delete BEFORE DELETE ON call_index_counters FOR EACH ROW EXECUTE FUNCTION callindex_guard_counters();

CREATE TRIGGER callindex_guard_counters_truncate BEFORE TRUNCATE ON call_index_counters FOR EACH STATEMENT EXECUTE FUNCTION callindex_guard_counters();

UPDATE callindex_alembic_version SET version_num='0002' WHERE callindex_alembic_version.version_num = '0001';

-- Running upgrade 0002 -> 0003

CREATE FUNCTION callindex_record_call(
    p_call_id text, p_state_id text, p_call_type text, p_status text,
    p_request jsonb, p_request_hash text, p_response jsonb, p_response_hash text,
    p_error jsonb, p_error_hash text, p_latency_ms double precision
) RETURNS SETOF calls
LANGUAGE plpgsql
AS $$
DECLARE
    recorded calls;
    allocated bigint;
BEGIN
    -- A call_id recorded already comes back as it is: no second row, no index used.
    SELECT * INTO recorded FROM calls WHERE call_id = p_call_id;
    IF FOUND THEN
        RETURN NEXT recorded;
        RETURN;
    END IF;
    UPDATE call_index_counters AS counters
    SET next_index = counters.next_index + 1
    WHERE counters.state_id = p_state_id
    RETURNING counters.next_index - 1 INTO allocated;
    IF NOT FOUND THEN
        RETURN;  -- unknown state: no row
    END IF;
    -- A concurrent insert of the same call_id fails this one on pk_calls, and
    -- the counter bump above rolls back with it.
    INSERT INTO calls (
        call_id, state_id, call_index, call_type, status,
        request, request_hash, response, response_hash, error, error_hash,
        latency_ms, completed_at
    ) VALUES (
        p_call_id, p_state_id, allocated, p_call_type, p_status,
        p_request, p_request_hash, p_response, p_response_hash, p_error, p_error_hash,
        p_latency_ms, CASE WHEN p_status = 'pending' THEN NULL ELSE now() END
    )
    RETURNING * INTO recorded;
    RETURN NEXT recorded;
END;
$$;

UPDATE callindex_alembic_version SET version_num='0003' WHERE callindex_alembic_version.version_num = '0002';

-- Running upgrade 0003 -> 0004

ALTER TABLE calls ADD COLUMN recorded_by TEXT;

ALTER TABLE calls ALTER COLUMN recorded_by SET DEFAULT session_user;

DROP FUNCTION callindex_record_call(text, text, text, text, jsonb, text, jsonb, text, jsonb, text, double precision);

DROP FUNCTION callindex_allocate(text, integer);

CREATE FUNCTION callindex_number_call() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    next bigint;
BEGIN
    NEW.recorded_by := session_user;  -- whatever the insert said
    IF NEW.state_id IS NULL THEN
        RETURN NEW;  -- an adopted table may hold calls of no state; not numbered here
    END IF;
    IF NEW.call_index IS NULL THEN
        UPDATE call_index_counters SET next_index = next_index + 1
        WHERE state_id = NEW.state_id
        RETURNING next_index - 1 INTO NEW.call_index;
        IF FOUND THEN
            RETURN NEW;
        END IF;
    END IF;
    -- Take the counter until this insert commits: every writer of the state
    -- queues here, so the checks below see every call committed before. It is
    -- written, not only locked, so that a REPEATABLE READ or SERIALIZABLE
    -- writer whose snapshot misses the state's last insert gets a
    -- serialization failure (to retry) instead of a unique violation.
    UPDATE call_index_counters SET next_index = next_index
    WHERE state_id = NEW.state_id
    RETURNING next_index INTO next;
    IF NOT FOUND THEN
        INSERT INTO call_index_counters (state_id, next_index)
        SELECT NEW.state_id, coalesce(max(call_index) + 1, 0)
        FROM calls WHERE state_id = NEW.state_id
        ON CONFLICT (state_id) DO NOTHING;
        UPDATE call_index_counters SET next_index = next_index
        WHERE state_id = NEW.state_id
        RETURNING next_index INTO next;
    END IF;
    IF NEW.call_index > next + 1000000 THEN
        RAISE EXCEPTION 'callindex: call_index % is more than 1000000 ahead of the '
            'counter of state % (%)', NEW.call_index, NEW.state_id, next
            USING ERRCODE = 'numeric_value_out_of_range';
    END IF;
    IF NEW.call_index IS NULL
       OR (NEW.call_index < next AND EXISTS (
               SELECT 1 FROM calls
               WHERE state_id = NEW.state_id AND call_index = NEW.call_index)) THEN
        NEW.call_index := next;
    END IF;
    IF NEW.call_index >= next THEN
        UPDATE call_index_counters SET next_index = NEW.call_index + 1
        WHERE state_id = NEW.state_id;
    END IF;
    RETURN NEW;
END;
$$;

CREATE FUNCTION callindex_reserve(p_state_id text, p_count integer)
RETURNS SETOF bigint
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
BEGIN
    -- No row: the state is unknown, or p_count is not in 1..1000000 (the
    -- library's limit too: a counter must never be pushed out of reach).
    RETURN QUERY
    UPDATE call_index_counters
    SET next_index = next_index + p_count
    WHERE state_id = p_state_id AND p_count BETWEEN 1 AND 1000000
    RETURNING next_index - p_count;
END;
$$;

CREATE FUNCTION callindex_allocate(state_id text, count integer DEFAULT 1)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    first_index bigint;
BEGIN
    IF callindex_allocate.count IS NULL
       OR callindex_allocate.count NOT BETWEEN 1 AND 1000000 THEN
        RAISE EXCEPTION 'callindex_allocate: count must be 1 to 1000000, not %',
            callindex_allocate.count
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT reserved INTO first_index
    FROM callindex_reserve(callindex_allocate.state_id, callindex_allocate.count) AS reserved;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'callindex_allocate: unknown state %', callindex_allocate.state_id
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN first_index;
END;
$$;

CREATE FUNCTION callindex_open_state(p_state_id text) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
BEGIN
    -- A state with calls but no counter yet (an adopted table) starts past them.
    INSERT INTO call_index_counters (state_id, next_index)
    SELECT p_state_id, coalesce(max(call_index) + 1, 0) FROM calls WHERE state_id = p_state_id
    ON CONFLICT (state_id) DO NOTHING;
END;
$$;

CREATE FUNCTION callindex_record_call(
    p_call_id text, p_state_id text, p_call_type text, p_status text,
    p_request jsonb, p_request_hash text, p_response jsonb, p_response_hash text,
    p_error jsonb, p_error_hash text, p_latency_ms double precision
) RETURNS SETOF calls
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    recorded calls;
BEGIN
    -- A call_id recorded already comes back as it is: no second row, no index used.
    SELECT * INTO recorded FROM calls WHERE call_id = p_call_id;
    IF FOUND THEN
        RETURN NEXT recorded;
        RETURN;
    END IF;
    PERFORM FROM call_index_counters WHERE state_id = p_state_id;
    IF NOT FOUND THEN
        RETURN;  -- unknown state: no row
    END IF;
    -- callindex_number_call gives the call its index. A concurrent insert of
    -- the same call_id fails this one on its primary key, and the counter
    -- bump rolls back with it.
    INSERT INTO calls (
        call_id, state_id, call_type, status,
        request, request_hash, response, response_hash, error, error_hash,
        latency_ms, created_at, completed_at
    ) VALUES (
        p_call_id, p_state_id, p_call_type, p_status,
        p_request, p_request_hash, p_response, p_response_hash, p_error, p_error_hash,
        p_latency_ms, now(), CASE WHEN p_status = 'pending' THEN NULL ELSE now() END
    )
    RETURNING * INTO recorded;
    RETURN NEXT recorded;
END;
$$;

CREATE FUNCTION callindex_finish_call(
    p_call_id text, p_status text, p_response jsonb, p_response_hash text,
    p_error jsonb, p_error_hash text, p_latency_ms double precision
) RETURNS SETOF calls
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
BEGIN
    IF p_status IS NULL OR p_status NOT IN ('success', 'error') THEN
        RAISE EXCEPTION 'callindex_finish_call: status must be success or error, not %',
            p_status USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- No row: the call is not pending (finished, abandoned or unknown).
    RETURN QUERY
    UPDATE calls
    SET status = p_status, response = p_response, response_hash = p_response_hash,
        error = p_error, error_hash = p_error_hash, latency_ms = p_latency_ms,
        completed_at = now()
    WHERE call_id = p_call_id AND status = 'pending'
      AND (recorded_by IS NULL OR recorded_by = session_user)
    RETURNING *;
    IF NOT FOUND AND EXISTS (
        SELECT 1 FROM calls WHERE call_id = p_call_id AND status = 'pending'
    ) THEN
        RAISE EXCEPTION 'callindex: call % was recorded by another role, and only that role '
            'may finish it', p_call_id USING ERRCODE = 'insufficient_privilege';
    END IF;
END;
$$;

CREATE TRIGGER callindex_number_call BEFORE INSERT ON calls FOR EACH ROW EXECUTE FUNCTION callindex_number_call();

DO $$
DECLARE
    fn text;
BEGIN
    FOREACH fn IN ARRAY ARRAY['callindex_number_call()', 'callindex_reserve(text, integer)', 'callindex_allocate(text, integer)', 'callindex_open_state(text)', 'callindex_record_call(text, text, text, text, jsonb, text, jsonb, text, jsonb, text, double precision)', 'callindex_finish_call(text, text, jsonb, text, jsonb, text, double precision)'] LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_temp', fn, current_schema());
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', fn);
    END LOOP;
END;
$$;

UPDATE callindex_alembic_version SET version_num='0004' WHERE callindex_alembic_version.version_num = '0003';

-- Running upgrade 0004 -> 0005

CREATE OR REPLACE FUNCTION callindex_guard_counters() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'callindex: a counter may only move forward, by at most 1000000 at '
        'a time, and is never deleted (% on call_index_counters)', TG_OP
        USING ERRCODE = 'CX001';
END;
$$;

DROP TRIGGER callindex_guard_counters ON call_index_counters;

CREATE TRIGGER callindex_guard_counters BEFORE UPDATE ON call_index_counters FOR EACH ROW WHEN (NEW.next_index < OLD.next_index OR NEW.next_index > OLD.next_index + 1000000 OR NEW.state_id <> OLD.state_id) EXECUTE FUNCTION callindex_guard_counters();

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM calls) THEN
        DROP TRIGGER IF EXISTS callindex_number_call ON calls;
    END IF;
END;
$$;

CREATE PROCEDURE callindex_record_released(
    p_call_id text, p_state_id text, p_call_type text, p_status text,
    p_request jsonb, p_request_hash text, p_response jsonb, p_response_hash text,
    p_error jsonb, p_error_hash text, p_latency_ms double precision,
    INOUT call_index bigint DEFAULT NULL,
    INOUT created_at timestamptz DEFAULT NULL,
    INOUT completed_at timestamptz DEFAULT NULL,
    INOUT waited_ms double precision DEFAULT NULL
)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    WITH counter AS (
        UPDATE call_index_counters SET next_index = next_index + 1
        WHERE state_id = p_state_id
        RETURNING next_index - 1 AS next
    )
    INSERT INTO calls (
        call_id, state_id, call_index, call_type, status,
        request, request_hash, response, response_hash, error, error_hash,
        latency_ms, created_at, completed_at
    )
    SELECT p_call_id, p_state_id, counter.next, p_call_type, p_status,
           p_request, p_request_hash, p_response, p_response_hash, p_error, p_error_hash,
           p_latency_ms, now(), CASE WHEN p_status = 'pending' THEN NULL ELSE now() END
    FROM counter
    RETURNING calls.call_index, calls.created_at, calls.completed_at,
              1000 * extract(epoch FROM clock_timestamp() - statement_timestamp())
    INTO call_index, created_at, completed_at, waited_ms;
    IF call_index IS NULL THEN
        RETURN;  -- unknown state: nothing written
    END IF;
    -- The call's commit is asynchronous: the counter row is free from here.
    COMMIT;
    -- Acknowledge only once the log is on disk past that commit.
    PERFORM set_config('synchronous_commit', 'on', true);
    PERFORM pg_logical_emit_message(true, 'callindex', '');
END;
$$;

CREATE OR REPLACE FUNCTION callindex_record_call(
    p_call_id text, p_state_id text, p_call_type text, p_status text,
    p_request jsonb, p_request_hash text, p_response jsonb, p_response_hash text,
    p_error jsonb, p_error_hash text, p_latency_ms double precision
) RETURNS SETOF calls
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    recorded calls;
BEGIN
    SELECT * INTO recorded FROM calls WHERE call_id = p_call_id;
    IF FOUND THEN
        RETURN NEXT recorded;
        RETURN;
    END IF;
    WITH counter AS (
        UPDATE call_index_counters SET next_index = next_index + 1
        WHERE state_id = p_state_id
        RETURNING next_index - 1 AS next
    )
    INSERT INTO calls (
        call_id, state_id, call_index, call_type, status,
        request, request_hash, response, response_hash, error, error_hash,
        latency_ms, created_at, completed_at
    )
    SELECT p_call_id, p_state_id, counter.next, p_call_type, p_status,
           p_request, p_request_hash, p_response, p_response_hash, p_error, p_error_hash,
           p_latency_ms, now(), CASE WHEN p_status = 'pending' THEN NULL ELSE now() END
    FROM counter
    RETURNING * INTO recorded;
    IF FOUND THEN
        RETURN NEXT recorded;  -- no row at all: the state is unknown
    END IF;
END;
$$;

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION callindex_record_call(text, text, text, text, jsonb, text, '
                   'jsonb, text, jsonb, text, double precision) SET search_path = %I, pg_temp',
                   current_schema());
END;
$$;

DROP TRIGGER callindex_guard_calls ON calls;

CREATE TRIGGER callindex_guard_calls BEFORE DELETE ON calls FOR EACH ROW EXECUTE FUNCTION callindex_guard_calls();

CREATE TRIGGER callindex_guard_calls_update BEFORE UPDATE ON calls FOR EACH ROW WHEN (OLD.status <> 'pending' OR NEW.status = 'pending' OR NEW.completed_at IS NULL OR NEW.call_id IS DISTINCT FROM OLD.call_id OR NEW.state_id IS DISTINCT FROM OLD.state_id OR NEW.call_index IS DISTINCT FROM OLD.call_index OR NEW.call_type IS DISTINCT FROM OLD.call_type OR NEW.request IS DISTINCT FROM OLD.request OR NEW.request_hash IS DISTINCT FROM OLD.request_hash OR NEW.created_at IS DISTINCT FROM OLD.created_at) EXECUTE FUNCTION callindex_guard_calls();

CREATE FUNCTION callindex_vouch_index() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    next bigint;
BEGIN
    IF NEW.state_id IS NULL THEN
        RETURN NEW;
    END IF;
    SELECT next_index INTO next FROM call_index_counters WHERE state_id = NEW.state_id;
    IF next IS NULL OR NEW.call_index IS NULL OR NEW.call_index >= next THEN
        RAISE EXCEPTION 'callindex: call_index % of state % was not handed out by its '
            'counter (next %)', NEW.call_index, NEW.state_id, next USING ERRCODE = 'CX001';
    END IF;
    RETURN NEW;
END;
$$;

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION callindex_vouch_index() SET search_path = %I, pg_temp',
                   current_schema());
    REVOKE EXECUTE ON FUNCTION callindex_vouch_index() FROM PUBLIC;
    EXECUTE format('CREATE TRIGGER callindex_vouch_index BEFORE INSERT ON calls FOR EACH ROW '
                   'WHEN (current_user <> %L) EXECUTE FUNCTION callindex_vouch_index()',
                   current_user);
END;
$$;

UPDATE callindex_alembic_version SET version_num='0005' WHERE callindex_alembic_version.version_num = '0004';

-- Running upgrade 0005 -> 0006

CREATE INDEX IF NOT EXISTS ix_calls_request_hash ON calls (request_hash);

ALTER TABLE calls ADD COLUMN hash_scheme TEXT NOT NULL DEFAULT 'sorted-json' CONSTRAINT ck_calls_hash_scheme_known CHECK (hash_scheme IN ('sorted-json', 'rfc8785'));

DROP TRIGGER callindex_guard_calls_update ON calls;

ALTER TABLE calls ALTER COLUMN request TYPE json USING request::json, ALTER COLUMN response TYPE json USING response::json, ALTER COLUMN error TYPE json USING error::json;

CREATE OR REPLACE FUNCTION callindex_guard_calls() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        RAISE EXCEPTION 'callindex: % cannot be truncated: the audit trail is append-only',
            TG_TABLE_NAME USING ERRCODE = 'CX001';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'callindex: call % cannot be deleted: the audit trail is append-only',
            OLD.call_id USING ERRCODE = 'CX001';
    END IF;
    IF OLD.status <> 'pending' THEN
        RAISE EXCEPTION 'callindex: call % is %, and a finished call cannot be changed',
            OLD.call_id, OLD.status USING ERRCODE = 'CX001';
    END IF;
    IF NEW.status = 'pending'
       OR NEW.completed_at IS NULL
       OR NEW.call_id IS DISTINCT FROM OLD.call_id
       OR NEW.state_id IS DISTINCT FROM OLD.state_id
       OR NEW.call_index IS DISTINCT FROM OLD.call_index
       OR NEW.call_type IS DISTINCT FROM OLD.call_type
       OR NEW.request::text IS DISTINCT FROM OLD.request::text
       OR NEW.request_hash IS DISTINCT FROM OLD.request_hash
       OR NEW.hash_scheme IS DISTINCT FROM OLD.hash_scheme
       OR NEW.created_at IS DISTINCT FROM OLD.created_at THEN
        RAISE EXCEPTION 'callindex: pending call % may only be finished or abandoned, '
            'with its completed_at', OLD.call_id USING ERRCODE = 'CX001';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER callindex_guard_calls_update BEFORE UPDATE ON calls FOR EACH ROW WHEN (OLD.status <> 'pending' OR NEW.status = 'pending' OR NEW.completed_at IS NULL OR NEW.call_id IS DISTINCT FROM OLD.call_id OR NEW.state_id IS DISTINCT FROM OLD.state_id OR NEW.call_index IS DISTINCT FROM OLD.call_index OR NEW.call_type IS DISTINCT FROM OLD.call_type OR NEW.request::text IS DISTINCT FROM OLD.request::text OR NEW.request_hash IS DISTINCT FROM OLD.request_hash OR NEW.hash_scheme IS DISTINCT FROM OLD.hash_scheme OR NEW.created_at IS DISTINCT FROM OLD.created_at) EXECUTE FUNCTION callindex_guard_calls();

DROP PROCEDURE callindex_record_released(text, text, text, text, jsonb, text, jsonb, text, jsonb, text, double precision, bigint, timestamptz, timestamptz, double precision);

CREATE PROCEDURE callindex_record_released(
    p_call_id text, p_state_id text, p_call_type text, p_status text,
    p_request text, p_request_hash text, p_response text, p_response_hash text,
    p_error text, p_error_hash text, p_latency_ms double precision,
    INOUT call_index bigint DEFAULT NULL,
    INOUT created_at timestamptz DEFAULT NULL,
    INOUT completed_at timestamptz DEFAULT NULL,
    INOUT waited_ms double precision DEFAULT NULL
)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    WITH counter AS (
        UPDATE call_index_counters SET next_index = next_index + 1
        WHERE state_id = p_state_id
        RETURNING next_index - 1 AS next
    )
    INSERT INTO calls (
        call_id, state_id, call_index, call_type, status,
        request, request_hash, response, response_hash, error, error_hash,
        latency_ms, created_at, completed_at, hash_scheme
    )
    SELECT p_call_id, p_state_id, counter.next, p_call_type, p_status,
           p_request::json, p_request_hash, p_response::json, p_response_hash,
           p_error::json, p_error_hash,
           p_latency_ms, now(), CASE WHEN p_status = 'pending' THEN NULL ELSE now() END,
           'rfc8785'
    FROM counter
    RETURNING calls.call_index, calls.created_at, calls.completed_at,
              1000 * extract(epoch FROM clock_timestamp() - statement_timestamp())
    INTO call_index, created_at, completed_at, waited_ms;
    IF call_index IS NULL THEN
        RETURN;  -- unknown state: nothing written
    END IF;
    -- The call's commit is asynchronous: the counter row is free from here.
    COMMIT;
    -- Acknowledge only once the log is on disk past that commit.
    PERFORM set_config('synchronous_commit', 'on', true);
    PERFORM pg_logical_emit_message(true, 'callindex', '');
END;
$$;

CREATE FUNCTION callindex_record_call(
    p_call_id text, p_state_id text, p_call_type text, p_status text,
    p_request text, p_request_hash text, p_response text, p_response_hash text,
    p_error text, p_error_hash text, p_latency_ms double precision
) RETURNS SETOF calls
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    recorded calls;
BEGIN
    SELECT * INTO recorded FROM calls WHERE call_id = p_call_id;
    IF FOUND THEN
        RETURN NEXT recorded;
        RETURN;
    END IF;
    WITH counter AS (
        UPDATE call_index_counters SET next_index = next_index + 1
        WHERE state_id = p_state_id
        RETURNING next_index - 1 AS next
    )
    INSERT INTO calls (
        call_id, state_id, call_index, call_type, status,
        request, request_hash, response, response_hash, error, error_hash,
        latency_ms, created_at, completed_at, hash_scheme
    )
    SELECT p_call_id, p_state_id, counter.next, p_call_type, p_status,
           p_request::json, p_request_hash, p_response::json, p_response_hash,
           p_error::json, p_error_hash,
           p_latency_ms, now(), CASE WHEN p_status = 'pending' THEN NULL ELSE now() END,
           'rfc8785'
    FROM counter
    RETURNING * INTO recorded;
    IF FOUND THEN
        RETURN NEXT recorded;  -- no row at all: the state is unknown
    END IF;
END;
$$;

CREATE FUNCTION callindex_finish_call(
    p_call_id text, p_status text, p_response text, p_response_hash text,
    p_error text, p_error_hash text, p_latency_ms double precision
) RETURNS SETOF calls
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
BEGIN
    IF p_status IS NULL OR p_status NOT IN ('success', 'error') THEN
        RAISE EXCEPTION 'callindex_finish_call: status must be success or error, not %',
            p_status USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- No row: the call is not pending (finished, abandoned or unknown).
    RETURN QUERY
    UPDATE calls
    SET status = p_status, response = p_response::json, response_hash = p_response_hash,
        error = p_error::json, error_hash = p_error_hash, latency_ms = p_latency_ms,
        completed_at = now()
    WHERE call_id = p_call_id AND status = 'pending'
      AND (recorded_by IS NULL OR recorded_by = session_user)
    RETURNING *;
    IF NOT FOUND AND EXISTS (
        SELECT 1 FROM calls WHERE call_id = p_call_id AND status = 'pending'
    ) THEN
        RAISE EXCEPTION 'callindex: call % was recorded by another role, and only that role '
            'may finish it', p_call_id USING ERRCODE = 'insufficient_privilege';
    END IF;
END;
$$;

DO $$
DECLARE
    fn text;
BEGIN
    FOREACH fn IN ARRAY ARRAY['callindex_record_call(text, text, text, text, text, text, text, text, text, text, double precision)', 'callindex_finish_call(text, text, text, text, text, text, double precision)'] LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_temp', fn, current_schema());
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', fn);
    END LOOP;
END;
$$;

CREATE FUNCTION callindex_guard_new_counter() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'callindex: a new counter starts at most 1000000 (state %, next %)',
        NEW.state_id, NEW.next_index USING ERRCODE = 'CX001';
END;
$$;

DO $$
BEGIN
    EXECUTE format('CREATE TRIGGER callindex_guard_new_counter BEFORE INSERT '
                   'ON call_index_counters FOR EACH ROW '
                   'WHEN (NEW.next_index > 1000000 AND current_user <> %L) '
                   'EXECUTE FUNCTION callindex_guard_new_counter()', current_user);
END;
$$;

UPDATE callindex_alembic_version SET version_num='0006' WHERE callindex_alembic_version.version_num = '0005';

-- Running upgrade 0006 -> 0007

ALTER TABLE calls ADD CONSTRAINT ck_calls_call_type_identifier CHECK (call_type ~ '^[a-z0-9_]{1,32}$') NOT VALID;

ALTER TABLE calls ADD CONSTRAINT ck_calls_latency_ms_finite CHECK (latency_ms IS NULL OR (latency_ms >= 0 AND latency_ms < 'Infinity')) NOT VALID;

CREATE OR REPLACE FUNCTION callindex_vouch_index() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    next bigint;
BEGIN
    -- The database, not the writer, says when a call was made and finished.
    NEW.created_at := now();
    NEW.completed_at := CASE WHEN NEW.status = 'pending' THEN NULL ELSE now() END;
    IF NEW.state_id IS NULL THEN
        RETURN NEW;
    END IF;
    SELECT next_index INTO next FROM call_index_counters WHERE state_id = NEW.state_id;
    IF next IS NULL OR NEW.call_index IS NULL OR NEW.call_index >= next THEN
        RAISE EXCEPTION 'callindex: call_index % of state % was not handed out by its '
            'counter (next %)', NEW.call_index, NEW.state_id, next USING ERRCODE = 'CX001';
    END IF;
    RETURN NEW;
END;
$$;

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION callindex_vouch_index() SET search_path = %I, pg_temp',
                   current_schema());
END;
$$;

UPDATE callindex_alembic_version SET version_num='0007' WHERE callindex_alembic_version.version_num = '0006';

-- Running upgrade 0007 -> 0008

CREATE OR REPLACE FUNCTION callindex_guard_counters() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'callindex: a counter may only move forward, by at most 1000000 at '
        'a time, and is never deleted (% on call_index_counters)', TG_OP
        USING ERRCODE = 'CX002';
END;
$$;

CREATE OR REPLACE FUNCTION callindex_guard_new_counter() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'callindex: a new counter starts at most 1000000 (state %, next %)',
        NEW.state_id, NEW.next_index USING ERRCODE = 'CX002';
END;
$$;

CREATE OR REPLACE FUNCTION callindex_vouch_index() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    next bigint;
BEGIN
    -- The database, not the writer, says when a call was made and finished.
    NEW.created_at := now();
    NEW.completed_at := CASE WHEN NEW.status = 'pending' THEN NULL ELSE now() END;
    IF NEW.state_id IS NULL THEN
        RETURN NEW;
    END IF;
    SELECT next_index INTO next FROM call_index_counters WHERE state_id = NEW.state_id;
    IF next IS NULL OR NEW.call_index IS NULL OR NEW.call_index >= next THEN
        RAISE EXCEPTION 'callindex: call_index % of state % was not handed out by its '
            'counter (next %)', NEW.call_index, NEW.state_id, next USING ERRCODE = 'CX003';
    END IF;
    RETURN NEW;
END;
$$;

CREATE OR REPLACE FUNCTION callindex_number_call() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    next bigint;
BEGIN
    NEW.recorded_by := session_user;  -- whatever the insert said
    IF NEW.state_id IS NULL THEN
        RETURN NEW;  -- an adopted table may hold calls of no state; not numbered here
    END IF;
    IF NEW.call_index IS NULL THEN
        UPDATE call_index_counters SET next_index = next_index + 1
        WHERE state_id = NEW.state_id
        RETURNING next_index - 1 INTO NEW.call_index;
        IF FOUND THEN
            RETURN NEW;
        END IF;
    END IF;
    -- Take the counter until this insert commits: every writer of the state
    -- queues here, so the checks below see every call committed before. It is
    -- written, not only locked, so that a REPEATABLE READ or SERIALIZABLE
    -- writer whose snapshot misses the state's last insert gets a
    -- serialization failure (to retry) instead of a unique violation.
    UPDATE call_index_counters SET next_index = next_index
    WHERE state_id = NEW.state_id
    RETURNING next_index INTO next;
    IF NOT FOUND THEN
        INSERT INTO call_index_counters (state_id, next_index)
        SELECT NEW.state_id, coalesce(max(call_index) + 1, 0)
        FROM calls WHERE state_id = NEW.state_id
        ON CONFLICT (state_id) DO NOTHING;
        UPDATE call_index_counters SET next_index = next_index
        WHERE state_id = NEW.state_id
        RETURNING next_index INTO next;
    END IF;
    IF NEW.call_index > next + 1000000 THEN
        RAISE EXCEPTION 'callindex: call_index % is more than 1000000 ahead of the '
            'counter of state % (%)', NEW.call_index, NEW.state_id, next
            USING ERRCODE = 'CX003';
    END IF;
    IF NEW.call_index IS NULL
       OR (NEW.call_index < next AND EXISTS (
               SELECT 1 FROM calls
               WHERE state_id = NEW.state_id AND call_index = NEW.call_index)) THEN
        NEW.call_index := next;
    END IF;
    IF NEW.call_index >= next THEN
        UPDATE call_index_counters SET next_index = NEW.call_index + 1
        WHERE state_id = NEW.state_id;
    END IF;
    RETURN NEW;
END;
$$;

CREATE OR REPLACE FUNCTION callindex_finish_call(
    p_call_id text, p_status text, p_response jsonb, p_response_hash text,
    p_error jsonb, p_error_hash text, p_latency_ms double precision
) RETURNS SETOF calls
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
BEGIN
    IF p_status IS NULL OR p_status NOT IN ('success', 'error') THEN
        RAISE EXCEPTION 'callindex_finish_call: status must be success or error, not %',
            p_status USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- No row: the call is not pending (finished, abandoned or unknown).
    RETURN QUERY
    UPDATE calls
    SET status = p_status, response = p_response, response_hash = p_response_hash,
        error = p_error, error_hash = p_error_hash, latency_ms = p_latency_ms,
        completed_at = now()
    WHERE call_id = p_call_id AND status = 'pending'
      AND (recorded_by IS NULL OR recorded_by = session_user)
    RETURNING *;
    IF NOT FOUND AND EXISTS (
        SELECT 1 FROM calls WHERE call_id = p_call_id AND status = 'pending'
    ) THEN
        RAISE EXCEPTION 'callindex: call % was recorded by another role, and only that role '
            'may finish it', p_call_id USING ERRCODE = 'CX004';
    END IF;
END;
$$;

CREATE OR REPLACE FUNCTION callindex_finish_call(
    p_call_id text, p_status text, p_response text, p_response_hash text,
    p_error text, p_error_hash text, p_latency_ms double precision
) RETURNS SETOF calls
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
BEGIN
    IF p_status IS NULL OR p_status NOT IN ('success', 'error') THEN
        RAISE EXCEPTION 'callindex_finish_call: status must be success or error, not %',
            p_status USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- No row: the call is not pending (finished, abandoned or unknown).
    RETURN QUERY
    UPDATE calls
    SET status = p_status, response = p_response::json, response_hash = p_response_hash,
        error = p_error::json, error_hash = p_error_hash, latency_ms = p_latency_ms,
        completed_at = now()
    WHERE call_id = p_call_id AND status = 'pending'
      AND (recorded_by IS NULL OR recorded_by = session_user)
    RETURNING *;
    IF NOT FOUND AND EXISTS (
        SELECT 1 FROM calls WHERE call_id = p_call_id AND status = 'pending'
    ) THEN
        RAISE EXCEPTION 'callindex: call % was recorded by another role, and only that role '
            'may finish it', p_call_id USING ERRCODE = 'CX004';
    END IF;
END;
$$;

DO $$
DECLARE
    fn text;
BEGIN
    FOREACH fn IN ARRAY ARRAY['callindex_vouch_index()', 'callindex_number_call()', 'callindex_finish_call(text, text, jsonb, text, jsonb, text, double precision)', 'callindex_finish_call(text, text, text, text, text, text, double precision)'] LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_temp', fn, current_schema());
    END LOOP;
END;
$$;

UPDATE callindex_alembic_version SET version_num='0008' WHERE callindex_alembic_version.version_num = '0007';

-- Running upgrade 0008 -> 0009

CREATE TABLE callindex_schema_interfaces (
    revision VARCHAR(32) NOT NULL,
    interface INTEGER NOT NULL,
    CONSTRAINT pk_callindex_schema_interfaces PRIMARY KEY (revision, interface)
);

INSERT INTO callindex_schema_interfaces (revision, interface) VALUES ('0009', 1), ('0009', 2);

CREATE FUNCTION callindex_allocate_v2(
    state_id text,
    count integer DEFAULT 1
)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
AS $function$
DECLARE
    first_index bigint;
BEGIN
    IF callindex_allocate_v2.count IS NULL
       OR callindex_allocate_v2.count NOT BETWEEN 1 AND 1000000 THEN
        RAISE EXCEPTION 'callindex_allocate_v2: count must be 1 to 1000000, not %',
            callindex_allocate_v2.count
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT reserved INTO first_index
    FROM callindex_reserve_v2(callindex_allocate_v2.state_id,
                              callindex_allocate_v2.count) AS reserved;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'callindex_allocate_v2: unknown state %', callindex_allocate_v2.state_id
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN first_index;
END;
$function$;

CREATE FUNCTION callindex_finish_call_v2(
    p_call_id text,
    p_status text,
    p_response text,
    p_response_hash text,
    p_error text,
    p_error_hash text,
    p_latency_ms double precision
)
 RETURNS SETOF calls
 LANGUAGE plpgsql
 SECURITY DEFINER
AS $function$
BEGIN
    IF p_status IS NULL OR p_status NOT IN ('success', 'error') THEN
        RAISE EXCEPTION 'callindex_finish_call_v2: status must be success or error, not %',
            p_status USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- No row: the call is not pending (finished, abandoned or unknown).
    RETURN QUERY
    UPDATE calls
    SET status = p_status, response = p_response::json, response_hash = p_response_hash,
        error = p_error::json, error_hash = p_error_hash, latency_ms = p_latency_ms,
        completed_at = now()
    WHERE call_id = p_call_id AND status = 'pending'
      AND (recorded_by IS NULL OR recorded_by = session_user)
    RETURNING *;
    IF NOT FOUND AND EXISTS (
        SELECT 1 FROM calls WHERE call_id = p_call_id AND status = 'pending'
    ) THEN
        RAISE EXCEPTION 'callindex: call % was recorded by another role, and only that role '
            'may finish it', p_call_id USING ERRCODE = 'CX004';
    END IF;
END;
$function$;

CREATE FUNCTION callindex_open_state_v2(
    p_state_id text
)
 RETURNS void
 LANGUAGE plpgsql
 SECURITY DEFINER
AS $function$
BEGIN
    -- A state with calls but no counter yet (an adopted table) starts past them.
    INSERT INTO call_index_counters (state_id, next_index)
    SELECT p_state_id, coalesce(max(call_index) + 1, 0) FROM calls WHERE state_id = p_state_id
    ON CONFLICT (state_id) DO NOTHING;
END;
$function$;

CREATE FUNCTION callindex_record_call_v2(
    p_call_id text,
    p_state_id text,
    p_call_type text,
    p_status text,
    p_request text,
    p_request_hash text,
    p_response text,
    p_response_hash text,
    p_error text,
    p_error_hash text,
    p_latency_ms double precision
)
 RETURNS SETOF calls
 LANGUAGE plpgsql
 SECURITY DEFINER
AS $function$
DECLARE
    recorded calls;
BEGIN
    SELECT * INTO recorded FROM calls WHERE call_id = p_call_id;
    IF FOUND THEN
        RETURN NEXT recorded;
        RETURN;
    END IF;
    WITH counter AS (
        UPDATE call_index_counters SET next_index = next_index + 1
        WHERE state_id = p_state_id
        RETURNING next_index - 1 AS next
    )
    INSERT INTO calls (
        call_id, state_id, call_index, call_type, status,
        request, request_hash, response, response_hash, error, error_hash,
        latency_ms, created_at, completed_at, hash_scheme
    )
    SELECT p_call_id, p_state_id, counter.next, p_call_type, p_status,
           p_request::json, p_request_hash, p_response::json, p_response_hash,
           p_error::json, p_error_hash,
           p_latency_ms, now(), CASE WHEN p_status = 'pending' THEN NULL ELSE now() END,
           'rfc8785'
    FROM counter
    RETURNING * INTO recorded;
    IF FOUND THEN
        RETURN NEXT recorded;  -- no row at all: the state is unknown
    END IF;
END;
$function$;

CREATE PROCEDURE callindex_record_released_v2(
    IN p_call_id text,
    IN p_state_id text,
    IN p_call_type text,
    IN p_status text,
    IN p_request text,
    IN p_request_hash text,
    IN p_response text,
    IN p_response_hash text,
    IN p_error text,
    IN p_error_hash text,
    IN p_latency_ms double precision,
    INOUT call_index bigint DEFAULT NULL::bigint,
    INOUT created_at timestamp with time zone DEFAULT NULL::timestamp with time zone,
    INOUT completed_at timestamp with time zone DEFAULT NULL::timestamp with time zone,
    INOUT waited_ms double precision DEFAULT NULL::double precision
)
 LANGUAGE plpgsql
AS $procedure$
#variable_conflict use_column
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    WITH counter AS (
        UPDATE call_index_counters SET next_index = next_index + 1
        WHERE state_id = p_state_id
        RETURNING next_index - 1 AS next
    )
    INSERT INTO calls (
        call_id, state_id, call_index, call_type, status,
        request, request_hash, response, response_hash, error, error_hash,
        latency_ms, created_at, completed_at, hash_scheme
    )
    SELECT p_call_id, p_state_id, counter.next, p_call_type, p_status,
           p_request::json, p_request_hash, p_response::json, p_response_hash,
           p_error::json, p_error_hash,
           p_latency_ms, now(), CASE WHEN p_status = 'pending' THEN NULL ELSE now() END,
           'rfc8785'
    FROM counter
    RETURNING calls.call_index, calls.created_at, calls.completed_at,
              1000 * extract(epoch FROM clock_timestamp() - statement_timestamp())
    INTO call_index, created_at, completed_at, waited_ms;
    IF call_index IS NULL THEN
        RETURN;  -- unknown state: nothing written
    END IF;
    -- The call's commit is asynchronous: the counter row is free from here.
    COMMIT;
    -- Acknowledge only once the log is on disk past that commit.
    PERFORM set_config('synchronous_commit', 'on', true);
    PERFORM pg_logical_emit_message(true, 'callindex', '');
END;
$procedure$;

CREATE FUNCTION callindex_reserve_v2(
    p_state_id text, p_count integer
)
 RETURNS SETOF bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
AS $function$
BEGIN
    -- No row: the state is unknown, or p_count is not in 1..1000000 (the
    -- library's limit too: a counter must never be pushed out of reach).
    RETURN QUERY
    UPDATE call_index_counters
    SET next_index = next_index + p_count
    WHERE state_id = p_state_id AND p_count BETWEEN 1 AND 1000000
    RETURNING next_index - p_count;
END;
$function$;

DO $$
DECLARE
    pair text[];
    grantee name;
BEGIN
    FOREACH pair SLICE 1 IN ARRAY ARRAY[ARRAY['callindex_open_state_v2(text)', 'callindex_open_state(text)'], ARRAY['callindex_reserve_v2(text, integer)', 'callindex_reserve(text, integer)'], ARRAY['callindex_allocate_v2(text, integer)', 'callindex_allocate(text, integer)'], ARRAY['callindex_record_call_v2(text, text, text, text, text, text, text, text, text, text, double precision)', 'callindex_record_call(text, text, text, text, text, text, text, text, text, text, double precision)'], ARRAY['callindex_finish_call_v2(text, text, text, text, text, text, double precision)', 'callindex_finish_call(text, text, text, text, text, text, double precision)'], ARRAY['callindex_record_released_v2(text, text, text, text, text, text, text, text, text, text, double precision, bigint, timestamptz, timestamptz, double precision)', 'callindex_record_released(text, text, text, text, text, text, text, text, text, text, double precision, bigint, timestamptz, timestamptz, double precision)']] LOOP
        IF pair[1] = ANY (ARRAY['callindex_open_state_v2(text)', 'callindex_reserve_v2(text, integer)', 'callindex_allocate_v2(text, integer)', 'callindex_record_call_v2(text, text, text, text, text, text, text, text, text, text, double precision)', 'callindex_finish_call_v2(text, text, text, text, text, text, double precision)']) THEN
            EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_temp',
                           pair[1], current_schema());
            EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', pair[1]);
        END IF;
        FOR grantee IN
            SELECT pg_get_userbyid(acl.grantee)
            FROM pg_proc, aclexplode(pg_proc.proacl) AS acl
            WHERE pg_proc.oid = pair[2]::regprocedure AND acl.privilege_type = 'EXECUTE'
              AND acl.grantee NOT IN (0, pg_proc.proowner)
        LOOP
            EXECUTE format('GRANT EXECUTE ON ROUTINE %s TO %I', pair[1], grantee);
        END LOOP;
    END LOOP;
END;
$$;

UPDATE callindex_alembic_version SET version_num='0009' WHERE callindex_alembic_version.version_num = '0008';

-- Running upgrade 0009 -> 0010

INSERT INTO callindex_schema_interfaces (revision, interface) VALUES ('0010', 2);

DROP ROUTINE callindex_open_state(text);

DROP ROUTINE callindex_reserve(text, integer);

DROP ROUTINE callindex_allocate(text, integer);

DROP ROUTINE callindex_record_call(text, text, text, text, jsonb, text, jsonb, text, jsonb, text, double precision);

DROP ROUTINE callindex_record_call(text, text, text, text, text, text, text, text, text, text, double precision);

DROP ROUTINE callindex_finish_call(text, text, jsonb, text, jsonb, text, double precision);

DROP ROUTINE callindex_finish_call(text, text, text, text, text, text, double precision);

DROP ROUTINE callindex_record_released(text, text, text, text, text, text, text, text, text, text, double precision, bigint, timestamptz, timestamptz, double precision);

UPDATE callindex_alembic_version SET version_num='0010' WHERE callindex_alembic_version.version_num = '0009';

-- Running upgrade 0010 -> 0011

CREATE TABLE call_seals (
    state_id TEXT NOT NULL,
    last_index BIGINT NOT NULL,
    head VARCHAR(64) NOT NULL,
    calls BIGINT NOT NULL,
    sealed_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT now(),
    CONSTRAINT pk_call_seals PRIMARY KEY (state_id, last_index),
    CONSTRAINT ck_call_seals_head_sha256 CHECK (length(head) = 64),
    CONSTRAINT ck_call_seals_calls_positive CHECK (calls >= 1)
);

INSERT INTO callindex_schema_interfaces (revision, interface) VALUES ('0011', 2);

CREATE FUNCTION callindex_guard_seals() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'callindex: a seal is never changed or deleted (% on call_seals)', TG_OP
        USING ERRCODE = 'CX007';
END;
$$;

CREATE TRIGGER callindex_guard_seals BEFORE UPDATE OR DELETE ON call_seals FOR EACH ROW EXECUTE FUNCTION callindex_guard_seals();

CREATE TRIGGER callindex_guard_seals_truncate BEFORE TRUNCATE ON call_seals FOR EACH STATEMENT EXECUTE FUNCTION callindex_guard_seals();

DO $$
DECLARE
    grantee name;
BEGIN
    FOR grantee IN
        SELECT DISTINCT pg_get_userbyid(acl.grantee)
        FROM pg_class, aclexplode(pg_class.relacl) AS acl
        WHERE pg_class.oid = 'calls'::regclass AND acl.privilege_type = 'SELECT'
          AND acl.grantee NOT IN (0, pg_class.relowner)
    LOOP
        EXECUTE format('GRANT SELECT ON call_seals TO %I', grantee);
    END LOOP;
END;
$$;

UPDATE callindex_alembic_version SET version_num='0011' WHERE callindex_alembic_version.version_num = '0010';

-- Running upgrade 0011 -> 0012

CREATE TABLE call_purges (
    state_id TEXT NOT NULL,
    first_index BIGINT NOT NULL,
    last_index BIGINT NOT NULL,
    calls BIGINT NOT NULL,
    head VARCHAR(64),
    purged_before TIMESTAMP WITH TIME ZONE NOT NULL,
    purged_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT now(),
    purged_by TEXT NOT NULL,
    CONSTRAINT pk_call_purges PRIMARY KEY (state_id, first_index),
    CONSTRAINT ck_call_purges_range CHECK (0 <= first_index AND first_index <= last_index),
    CONSTRAINT ck_call_purges_calls CHECK (1 <= calls AND calls <= last_index - first_index + 1),
    CONSTRAINT ck_call_purges_head_sha256 CHECK (head IS NULL OR length(head) = 64)
);

INSERT INTO callindex_schema_interfaces (revision, interface) VALUES ('0012', 2);

CREATE FUNCTION callindex_guard_purges() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION 'callindex: a purge record is never changed or deleted (% on call_purges)',
        TG_OP USING ERRCODE = 'CX008';
END;
$$;

CREATE TRIGGER callindex_guard_purges BEFORE UPDATE OR DELETE ON call_purges FOR EACH ROW EXECUTE FUNCTION callindex_guard_purges();

CREATE TRIGGER callindex_guard_purges_truncate BEFORE TRUNCATE ON call_purges FOR EACH STATEMENT EXECUTE FUNCTION callindex_guard_purges();

DROP TRIGGER callindex_guard_calls ON calls;

CREATE TRIGGER callindex_guard_calls BEFORE DELETE ON calls FOR EACH ROW WHEN (OLD.status = 'pending' OR current_setting('callindex.purging', true) IS DISTINCT FROM 'on') EXECUTE FUNCTION callindex_guard_calls();

CREATE OR REPLACE FUNCTION callindex_vouch_index() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    next bigint;
BEGIN
    -- The database, not the writer, says when a call was made and finished.
    NEW.created_at := now();
    NEW.completed_at := CASE WHEN NEW.status = 'pending' THEN NULL ELSE now() END;
    IF NEW.state_id IS NULL THEN
        RETURN NEW;
    END IF;
    SELECT next_index INTO next FROM call_index_counters WHERE state_id = NEW.state_id;
    IF next IS NULL OR NEW.call_index IS NULL OR NEW.call_index >= next THEN
        RAISE EXCEPTION 'callindex: call_index % of state % was not handed out by its '
            'counter (next %)', NEW.call_index, NEW.state_id, next USING ERRCODE = 'CX003';
    END IF;
    IF EXISTS (SELECT 1 FROM call_purges
               WHERE state_id = NEW.state_id
                 AND first_index <= NEW.call_index AND NEW.call_index <= last_index) THEN
        RAISE EXCEPTION 'callindex: call_index % of state % belonged to a purged call',
            NEW.call_index, NEW.state_id USING ERRCODE = 'CX009';
    END IF;
    RETURN NEW;
END;
$$;

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION callindex_vouch_index() SET search_path = %I, pg_temp',
                   current_schema());
END;
$$;

DO $$
DECLARE
    grantee name;
BEGIN
    FOR grantee IN
        SELECT DISTINCT pg_get_userbyid(acl.grantee)
        FROM pg_class, aclexplode(pg_class.relacl) AS acl
        WHERE pg_class.oid = 'calls'::regclass AND acl.privilege_type = 'SELECT'
          AND acl.grantee NOT IN (0, pg_class.relowner)
    LOOP
        EXECUTE format('GRANT SELECT ON call_purges TO %I', grantee);
    END LOOP;
END;
$$;

UPDATE callindex_alembic_version SET version_num='0012' WHERE callindex_alembic_version.version_num = '0011';

-- Running upgrade 0012 -> 0013

CREATE OR REPLACE FUNCTION callindex_vouch_index() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    next bigint;
BEGIN
    -- The database, not the writer, says when a call was made and finished.
    NEW.created_at := now();
    NEW.completed_at := CASE WHEN NEW.status = 'pending' THEN NULL ELSE now() END;
    IF NEW.state_id IS NULL THEN
        RETURN NEW;
    END IF;
    SELECT next_index INTO next FROM call_index_counters WHERE state_id = NEW.state_id FOR KEY SHARE;
    IF next IS NULL OR NEW.call_index IS NULL OR NEW.call_index >= next THEN
        RAISE EXCEPTION 'callindex: call_index % of state % was not handed out by its '
            'counter (next %)', NEW.call_index, NEW.state_id, next USING ERRCODE = 'CX003';
    END IF;
    IF EXISTS (SELECT 1 FROM call_purges
               WHERE state_id = NEW.state_id
                 AND first_index <= NEW.call_index AND NEW.call_index <= last_index) THEN
        RAISE EXCEPTION 'callindex: call_index % of state % belonged to a purged call',
            NEW.call_index, NEW.state_id USING ERRCODE = 'CX009';
    END IF;
    RETURN NEW;
END;
$$;

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION callindex_vouch_index() SET search_path = %I, pg_temp',
                   current_schema());
END;
$$;

INSERT INTO callindex_schema_interfaces (revision, interface) VALUES ('0013', 2);

UPDATE callindex_alembic_version SET version_num='0013' WHERE callindex_alembic_version.version_num = '0012';

COMMIT;

