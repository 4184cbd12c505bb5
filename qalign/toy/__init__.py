"""The toy LM + reward with exactly known targets, and an HTTP server imitating vLLM / SGLang."""

from qalign.toy.model import ToyModel, ToyTokenizeError
from qalign.toy.server import (
    ToyServer,
    ToyServerHandle,
    ToyServerOptions,
    create_app,
    serve,
    serve_in_thread,
)

__all__ = [
    "ToyModel",
    "ToyServer",
    "ToyServerHandle",
    "ToyServerOptions",
    "ToyTokenizeError",
    "create_app",
    "serve",
    "serve_in_thread",
]
