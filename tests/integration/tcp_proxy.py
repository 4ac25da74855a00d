"""A TCP proxy on 127.0.0.1 that can take its server off the network and bring it back, for the S3 outage drill.

Test support only. `outage()` closes the listening socket and resets every open connection, so clients see what
a restarting server gives them (connection refused, connection reset) while the server behind keeps its objects,
as a real object store does across a network blip; `restore()` listens on the same port again.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

BUFFER_BYTES = 64 * 1024


class PausableTcpProxy:
    """Forwards 127.0.0.1:<port> to `target` (host, port) until `outage()`; `restore()` forwards again.

    with PausableTcpProxy(("127.0.0.1", 5000)) as proxy:
        url = f"http://127.0.0.1:{proxy.port}"
    """

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.port = 0
        self.connections = 0
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def __enter__(self) -> PausableTcpProxy:
        self.restore()
        return self

    def __exit__(self, *exc: object) -> None:
        self.outage()

    def restore(self) -> None:
        """Listen (on the same port as before, if there was one) and forward new connections."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def outage(self) -> None:
        """Stop listening and reset every open connection (RST, as a killed server's kernel would send)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            sockets, self._open = self._open, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RDWR)  # wakes the pump threads blocked in recv()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by outage()
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # an outage began meanwhile
                    client.close()
                    server.close()
                    continue
                self._open |= {client, server}
                self.connections += 1
            pumps = [threading.Thread(target=self._pump, args=pair, daemon=True)
                     for pair in ((client, server), (server, client))]  # fmt: skip
            for pump in pumps:
                pump.start()
            threading.Thread(target=self._close_after, args=(pumps, client, server), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(BUFFER_BYTES):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)

    def _close_after(self, pumps: list[threading.Thread], *sockets: socket.socket) -> None:
        for pump in pumps:
            pump.join()
        with self._lock:
            self._open.difference_update(sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
