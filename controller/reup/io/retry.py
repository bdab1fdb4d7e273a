"""Retrying transient failures: tenacity with jittered exponential backoff, for every executor.

Used by io/ssh.py (SSH to devices) and loop/controller.py (git fetches). Only
`TemporaryError` (and its `UnreachableError`) is retried; a `PermanentError`
or any other exception goes straight through.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from reup.core.errors import TemporaryError

T = TypeVar("T")


async def retrying(fn: Callable[[], Awaitable[T]], *, attempts: int, multiplier: float = 0.2,
                   max_wait: float = 5.0) -> T:
    """Await `fn()` up to `attempts` times while it raises TemporaryError; re-raise the last one."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(TemporaryError),
        wait=wait_random_exponential(multiplier=multiplier, max=max_wait),
        stop=stop_after_attempt(attempts),
        reraise=True,
    ):
        with attempt:
            return await fn()
    raise AssertionError("tenacity stopped without a result")  # pragma: no cover
