-- Named queries of the SQLite backend. Each starts with "-- name: <name>".
-- Parameters are named (:job_id); the Python side never builds SQL from text.

-- name: insert_job
INSERT INTO jobs (job_id, work_id, artifact_id, url, expected_sha256, state,
                  max_attempts, created_at, updated_at)
VALUES (:job_id, :work_id, :artifact_id, :url, :expected_sha256, 'PLANNED',
        :max_attempts, :now, :now)
ON CONFLICT (job_id) DO NOTHING;

-- name: get_job
SELECT * FROM jobs WHERE job_id = :job_id;

-- name: next_claimable
SELECT job_id, state, attempts, max_attempts, lease_owner, lease_token
FROM jobs
WHERE claimable = 1 AND ifnull(lease_until, 0) <= :now AND not_before <= :now
ORDER BY ifnull(lease_until, 0)
LIMIT :limit;

-- name: claim
UPDATE jobs
SET lease_owner = :owner, lease_until = :until, lease_ttl = :ttl,
    lease_token = lease_token + 1, attempts = attempts + 1,
    state = CASE WHEN state IN ('PLANNED', 'FAILED') THEN 'LEASED' ELSE state END,
    updated_at = :now
WHERE job_id = :job_id AND claimable = 1 AND ifnull(lease_until, 0) <= :now
RETURNING job_id, work_id, artifact_id, url, expected_sha256, state, attempts,
          max_attempts, lease_owner, lease_until, lease_token;

-- name: fail_exhausted
UPDATE jobs
SET state = 'FAILED', claimable = 0, lease_owner = NULL, lease_until = NULL,
    fail_reason = :reason, updated_at = :now
WHERE job_id = :job_id;

-- name: renew
UPDATE jobs SET lease_until = :until, lease_ttl = :ttl, updated_at = :now
WHERE job_id = :job_id AND lease_owner = :owner AND lease_until > max(:now, updated_at)
      AND (:token IS NULL OR lease_token = :token)
RETURNING lease_token;

-- name: release
UPDATE jobs SET lease_owner = NULL, lease_until = NULL, updated_at = :now
WHERE job_id = :job_id AND lease_owner = :owner AND lease_until > max(:now, updated_at)
      AND (:token IS NULL OR lease_token = :token)
RETURNING lease_token, state;

-- name: fence
SELECT state FROM jobs
WHERE job_id = :job_id AND lease_token = :token AND lease_owner IS NOT NULL
      AND lease_until > max(:now, updated_at);

-- name: set_state
UPDATE jobs SET state = :to_state, claimable = :claimable, updated_at = :now
WHERE job_id = :job_id AND state = :from_state;

-- name: set_failed
UPDATE jobs
SET state = 'FAILED', claimable = :claimable, fail_reason = :reason,
    not_before = :not_before, lease_owner = NULL, lease_until = NULL,
    updated_at = :now
WHERE job_id = :job_id;

-- name: insert_history
INSERT INTO history (job_id, event, from_state, to_state, token, owner, at,
                     lease_until, detail)
VALUES (:job_id, :event, :from_state, :to_state, :token, :owner, :at,
        :lease_until, :detail);

-- name: expired_leases
SELECT job_id, state, lease_owner, lease_token, lease_until FROM jobs
WHERE lease_owner IS NOT NULL AND lease_until <= :now;

-- name: clear_lease
UPDATE jobs SET lease_owner = NULL, lease_until = NULL, updated_at = :now
WHERE job_id = :job_id AND lease_token = :token AND lease_owner IS NOT NULL
      AND lease_until <= :now;

-- name: get_op
SELECT * FROM ops WHERE op_key = :op_key;

-- name: start_op
INSERT INTO ops (op_key, job_id, kind, fingerprint, status, token, owner,
                 started_at, expires_at)
VALUES (:op_key, :job_id, :kind, :fingerprint, 'IN_PROGRESS', :token, :owner,
        :now, :expires_at)
ON CONFLICT (op_key) DO UPDATE
SET status = 'IN_PROGRESS', token = :token, owner = :owner, started_at = :now,
    expires_at = :expires_at, finished_at = NULL, error = NULL,
    runs = runs + 1;

-- name: record_op
UPDATE ops SET status = 'SUCCEEDED', result = :result, finished_at = :now,
               expires_at = :now
WHERE op_key = :op_key AND status = 'IN_PROGRESS'
      AND token IS :token AND owner IS :owner;

-- name: fail_op
UPDATE ops SET status = 'FAILED', error = :error, finished_at = :now,
               expires_at = :now
WHERE op_key = :op_key AND status = 'IN_PROGRESS'
      AND token IS :token AND owner IS :owner;

-- name: op_progress
UPDATE ops SET progress = :progress, progress_meta = :meta
WHERE op_key = :op_key AND status = 'IN_PROGRESS'
      AND token IS :token AND owner IS :owner;

-- name: stale_ops
SELECT o.op_key, o.job_id, o.kind, o.token, o.expires_at
FROM ops AS o LEFT JOIN jobs AS j ON j.job_id = o.job_id
WHERE o.status = 'IN_PROGRESS'
  AND (o.expires_at <= max(:now, o.started_at)
       OR (o.token IS NOT NULL
           AND (j.job_id IS NULL OR j.lease_token != o.token
                OR j.lease_owner IS NULL OR j.lease_until <= :now)));

-- name: abandon_op
UPDATE ops SET status = 'ABANDONED', error = :reason, finished_at = :now
WHERE op_key = :op_key AND status = 'IN_PROGRESS';

-- name: insert_manifest
INSERT INTO manifest (job_id, work_id, artifact_id, url, final_name, sha256, size,
                      token, recorded_at)
SELECT job_id, work_id, artifact_id, url, :final_name, :sha256, :size, :token, :now
FROM jobs WHERE job_id = :job_id;

-- name: set_final
UPDATE jobs SET final_name = :final_name, sha256 = :sha256, size = :size
WHERE job_id = :job_id;

-- name: get_meta
SELECT value FROM meta WHERE key = :key;

-- name: set_meta
INSERT INTO meta (key, value) VALUES (:key, :value)
ON CONFLICT (key) DO UPDATE SET value = excluded.value;

-- name: jobs_in_states
SELECT job_id, state FROM jobs WHERE state IN (SELECT value FROM json_each(:states));

-- name: repair_job
UPDATE jobs SET state = :to_state, claimable = 1, final_name = NULL, updated_at = :now
WHERE job_id = :job_id;

-- name: abandon_job_ops
UPDATE ops SET status = 'ABANDONED', error = :reason
WHERE job_id = :job_id AND status != 'ABANDONED'
  AND (:kinds IS NULL OR kind IN (SELECT value FROM json_each(:kinds)))
  AND (:only_open = 0 OR status = 'IN_PROGRESS');

-- name: delete_manifest
DELETE FROM manifest WHERE job_id = :job_id;

-- name: extend_ops
UPDATE ops SET expires_at = max(expires_at, :until)
WHERE job_id = :job_id AND status = 'IN_PROGRESS' AND token = :token;

-- name: reopen_op
UPDATE ops SET status = 'ABANDONED', error = :reason, finished_at = :now
WHERE op_key = :op_key AND status = 'SUCCEEDED';

-- name: manifest_entries
SELECT * FROM manifest ORDER BY recorded_at, job_id;

-- name: expire_owner
UPDATE jobs SET lease_until = :now, updated_at = :now
WHERE lease_owner = :owner AND lease_until > :now
RETURNING job_id, lease_token, state;

-- name: state_counts
SELECT state, claimable, count(*) AS n FROM jobs GROUP BY state, claimable;

-- name: lease_counts
SELECT sum(lease_owner IS NOT NULL AND lease_until > :now) AS live,
       sum(lease_owner IS NOT NULL AND lease_until <= :now) AS expired,
       sum(claimable = 1 AND not_before > :now) AS backing_off,
       min(CASE WHEN claimable = 1 AND not_before > :now THEN not_before END) AS next_retry,
       min(CASE WHEN lease_owner IS NOT NULL AND lease_until > :now
                THEN lease_until END) AS next_expiry
FROM jobs;

-- name: finalized_unindexed
SELECT j.* FROM jobs AS j LEFT JOIN manifest AS m ON m.job_id = j.job_id
WHERE j.state = 'FINALIZED' AND m.job_id IS NULL
  AND (j.lease_owner IS NULL OR j.lease_until <= :now);

-- name: referenced_parts
-- Part files the ledger still points at: the recorded progress of an
-- unfinished op (its token's part) and the part a recorded result names, for
-- a job not published yet.
SELECT o.job_id, o.progress_meta, o.result, o.status
FROM ops AS o JOIN jobs AS j ON j.job_id = o.job_id
WHERE j.state NOT IN ('FINALIZED', 'INDEXED', 'DEDUPED', 'SKIPPED_DUPLICATE')
  AND ((o.status != 'SUCCEEDED' AND o.progress > 0) OR o.status = 'SUCCEEDED');

-- name: retry_failed
UPDATE jobs SET claimable = 1, attempts = 0, not_before = 0, updated_at = :now
WHERE state = 'FAILED' AND claimable = 0
RETURNING job_id, fail_reason;
