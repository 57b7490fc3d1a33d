"""``authz-simple``, ``authz-list`` and ``authz-listfile`` (QEMU's ``authz/*.c``).

An authz object answers one question, :meth:`QAuthZ.is_allowed` for an
identity (for migration: the client certificate's distinguished name, see
``livemig.crypto.tls.peer_name``). Rules match ``exact`` or ``glob``
(GLib's ``g_pattern_match_simple``: only ``*`` and ``?``), first match
wins, else the list's policy (default ``deny``). ``authz-listfile`` reads
the same JSON object (``{"policy": ..., "rules": [...]}``) from a file and,
with ``refresh`` (QEMU's default), reloads it when it changes: here by its
``stat`` at each question rather than inotify; a file that no longer loads
denies everyone until it loads again, as in QEMU.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Mapping
from typing import Any, Final

from livemig.qapi.errors import QapiError
from livemig.qapi.schema import Array, Enum, struct
from livemig.qapi.visitor import visit_members
from livemig.qom.object import UserCreatable, register_object_type

POLICY: Final = Enum("QAuthZListPolicy", ("deny", "allow"))
FORMAT: Final = Enum("QAuthZListFormat", ("exact", "glob"))
RULE: Final = struct("QAuthZListRule", {"match": "str", "policy": POLICY, "*format": FORMAT})
LIST_PROPERTIES: Final = struct("AuthZListProperties", {"*policy": POLICY,
                                                        "*rules": Array(RULE)})

# authz/listfile.c
FILENAME_NOT_PROVIDED: Final = "filename not provided"
UNABLE_TO_READ: Final = "Unable to read '%s': %s"
MUST_BE_OBJECT: Final = "File '%s' must contain a JSON object"
MUST_BE_ABSOLUTE: Final = "Filename must be an absolute path"


class QAuthZ(UserCreatable):
    """QEMU's ``QAuthZ`` base: anything an endpoint can ask about an identity."""

    def is_allowed(self, identity: str) -> bool:
        raise NotImplementedError


@register_object_type
class AuthZSimple(QAuthZ):
    """One identity, exact match."""

    qom_type = "authz-simple"
    properties = struct("AuthZSimpleProperties", {"identity": "str"})

    def is_allowed(self, identity: str) -> bool:
        return identity == self.props["identity"]


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """``g_pattern_match_simple``: ``*`` any run, ``?`` one character, nothing else."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c)
                              for c in pattern), re.DOTALL)


class RuleList:
    """An authz-list's policy and rules, compiled once."""

    def __init__(self, props: Mapping[str, Any]) -> None:
        self.policy = props.get("policy", "deny")
        self.rules: list[tuple[str, str, re.Pattern[str] | None]] = [
            (rule["match"], rule["policy"],
             _glob_regex(rule["match"]) if rule.get("format", "exact") == "glob" else None)
            for rule in props.get("rules", [])]

    def is_allowed(self, identity: str) -> bool:
        for match, policy, regex in self.rules:
            if (regex.fullmatch(identity) is not None) if regex else match == identity:
                return bool(policy == "allow")
        return bool(self.policy == "allow")


@register_object_type
class AuthZList(QAuthZ):
    """Rules given inline (``object-add``'s ``rules`` array)."""

    qom_type = "authz-list"
    properties = LIST_PROPERTIES

    def complete(self) -> None:
        self.list = RuleList(self.props)

    def is_allowed(self, identity: str) -> bool:
        return self.list.is_allowed(identity)


def load_list_file(filename: str) -> RuleList:
    """The rules of an authz-listfile's file, with QEMU's texts."""
    try:
        with open(filename, encoding="utf-8") as f:
            content = f.read()
    except OSError as exc:
        raise QapiError(UNABLE_TO_READ % (
            filename, f"Failed to open file \u201c{filename}\u201d: {exc.strerror}")) from None
    except UnicodeDecodeError:
        raise QapiError(UNABLE_TO_READ % (filename, "not UTF-8")) from None
    try:
        value = json.loads(content)
    except json.JSONDecodeError as exc:
        raise QapiError(f"JSON parse error, {exc.msg}") from None
    if not isinstance(value, dict):
        raise QapiError(MUST_BE_OBJECT % filename)
    return RuleList(visit_members(LIST_PROPERTIES, value))


@register_object_type
class AuthZListFile(QAuthZ):
    """Rules in a JSON file, reloaded when it changes (``refresh``, default on)."""

    qom_type = "authz-listfile"
    properties = struct("AuthZListFileProperties", {"filename": "str", "*refresh": "bool"})

    def complete(self) -> None:
        filename = self.props["filename"]
        if not filename:
            raise QapiError(FILENAME_NOT_PROVIDED)
        self.refresh = self.props.get("refresh", True)
        if self.refresh and not os.path.isabs(filename):
            raise QapiError(MUST_BE_ABSOLUTE)
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self.list: RuleList | None = load_list_file(filename)

    def _stat(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.props["filename"])
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def is_allowed(self, identity: str) -> bool:
        with self._lock:
            if self.refresh:
                stamp = self._stat()
                if stamp != self._stamp:
                    self._stamp = stamp
                    try:
                        self.list = load_list_file(self.props["filename"])
                    except QapiError:
                        self.list = None     # QEMU: all fail until the file loads again
            rules = self.list
        return rules is not None and rules.is_allowed(identity)


def find_authz(objects: Any, ident: str) -> QAuthZ | None:
    """The authz object ``ident`` names, or None (absent, or not an authz object)."""
    obj = objects.get(ident)
    return obj if isinstance(obj, QAuthZ) else None

