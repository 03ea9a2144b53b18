"""The idempotency core: keys, jobs, leases, the op ledger, the reconciler.

It imports nothing above it and knows nothing of pytest, HTTP or YAML.
"""

from .clock import Clock, FakeClock, SharedClock, SystemClock, default_clock, set_default_clock
from .crashpoints import CRASH_POINTS, Fault, arm, crashpoint, disarm
from .db import (
    SCHEMA_VERSION,
    Connection,
    apply_migration,
    close,
    connect,
    get_schema_version,
    transaction,
)
from .errors import (
    CanonicalJSONError,
    ConfigError,
    CrashPointFired,
    DatabaseCorrupt,
    DatabaseUnavailable,
    EffectFailed,
    GateValueError,
    IdemError,
    InheritedConnection,
    InvalidTransition,
    InvalidURL,
    KeyFieldMissing,
    LeaseLost,
    OpInProgress,
    PayloadMismatch,
    ResultTooLarge,
    SchemaTooNew,
    UnknownCrashPoint,
)
from .gate import GATE_ENV, idempotency_enabled
from .jobs import (
    Lease,
    advance_state,
    fail_job,
    get_current_state,
    get_job,
    lease_next_job,
    plan_job_if_absent,
    plan_jobs,
    release_lease,
    renew_lease,
)
from .keys import canonical_json, canonical_url, job_key, op_key, request_fingerprint
from .ledger import (
    add_manifest_entry,
    get_effect_record,
    get_effect_result,
    get_op,
    manifest_entries,
    record_progress,
    reopen_op,
    run_effect,
    set_digest,
)
from .reconcile import ReconcileReport, cleanup_stale_leases, cleanup_stale_ops, reconcile_jobs
from .states import JobState

__all__ = [
    "CRASH_POINTS", "GATE_ENV", "SCHEMA_VERSION", "CanonicalJSONError", "Clock",
    "ConfigError", "Connection", "CrashPointFired", "DatabaseCorrupt",
    "DatabaseUnavailable", "EffectFailed", "FakeClock", "Fault", "GateValueError",
    "IdemError", "InheritedConnection", "InvalidTransition", "InvalidURL", "JobState",
    "KeyFieldMissing", "Lease", "LeaseLost", "OpInProgress", "PayloadMismatch",
    "ReconcileReport", "ResultTooLarge", "SchemaTooNew", "SharedClock", "SystemClock",
    "UnknownCrashPoint", "advance_state", "apply_migration", "arm", "canonical_json",
    "canonical_url", "cleanup_stale_leases", "cleanup_stale_ops", "close", "connect",
    "crashpoint", "default_clock", "disarm", "fail_job", "get_current_state",
    "get_effect_record", "get_effect_result", "get_job", "get_op", "get_schema_version",
    "idempotency_enabled", "job_key", "lease_next_job", "op_key", "plan_job_if_absent",
    "plan_jobs", "reconcile_jobs", "record_progress", "release_lease", "renew_lease",
    "request_fingerprint", "run_effect", "set_default_clock", "transaction",
    "add_manifest_entry", "manifest_entries", "reopen_op", "set_digest",
]
