"""Loopback TCP proxy for fault injection (tests and the ``storm`` benchmark).

The proxy runs in a child process (``python -m greenpool.testing.proxy``) on its own
asyncio loop, so it is untouched by the calling process's gevent hub,
monkey-patching, or blocking calls: a benchmark that saturates its own hub
still gets a proxy that relays promptly. The in-process :class:`Proxy`
controller drives it synchronously over a line protocol on the child's
stdin/stdout (see :mod:`greenpool.testing.childproc`):

==================  ===========================================================
command             effect / reply
==================  ===========================================================
``ping``            ``ok pong``
``delay <s>``       delay each *new* client by ``s`` seconds before the upstream
                    connect; ``ok delay=<s>``
``kill``            reset every proxied connection; ``ok <count>``
``pause``           stop listening (clients get ECONNREFUSED); ``ok paused``
``resume``          listen again on the same port; ``ok port=<port>``
``blackhole <0|1>`` 1: relay nothing more, either way, and close nothing (a
                    server that accepts and never answers, a dead network
                    that keeps sockets open); 0: relay again; ``ok blackhole=<0|1>``
``stats``           ``ok active=<n> accepted=<n> killed=<n>``
``quit``            ``ok bye``, close everything, exit
==================  ===========================================================

On startup the child prints ``ok port=<port>``. It exits on ``quit``, on
stdin EOF, or when its parent process dies.

Usage::

    with Proxy("127.0.0.1", 5432) as proxy:
        conn = psycopg.connect(proxy.dsn("host=127.0.0.1 port=5432 dbname=test"))
        proxy.kill_connections()        # conn's next query raises OperationalError
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qsl, unquote, urlsplit

from .childproc import ChildController, HelperError, LineChild, reply

# asyncio is imported only inside the child-side functions: importing it in
# the parent would import ssl, and gevent warns (rightly) about ssl imported
# before monkey-patching -- this module is imported by processes that patch
# later.
if TYPE_CHECKING:
    import asyncio

__all__ = ["Proxy", "main", "parse_dsn_host_port"]

_START_TIMEOUT = 10.0
_COMMAND_TIMEOUT = 10.0


# --------------------------------------------------------------------------
# DSN helpers
# --------------------------------------------------------------------------


def _parse_keyword_dsn(dsn: str) -> dict[str, str]:
    """Parse a libpq ``key=value`` string (values may be single-quoted, with
    backslash escapes), for when psycopg is not installed."""
    params: dict[str, str] = {}
    i, n = 0, len(dsn)
    while True:
        while i < n and dsn[i].isspace():
            i += 1
        if i >= n:
            return params
        eq = dsn.find("=", i)
        if eq < 0:
            raise ValueError(f"missing '=' after {dsn[i:]!r} in connection string")
        key = dsn[i:eq].strip()
        i = eq + 1
        while i < n and dsn[i].isspace():
            i += 1
        value: list[str] = []
        if i < n and dsn[i] == "'":
            i += 1
            while True:
                if i >= n:
                    raise ValueError("unterminated quoted value in connection string")
                ch = dsn[i]
                if ch == "\\" and i + 1 < n:
                    value.append(dsn[i + 1])
                    i += 2
                elif ch == "'":
                    i += 1
                    break
                else:
                    value.append(ch)
                    i += 1
        else:
            while i < n and not dsn[i].isspace():
                if dsn[i] == "\\" and i + 1 < n:
                    i += 1
                value.append(dsn[i])
                i += 1
        params[key] = "".join(value)


def _parse_uri_dsn(dsn: str) -> dict[str, str]:
    """Parse a ``postgresql://`` URI into libpq keywords, for when psycopg is
    not installed."""
    parts = urlsplit(dsn)
    params: dict[str, str] = {}
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, netloc = netloc.rpartition("@")
        user, sep, password = userinfo.partition(":")
        if user:
            params["user"] = unquote(user)
        if sep:
            params["password"] = unquote(password)
    hosts: list[str] = []
    ports: list[str] = []
    for item in netloc.split(",") if netloc else []:
        if item.startswith("["):  # [ipv6]:port
            host, _, rest = item[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port = item.partition(":")
        hosts.append(unquote(host))
        ports.append(port)
    if any(hosts):
        params["host"] = ",".join(hosts)
    if any(ports):
        params["port"] = ",".join(ports)
    if parts.path not in ("", "/"):
        params["dbname"] = unquote(parts.path[1:])
    # Query parameters override the authority part, as in libpq.
    params.update(parse_qsl(parts.query, keep_blank_values=True))
    return params


def _conninfo_to_dict(dsn: str) -> dict[str, str]:
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        if dsn.startswith(("postgresql://", "postgres://")):
            return _parse_uri_dsn(dsn)
        return _parse_keyword_dsn(dsn)
    # libpq's own parser, so every corner of the syntax matches what connects.
    return {k: str(v) for k, v in conninfo_to_dict(dsn).items() if v is not None}


def _quote_value(value: str) -> str:
    if value and not any(c.isspace() or c in "'\\" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _make_conninfo(params: dict[str, str]) -> str:
    try:
        from psycopg.conninfo import make_conninfo
    except ImportError:
        return " ".join(f"{k}={_quote_value(v)}" for k, v in params.items())
    return make_conninfo("", **params)


def parse_dsn_host_port(dsn: str) -> tuple[str, int]:
    """Return the TCP ``(host, port)`` a libpq DSN (``key=value`` or URI) points at.

    Uses psycopg's (i.e. libpq's) parser when psycopg is importable. With
    several hosts the first one wins; ``hostaddr`` beats ``host`` because it is
    what libpq actually connects to. Missing values fall back to ``PGHOST`` /
    ``PGPORT`` like libpq, then to ``localhost`` / ``5432``.

    Raises :class:`ValueError` when the host is a Unix-socket directory, which
    a TCP proxy cannot forward to.
    """
    params = _conninfo_to_dict(dsn)
    host = (params.get("hostaddr") or params.get("host") or os.environ.get("PGHOST") or "").split(",")[0]
    port_text = (params.get("port") or os.environ.get("PGPORT") or "").split(",")[0].strip()
    host = host.strip() or "localhost"
    if host.startswith(("/", "@")):
        raise ValueError(f"DSN points at Unix socket {host!r}; a TCP host is needed")
    try:
        port = int(port_text) if port_text else 5432
    except ValueError:
        raise ValueError(f"invalid port {port_text!r} in DSN") from None
    return host, port


# --------------------------------------------------------------------------
# In-process controller
# --------------------------------------------------------------------------


class Proxy(ChildController):
    """Loopback TCP proxy in a child process, for fault injection.

    Relays ``127.0.0.1:<port>`` to ``target_host:target_port``. All methods
    are synchronous and safe to call from threads or greenlets, in plain or
    gevent-monkey-patched processes; a call blocks the caller (and a gevent
    hub) only for one pipe round trip to the child.
    """

    _name = "Proxy"

    def __init__(self, target_host: str, target_port: int, *, connect_delay: float = 0.0) -> None:
        """Describe a proxy to *target_host*:*target_port*; :meth:`start` runs it.

        *connect_delay* seconds are waited after each client connects and
        before the upstream connect (see :meth:`set_connect_delay`).
        """
        super().__init__()
        self.target_host = target_host
        self.target_port = int(target_port)
        self._connect_delay = _check_delay(connect_delay)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        port = self._port if self._port is not None else "?"
        return f"<Proxy {self.host}:{port} -> {self.target_host}:{self.target_port} {state}>"

    def start(self) -> Proxy:
        """Spawn the child and wait until it listens; return ``self``.

        Raises :class:`RuntimeError` if the child is not listening within 10 s.
        Calling it on a running proxy does nothing.
        """
        return super().start()

    def _spawn(self) -> LineChild:
        child = LineChild(
            "greenpool.testing.proxy",
            [
                "--target-host",
                self.target_host,
                "--target-port",
                str(self.target_port),
                "--connect-delay",
                repr(self._connect_delay),
            ],
            what="proxy",
        )
        try:
            reply = child.readline(_START_TIMEOUT)
            if not reply.startswith("ok port="):
                raise HelperError(f"proxy failed to start: {reply}")
            self._port = int(reply.split("=", 1)[1])
        except (HelperError, ValueError) as exc:
            child.close(timeout=2.0)
            raise RuntimeError(str(exc)) from None
        return child

    def stop(self) -> None:
        """Stop the child, dropping all proxied connections. Idempotent."""
        self._stop_child()

    def _request(self, command: str) -> str:
        child = self._child
        if child is None or child.closed:
            raise RuntimeError("Proxy is not running")
        try:
            return child.request(command, _COMMAND_TIMEOUT)
        except HelperError as exc:
            raise RuntimeError(str(exc)) from None

    def set_connect_delay(self, seconds: float) -> None:
        """Delay connections accepted from now on by *seconds* before relaying.

        The delay sits between accepting a client and connecting upstream, so
        it slows down a libpq connect by that much; established connections
        are not affected.
        """
        seconds = _check_delay(seconds)
        if self.running:
            self._request(f"delay {seconds!r}")
        self._connect_delay = seconds

    @property
    def connect_delay(self) -> float:
        """The current connect delay in seconds."""
        return self._connect_delay

    def kill_connections(self) -> int:
        """Abruptly close every proxied connection (both sides get a TCP RST).

        Returns how many client connections were killed, including ones still
        waiting out the connect delay.
        """
        return int(self._request("kill"))

    def pause(self) -> None:
        """Stop accepting: new connects get ECONNREFUSED ("server down").

        Established connections keep working. The port stays reserved (bound
        but not listening) so :meth:`resume` gets it back.
        """
        self._request("pause")

    def resume(self) -> None:
        """Accept connections again, on the same port."""
        self._request("resume")

    def blackhole(self, on: bool = True) -> None:
        """Relay nothing more, in either direction, and close nothing (`on=False`: relay again).

        What a client sees of a server that accepts and never answers, or of
        a network that dropped everything: connects wait for the server's
        reply, queries for their results. (The proxy's own TCP stack still
        acknowledges, so TCP keepalives don't see it.)
        """
        self._request(f"blackhole {int(on)}")

    def stats(self) -> dict[str, int]:
        """Counters: ``active`` connections, total ``accepted``, total ``killed``."""
        reply = self._request("stats")
        return {k: int(v) for k, v in (item.split("=", 1) for item in reply.split())}

    def dsn(self, base_dsn: str) -> str:
        """Return *base_dsn* rewritten to connect through this proxy.

        Accepts ``key=value`` and URI DSNs; returns ``key=value`` with
        ``host``/``port`` replaced (and ``hostaddr`` dropped), all other
        parameters kept.
        """
        params = _conninfo_to_dict(base_dsn)
        params.pop("hostaddr", None)
        params["host"] = self.host
        params["port"] = str(self.port)
        return _make_conninfo(params)


def _check_delay(seconds: float) -> float:
    seconds = float(seconds)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"connect delay must be a finite number >= 0, not {seconds!r}")
    return seconds


# --------------------------------------------------------------------------
# Child process: the proxy itself (stdlib + asyncio only)
# --------------------------------------------------------------------------


def _set_linger_zero(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            # l_onoff=1, l_linger=0: close() sends RST instead of FIN, which is
            # what a crashed server or a cut network cable looks like.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except OSError:
            pass


# The protocol classes below duck-type asyncio.Protocol instead of subclassing
# it, because asyncio must not be imported at module level (see above).


class _Leg:
    """What both legs of a relay do: pass what arrives on to the other leg (the peer)."""

    def _relay(self) -> _Relay:
        """The relay this leg belongs to."""
        raise NotImplementedError

    def _peer(self) -> Any:
        """The other leg's transport (None until it is connected)."""
        raise NotImplementedError

    def data_received(self, data: bytes) -> None:
        peer = self._peer()
        if peer is not None and not self._relay().server.blackhole:
            peer.write(data)

    def eof_received(self) -> bool:
        self._relay().close()
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self._relay().close()

    # Backpressure: this leg's side takes data slower than the peer sends it?
    # Stop reading from the peer until this leg's write buffer drains.
    def pause_writing(self) -> None:
        peer = self._peer()
        if peer is not None:
            peer.pause_reading()

    def resume_writing(self) -> None:
        peer = self._peer()
        if peer is not None and not peer.is_closing():
            peer.resume_reading()


class _Upstream(_Leg):
    """asyncio protocol for the proxy -> target leg of one relay."""

    def __init__(self, relay: _Relay) -> None:
        self.relay = relay

    def connection_made(self, transport: Any) -> None:
        self.relay.upstream = transport

    def _relay(self) -> _Relay:
        return self.relay

    def _peer(self) -> Any:
        return self.relay.client


class _Relay(_Leg):
    """asyncio protocol for one accepted client, plus its upstream leg."""

    def __init__(self, server: _ProxyServer) -> None:
        self.server = server
        self.client: Any = None
        self.upstream: Any = None
        self.closed = False
        self.connect_task: asyncio.Task[None] | None = None

    def connection_made(self, transport: Any) -> None:
        import asyncio

        self.client = transport
        # Hold client bytes in the kernel until the upstream leg exists.
        transport.pause_reading()
        self.server.relays.add(self)
        self.server.accepted += 1
        self.connect_task = asyncio.get_running_loop().create_task(self._connect_upstream(self.server.connect_delay))

    async def _connect_upstream(self, delay: float) -> None:
        import asyncio

        if delay > 0:
            await asyncio.sleep(delay)
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(
                lambda: cast("asyncio.Protocol", _Upstream(self)), self.server.target_host, self.server.target_port
            )
        except OSError:
            # Target down: drop the client hard, as a refused connect would.
            self.abort()
            return
        if self.closed:
            self.abort()
        else:
            self.client.resume_reading()

    def _relay(self) -> _Relay:
        return self

    def _peer(self) -> Any:
        return self.upstream

    def _forget(self) -> None:
        """Mark the relay closed, stop counting it, and stop connecting its upstream leg."""
        self.closed = True
        self.server.relays.discard(self)
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()

    def close(self) -> None:
        """Graceful close of both legs (queued data is still flushed)."""
        if self.closed:
            return
        self._forget()
        for transport in (self.client, self.upstream):
            if transport is not None:
                transport.close()

    def abort(self) -> None:
        """Reset both legs immediately."""
        self._forget()
        for transport in (self.client, self.upstream):
            if transport is not None:
                _set_linger_zero(transport)
                transport.abort()


class _ProxyServer:
    """The listening side: accepts clients and tracks live relays."""

    def __init__(
        self, listen_host: str, listen_port: int, target_host: str, target_port: int, connect_delay: float
    ) -> None:
        self.listen_host = listen_host
        self.port = listen_port
        self.target_host = target_host
        self.target_port = target_port
        self.connect_delay = connect_delay
        self.relays: set[_Relay] = set()
        self.accepted = 0
        self.killed = 0
        self.blackhole = False  # relay nothing (see Proxy.blackhole)
        self._server: asyncio.AbstractServer | None = None
        # While paused: bound but not listening, so the kernel answers SYNs
        # with RST (ECONNREFUSED) and nobody else can take the port meanwhile.
        self._placeholder: socket.socket | None = None

    async def start(self) -> None:
        """Listen on (listen_host, port); port 0 picks a free one."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.listen_host, self.port))
        self.port = sock.getsockname()[1]
        await self._serve(sock)

    async def _serve(self, sock: socket.socket) -> None:
        import asyncio

        sock.listen(512)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: cast("asyncio.Protocol", _Relay(self)), sock=sock)

    def pause(self) -> None:
        """Close the listening socket but keep the port bound."""
        if self._server is None:
            return
        self._server.close()  # closes the listening socket now; relays survive
        self._server = None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.listen_host, self.port))
        self._placeholder = sock

    async def resume(self) -> None:
        """Listen again on the reserved port."""
        if self._server is not None:
            return
        sock, self._placeholder = self._placeholder, None
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.listen_host, self.port))
        await self._serve(sock)

    def kill(self) -> int:
        """Reset every relay; return how many there were."""
        relays = list(self.relays)
        for relay in relays:
            relay.abort()
        self.killed += len(relays)
        return len(relays)

    def close(self) -> None:
        """Stop listening and reset everything (used at exit)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None
        self.kill()


async def _handle(server: _ProxyServer, line: str) -> tuple[str, bool]:
    """Execute one control command; return (reply, should_exit)."""
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "ping":
        return "ok pong", False
    if cmd == "delay":
        try:
            server.connect_delay = _check_delay(float(arg))
        except ValueError as exc:
            return f"err {exc}", False
        return f"ok delay={server.connect_delay!r}", False
    if cmd == "kill":
        return f"ok {server.kill()}", False
    if cmd == "pause":
        server.pause()
        return "ok paused", False
    if cmd == "resume":
        await server.resume()
        return f"ok port={server.port}", False
    if cmd == "blackhole":
        server.blackhole = arg.strip() == "1"
        return f"ok blackhole={int(server.blackhole)}", False
    if cmd == "stats":
        return f"ok active={len(server.relays)} accepted={server.accepted} killed={server.killed}", False
    if cmd == "quit":
        return "ok bye", True
    return f"err unknown command {line.strip()!r}", False


async def _amain(args: argparse.Namespace) -> int:
    import asyncio

    loop = asyncio.get_running_loop()
    # Before announcing the port: once it has, the parent may exit at once,
    # and a parent read after that would be the reaper that adopted us.
    parent = os.getppid()
    server = _ProxyServer(args.listen_host, args.listen_port, args.target_host, args.target_port, args.connect_delay)
    await server.start()
    reply(f"ok port={server.port}")

    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def next_line() -> bytes | None:
        # Poll with a timeout so a parent that died without closing our stdin
        # (its fd copied into a forked grandchild) is still noticed.
        while True:
            try:
                return await asyncio.wait_for(reader.readline(), timeout=1.0)
            except asyncio.TimeoutError:
                if os.getppid() != parent:
                    return None

    try:
        while True:
            line = await next_line()
            if not line:  # EOF or orphaned
                return 0
            try:
                answer, done = await _handle(server, line.decode("utf-8", "replace"))
            except OSError as exc:
                answer, done = f"err {exc}", False
            reply(answer)
            if done:
                return 0
    finally:
        server.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m greenpool.testing.proxy``: run the proxy in this process.

    Prints ``ok port=<port>`` once listening, then serves the control
    protocol on stdin/stdout until ``quit`` or EOF.
    """
    import asyncio

    parser = argparse.ArgumentParser(prog="python -m greenpool.testing.proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target-host", required=True)
    parser.add_argument("--target-port", required=True, type=int)
    parser.add_argument("--connect-delay", type=float, default=0.0)
    parser.add_argument("--listen-host", default="127.0.0.1")
    parser.add_argument("--listen-port", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        return asyncio.run(_amain(args))
    except OSError as exc:
        reply(f"err {exc}")
        return 1
    except KeyboardInterrupt:  # interactive use: Ctrl-C is a normal way out
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
