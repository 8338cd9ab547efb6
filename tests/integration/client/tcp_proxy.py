"""A plain TCP forwarder for connection-failure tests: real sockets between the client and the real
server, which a test can start late (connection refused until then) or cut mid-stream."""
from __future__ import annotations

import socket
import threading


class TcpProxy:
    def __init__(self, target: str):
        """target: the server's "host:port"."""
        host, _, port = target.rpartition(":")
        self.target = (host or "localhost", int(port))
        self.connections = 0  # accepted client connections
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()  # nothing listens on `port` until start(): connections are refused

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "TcpProxy":
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        self._listener = listener
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self.connections += 1
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def drop_connections(self) -> None:
        """Cut every forwarded connection (both sides see a reset/close)."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            try:
                # shutdown, not just close: it wakes the pipe thread blocked in recv() on this socket,
                # which would otherwise keep the connection open.
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self.drop_connections()
