"""Keyed signatures of exported decoders (HMAC-SHA256), for exports that travel between people or machines.

An export's ``deeploc_sha256`` (:mod:`deeploc.inference.export`) is an unkeyed digest: it catches damage and hand
edits, but anyone can edit the metadata and recompute it. With a secret key, ``deeploc-export`` also writes
``deeploc_hmac_sha256`` = HMAC-SHA256(key, metadata text); the metadata text holds ``decoder_sha256``, so the
signature covers the tensors too. ``deeploc-eval`` and ``deeploc-predict`` verify it whenever a key is configured,
and refuse an export that is unsigned or signed with another key. The key comes from ``--key-file PATH`` (the file's
bytes, one trailing newline dropped) or the environment variable ``DEEPLOC_SIGNING_KEY`` (its text). No key: no
signature is written and none is checked. Checkpoints inside run directories are not signed (their sha256 is
recorded in the run's metrics.json).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from deeploc.runs.checkpoints import ModelError

KEY_ENV = "DEEPLOC_SIGNING_KEY"
SIGNATURE_KEY = "deeploc_hmac_sha256"


class SignatureError(ModelError):
    """An export whose keyed signature is missing or does not match the configured key."""


def signing_key(key_file: str | os.PathLike[str] | None = None) -> bytes | None:
    """The configured key: the bytes of ``key_file``, else ``$DEEPLOC_SIGNING_KEY``, else None (no signing)."""
    if key_file is not None:
        path = Path(key_file).expanduser()
        try:
            key = path.read_bytes()
        except OSError as exc:
            raise SignatureError(f"--key-file {path}: cannot read it ({exc.strerror or exc})") from None
        key = key[:-1] if key.endswith(b"\n") else key
        if not key:
            raise SignatureError(f"--key-file {path} is empty; put a secret of at least 16 bytes in it")
        return key
    text = os.environ.get(KEY_ENV)
    if text is None:
        return None
    if not text:
        raise SignatureError(f"{KEY_ENV} is set but empty; set it to a secret, or unset it")
    return text.encode()


def sign(text: str, key: bytes) -> str:
    """``hmac-sha256:<hex>`` of the metadata ``text`` under ``key``."""
    return "hmac-sha256:" + hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def check_signature(path: Path, text: str, recorded: str | None, key: bytes) -> None:
    """Refuse an export whose signature is missing or was made with another key (or whose metadata changed)."""
    if recorded is None:
        raise SignatureError(
            f"{path} is not signed, but a signing key is configured ({KEY_ENV} or --key-file): only exports "
            "written by deeploc-export with that key are accepted. Export the run again with the key, or unset it"
        )
    if not hmac.compare_digest(sign(text, key), recorded):
        raise SignatureError(
            f"{path}: its signature does not match the configured key: the file was forged or modified, or signed "
            "with another key. Use the export as its author signed it, with their key"
        )
