"""A quiet console: deeploc's own lines, the progress bar, the final table and every warning that matters.

Known third-party noise is filtered where it comes from, one named message at a time (nothing else is hidden):

* Lightning's informational lines (accelerator found, checkpoint restored, "fit stopped", its litlogger advert)
  go to the run's log file (``<run>/train.log``), not the console: Lightning's own console handler is removed so
  its records reach Hydra's handlers, and :class:`ConsoleFilter` on Hydra's console handler
  (``conf/hydra/default.yaml``) keeps Lightning's records below WARNING off the screen. The litlogger advert is
  dropped everywhere (:class:`DropMessages`).
* :data:`KNOWN_WARNINGS`: Python warnings deeploc knows to be noise for its use of the libraries, each ignored by
  message (and module where the message alone could match something else); the warnings that remain print as one
  line each (:func:`one_line_warning`, without Python's echo of the source line).

W&B's "anonymous setting" warning is removed at its cause (``deeploc.training.loggers``), the "requeue armed" line is
logged once per process (``deeploc.training.cluster``); an Optuna search quiets Optuna's and alembic's informational lines
(:func:`quiet_optuna`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable

__all__ = ["KNOWN_WARNINGS", "ConsoleFilter", "DropMessages", "one_line_warning", "quiet_console", "quiet_optuna"]

# (message regex, category, module regex or "" for any): warnings.filterwarnings("ignore", ...) for each.
KNOWN_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # Lightning's pytree helper uses a torch API that torch deprecates; nothing a deeploc user can change.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\..*"),
    # Small (test, debug) training sets have fewer batches than the logging interval; the epoch scores are logged.
    (r"The number of training batches \(\d+\) is smaller than the logging interval", UserWarning, ""),
    # The frozen encoder stays in eval mode on purpose (deeploc.training.module); Lightning warns on every fit.
    (r"Found \d+ module\(s\) in eval mode", UserWarning, ""),
    # debug=overfit: Lightning turns off shuffling of the training batches, as overfitting a fixed batch wants.
    (r"You requested to overfit but enabled train.* dataloader shuffling", UserWarning, ""),
    # A resumed run's checkpoints folder holds its own checkpoints (run directories are named by their overrides and
    # locked while in use, deeploc.runs): the "not empty" warning is what resuming looks like, not a clash.
    (r"Checkpoint directory .* exists and is not empty", UserWarning, ""),
)
# Log messages of Lightning's that are adverts, not information about the run.
LIGHTNING_ADVERTS = ("try installing [litlogger]",)
# Lightning gives "lightning" a console handler of its own, and its subpackages too when logging is not configured.
_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
_ROUTED = "_deeploc_routed"


class ConsoleFilter(logging.Filter):
    """Keep Lightning's records below WARNING off a handler (the console); everything else passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        lightning = record.name == "lightning" or record.name.startswith("lightning.")
        quiet = lightning and record.levelno < logging.WARNING
        return not quiet


class DropMessages(logging.Filter):
    """Drop the records whose message contains one of ``fragments``."""

    def __init__(self, fragments: Iterable[str]) -> None:
        super().__init__()
        self.fragments = tuple(fragments)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def one_line_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """A warning as one line (where and what), for :data:`warnings.formatwarning`: Python's default echoes the
    source line that raised it (a library's ``warnings.warn(`` call) under every warning, in every job."""
    return f"{filename}:{lineno}: {category.__name__}: {message}\n"


def quiet_console() -> None:
    """Install the filters above in this process (idempotent). Called at the start of every training job."""
    warnings.formatwarning = one_line_warning
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if getattr(logger, _ROUTED, False):
            continue
        # Lightning's own console handlers would print its lines past Hydra's log file and the console filter.
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True
        setattr(logger, _ROUTED, True)
    # rank_zero_info logs through one of these (a logger's filters see its own records, not its children's).
    for name in _RANK_ZERO_LOGGERS:
        adverts = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in adverts.filters):
            adverts.addFilter(DropMessages(LIGHTNING_ADVERTS))


def quiet_optuna() -> None:
    """An Optuna search prints what deeploc and the sweeper say (trials launched, values, the best trial), not
    Optuna's "study created" line nor the plugin registrations of alembic (Optuna's database layer)."""
    logging.getLogger("alembic").setLevel(logging.WARNING)  # it registers its plugins when Optuna is imported
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
