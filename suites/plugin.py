"""The vhost-conformance pytest plugin (registered through the ``pytest11`` entry point).

Options, fixtures and result capture land with the suites; this module must stay importable
so that every pytest run in an environment with the package installed can load it.
"""

from __future__ import annotations
