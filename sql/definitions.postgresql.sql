-- The current definition of every callindex function and trigger on
-- PostgreSQL, at schema head (legacy-writers mode off). Rendered from a
-- migrated database by `callindex db definitions`; the migrations hold
-- frozen copies, and tests/test_migrations.py checks the two agree.

-- function callindex_allocate_v2(text,integer)
CREATE OR REPLACE FUNCTION public.callindex_allocate_v2(state_id text, count integer DEFAULT 1)
 RETURNS bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
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

-- function callindex_finish_call_v2(text,text,text,text,text,text,double precision)
CREATE OR REPLACE FUNCTION public.callindex_finish_call_v2(p_call_id text, p_status text, p_response text, p_response_hash text, p_error text, p_error_hash text, p_latency_ms double precision)
 RETURNS SETOF calls
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
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

-- function callindex_guard_calls()
CREATE OR REPLACE FUNCTION public.callindex_guard_calls()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
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
$function$;

-- function callindex_guard_counters()
CREATE OR REPLACE FUNCTION public.callindex_guard_counters()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
    RAISE EXCEPTION 'callindex: a counter may only move forward, by at most 1000000 at '
        'a time, and is never deleted (% on call_index_counters)', TG_OP
        USING ERRCODE = 'CX002';
END;
$function$;

-- function callindex_guard_new_counter()
CREATE OR REPLACE FUNCTION public.callindex_guard_new_counter()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
    RAISE EXCEPTION 'callindex: a new counter starts at most 1000000 (state %, next %)',
        NEW.state_id, NEW.next_index USING ERRCODE = 'CX002';
END;
$function$;

-- function callindex_guard_purges()
CREATE OR REPLACE FUNCTION public.callindex_guard_purges()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
    RAISE EXCEPTION 'callindex: a purge record is never changed or deleted (% on call_purges)',
        TG_OP USING ERRCODE = 'CX008';
END;
$function$;

-- function callindex_guard_seals()
CREATE OR REPLACE FUNCTION public.callindex_guard_seals()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
    RAISE EXCEPTION 'callindex: a seal is never changed or deleted (% on call_seals)', TG_OP
        USING ERRCODE = 'CX007';
END;
$function$;

-- function callindex_number_call()
CREATE OR REPLACE FUNCTION public.callindex_number_call()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
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
$function$;

-- function callindex_open_state_v2(text)
CREATE OR REPLACE FUNCTION public.callindex_open_state_v2(p_state_id text)
 RETURNS void
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
BEGIN
    -- A state with calls but no counter yet (an adopted table) starts past them.
    INSERT INTO call_index_counters (state_id, next_index)
    SELECT p_state_id, coalesce(max(call_index) + 1, 0) FROM calls WHERE state_id = p_state_id
    ON CONFLICT (state_id) DO NOTHING;
END;
$function$;

-- function callindex_record_call_v2(text,text,text,text,text,text,text,text,text,text,double precision)
CREATE OR REPLACE FUNCTION public.callindex_record_call_v2(p_call_id text, p_state_id text, p_call_type text, p_status text, p_request text, p_request_hash text, p_response text, p_response_hash text, p_error text, p_error_hash text, p_latency_ms double precision)
 RETURNS SETOF calls
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
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

-- function callindex_record_released_v2(text,text,text,text,text,text,text,text,text,text,double precision,bigint,timestamp with time zone,timestamp with time zone,double precision)
CREATE OR REPLACE PROCEDURE public.callindex_record_released_v2(IN p_call_id text, IN p_state_id text, IN p_call_type text, IN p_status text, IN p_request text, IN p_request_hash text, IN p_response text, IN p_response_hash text, IN p_error text, IN p_error_hash text, IN p_latency_ms double precision, INOUT call_index bigint DEFAULT NULL::bigint, INOUT created_at timestamp with time zone DEFAULT NULL::timestamp with time zone, INOUT completed_at timestamp with time zone DEFAULT NULL::timestamp with time zone, INOUT waited_ms double precision DEFAULT NULL::double precision)
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

-- function callindex_reserve_v2(text,integer)
CREATE OR REPLACE FUNCTION public.callindex_reserve_v2(p_state_id text, p_count integer)
 RETURNS SETOF bigint
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
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

-- function callindex_vouch_index()
CREATE OR REPLACE FUNCTION public.callindex_vouch_index()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
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
$function$;

-- trigger callindex_guard_calls ON calls
CREATE TRIGGER callindex_guard_calls BEFORE DELETE ON calls FOR EACH ROW WHEN (old.status::text = 'pending'::text OR current_setting('callindex.purging'::text, true) IS DISTINCT FROM 'on'::text) EXECUTE FUNCTION callindex_guard_calls();

-- trigger callindex_guard_calls_truncate ON calls
CREATE TRIGGER callindex_guard_calls_truncate BEFORE TRUNCATE ON calls FOR EACH STATEMENT EXECUTE FUNCTION callindex_guard_calls();

-- trigger callindex_guard_calls_update ON calls
CREATE TRIGGER callindex_guard_calls_update BEFORE UPDATE ON calls FOR EACH ROW WHEN (old.status::text <> 'pending'::text OR new.status::text = 'pending'::text OR new.completed_at IS NULL OR new.call_id IS DISTINCT FROM old.call_id OR new.state_id IS DISTINCT FROM old.state_id OR new.call_index IS DISTINCT FROM old.call_index OR new.call_type::text IS DISTINCT FROM old.call_type::text OR new.request::text IS DISTINCT FROM old.request::text OR new.request_hash::text IS DISTINCT FROM old.request_hash::text OR new.hash_scheme IS DISTINCT FROM old.hash_scheme OR new.created_at IS DISTINCT FROM old.created_at) EXECUTE FUNCTION callindex_guard_calls();

-- trigger callindex_guard_counters ON call_index_counters
CREATE TRIGGER callindex_guard_counters BEFORE UPDATE ON call_index_counters FOR EACH ROW WHEN (new.next_index < old.next_index OR new.next_index > (old.next_index + 1000000) OR new.state_id <> old.state_id) EXECUTE FUNCTION callindex_guard_counters();

-- trigger callindex_guard_counters_delete ON call_index_counters
CREATE TRIGGER callindex_guard_counters_delete BEFORE DELETE ON call_index_counters FOR EACH ROW EXECUTE FUNCTION callindex_guard_counters();

-- trigger callindex_guard_counters_truncate ON call_index_counters
CREATE TRIGGER callindex_guard_counters_truncate BEFORE TRUNCATE ON call_index_counters FOR EACH STATEMENT EXECUTE FUNCTION callindex_guard_counters();

-- trigger callindex_guard_new_counter ON call_index_counters
CREATE TRIGGER callindex_guard_new_counter BEFORE INSERT ON call_index_counters FOR EACH ROW WHEN (new.next_index > 1000000 AND CURRENT_USER <> '<owner>'::name) EXECUTE FUNCTION callindex_guard_new_counter();

-- trigger callindex_guard_purges ON call_purges
CREATE TRIGGER callindex_guard_purges BEFORE DELETE OR UPDATE ON call_purges FOR EACH ROW EXECUTE FUNCTION callindex_guard_purges();

-- trigger callindex_guard_purges_truncate ON call_purges
CREATE TRIGGER callindex_guard_purges_truncate BEFORE TRUNCATE ON call_purges FOR EACH STATEMENT EXECUTE FUNCTION callindex_guard_purges();

-- trigger callindex_guard_seals ON call_seals
CREATE TRIGGER callindex_guard_seals BEFORE DELETE OR UPDATE ON call_seals FOR EACH ROW EXECUTE FUNCTION callindex_guard_seals();

-- trigger callindex_guard_seals_truncate ON call_seals
CREATE TRIGGER callindex_guard_seals_truncate BEFORE TRUNCATE ON call_seals FOR EACH STATEMENT EXECUTE FUNCTION callindex_guard_seals();

-- trigger callindex_vouch_index ON calls
CREATE TRIGGER callindex_vouch_index BEFORE INSERT ON calls FOR EACH ROW WHEN (CURRENT_USER <> '<owner>'::name) EXECUTE FUNCTION callindex_vouch_index();
