"""Sub-commands of the ``hasten`` CLI; each module has ``register(subparsers)``."""
