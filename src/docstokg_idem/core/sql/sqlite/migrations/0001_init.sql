-- The first schema: jobs, their history, the op ledger and the manifest.

CREATE TABLE jobs (
    job_id          TEXT PRIMARY KEY,
    work_id         TEXT NOT NULL,
    artifact_id     TEXT NOT NULL,
    url             TEXT NOT NULL,
    expected_sha256 TEXT,
    state           TEXT NOT NULL,
    -- 1 while a worker may claim the job (an active state, or FAILED retryable)
    claimable       INTEGER NOT NULL DEFAULT 1,
    attempts        INTEGER NOT NULL DEFAULT 0,
    max_attempts    INTEGER NOT NULL,
    not_before      REAL NOT NULL DEFAULT 0,
    -- the lease: owner and expiry are both set or both NULL
    lease_owner     TEXT,
    lease_until     REAL,
    lease_ttl       REAL,
    -- the last token handed out for this job; the next claim gets token + 1
    lease_token     INTEGER NOT NULL DEFAULT 0,
    fail_reason     TEXT,
    final_name      TEXT,
    sha256          TEXT,
    size            INTEGER,
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL,
    CHECK ((lease_owner IS NULL) = (lease_until IS NULL))
);

CREATE INDEX jobs_ready ON jobs (ifnull(lease_until, 0)) WHERE claimable = 1;

-- Every claim, renewal, release, expiry and state change, for I5 and I6.
CREATE TABLE history (
    seq         INTEGER PRIMARY KEY,
    job_id      TEXT NOT NULL,
    event       TEXT NOT NULL,
    from_state  TEXT,
    to_state    TEXT,
    token       INTEGER,
    owner       TEXT,
    at          REAL NOT NULL,
    lease_until REAL,
    detail      TEXT
);


-- The op ledger: one row per op key; a result is recorded at most once (I4).
CREATE TABLE ops (
    op_key      TEXT PRIMARY KEY,
    job_id      TEXT NOT NULL,
    kind        TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    status      TEXT NOT NULL
                CHECK (status IN ('IN_PROGRESS', 'SUCCEEDED', 'FAILED', 'ABANDONED')),
    token       INTEGER,
    owner       TEXT,
    started_at  REAL NOT NULL,
    expires_at  REAL NOT NULL,
    finished_at REAL,
    runs        INTEGER NOT NULL DEFAULT 1,
    result      BLOB,
    error       TEXT,
    progress    INTEGER NOT NULL DEFAULT 0,
    progress_meta TEXT
) WITHOUT ROWID;

CREATE INDEX ops_job ON ops (job_id);
CREATE INDEX ops_open ON ops (expires_at) WHERE status = 'IN_PROGRESS';

-- One entry per finalized artifact (I3), written with its ledger record.
CREATE TABLE manifest (
    job_id      TEXT PRIMARY KEY,
    work_id     TEXT NOT NULL,
    artifact_id TEXT NOT NULL,
    url         TEXT NOT NULL,
    final_name  TEXT NOT NULL,
    sha256      TEXT NOT NULL,
    size        INTEGER NOT NULL,
    token       INTEGER,
    recorded_at REAL NOT NULL
);

-- Small facts about the database: the highest wall time seen (C14), ...
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
