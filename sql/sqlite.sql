BEGIN;

CREATE TABLE callindex_alembic_version (
    version_num VARCHAR(32) NOT NULL, 
    CONSTRAINT callindex_alembic_version_pkc PRIMARY KEY (version_num)
);

-- Running upgrade  -> 0001

CREATE TABLE call_index_counters (
    state_id TEXT NOT NULL, 
    next_index BIGINT DEFAULT '0' NOT NULL, 
    created_at DATETIME DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')) NOT NULL, 
    CONSTRAINT pk_call_index_counters PRIMARY KEY (state_id), 
    CONSTRAINT ck_call_index_counters_next_index_non_negative CHECK (next_index >= 0), 
    CONSTRAINT ck_call_index_counters_state_id_length CHECK (length(state_id) BETWEEN 1 AND 255)
);

CREATE TABLE calls (
    call_id TEXT NOT NULL, 
    state_id TEXT NOT NULL, 
    call_index BIGINT NOT NULL, 
    call_type VARCHAR(64) NOT NULL, 
    status VARCHAR(16) NOT NULL, 
    request JSON, 
    request_hash VARCHAR(64), 
    response JSON, 
    response_hash VARCHAR(64), 
    error JSON, 
    error_hash VARCHAR(64), 
    latency_ms FLOAT, 
    created_at DATETIME DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')) NOT NULL, 
    completed_at DATETIME, 
    CONSTRAINT pk_calls PRIMARY KEY (call_id), 
    CONSTRAINT ck_calls_call_index_non_negative CHECK (call_index >= 0), 
    CONSTRAINT ck_calls_status_known CHECK (status IN ('pending', 'success', 'error', 'abandoned')), 
    CONSTRAINT fk_calls_state_id_call_index_counters FOREIGN KEY(state_id) REFERENCES call_index_counters (state_id) ON DELETE RESTRICT, 
    CONSTRAINT uq_calls_state_id_call_index UNIQUE (state_id, call_index)
);

INSERT INTO callindex_alembic_version (version_num) VALUES ('0001') RETURNING version_num;

-- Running upgrade 0001 -> 0002

CREATE INDEX IF NOT EXISTS ix_calls_pending_created_at ON calls (created_at) WHERE status = 'pending';

CREATE TRIGGER callindex_guard_calls_delete BEFORE DELETE ON calls
BEGIN
    SELECT RAISE(ABORT, 'callindex: a call cannot be deleted: the audit trail is append-only');
END;

CREATE TRIGGER callindex_guard_calls_update BEFORE UPDATE ON calls
WHEN OLD.status <> 'pending'
     OR NEW.status = 'pending'
     OR NEW.completed_at IS NULL
     OR NEW.call_id IS NOT OLD.call_id
     OR NEW.state_id IS NOT OLD.state_id
     OR NEW.call_index IS NOT OLD.call_index
     OR NEW.call_type IS NOT OLD.call_type
     OR NEW.request IS NOT OLD.request
     OR NEW.request_hash IS NOT OLD.request_hash
     OR NEW.created_at IS NOT OLD.created_at
BEGIN
    SELECT RAISE(ABORT, 'callindex: a call may change only from pending to finished');
END;

CREATE TRIGGER callindex_guard_calls_replace_id BEFORE INSERT ON calls
WHEN EXISTS (SELECT 1 FROM calls WHERE call_id = NEW.call_id)
BEGIN
    SELECT RAISE(ABORT, 'callindex: a recorded call cannot be replaced');
END;

CREATE TRIGGER callindex_guard_calls_replace_index BEFORE INSERT ON calls
WHEN EXISTS (SELECT 1 FROM calls WHERE state_id = NEW.state_id AND call_index = NEW.call_index)
BEGIN
    SELECT RAISE(ABORT, 'callindex: call_index taken: the counter is behind its calls');
END;

CREATE TRIGGER callindex_guard_counters BEFORE UPDATE ON call_index_counters
WHEN NEW.next_index < OLD.next_index OR NEW.state_id IS NOT OLD.state_id
BEGIN
    SELECT RAISE(ABORT, 'callindex: a counter may only move forward');
END;

CREATE TRIGGER callindex_guard_counters_delete BEFORE DELETE ON call_index_counters
BEGIN
    SELECT RAISE(ABORT, 'callindex: a counter is never deleted');
END;

UPDATE callindex_alembic_version SET version_num='0002' WHERE callindex_alembic_version.version_num = '0001';

-- Running upgrade 0002 -> 0003

UPDATE callindex_alembic_version SET version_num='0003' WHERE callindex_alembic_version.version_num = '0002';

-- Running upgrade 0003 -> 0004

ALTER TABLE calls ADD COLUMN recorded_by TEXT;

DROP TRIGGER callindex_guard_calls_replace_index;

CREATE TRIGGER callindex_number_call_missing BEFORE INSERT ON calls
WHEN NEW.state_id IS NOT NULL AND NEW.call_index IS NULL
BEGIN
    INSERT INTO call_index_counters (state_id, next_index)
    SELECT NEW.state_id,
           (SELECT coalesce(max(call_index) + 1, 0) FROM calls WHERE state_id = NEW.state_id)
    WHERE NOT EXISTS (SELECT 1 FROM call_index_counters WHERE state_id = NEW.state_id);
    UPDATE call_index_counters SET next_index = next_index + 1 WHERE state_id = NEW.state_id;
    INSERT INTO calls ("call_id", "state_id", "call_type", "status", "request", "request_hash", "response", "response_hash", "error", "error_hash", "latency_ms", "created_at", "completed_at", "recorded_by", call_index) VALUES (NEW."call_id", NEW."state_id", NEW."call_type", NEW."status", NEW."request", NEW."request_hash", NEW."response", NEW."response_hash", NEW."error", NEW."error_hash", NEW."latency_ms", NEW."created_at", NEW."completed_at", NEW."recorded_by", (SELECT next_index - 1 FROM call_index_counters WHERE state_id = NEW.state_id));
    SELECT RAISE(IGNORE);
END;

CREATE TRIGGER callindex_number_call_taken BEFORE INSERT ON calls
WHEN NEW.state_id IS NOT NULL AND NEW.call_index IS NOT NULL AND EXISTS (
    SELECT 1 FROM calls WHERE state_id = NEW.state_id AND call_index = NEW.call_index)
BEGIN
    INSERT INTO call_index_counters (state_id, next_index)
    SELECT NEW.state_id,
           (SELECT coalesce(max(call_index) + 1, 0) FROM calls WHERE state_id = NEW.state_id)
    WHERE NOT EXISTS (SELECT 1 FROM call_index_counters WHERE state_id = NEW.state_id);
    UPDATE call_index_counters SET next_index = next_index + 1 WHERE state_id = NEW.state_id;
    INSERT INTO calls ("call_id", "state_id", "call_type", "status", "request", "request_hash", "response", "response_hash", "error", "error_hash", "latency_ms", "created_at", "completed_at", "recorded_by", call_index) VALUES (NEW."call_id", NEW."state_id", NEW."call_type", NEW."status", NEW."request", NEW."request_hash", NEW."response", NEW."response_hash", NEW."error", NEW."error_hash", NEW."latency_ms", NEW."created_at", NEW."completed_at", NEW."recorded_by", (SELECT next_index - 1 FROM call_index_counters WHERE state_id = NEW.state_id));
    SELECT RAISE(IGNORE);
END;

CREATE TRIGGER callindex_number_call_given BEFORE INSERT ON calls
WHEN NEW.state_id IS NOT NULL AND NEW.call_index IS NOT NULL
BEGIN
    INSERT INTO call_index_counters (state_id, next_index)
    SELECT NEW.state_id,
           (SELECT coalesce(max(call_index) + 1, 0) FROM calls WHERE state_id = NEW.state_id)
    WHERE NOT EXISTS (SELECT 1 FROM call_index_counters WHERE state_id = NEW.state_id);
    SELECT RAISE(ABORT, 'callindex: call_index is more than 1000000 ahead of its counter')
    WHERE NEW.call_index > 1000000 + (
        SELECT next_index FROM call_index_counters WHERE state_id = NEW.state_id);
    UPDATE call_index_counters SET next_index = NEW.call_index + 1
    WHERE state_id = NEW.state_id AND next_index <= NEW.call_index;
END;

UPDATE callindex_alembic_version SET version_num='0004' WHERE callindex_alembic_version.version_num = '0003';

-- Running upgrade 0004 -> 0005

DROP TRIGGER callindex_guard_counters;

CREATE TRIGGER callindex_guard_counters BEFORE UPDATE ON call_index_counters
WHEN NEW.next_index < OLD.next_index OR NEW.next_index > OLD.next_index + 1000000
     OR NEW.state_id IS NOT OLD.state_id
BEGIN
    SELECT RAISE(ABORT,
        'callindex: a counter may only move forward, by at most 1000000 at a time');
END;

DROP TRIGGER IF EXISTS callindex_number_call_missing;

DROP TRIGGER IF EXISTS callindex_number_call_taken;

DROP TRIGGER IF EXISTS callindex_number_call_given;

CREATE TRIGGER callindex_guard_calls_replace_index BEFORE INSERT ON calls
WHEN EXISTS (SELECT 1 FROM calls WHERE state_id = NEW.state_id AND call_index = NEW.call_index)
BEGIN
    SELECT RAISE(ABORT, 'callindex: call_index taken: the counter is behind its calls');
END;

UPDATE callindex_alembic_version SET version_num='0005' WHERE callindex_alembic_version.version_num = '0004';

-- Running upgrade 0005 -> 0006

CREATE INDEX IF NOT EXISTS ix_calls_request_hash ON calls (request_hash);

ALTER TABLE calls ADD COLUMN hash_scheme TEXT NOT NULL DEFAULT 'sorted-json' CONSTRAINT ck_calls_hash_scheme_known CHECK (hash_scheme IN ('sorted-json', 'rfc8785'));

DROP TRIGGER callindex_guard_calls_update;

CREATE TRIGGER callindex_guard_calls_update BEFORE UPDATE ON calls
WHEN OLD.status <> 'pending'
     OR NEW.status = 'pending'
     OR NEW.completed_at IS NULL
     OR NEW.call_id IS NOT OLD.call_id
     OR NEW.state_id IS NOT OLD.state_id
     OR NEW.call_index IS NOT OLD.call_index
     OR NEW.call_type IS NOT OLD.call_type
     OR NEW.request IS NOT OLD.request
     OR NEW.request_hash IS NOT OLD.request_hash
     OR NEW.hash_scheme IS NOT OLD.hash_scheme
     OR NEW.created_at IS NOT OLD.created_at
BEGIN
    SELECT RAISE(ABORT, 'callindex: a call may change only from pending to finished');
END;

UPDATE callindex_alembic_version SET version_num='0006' WHERE callindex_alembic_version.version_num = '0005';

-- Running upgrade 0006 -> 0007

CREATE TRIGGER callindex_check_call_insert BEFORE INSERT ON calls
WHEN (length(NEW.call_type) NOT BETWEEN 1 AND 32 OR NEW.call_type GLOB '*[^a-z0-9_]*') OR NEW.latency_ms < 0 OR NEW.latency_ms > 1.7976931348623157e308
BEGIN
    SELECT RAISE(ABORT, 'callindex: call_type must be 1 to 32 of a-z, 0-9 and _, and latency_ms finite and not negative');
END;

CREATE TRIGGER callindex_check_call_update BEFORE UPDATE OF call_type, latency_ms ON calls
WHEN (length(NEW.call_type) NOT BETWEEN 1 AND 32 OR NEW.call_type GLOB '*[^a-z0-9_]*') OR NEW.latency_ms < 0 OR NEW.latency_ms > 1.7976931348623157e308
BEGIN
    SELECT RAISE(ABORT, 'callindex: call_type must be 1 to 32 of a-z, 0-9 and _, and latency_ms finite and not negative');
END;

CREATE TRIGGER callindex_guard_counters_replace BEFORE INSERT ON call_index_counters
WHEN NEW.next_index < (SELECT next_index FROM call_index_counters WHERE state_id = NEW.state_id)
  OR NEW.next_index > 1000000 + (
      SELECT next_index FROM call_index_counters WHERE state_id = NEW.state_id)
BEGIN
    SELECT RAISE(ABORT, 'callindex: a counter may only move forward, by at most 1000000 at a time (INSERT OR REPLACE on call_index_counters)');
END;

UPDATE callindex_alembic_version SET version_num='0007' WHERE callindex_alembic_version.version_num = '0006';

-- Running upgrade 0007 -> 0008

DROP TRIGGER callindex_guard_counters;

CREATE TRIGGER callindex_guard_counters BEFORE UPDATE ON call_index_counters
WHEN NEW.next_index < OLD.next_index OR NEW.next_index > OLD.next_index + 1000000
     OR NEW.state_id IS NOT OLD.state_id
BEGIN
    SELECT RAISE(ABORT, 'callindex: [CX002] a counter may only move forward, by at most 1000000 at a time');
END;

DROP TRIGGER callindex_guard_counters_replace;

CREATE TRIGGER callindex_guard_counters_replace BEFORE INSERT ON call_index_counters
WHEN NEW.next_index < (SELECT next_index FROM call_index_counters WHERE state_id = NEW.state_id)
  OR NEW.next_index > 1000000 + (
      SELECT next_index FROM call_index_counters WHERE state_id = NEW.state_id)
BEGIN
    SELECT RAISE(ABORT, 'callindex: [CX002] a counter may only move forward, by at most 1000000 at a time (INSERT OR REPLACE on call_index_counters)');
END;

UPDATE callindex_alembic_version SET version_num='0008' WHERE callindex_alembic_version.version_num = '0007';

-- Running upgrade 0008 -> 0009

CREATE TABLE callindex_schema_interfaces (
    revision VARCHAR(32) NOT NULL,
    interface INTEGER NOT NULL,
    CONSTRAINT pk_callindex_schema_interfaces PRIMARY KEY (revision, interface)
);

INSERT INTO callindex_schema_interfaces (revision, interface) VALUES ('0009', 1), ('0009', 2);

DROP TRIGGER callindex_guard_calls_delete;

CREATE TRIGGER callindex_guard_calls_delete BEFORE DELETE ON calls
BEGIN
    SELECT RAISE(ABORT, 'callindex: [CX001] a call cannot be deleted: the audit trail is append-only');
END;

DROP TRIGGER callindex_guard_calls_update;

CREATE TRIGGER callindex_guard_calls_update BEFORE UPDATE ON calls
WHEN OLD.status <> 'pending'
     OR NEW.status = 'pending'
     OR NEW.completed_at IS NULL
     OR NEW.call_id IS NOT OLD.call_id
     OR NEW.state_id IS NOT OLD.state_id
     OR NEW.call_index IS NOT OLD.call_index
     OR NEW.call_type IS NOT OLD.call_type
     OR NEW.request IS NOT OLD.request
     OR NEW.request_hash IS NOT OLD.request_hash
     OR NEW.hash_scheme IS NOT OLD.hash_scheme
     OR NEW.created_at IS NOT OLD.created_at
BEGIN
    SELECT RAISE(ABORT, 'callindex: [CX001] a call may change only from pending to finished');
END;

DROP TRIGGER callindex_guard_calls_replace_id;

CREATE TRIGGER callindex_guard_calls_replace_id BEFORE INSERT ON calls
WHEN EXISTS (SELECT 1 FROM calls WHERE call_id = NEW.call_id)
BEGIN
    SELECT RAISE(ABORT, 'callindex: [CX001] a recorded call cannot be replaced');
END;

DROP TRIGGER callindex_guard_calls_replace_index;

CREATE TRIGGER callindex_guard_calls_replace_index BEFORE INSERT ON calls
WHEN EXISTS (SELECT 1 FROM calls WHERE state_id = NEW.state_id AND call_index = NEW.call_index)
BEGIN
    SELECT RAISE(ABORT, 'callindex: [CX005] call_index taken: the counter is behind its calls');
END;

DROP TRIGGER callindex_guard_counters_delete;

CREATE TRIGGER callindex_guard_counters_delete BEFORE DELETE ON call_index_counters
BEGIN
    SELECT RAISE(ABORT, 'callindex: [CX002] a counter is never deleted');
END;

DROP TRIGGER callindex_check_call_insert;

CREATE TRIGGER callindex_check_call_insert BEFORE INSERT ON calls
WHEN (length(NEW.call_type) NOT BETWEEN 1 AND 32 OR NEW.call_type GLOB '*[^a-z0-9_]*') OR NEW.latency_ms < 0 OR NEW.latency_ms > 1.7976931348623157e308
BEGIN
    SELECT RAISE(ABORT, 'callindex: [CX006] call_type must be 1 to 32 of a-z, 0-9 and _, and latency_ms finite and not negative');
END;

DROP TRIGGER callindex_check_call_update;

CREATE TRIGGER callindex_check_call_update BEFORE UPDATE OF call_type, latency_ms ON calls
WHEN (length(NEW.call_type) NOT BETWEEN 1 AND 32 OR NEW.call_type GLOB '*[^a-z0-9_]*') OR NEW.latency_ms < 0 OR NEW.latency_ms > 1.7976931348623157e308
BEGIN
    SELECT RAISE(ABORT, 'callindex: [CX006] call_type must be 1 to 32 of a-z, 0-9 and _, and latency_ms finite and not negative');
END;

UPDATE callindex_alembic_version SET version_num='0009' WHERE callindex_alembic_version.version_num = '0008';

-- Running upgrade 0009 -> 0010

INSERT INTO callindex_schema_interfaces (revision, interface) VALUES ('0010', 2);

UPDATE callindex_alembic_version SET version_num='0010' WHERE callindex_alembic_version.version_num = '0009';

-- Running upgrade 0010 -> 0011

CREATE TABLE call_seals (
    state_id TEXT NOT NULL,
    last_index BIGINT NOT NULL,
    head VARCHAR(64) NOT NULL,
    calls BIGINT NOT NULL,
    sealed_at DATETIME NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    CONSTRAINT pk_call_seals PRIMARY KEY (state_id, last_index),
    CONSTRAINT ck_call_seals_head_sha256 CHECK (length(head) = 64),
    CONSTRAINT ck_call_seals_calls_positive CHECK (calls >= 1)
);

INSERT INTO callindex_schema_interfaces (revision, interface) VALUES ('0011', 2);

CREATE TRIGGER callindex_guard_seals_update BEFORE UPDATE ON call_seals
BEGIN
    SELECT RAISE(ABORT, 'callindex: [CX007] a seal is never changed or deleted');
END;

CREATE TRIGGER callindex_guard_seals_delete BEFORE DELETE ON call_seals
BEGIN
    SELECT RAISE(ABORT, 'callindex: [CX007] a seal is never changed or deleted');
END;

CREATE TRIGGER callindex_guard_seals_replace BEFORE INSERT ON call_seals
WHEN EXISTS (SELECT 1 FROM call_seals
             WHERE state_id = NEW.state_id AND last_index = NEW.last_index)
BEGIN
    SELECT RAISE(ABORT, 'callindex: [CX007] a seal is never changed or deleted');
END;

UPDATE callindex_alembic_version SET version_num='0011' WHERE callindex_alembic_version.version_num = '0010';

-- Running upgrade 0011 -> 0012

CREATE TABLE call_purges (
    state_id TEXT NOT NULL,
    first_index BIGINT NOT NULL,
    last_index BIGINT NOT NULL,
    calls BIGINT NOT NULL,
    head VARCHAR(64),
    purged_before DATETIME NOT NULL,
    purged_at DATETIME NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    purged_by TEXT NOT NULL,
    CONSTRAINT pk_call_purges PRIMARY KEY (state_id, first_index),
    CONSTRAINT ck_call_purges_range CHECK (0 <= first_index AND first_index <= last_index),
    CONSTRAINT ck_call_purges_calls CHECK (1 <= calls AND calls <= last_index - first_index + 1),
    CONSTRAINT ck_call_purges_head_sha256 CHECK (head IS NULL OR length(head) = 64)
);

INSERT INTO callindex_schema_interfaces (revision, interface) VALUES ('0012', 2);

CREATE TRIGGER callindex_guard_purges_update BEFORE UPDATE ON call_purges
BEGIN
    SELECT RAISE(ABORT, 'callindex: [CX008] a purge record is never changed or deleted');
END;

CREATE TRIGGER callindex_guard_purges_delete BEFORE DELETE ON call_purges
BEGIN
    SELECT RAISE(ABORT, 'callindex: [CX008] a purge record is never changed or deleted');
END;

CREATE TRIGGER callindex_guard_purges_replace BEFORE INSERT ON call_purges
WHEN EXISTS (SELECT 1 FROM call_purges
             WHERE state_id = NEW.state_id AND first_index = NEW.first_index)
BEGIN
    SELECT RAISE(ABORT, 'callindex: [CX008] a purge record is never changed or deleted');
END;

CREATE TRIGGER callindex_guard_calls_purged_index BEFORE INSERT ON calls
WHEN EXISTS (SELECT 1 FROM call_purges
             WHERE state_id = NEW.state_id
               AND first_index <= NEW.call_index AND NEW.call_index <= last_index)
BEGIN
    SELECT RAISE(ABORT, 'callindex: [CX009] the call_index belonged to a purged call');
END;

CREATE TABLE callindex_purging (purge INTEGER NOT NULL);

DROP TRIGGER callindex_guard_calls_delete;

CREATE TRIGGER callindex_guard_calls_delete BEFORE DELETE ON calls
WHEN OLD.status = 'pending' OR NOT EXISTS (SELECT 1 FROM callindex_purging)
BEGIN
    SELECT RAISE(ABORT, 'callindex: [CX001] a call cannot be deleted: the audit trail is append-only');
END;

UPDATE callindex_alembic_version SET version_num='0012' WHERE callindex_alembic_version.version_num = '0011';

-- Running upgrade 0012 -> 0013

INSERT INTO callindex_schema_interfaces (revision, interface) VALUES ('0013', 2);

UPDATE callindex_alembic_version SET version_num='0013' WHERE callindex_alembic_version.version_num = '0012';

COMMIT;

