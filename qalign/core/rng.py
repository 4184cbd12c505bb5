"""Counter-based randomness: every random decision is a pure function of its coordinates.

Replaying step k of chain c under run seed s makes exactly the same cut, the same accept/reject
decision and sends the same generator seed, whichever worker runs it and however often.
"""

from __future__ import annotations

import hashlib
from enum import StrEnum

_TWO_POW_53 = float(1 << 53)
# Generator seeds stay below 2**31 - 1 so that every server (vLLM int64, llama.cpp uint32,
# SGLang int) accepts them unchanged.
_SEED_MODULUS = (1 << 31) - 1


class Purpose(StrEnum):
    """Independent random streams used by one step."""

    INDEX = "index"
    ACCEPT = "accept"
    GENERATE = "generate"
    RESAMPLE = "resample"  # SMC: one draw per (prompt, block), see core.smc


def _digest(seed: int, chain: str | int, step: int, purpose: Purpose) -> int:
    key = f"qalign/v1|{seed}|{chain}|{step}|{purpose.value}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def uniform(seed: int, chain: str | int, step: int, purpose: Purpose) -> float:
    """A uniform draw in [0, 1) with 53 random bits."""
    return (_digest(seed, chain, step, purpose) >> 11) / _TWO_POW_53


def generator_seed(seed: int, chain: str | int, step: int) -> int:
    """The sampling seed sent to the generator for this (chain, step)."""
    return _digest(seed, chain, step, Purpose.GENERATE) % _SEED_MODULUS
