"""Starting a W&B run, shared by the trainer (training.run_log) and the eval jobs (eval.wandb_log).

Mode "auto" means online when an API key is configured and W&B's server answers, offline
otherwise: a laptop or an air-gapped cluster logs locally and `wandb sync` uploads later. A key
without a network used to wait ~107 s inside wandb.init and then die with a traceback; here a
3-second connection check decides first, and a run that still fails to start online falls back
to offline. Either way one line says so. The API key never appears in anything printed.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from data_pipeline.errors import UserError

DEFAULT_BASE_URL = "https://api.wandb.ai"
PROBE_SECONDS = 3.0


def _has_key() -> bool:
    return bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").is_file()


def server_reachable(base_url: str | None = None, timeout: float = PROBE_SECONDS) -> bool:
    """Whether a TCP connection to W&B's server (WANDB_BASE_URL, else api.wandb.ai) opens."""
    url = urlparse(base_url or os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_wandb_mode(mode: str) -> str:
    """"auto" -> "online" with a key and a reachable server, else "offline" (one line says why
    when a key was configured but the server did not answer)."""
    if mode != "auto":
        return mode
    if not _has_key():
        return "offline"
    if not server_reachable():
        _say("W&B: an API key is set but the server does not answer; logging offline "
             "(upload later with `wandb sync`)")
        return "offline"
    return "online"


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _scrub(text: str) -> str:
    key = os.environ.get("WANDB_API_KEY")
    return text.replace(key, "***") if key else text


def start_wandb_run(mode: str, **init_kwargs: Any):
    """wandb.init in the resolved mode; in auto mode a failed online start retries offline."""
    import wandb  # slow to import and optional: only when W&B is asked for

    resolved = resolve_wandb_mode(mode)
    try:
        return wandb.init(mode=resolved, **init_kwargs)
    except Exception as exc:  # noqa: BLE001 - wandb raises many types (UsageError, CommError, ...)
        reason = _scrub(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        if mode != "auto" or resolved == "offline":
            raise WandbStartError(f"W&B could not start in {resolved} mode ({reason})") from None
        _say(f"W&B: online start failed ({reason}); logging offline (upload later with `wandb sync`)")
        return wandb.init(mode="offline", **init_kwargs)


class WandbStartError(UserError):
    """W&B was asked for explicitly and cannot start (shown as one line)."""
