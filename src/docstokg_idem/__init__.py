"""docstokg_idem: exactly-once download jobs, and a harness that proves it.

The public API of the idempotency core is re-exported here. The download
pipeline lives in :mod:`docstokg_idem.pipeline`, the chaos harness in
:mod:`docstokg_idem.harness`. ``pytest -p docstokg_idem`` loads the pytest
plugin through :data:`pytest_plugins` below, without importing pytest here.
"""

from .core import *  # noqa: F403
from .core import __all__ as _core_all

__version__ = "0.1.0"

#: Loading this package as a pytest plugin (``-p docstokg_idem``) loads the
#: plugin module; importing the package alone imports no pytest.
pytest_plugins = ["docstokg_idem.plugin"]

__all__ = [*_core_all, "__version__"]
