"""Helpers shared by the `reup` command modules: logging setup and the read-only state store.

Called by every module of reup.cli; imports only config and the loop's state store.
"""


from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

from reup.config.reup_toml import Config, load_config
from reup.loop.state import StateDB


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("asyncssh", "watchdog"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def opened_store(config_path: str) -> Iterator[tuple[Config, StateDB]]:
    """The config and its state store, for the read-mostly commands (ConfigError: exit 2)."""
    cfg = load_config(config_path)
    store = StateDB(cfg.state.dir)
    try:
        yield cfg, store
    finally:
        store.close()


