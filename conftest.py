"""In-repo pytest configuration.

The vhost-conformance plugin is registered through the ``pytest11`` entry point of the
installed package, so nothing needs loading here; this file only marks the repository root.
"""
