"""How a command's process logs, set once by its entry point (the CLI) and carried into the
processes it spawns (`parallel.launch`), so a rank logs what its parent would: `-v` shows our
INFO lines and third-party warnings, without it only our warnings and errors."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

FORMAT = "%(levelname)s %(name)s: %(message)s"


@dataclass(frozen=True)
class LogSettings:
    verbose: bool = False
    route_transformers: bool = False
    """transformers' logs through logging too (set when the command loads a tokenizer)."""

    @classmethod
    def current(cls) -> LogSettings:
        """This process's settings, for a process it spawns."""
        return cls(
            verbose=logging.getLogger().getEffectiveLevel() <= logging.INFO,
            route_transformers="transformers" in sys.modules,
        )


def configure_logging(verbose: bool, *, route_transformers: bool) -> None:
    """Our logs, Python warnings and (when `route_transformers`: the command loads a
    tokenizer, so transformers is imported anyway) transformers' logs, all through logging."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format=FORMAT)
    logging.captureWarnings(True)
    if not verbose:  # third-party warnings are for -v
        logging.getLogger("py.warnings").setLevel(logging.ERROR)
        # "Terminating process N via signal SIGTERM" as the other ranks of a failed job stop
        logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    if route_transformers:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
        hf_logging.set_verbosity(logging.INFO if verbose else logging.ERROR)
