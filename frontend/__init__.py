"""The fake QEMU front-end: a library that speaks vhost-user the way QEMU 11.1.3 does.

It never imports :mod:`vhost_conformance.backend`; the only module both sides share is
:mod:`vhost_conformance.frontend.protocol` (the sans-IO wire codec).
"""
