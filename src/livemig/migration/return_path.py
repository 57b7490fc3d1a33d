"""Both ends of the return path: the source's reader thread and the
destination's (thread-safe) writer. Message framing is ``livemig.wire``'s."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from livemig.migration.errors import MigrationError
from livemig.threadname import name_native_thread
from livemig.transport import TransportError
from livemig.transport.tls import TlsAlert
from livemig.wire import (
    NEED_DATA,
    Closed,
    Pong,
    ReturnPathDecoder,
    ReturnPathError,
    Shut,
    SwitchoverAck,
    XError,
    XLoadCosts,
    encode_pong,
    encode_shut,
    encode_switchover_ack,
    encode_x_error,
    encode_x_load_costs,
)
from livemig.wire.return_path import (
    RecvBitmap,
    ReqPages,
    ResumeAck,
    encode_recv_bitmap_message,
    encode_req_pages,
    encode_resume_ack,
)

log = logging.getLogger("livemig.migration")
CHANNEL_ERROR = "Channel error: Input/output error"


class SourceReturnPath:
    """Reads the destination's messages (``@bottom_half``: return-path thread)."""

    def __init__(self, channel, on_ack: Callable[[], None],
                 on_costs: Callable[[dict[str, float]], None] | None = None,
                 on_pong: Callable[[int], None] | None = None,
                 on_postcopy: Callable[[ReqPages | RecvBitmap | ResumeAck], None] | None = None
                 ) -> None:
        self.channel = channel
        self.on_postcopy = on_postcopy
        self.on_ack = on_ack
        self.on_costs = on_costs
        self.on_pong = on_pong
        self.decoder = ReturnPathDecoder()
        self.shut_value: int | None = None
        self.pongs: list[int] = []
        self.error: str | None = None
        self.dest_error: str | None = None   # the destination's own words (MIG_RP_MSG_X_ERROR)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="return path", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        name_native_thread()
        buf = bytearray(4096)
        try:
            while True:
                n = self.channel.recv_into(buf)
                # n == 0: end of data; the decoder says if a message was cut short.
                self.decoder.receive_data(bytes(buf[:n]))
                while (ev := self.decoder.next_event()) is not NEED_DATA:
                    if isinstance(ev, Closed):
                        if self.shut_value is None:
                            self._fail(CHANNEL_ERROR)
                        return
                    if self._handle(ev):
                        return
                if n == 0:
                    if self.shut_value is None:
                        self._fail(CHANNEL_ERROR)
                    return
        except ReturnPathError as exc:
            self._fail(exc.message)         # QEMU's words, without our offset suffix
        except TlsAlert as exc:
            # QEMU's text, and why: the destination's TLS refused us (e.g. our certificate).
            if self.shut_value is None:
                self._fail(f"{CHANNEL_ERROR} (TLS: {exc.reason})")
        except (OSError, TransportError):
            if self.shut_value is None:
                self._fail(CHANNEL_ERROR)
        finally:
            self._done.set()

    def _handle(self, ev) -> bool:
        """Handle one message; True when the return path is finished (SHUT)."""
        if isinstance(ev, SwitchoverAck):
            self.on_ack()
        elif isinstance(ev, Pong):
            self.pongs.append(ev.value)
            if self.on_pong is not None:
                self.on_pong(ev.value)
        elif isinstance(ev, XLoadCosts):
            if self.on_costs is not None:
                self.on_costs(ev.costs)
        elif isinstance(ev, (ReqPages, RecvBitmap, ResumeAck)):
            if self.on_postcopy is None:
                self._fail(f"Received {type(ev).__name__} without postcopy-ram")
                return True
            try:
                self.on_postcopy(ev)
            except MigrationError as exc:
                self._fail(exc.desc)
                return True
        elif isinstance(ev, XError):
            self.dest_error = ev.text
        elif isinstance(ev, Shut):
            self.shut_value = ev.value
            if ev.value:
                self._fail(f"Sibling indicated error {ev.value}")
            return True
        return False

    def _fail(self, desc: str) -> None:
        if self.error is None:
            self.error = f"destination: {self.dest_error}" if self.dest_error else desc

    def wait_done(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the reader to finish (SHUT, error or EOF)."""
        return self._done.wait(timeout)

    def wait_shut(self, check: Callable[[], None]) -> None:
        """Block until SHUT (or an error/cancel, raised by ``check``)."""
        while not self._done.wait(0.05):
            check()
        check()
        if self.shut_value is None:
            raise MigrationError(self.error or CHANNEL_ERROR)

    def shutdown(self) -> None:
        try:
            self.channel.shutdown()
        except OSError:
            pass

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)
        try:
            self.channel.close()
        except OSError:
            pass


class DestinationReturnPath:
    """Sends messages back to the source; any thread may send (``_lock``)."""

    def __init__(self, channel) -> None:
        self.channel = channel
        self._lock = threading.Lock()
        self.closed = False
        self._released = False

    def _send(self, data: bytes) -> None:
        with self._lock:
            if self.closed:
                return
            try:
                self.channel.sendall(data)
            except (OSError, TransportError) as exc:
                log.warning("return path send failed: %s", exc)
                self.closed = True

    def send_pong(self, value: int) -> None:
        self._send(encode_pong(value))

    def send_switchover_ack(self) -> None:
        self._send(encode_switchover_ack())

    def send_error(self, text: str) -> None:
        self._send(encode_x_error(text))

    def send_load_costs(self, costs: dict[str, float]) -> None:
        self._send(encode_x_load_costs(costs))

    def send_req_pages(self, start: int, length: int, block: str | None = None) -> None:
        """REQ_PAGES (REQ_PAGES_ID when ``block`` is named): postcopy's fault."""
        self._send(encode_req_pages(start, length, block))

    def send_recv_bitmap(self, block: str, received) -> None:
        """RECV_BITMAP and the bitmap (recovery)."""
        self._send(encode_recv_bitmap_message(block, received))

    def send_resume_ack(self) -> None:
        self._send(encode_resume_ack())

    def send_shut(self, value: int) -> None:
        self._send(encode_shut(value))

    def close(self) -> None:
        """Stop sending and release our descriptor of the connection. Only the
        descriptor: a shutdown here would cut the main channel it shares."""
        with self._lock:
            if self.closed and self._released:
                return
            self.closed = True
            self._released = True
        try:
            self.channel.release()
        except (OSError, TransportError):
            pass
