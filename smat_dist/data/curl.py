"""HTTP(S) GETs through ``curl``, with the redirect rule applied before each hop.

curl writes the response headers ahead of the body (``-D -``) and follows no redirect itself (no
``-L``): :class:`CurlStream` reads the status line, and for a 3xx answer checks the ``Location``
against ``data.remote.redirects`` *before* asking the next host. "Host" means the host name or
address exactly as the URL writes it, plus the port: ``127.0.0.1`` and ``localhost`` are two
hosts, and so are two ports of one machine. ``--proto =http,https`` keeps curl to those two
protocols. Statuses that another attempt would not change (404, 403, ...) are final; 408, 429 and
5xx may be retried by :class:`~smat_dist.data.deadline.GuardedReader`, which also enforces the
deadlines (curl only gets ``--connect-timeout``: its own speed and total limits would also count
the time a slow consumer keeps it from writing).
"""

from __future__ import annotations

import re
import subprocess
from typing import Optional, Tuple
from urllib.parse import urljoin, urlsplit

from smat_dist.data.deadline import RemoteReadError

MAX_HOPS = 8
MAX_HEADER_BYTES = 64 << 10
_STATUS_RE = re.compile(rb"^HTTP/[0-9.]+\s+(\d{3})(?:\s+(.*))?$")
_RETRYABLE = {408, 425, 429}


def _origin(url: str) -> Tuple[str, str, int]:
    u = urlsplit(url)
    scheme = u.scheme.lower()
    return scheme, (u.hostname or "").lower(), u.port or (443 if scheme == "https" else 80)


def redirect_allowed(origin: str, target: str, rule: str) -> bool:
    """Whether ``rule`` (``same_host``/``none``/``any``) lets a request for ``origin`` follow a
    redirect to ``target``. Only http(s) targets are ever followed."""
    if rule == "none" or urlsplit(target).scheme.lower() not in ("http", "https"):
        return False
    return rule == "any" or _origin(target) == _origin(origin)


class CurlStream:
    """A GET of ``url`` as a read-only stream (``proc`` is the curl process of the current hop)."""

    def __init__(self, url: str, *, connect_timeout_s: float, redirects: str = "same_host"):
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        self.redirects = redirects
        self.proc: Optional[subprocess.Popen] = None
        self._body = False
        self._start(url)

    def _start(self, url: str) -> None:
        self.current = url
        self.proc = subprocess.Popen(
            ["curl", "-s", "--suppress-connect-headers", "-D", "-", "--proto", "=http,https",
             "--connect-timeout", f"{self.connect_timeout_s:g}", url],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)

    def _exit_error(self) -> OSError:
        assert self.proc is not None
        rc = self.proc.wait()
        return OSError(f"curl {self.current}: exit {rc}") if rc else OSError(f"curl {self.current}: empty answer")

    def ready(self) -> None:
        """Connected and the headers read (GuardedReader counts this under the connect deadline)."""
        if not self._body:
            self._headers()

    def _headers(self) -> None:
        """Read status and headers; follow permitted redirects until a 2xx body starts."""
        for _ in range(MAX_HOPS + 1):
            assert self.proc is not None and self.proc.stdout is not None
            status, reason, location, seen = 0, "", None, 0
            while True:  # one header block; 1xx blocks are skipped
                line = self.proc.stdout.readline(MAX_HEADER_BYTES)
                seen += len(line)
                if not line:
                    raise self._exit_error()
                if seen > MAX_HEADER_BYTES:
                    raise RemoteReadError("response headers too long", retry=False)
                text = line.rstrip(b"\r\n")
                if not status:
                    m = _STATUS_RE.match(text)
                    if not m:
                        raise RemoteReadError(f"not an HTTP response: {text[:60]!r}", retry=False)
                    status, reason = int(m.group(1)), (m.group(2) or b"").decode("latin-1").strip()
                elif not text:
                    if 100 <= status < 200:
                        status = 0
                        continue
                    break
                elif text.lower().startswith(b"location:"):
                    location = text.split(b":", 1)[1].strip().decode("latin-1")
            if 200 <= status < 300:
                self._body = True
                return
            if 300 <= status < 400 and location:
                target = urljoin(self.current, location)
                if not redirect_allowed(self.url, target, self.redirects):
                    raise RemoteReadError(
                        f"redirect ({status}) to {target} refused: data.remote.redirects={self.redirects} "
                        + ("follows none" if self.redirects == "none" else
                           "follows only the same scheme, host and port"), retry=False)
                self._kill()
                self._start(target)
                continue
            where = f" (redirected to {self.current})" if self.current != self.url else ""
            raise RemoteReadError(f"HTTP {status} {reason}{where}".rstrip(),
                                  retry=status >= 500 or status in _RETRYABLE)
        raise RemoteReadError(f"more than {MAX_HOPS} redirects", retry=False)

    def read1(self, size: int = -1) -> bytes:
        """What is there, up to ``size`` bytes (blocks only while nothing is)."""
        if not self._body:
            self._headers()
        assert self.proc is not None and self.proc.stdout is not None
        b = self.proc.stdout.read1(size) if size and size > 0 else self.proc.stdout.read()
        if not b and self.proc.wait() != 0:  # e.g. 18: the body ended before its Content-Length
            raise self._exit_error()
        return b

    read = read1  # GuardedReader is the only reader; it asks for chunks

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()

    def close(self) -> None:
        self._kill()


__all__ = ["CurlStream", "MAX_HOPS", "redirect_allowed"]
