"""The one way this project reaches Ray: the training command, the evaluation and the tests'
drivers all connect here.

`--address` / RAY_ADDRESS is joined; without either, the cluster `ray start` runs on this node
(the head of `ray up`, where `ray job submit`, `ray submit` and `ray attach` run the commands)
is joined, as `ray.init()` does; else, or with `--address local`, a Ray of the command's own is
started, its dashboard (if any) on the interface given.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray

logger = logging.getLogger(__name__)

PRIVATE_RAY = "local"  # --address local: a new Ray for this command only


class RayConnectionError(RuntimeError):
    """Ray could not be started or reached; the message says which and what to check."""


@dataclass(frozen=True)
class RayConnection:
    started_here: bool  # this call started the Ray (the caller may shut it down)
    dashboard_url: str | None  # where the dashboard answers, when there is one to show


def connect_ray(address: str | None, dashboard: bool = False,
                dashboard_host: str = "127.0.0.1") -> RayConnection:
    if ray.is_initialized():
        return RayConnection(started_here=False, dashboard_url=None)
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        context = None
        if address and address != PRIVATE_RAY:
            context = ray.init(address=address, logging_level=logging.WARNING)
        elif address is None:
            try:
                context = ray.init(address="auto", logging_level=logging.WARNING)
                address = "auto"
                logger.info("joined the Ray cluster running on this node (--address local "
                            "starts a Ray of this command's own instead)")
            except ConnectionError:  # none runs here
                pass
            except ray.exceptions.AuthenticationError:
                # No token on this machine: Ray refuses before looking for a cluster. A cluster
                # `ray up` started has one file-mounted, so none runs here that we could join.
                logger.info("no Ray auth token on this machine (~/.ray/auth_token): not joining "
                            "a cluster; starting a Ray of this command's own")
        started_here = context is None
        if started_here:
            address = None
            context = ray.init(address=PRIVATE_RAY, include_dashboard=dashboard,
                               dashboard_host=dashboard_host, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise RayConnectionError(f"cannot start or reach {where}: {error}; check --address / "
                                 "RAY_ADDRESS (or --address local for a Ray of this "
                                 "command's own)") from error
    return RayConnection(started_here, _dashboard_url(context, address, dashboard_host))


def _dashboard_url(context, address: str | None, dashboard_host: str) -> str | None:
    url = getattr(context, "dashboard_url", None)
    if not url:
        return None
    url = url.removeprefix("http://")
    if not address and dashboard_host not in ("0.0.0.0", "::"):
        # Ray publishes the node's IP for any host but localhost; the dashboard listens only
        # on the host given, so that is the address that answers.
        port = url.rsplit(":", 1)[-1]
        host = f"[{dashboard_host}]" if ":" in dashboard_host else dashboard_host
        url = f"{host}:{port}"
    return f"http://{url}"
