"""Who may call ``/admin/*`` and how often a reload may start.

With ``settings.admin_token`` (``RECSYS_ADMIN_TOKEN``) set, admin calls need ``Authorization: Bearer <token>``
(compared in constant time; otherwise 401). Without one they are open on loopback (127.0.0.0/8, ::1, localhost: only
local processes reach the server) and disabled (403) on any other address.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
import time
from fastapi import Depends, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from serving.errors import AdminDisabled, TooEarly, Unauthorized
from serving.settings import ADMIN_TOKEN_ENV, ServingSettings

log = logging.getLogger("serving")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable from this machine only.

    Example:
        >>> is_loopback("127.0.0.1"), is_loopback("::1"), is_loopback("0.0.0.0"), is_loopback("10.1.2.3")
        (True, True, False, False)
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def admin_guard(settings: ServingSettings) -> tuple:
    """The FastAPI dependency of admin routes under ``settings`` and the statuses it may refuse a call with (401, 403
    or none); logs (once, at start-up) how admin calls are guarded. With a token it is a ``Security`` dependency, so
    the OpenAPI schema lists the bearer scheme."""
    if settings.admin_token is not None:
        token = settings.admin_token.get_secret_value().encode()
        bearer = HTTPBearer(auto_error=False, scheme_name="adminToken",
                            description=f"The server's {ADMIN_TOKEN_ENV} (admin endpoints only).")
        log.info("admin endpoints need the bearer token of %s", ADMIN_TOKEN_ENV)

        def authorized(credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
            if credentials is None:
                raise Unauthorized("admin endpoints need an 'Authorization: Bearer <token>' header")
            if not hmac.compare_digest(credentials.credentials.encode(), token):
                raise Unauthorized("the admin token is wrong")

        return Depends(authorized), (401,)
    if is_loopback(settings.host):
        log.warning("admin endpoints are open to every local caller: %s is not set (the server listens on %s only)",
                    ADMIN_TOKEN_ENV, settings.host)
        return Depends(lambda: None), ()
    log.warning("admin endpoints (POST /admin/reload) are DISABLED: the server listens on %s, beyond loopback, and %s "
                "is not set", settings.host, ADMIN_TOKEN_ENV)

    def disabled() -> None:
        raise AdminDisabled(f"admin endpoints are disabled on this server: it listens beyond loopback and no admin "
                            f"token is set (start it with {ADMIN_TOKEN_ENV})")

    return Depends(disabled), (403,)


class ReloadPacer:
    """At most one reload start per ``min_interval`` seconds (monotonic clock); a call in between gets ``TooEarly``
    (429) with the seconds to wait. Call it from the event loop only (no lock).

    Example:
        >>> pacer = ReloadPacer(3600, clock=lambda: 0.0)
        >>> pacer.start()
        >>> pacer.start()
        Traceback (most recent call last):
        ...
        serving.errors.TooEarly: the last reload started less than 3600 s ago; retry in 3600 s
    """

    def __init__(self, min_interval: float, clock=time.monotonic):
        self.min_interval, self.clock = min_interval, clock
        self.last: float | None = None

    def start(self) -> None:
        """Records a reload start, or raises ``TooEarly`` when the previous one started too recently."""
        now = self.clock()
        if self.last is not None and (wait := self.last + self.min_interval - now) > 0:
            seconds = max(1, math.ceil(wait))
            raise TooEarly(f"the last reload started less than {self.min_interval:g} s ago; retry in {seconds} s",
                           retry_after=seconds)
        self.last = now
