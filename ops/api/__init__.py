"""Tocsin's HTTP API (issue 6): the manager's workflow, citizens, agencies, transparency.

``create_app(settings)`` is the FastAPI application; ``seed_demo(store)`` creates the demo
organisation and its users and returns fresh demo tokens (for ``tocsin dev``).
"""

from ops.api.app import create_app
from ops.api.context import ApiContext
from ops.api.identity import IdentityStore, seed_demo

__all__ = ["ApiContext", "IdentityStore", "create_app", "seed_demo"]
