"""TLS-PSK on Python's ``ssl`` contexts, through the very OpenSSL ``_ssl`` runs.

Python 3.11's ``ssl`` has no PSK API (3.13 added one), but an
``ssl.SSLContext`` is a thin wrapper of an OpenSSL ``SSL_CTX``. This module
installs OpenSSL's own ``SSL_CTX_set_psk_client_callback`` /
``SSL_CTX_set_psk_server_callback`` on that ``SSL_CTX`` with ctypes. OpenSSL
uses these callbacks for TLS 1.3 external PSKs too (SHA-256 binders,
``TLS_AES_128_GCM_SHA256``: what GnuTLS's PSK credentials use by default),
so the session callbacks are not needed. Why ctypes into ``_ssl``'s libssl and
not a second TLS stack: pyOpenSSL is not installed, has no PSK API of its own
(a third-party add-on patches one in), and would bring the OpenSSL copy
bundled in ``cryptography``'s wheel next to the system's; here every other
part of livemig's TLS (``TlsChannel``, its lock, the handshake and error
texts) stays one ``ssl.SSLSocket`` on one OpenSSL.

Finding the ``SSL_CTX *`` is the one layout fact this relies on: CPython's
``PySSLContext`` starts with ``PyObject_HEAD`` then ``SSL_CTX *ctx``
(``Modules/_ssl.c``; long-standing, yet never assumed). :func:`ssl_ctx_pointer`
reads that word and proves it before any callback is installed, failing
closed (:class:`PskUnavailable`, a clear text) when anything is not as
expected:

* the libssl is the one already mapped into this process (``RTLD_NOLOAD``
  on the path ``/proc/self/maps`` names) and its ``OpenSSL_version_num``
  is ``ssl.OPENSSL_VERSION_NUMBER``;
* the word points at readable memory (a ``write`` of it to a pipe, which
  answers ``EFAULT`` rather than crashing);
* OpenSSL says that ``SSL_CTX``'s method is ``TLS_server_method()`` /
  ``TLS_client_method()`` of that same libssl, as the context's protocol
  says, and an options bit flipped through Python reads back flipped
  through OpenSSL.

The server learns which identity a handshake used from its callback, keyed
by the ``SSL``'s app data (``_ssl`` stores its ``_SSLSocket`` there, so the
key is ``id(ssock._sslobj)``), registered before the handshake and dropped
after it: an identity is never handed to another socket.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import ssl
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, Final

PSK_MAX_IDENTITY: Final = 128
UNAVAILABLE: Final = "TLS-PSK is not available to livemig here: %s"

_SERVER_CB: Final = ctypes.CFUNCTYPE(ctypes.c_uint, ctypes.c_void_p, ctypes.c_char_p,
                                     ctypes.c_void_p, ctypes.c_uint)
_CLIENT_CB: Final = ctypes.CFUNCTYPE(ctypes.c_uint, ctypes.c_void_p, ctypes.c_char_p,
                                     ctypes.c_void_p, ctypes.c_uint, ctypes.c_void_p,
                                     ctypes.c_uint)


class PskUnavailable(Exception):
    """OpenSSL's PSK callbacks cannot be installed safely in this process."""

    def __init__(self, why: str) -> None:
        super().__init__(UNAVAILABLE % why)
        self.desc = UNAVAILABLE % why


def _mapped_libssl() -> str:
    import _ssl  # noqa: F401  (maps libssl into the process)
    paths = set()
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
        for line in f:
            path = line.rstrip("\n").split(maxsplit=5)[-1]
            if os.path.basename(path).startswith("libssl.so"):
                paths.add(path)
    if len(paths) != 1:
        raise PskUnavailable(f"expected one libssl mapped by Python's _ssl, found "
                             f"{sorted(paths) or 'none (statically linked?)'}")
    return paths.pop()


class _LibSSL:
    """The prototypes livemig calls, bound in the libssl ``_ssl`` runs."""

    def __init__(self) -> None:
        path = _mapped_libssl()
        try:
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except OSError as exc:
            raise PskUnavailable(f"cannot reach {path}: {exc}") from None
        version = lib.OpenSSL_version_num
        version.restype, version.argtypes = ctypes.c_ulong, []
        if version() != ssl.OPENSSL_VERSION_NUMBER:
            raise PskUnavailable(f"{path} is OpenSSL {version():#x}, Python's ssl "
                                 f"{ssl.OPENSSL_VERSION_NUMBER:#x}")
        self.path = path
        vp, u64 = ctypes.c_void_p, ctypes.c_uint64
        self.TLS_server_method = self._fn(lib, "TLS_server_method", vp, [])
        self.TLS_client_method = self._fn(lib, "TLS_client_method", vp, [])
        self.SSL_CTX_get_ssl_method = self._fn(lib, "SSL_CTX_get_ssl_method", vp, [vp])
        self.SSL_CTX_get_options = self._fn(lib, "SSL_CTX_get_options", u64, [vp])
        self.SSL_get_ex_data = self._fn(lib, "SSL_get_ex_data", vp, [vp, ctypes.c_int])
        self.SSL_CTX_set_psk_server_callback = self._fn(
            lib, "SSL_CTX_set_psk_server_callback", None, [vp, _SERVER_CB])
        self.SSL_CTX_set_psk_client_callback = self._fn(
            lib, "SSL_CTX_set_psk_client_callback", None, [vp, _CLIENT_CB])
        self.SSL_CTX_set_session_id_context = self._fn(
            lib, "SSL_CTX_set_session_id_context", ctypes.c_int, [vp, ctypes.c_char_p,
                                                                 ctypes.c_uint])

    @staticmethod
    def _fn(lib: ctypes.CDLL, name: str, restype: Any, argtypes: list[Any]) -> Any:
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise PskUnavailable(f"libssl has no {name}") from None
        fn.restype, fn.argtypes = restype, argtypes
        return fn


_lib: _LibSSL | None = None
_lib_lock = threading.Lock()


def libssl() -> _LibSSL:
    global _lib
    with _lib_lock:
        if _lib is None:
            _lib = _LibSSL()
        return _lib


def _readable(address: int, size: int) -> bool:
    """Whether ``size`` bytes at ``address`` can be read: the kernel copies them
    into a pipe or answers EFAULT, where a plain read could crash the process."""
    libc = ctypes.CDLL(None, use_errno=True)
    write = libc.write
    write.restype, write.argtypes = ctypes.c_ssize_t, [ctypes.c_int, ctypes.c_void_p,
                                                        ctypes.c_size_t]
    r, w = os.pipe()
    try:
        return bool(write(w, address, size) == size)
    finally:
        os.close(r)
        os.close(w)


def ssl_ctx_pointer(ctx: ssl.SSLContext) -> int:
    """The ``SSL_CTX *`` behind ``ctx``, proven (see the module's docstring)."""
    import _ssl
    if sys.implementation.name != "cpython":
        raise PskUnavailable(f"not CPython ({sys.implementation.name})")
    base = _ssl._SSLContext
    head = object.__basicsize__            # sizeof(PyObject_HEAD) in this build
    word = ctypes.sizeof(ctypes.c_void_p)
    if not isinstance(ctx, base) or base.__basicsize__ < head + word:
        raise PskUnavailable("unexpected _ssl._SSLContext layout")
    pointer = ctypes.c_void_p.from_address(id(ctx) + head).value
    if not pointer or pointer % word or not _readable(pointer, 64):
        raise PskUnavailable("the SSLContext's SSL_CTX pointer is not where CPython's "
                             "_ssl keeps it")
    lib = libssl()
    expected = {ssl.PROTOCOL_TLS_SERVER: lib.TLS_server_method(),
                ssl.PROTOCOL_TLS_CLIENT: lib.TLS_client_method()}.get(ctx.protocol)
    if expected is None or lib.SSL_CTX_get_ssl_method(pointer) != expected:
        raise PskUnavailable("the SSLContext's SSL_CTX is not one of this libssl's "
                             "TLS server/client contexts")
    before = ctx.options
    try:
        for flip in (before ^ ssl.OP_CIPHER_SERVER_PREFERENCE, before):
            ctx.options = flip
            if lib.SSL_CTX_get_options(pointer) != int(ctx.options):
                raise PskUnavailable("OpenSSL's options of that SSL_CTX do not follow "
                                     "the SSLContext's")
    finally:
        ctx.options = before
    return pointer


def _tls_name(raw: bytes | None) -> str:
    return (raw or b"").decode("utf-8", errors="replace")


def psk_was_used(ssock: ssl.SSLSocket) -> bool:
    """The finished handshake authenticated with the PSK: a TLS 1.3 external PSK
    is a "resumed" session in OpenSSL (livemig never resumes one), a TLS 1.2
    suite names PSK. Anything else is a certificate handshake: refused."""
    if ssock.version() == "TLSv1.3":
        return bool(ssock.session_reused)
    cipher = ssock.cipher()
    return cipher is not None and "PSK" in cipher[0]


class PskClient:
    """A client context's identity and key, handed to OpenSSL when it asks."""

    def __init__(self, ctx: ssl.SSLContext, identity: str, key: bytes) -> None:
        self.identity = identity.encode()
        self.key = key
        if len(self.identity) > PSK_MAX_IDENTITY:
            raise ValueError(f"PSK identity longer than {PSK_MAX_IDENTITY} bytes")
        pointer = ssl_ctx_pointer(ctx)
        # _ssl gives every context the session id context "Python"; OpenSSL makes
        # the client's PSK session with none, then refuses the mismatch
        # (ATTEMPT_TO_REUSE_SESSION_IN_DIFFERENT_CONTEXT). A client needs none.
        if libssl().SSL_CTX_set_session_id_context(pointer, b"", 0) != 1:
            raise PskUnavailable("SSL_CTX_set_session_id_context failed")
        self._cb = _CLIENT_CB(self._callback)
        libssl().SSL_CTX_set_psk_client_callback(pointer, self._cb)
        ctx._livemig_psk = self      # type: ignore[attr-defined]  # the callback's lifetime

    def _callback(self, ssl_: int, hint: bytes | None, identity: int, max_identity: int,
                  psk: int, max_psk: int) -> int:
        try:
            if len(self.identity) + 1 > max_identity or len(self.key) > max_psk:
                return 0
            ctypes.memmove(identity, self.identity + b"\0", len(self.identity) + 1)
            ctypes.memmove(psk, self.key, len(self.key))
            return len(self.key)
        except BaseException:        # a callback must not raise into OpenSSL
            return 0


class PskServer:
    """A server context: ``lookup`` (identity -> key, or None) at each handshake,
    and the identity each handshake used, for ``tls-authz``."""

    def __init__(self, ctx: ssl.SSLContext, lookup: Callable[[bytes], bytes | None]) -> None:
        self.lookup = lookup
        self._seen: dict[int, tuple[str, bool] | None] = {}
        self._lock = threading.Lock()
        pointer = ssl_ctx_pointer(ctx)
        self._ex_data = libssl().SSL_get_ex_data
        self._cb = _SERVER_CB(self._callback)
        libssl().SSL_CTX_set_psk_server_callback(pointer, self._cb)
        ctx._livemig_psk = self      # type: ignore[attr-defined]

    def _callback(self, ssl_: int, identity: bytes | None, psk: int, max_psk: int) -> int:
        try:
            owner = self._ex_data(ssl_, 0)     # _ssl's app data: its _SSLSocket
            with self._lock:
                if owner not in self._seen:
                    return 0                   # not a handshake livemig is watching
            key = self.lookup(identity or b"")
            ok = key is not None and 0 < len(key) <= max_psk
            with self._lock:
                self._seen[owner] = (_tls_name(identity), ok)
            if key is None or not ok:
                # GnuTLS's way for an unknown user: a random key, so the binder fails
                # as for a wrong key and a client cannot tell which names exist.
                key = os.urandom(min(32, max_psk))
            ctypes.memmove(psk, key, len(key))
            return len(key)
        except BaseException:
            return 0

    @contextlib.contextmanager
    def handshake(self, ssock: ssl.SSLSocket) -> Iterator[Callable[[], tuple[str, bool] | None]]:
        """Around one handshake: yields a function answering (identity, known) for
        what the callback saw on this socket, None if it was not called."""
        owner = id(ssock._sslobj)    # type: ignore[attr-defined]
        with self._lock:
            self._seen[owner] = None
        try:
            yield lambda: self._seen.get(owner)
        finally:
            with self._lock:
                self._seen.pop(owner, None)


def probe() -> str | None:
    """Why PSK cannot be used here, or None when it can (for tests and docs)."""
    try:
        ssl_ctx_pointer(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        ssl_ctx_pointer(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    except PskUnavailable as exc:
        return exc.desc
    except OSError as exc:
        return UNAVAILABLE % os.strerror(exc.errno or errno.EIO)
    return None
