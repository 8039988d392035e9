"""The fedprint API: the generated stubs of the ``fedprint.*.v1`` protos and the plumbing every
service and client shares (gRPC hosting and errors, identities from certificates and the role
table every server enforces, validators, the ten-print wire message
decoded into templates, settings, database engines, logging, client calls).

The bottom layer above the formats (:mod:`minutiae`): it imports no other project package.
"""
