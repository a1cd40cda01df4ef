"""Balancing methods, one module per method (installed as ``mmbalance.methods``).

Every module registers its classes with :func:`mmbalance.registry.register_method` on import; the
registry imports all modules of this package on first lookup.
"""
