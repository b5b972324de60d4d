"""A small TCP proxy for fault injection: `pause()` stops forwarding in both directions while
connections stay open (packets go nowhere, as with a hung network path); `resume()` goes on."""

import select
import socket
import threading


class TcpProxy:
    def __init__(self, target_port, target_host="127.0.0.1"):
        self.target = (target_host, target_port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def pause(self):
        self._forwarding.clear()

    def resume(self):
        self._forwarding.set()

    def close(self):
        self._closed = True
        self._forwarding.set()
        self.listener.close()

    def _accept(self):
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client):
        self._forwarding.wait()
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        peers = {client: upstream, upstream: client}
        try:
            while not self._closed:
                self._forwarding.wait()
                ready, _, _ = select.select(list(peers), [], [], 0.2)
                for sock in ready:
                    if not self._forwarding.is_set():
                        break  # hold the bytes: nothing gets through while paused
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()
