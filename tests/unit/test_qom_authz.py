"""The QOM object layer and the authz objects, without a VM: ObjectRoot's
life cycle and texts, keyval visiting, authz rule matching and list files."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

import livemig.cli.object_types  # noqa: F401  (registers the object types)
from livemig.authz.authz import AuthZList, AuthZListFile, AuthZSimple, RuleList
from livemig.cli.run_options import OptionError, parse_object_option, parse_run_args
from livemig.qapi.errors import QapiError
from livemig.qom.object import (
    ObjectRoot,
    UserCreatable,
    id_wellformed,
    register_object_type,
    visit_object_options,
)


def make(root: ObjectRoot, **options):
    return root.add(visit_object_options(options))


def test_add_get_delete_and_texts():
    root = ObjectRoot()
    obj = make(root, **{"qom-type": "authz-simple", "id": "a", "identity": "CN=x"})
    assert isinstance(obj, AuthZSimple) and root.get("a") is obj and "a" in root
    with pytest.raises(QapiError, match=r"^attempt to add duplicate property 'a' to object "
                                        r"\(type 'container'\)$"):
        make(root, **{"qom-type": "authz-list", "id": "a"})
    assert root.get("a") is obj
    root.delete("a")
    assert root.get("a") is None
    with pytest.raises(QapiError, match="^object 'a' not found$"):
        root.delete("a")


def test_object_in_use_cannot_be_deleted():
    @register_object_type
    class Pinned(UserCreatable):
        qom_type = "x-test-pinned"

        def can_be_deleted(self) -> bool:
            return False
    root = ObjectRoot()
    make(root, **{"qom-type": "x-test-pinned", "id": "p"})
    with pytest.raises(QapiError, match="^object 'p' is in use, can not be deleted$"):
        root.delete("p")
    assert root.get("p") is not None
    from livemig.qom.object import OBJECT_TYPES
    del OBJECT_TYPES["x-test-pinned"]


@given(st.text(max_size=12))
def test_id_wellformed_is_qemus_rule(ident):
    expected = (bool(ident) and ident[0].isascii() and ident[0].isalpha()
                and all(c.isascii() and (c.isalnum() or c in "-._") for c in ident))
    assert id_wellformed(ident) == expected


def test_keyval_converts_by_schema():
    opts = parse_object_option("authz-listfile,id=f,filename=/x,,y,refresh=off")
    assert opts == {"qom-type": "authz-listfile", "id": "f", "filename": "/x,y",
                    "refresh": False}
    with pytest.raises(QapiError, match="^Parameter 'refresh' expects 'on' or 'off'$"):
        parse_object_option("authz-listfile,id=f,filename=/x,refresh=2")
    with pytest.raises(QapiError, match="^Invalid parameter 'x'$"):
        parse_object_option("authz-simple,id=f,identity=i,x=1")


def test_run_options_collect_objects_in_order():
    o = parse_run_args(["-object", "authz-simple,id=a,identity=x",
                        "-object", '{"qom-type":"authz-simple","id":"b","identity":"y"}'])
    assert [x["id"] for x in o.objects] == ["a", "b"]
    with pytest.raises(OptionError, match="Duplicate ID 'a' for object"):
        parse_run_args(["-object", "authz-simple,id=a,identity=x",
                        "-object", "authz-simple,id=a,identity=y"])


def test_rule_list_first_match_wins_then_policy():
    rules = RuleList({"policy": "allow", "rules": [
        {"match": "CN=bad*", "policy": "deny", "format": "glob"},
        {"match": "CN=good,O=x", "policy": "allow"},
        {"match": "CN=?", "policy": "deny", "format": "glob"}]})
    assert not rules.is_allowed("CN=bad.example")
    assert rules.is_allowed("CN=good,O=x")
    assert not rules.is_allowed("CN=z")
    assert rules.is_allowed("CN=zz")       # ? is exactly one character
    assert not RuleList({}).is_allowed("anyone")   # default policy deny
    # glob has no character classes: '[' is literal.
    assert RuleList({"rules": [{"match": "[a]*", "policy": "allow",
                                "format": "glob"}]}).is_allowed("[a]bc")


def test_authz_list_inline():
    root = ObjectRoot()
    obj = make(root, **{"qom-type": "authz-list", "id": "l",
                        "rules": [{"match": "CN=a", "policy": "allow"}]})
    assert isinstance(obj, AuthZList)
    assert obj.is_allowed("CN=a") and not obj.is_allowed("CN=b")


def test_authz_listfile_reloads_and_denies_while_broken(tmp_path):
    path = tmp_path / "acl.json"
    path.write_text(json.dumps({"policy": "deny",
                                "rules": [{"match": "CN=a", "policy": "allow"}]}))
    root = ObjectRoot()
    obj = make(root, **{"qom-type": "authz-listfile", "id": "f", "filename": str(path)})
    assert isinstance(obj, AuthZListFile)
    assert obj.is_allowed("CN=a") and not obj.is_allowed("CN=b")
    path.write_text(json.dumps({"rules": [{"match": "CN=b", "policy": "allow"}]}))
    os.utime(path, ns=(1, 1))          # a different stamp whatever the clock's resolution
    assert obj.is_allowed("CN=b") and not obj.is_allowed("CN=a")
    path.write_text("[1]")
    os.utime(path, ns=(2, 2))
    assert not obj.is_allowed("CN=b")  # QEMU: all fail until the file loads again
    path.write_text(json.dumps({"policy": "allow"}))
    os.utime(path, ns=(3, 3))
    assert obj.is_allowed("anyone")


def test_authz_listfile_texts(tmp_path):
    root = ObjectRoot()
    lf = {"qom-type": "authz-listfile", "id": "f"}
    with pytest.raises(QapiError, match="^filename not provided$"):
        make(root, **lf, filename="")
    with pytest.raises(QapiError, match="^Filename must be an absolute path$"):
        make(root, **lf, filename="rel.json")
    missing = tmp_path / "none.json"
    with pytest.raises(QapiError) as exc:
        make(root, **lf, filename=str(missing))
    assert exc.value.desc == (f"Unable to read '{missing}': Failed to open file "
                              f"\u201c{missing}\u201d: No such file or directory")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(QapiError, match="must contain a JSON object$"):
        make(root, **lf, filename=str(tmp_path / "list.json"))
    (tmp_path / "bad.json").write_text('{"policy": "maybe"}')
    with pytest.raises(QapiError, match="^Parameter 'policy' does not accept value 'maybe'$"):
        make(root, **lf, filename=str(tmp_path / "bad.json"))
    assert root.get("f") is None
