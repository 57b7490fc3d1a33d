"""GnuTLS ``priority`` strings: what livemig maps to OpenSSL, what it refuses."""

from __future__ import annotations

import ssl

import pytest

from livemig.crypto.priority import PriorityError, parse_priority

pytestmark = pytest.mark.timeout(30)

V12, V13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3


@pytest.mark.parametrize("text,minimum,maximum,precedence", [
    ("NORMAL", V12, V13, False),
    ("@SYSTEM", V12, V13, False),
    ("PERFORMANCE:%SERVER_PRECEDENCE", V12, V13, True),
    ("NORMAL:-VERS-ALL:+VERS-TLS1.3", V13, V13, False),
    ("NORMAL:-VERS-TLS1.3", V12, V12, False),
    ("NORMAL:!VERS-TLS1.2", V13, V13, False),
    ("NORMAL:-VERS-TLS1.0:-VERS-TLS1.1:-VERS-SSL3.0:-VERS-DTLS-ALL", V12, V13, False),
    ("NORMAL:-VERS-ALL:+VERS-TLS1.2:+VERS-TLS1.3", V12, V13, False),
])
def test_what_maps(text, minimum, maximum, precedence):
    p = parse_priority(text)
    assert (p.minimum, p.maximum, p.server_precedence) == (minimum, maximum, precedence)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    p.apply(ctx)
    assert (ctx.minimum_version, ctx.maximum_version) == (minimum, maximum)


@pytest.mark.parametrize("text,token", [
    ("SECURE256", "SECURE256"),
    ("NORMAL:-AES-128-GCM", "-AES-128-GCM"),
    ("NORMAL:%COMPAT", "%COMPAT"),
    ("NORMAL:+VERS-TLS1.1", "+VERS-TLS1.1"),
    ("NONE:+VERS-TLS1.3:+AES-256-GCM", "NONE"),
    ("NORMAL:", ""),
])
def test_what_is_refused_by_name(text, token):
    with pytest.raises(PriorityError) as exc:
        parse_priority(text)
    assert str(exc.value).startswith(f"Property 'priority' value '{text}': '{token}' has no "
                                     "OpenSSL equivalent in livemig")


def test_no_version_left():
    with pytest.raises(PriorityError, match="leaves no TLS version"):
        parse_priority("NORMAL:-VERS-ALL")
