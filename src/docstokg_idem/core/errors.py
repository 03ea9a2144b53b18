"""Exceptions of the idempotency core.

Each one subclasses the builtin that matches its meaning, so callers that only
know the standard library still catch it: a lost lease is a ``RuntimeError``, a
bad argument a ``ValueError``.
"""

from __future__ import annotations


class IdemError(Exception):
    """Base class of every error raised by docstokg_idem on purpose."""


class LeaseLost(IdemError, RuntimeError):
    """A write carried a lease token that is no longer the job's active lease (I7).

    Nothing was written. The caller must stop working on the job: another worker
    owns it now, or the lease expired.
    """


class InvalidTransition(IdemError, RuntimeError):
    """A state change was refused because the job is not in an allowed state (I5)."""


class KeyFieldMissing(IdemError, ValueError):
    """A field that goes into a job or op key is missing, ``None`` or empty (I12)."""


class InvalidURL(IdemError, ValueError):
    """A URL cannot be canonicalized: no scheme, a scheme other than http(s), no host."""


class CanonicalJSONError(IdemError, ValueError):
    """A value cannot be encoded as canonical JSON (NaN, a non-string key, ...)."""


class PayloadMismatch(IdemError, ValueError):
    """An op key was reused with a different request fingerprint (C02).

    The recorded result is left unchanged and the effect is not run.
    """


class ResultTooLarge(IdemError, ValueError):
    """An effect's result is larger than the ledger accepts; it is never truncated."""


class OpInProgress(IdemError, RuntimeError):
    """Another live lease holder is running this op right now."""


class EffectFailed(IdemError, RuntimeError):
    """An effect raised; its error was recorded and the op can be run again."""


class GateValueError(IdemError, ValueError):
    """``DOCSTOKG_ENABLE_IDEMPOTENCY`` holds a value that is not a known boolean."""


class ConfigError(IdemError, ValueError):
    """A configuration value breaks its rule (a TTL of ``None``, a negative TTL...)."""


class SchemaTooNew(IdemError, RuntimeError):
    """The database was written by a newer schema than this version knows."""


class DatabaseCorrupt(IdemError, RuntimeError):
    """The database file is not a SQLite database or fails its integrity check."""


class DatabaseUnavailable(IdemError, RuntimeError):
    """The database cannot be opened (bad path, unwritable folder, ...)."""


class InheritedConnection(IdemError, RuntimeError):
    """A connection opened in another process was used here (after fork) (C08)."""


class UnknownCrashPoint(IdemError, ValueError):
    """A crash point name is not declared in the registry."""


class CrashPointFired(IdemError, RuntimeError):
    """Raised by a crash point armed with the ``raise`` action."""
