"""The feature gate ``DOCSTOKG_ENABLE_IDEMPOTENCY`` (I11)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from .errors import GateValueError

GATE_ENV = "DOCSTOKG_ENABLE_IDEMPOTENCY"

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def idempotency_enabled(
    explicit: bool | None = None, *, env: Mapping[str, str] | None = None
) -> bool:
    """Tell whether job and op tracking is on.

    An explicit argument (a CLI flag, a keyword) wins. Otherwise the variable is
    read: ``1/0``, ``true/false``, ``yes/no``, ``on/off`` in any case, with
    surrounding blanks ignored. A missing or empty variable means off.

    Raises:
        GateValueError: the variable holds anything else.
    """
    if explicit is not None:
        return bool(explicit)
    raw = (os.environ if env is None else env).get(GATE_ENV)
    if raw is None or raw.strip() == "":
        return False
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise GateValueError(
        f"{GATE_ENV}={raw!r} is not a boolean; accepted values (any case): "
        f"{', '.join(sorted(_TRUE))} to turn idempotency on, "
        f"{', '.join(sorted(_FALSE))} to turn it off. "
        f"Set it to one of these or unset it (unset means off)."
    )
