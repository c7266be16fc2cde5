"""The reference vhost-user-blk back-end (a program and a library).

It shares only the wire codec (:mod:`vhost_conformance.frontend.protocol`) with the front-end.
"""
