"""How deeploc's console commands report errors: one clear line and exit status 1 for problems a user can fix.

Argparse commands add ``--verbose`` (:func:`add_verbose_flag`) and re-raise with it. The Hydra commands
(``deeploc-train``, ``deeploc-extract``) run through :func:`run_hydra_app`: Hydra would print a (trimmed)
traceback for any exception raised by a job, so the app runs with ``HYDRA_FULL_ERROR=1`` (Hydra then re-raises)
and the errors a user can fix are printed here as one line. ``--verbose`` or a ``HYDRA_FULL_ERROR=1`` set by the
user keep Hydra's full traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from deeploc.errors import deeploc_error

VERBOSE_FLAG = "--verbose"
# Set together with HYDRA_FULL_ERROR by run_hydra_app, so that processes it starts (DDP ranks re-run the command
# line) report errors like their parent instead of taking HYDRA_FULL_ERROR for the user's choice.
_COMPACT_ENV = "DEEPLOC_COMPACT_ERRORS"
_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """The options of every argparse command: ``--verbose`` (the full traceback of an error instead of its one-line
    message) and ``--import MODULE`` (plug-ins of your own; :func:`import_plugins`)."""
    parser.add_argument(VERBOSE_FLAG, action="store_true", help="show the full traceback of an error")
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import a module that registers your own plug-ins (decoder, encoder, data source, metric) first "
        "(repeatable); deeploc never imports a module named inside a model file",
    )


def report_error(prog: str, exc: BaseException, verbose: bool) -> int:
    """Inside an ``except`` block of an argparse command: print ``prog: <message>`` and return exit status 1, or
    re-raise with ``--verbose`` (the full traceback)."""
    if verbose:
        raise exc
    print(f"{prog}: {without_worker_traceback(exc)}", file=sys.stderr)
    return 1


def without_worker_traceback(exc: BaseException) -> str:
    """``exc``'s message. torch re-raises a DataLoader worker's error in the main process as the same type with the
    worker's traceback in front of the message ("Caught X in DataLoader worker process 0. Original Traceback ...
    module.X: message"): the message is what follows that last line's ``module.X: ``."""
    text = str(exc)
    if not text.startswith(f"Caught {type(exc).__name__} in DataLoader worker process"):
        return text
    marker = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    at = text.rfind(marker)
    return text[at + len(marker) :].strip() if at >= 0 else text


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The option of every command that loads a trained model: the encoder's weights file."""
    parser.add_argument(
        "--encoder-checkpoint",
        dest="encoder_checkpoint",
        default=None,
        help="the encoder weights file the decoder was trained on (SAM2 .pt, CLIP ViT-L-14.pt...; verified by "
        "sha256; default: the path recorded in the run). Not needed for decoders trained on random-weight encoders.",
    )
    add_key_flag(parser, "verify: an export must carry a signature made with this key")


def add_key_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """``--key-file``: the secret of exports' keyed signatures (default: $DEEPLOC_SIGNING_KEY; docs/inference.md)."""
    parser.add_argument(
        "--key-file",
        default=None,
        metavar="PATH",
        help=f"a file holding the secret key of export signatures ({what}); default: $DEEPLOC_SIGNING_KEY, if set",
    )


def import_plugins(args: argparse.Namespace) -> None:
    """Import the modules of ``--import`` (they register plug-ins)."""
    from deeploc.registry import import_modules

    import_modules(args.imports, "--import")


def run_hydra_app(prog: str, app: Callable[[], Any], defaults: Sequence[str] = ()) -> None:
    """Run a ``@hydra.main`` function; errors a user can fix end the process with one line and exit status 1 (a
    diverged run too); a ``SystemExit`` carrying a ``console_line`` (a run stopped by SIGTERM: status 143) prints that
    line and keeps its status. ``defaults``: overrides of the command itself, put before the user's (which win) and
    after flags such as -m (Hydra's parser wants the overrides in one block)."""
    args = sys.argv[1:]
    at = next((i for i, a in enumerate(args) if not a.startswith("-") and ("=" in a or a.startswith("~"))), len(args))
    sys.argv[1 + at : 1 + at] = list(defaults)
    verbose = VERBOSE_FLAG in sys.argv[1:]
    if verbose:
        sys.argv.remove(VERBOSE_FLAG)
    user_full = os.environ.get("HYDRA_FULL_ERROR") == "1" and os.environ.get(_COMPACT_ENV) != "1"
    if verbose or user_full:
        os.environ["HYDRA_FULL_ERROR"] = "1"
        os.environ.pop(_COMPACT_ENV, None)
        app()
        return
    os.environ.update({"HYDRA_FULL_ERROR": "1", _COMPACT_ENV: "1"})
    stderr = sys.stderr
    sys.stderr = hydra_line = _WithoutHydraJobLine(stderr)
    try:
        app()
    except SystemExit as exc:  # a run stopped by SIGTERM (exit 143), settings refused before launch (exit 1)
        line = getattr(exc, "console_line", None)
        if not line:
            raise
        print(f"{prog}: {line}", file=stderr)
        raise SystemExit(exc.code if isinstance(exc.code, int) else 1) from None
    except Exception as exc:
        message = error_message(exc)
        if message is None:
            hydra_line.restore()
            raise
        job = f" (job {hydra_line.overrides})" if hydra_line.overrides and _multirun() else ""
        print(f"{prog}: {message}{job}", file=stderr)
        raise SystemExit(1) from None
    finally:
        sys.stderr = stderr


_HYDRA_JOB_LINE = "Error executing job with overrides: "


class _WithoutHydraJobLine:
    """``sys.stderr`` without Hydra's "Error executing job with overrides: [...]" line, which it writes before
    re-raising a job's error: deeploc's own line is the one line (with the job's overrides in a sweep). An error
    that is not a user's (a bug) gets the line back before its traceback."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.overrides: str | None = None

    def write(self, text: str) -> int:
        if text.startswith(_HYDRA_JOB_LINE):
            self.overrides = text[len(_HYDRA_JOB_LINE) :].strip()
            return len(text)
        return self.stream.write(text)

    def restore(self) -> None:
        if self.overrides is not None:
            self.stream.write(f"{_HYDRA_JOB_LINE}{self.overrides}\n")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _multirun() -> bool:
    return any(arg in ("-m", "--multirun") for arg in sys.argv[1:])


def error_message(exc: BaseException) -> str | None:
    """The one-line report of an error a user can fix, or None (a bug: the caller shows the traceback)."""
    from hydra.errors import CompactHydraException
    from omegaconf.errors import OmegaConfBaseException

    own = deeploc_error(exc)
    if own is not None:
        return without_worker_traceback(own)
    if isinstance(exc, OSError) and exc.errno in _UNWRITABLE and exc.filename:
        return unwritable_message(Path(exc.filename), exc.strerror or str(exc))
    if isinstance(exc, CompactHydraException):  # unknown config option, missing key: Hydra's own short message
        cause = exc.__cause__
        return str(exc) + (f"\n{cause}" if isinstance(cause, OmegaConfBaseException) else "")
    return None


def unwritable_message(path: Path, reason: str) -> str:
    """What to do when ``path`` cannot be written: name the output folder setting when ``path`` lies under it."""
    output_dir = _output_dir()
    if _is_within(path, output_dir):
        return (
            f"cannot write {path} ({reason}): the output folder {output_dir} is not writable. deeploc writes its "
            "runs, caches and generated data there: set DEEPLOC_OUTPUTS=/a/writable/folder (or pass "
            "paths.output_dir=/a/writable/folder), or make the folder writable"
        )
    return (
        f"cannot write {path} ({reason}): point the setting that names this folder (e.g. features.dir, "
        "paths.cache_dir, paths.data_dir, hydra.run.dir) at a writable folder, or make it writable"
    )


def _output_dir() -> Path:
    """``paths.output_dir`` as this command line resolves it: an override, else $DEEPLOC_OUTPUTS, else ./outputs."""
    value = os.environ.get("DEEPLOC_OUTPUTS", "outputs")
    for arg in sys.argv[1:]:
        key, _, typed = arg.lstrip("+").partition("=")
        if key == "paths.output_dir" and typed:
            value = typed.strip("'\"")
    return Path(value).expanduser().absolute()


def _is_within(path: Path, folder: Path) -> bool:
    path = path.expanduser().absolute()
    return path == folder or folder in path.parents
