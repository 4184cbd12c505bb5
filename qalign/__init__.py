"""qalign: exact, distributed QAlign (MCMC test-time alignment) for served language models.

`from qalign import QAlign, RemoteVLLM, RemoteReward` gives the seed package's top-level names;
they are imported on first use so that `import qalign.core` stays free of HTTP clients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {"QAlign": "qalign.base", "RemoteVLLM": "qalign.model", "RemoteReward": "qalign.reward"}

if TYPE_CHECKING:
    from qalign.base import QAlign
    from qalign.model import RemoteVLLM
    from qalign.reward import RemoteReward


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qalign' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = ["QAlign", "RemoteReward", "RemoteVLLM", "__version__"]
