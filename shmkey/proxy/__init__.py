"""``shmkey proxy``: a TLS terminator whose network-facing workers reach the
private key only through a key oracle. ``supervisor`` runs in the parent,
``worker`` in each pre-forked worker process.
"""
