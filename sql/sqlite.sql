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

CREATE INDEX ix_calls_pending_created_at ON calls (created_at) WHERE status = 'pending';

CREATE TRIGGER callindex_guard_calls_delete BEFORE DELETE ON calls
BEGIN
    SELECT RAISE(ABORT, 'callindex: a call cannot be deleted: the audit trail is append-only');
END;

CREATE TRIGGER callindex_guard_calls_update BEFORE UPDATE ON calls
WHEN OLD.status <> 'pending'
     OR NEW.status = 'pending'
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

UPDATE callindex_alembic_version SET version_num='0002' WHERE callindex_alembic_version.version_num = '0001';

COMMIT;

