"""The fedprint API: the generated stubs of the ``fedprint.*.v1`` protos and the plumbing every
service and client shares (gRPC hosting and errors, TLS files, the ten-print wire message
decoded into templates, settings, database engines, logging, client calls).

The bottom layer above the formats (:mod:`minutiae`): it imports no other project package.
"""
