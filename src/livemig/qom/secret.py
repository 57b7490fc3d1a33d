"""QEMU's ``secret`` object (``crypto/secret.c``): a value given inline or in a file.

libvirt gives every domain one (``masterKey0``, its key for the other secrets
it may pass); livemig checks and loads it as QEMU does. ``keyid``/``iv``
(data encrypted with another secret, AES-256-CBC) are refused by name.
"""

from __future__ import annotations

import base64
import binascii

from livemig.qapi.errors import QapiError
from livemig.qapi.schema import Enum, struct
from livemig.qom.object import UserCreatable, register_object_type

SECRET_FORMAT = Enum("QCryptoSecretFormat", ("raw", "base64"))


@register_object_type
class Secret(UserCreatable):
    qom_type = "secret"
    properties = struct("SecretProperties", {
        "*format": SECRET_FORMAT, "*data": "str", "*file": "str", "*keyid": "str",
        "*iv": "str"})

    value: bytes = b""

    def complete(self) -> None:
        """QEMU's qcrypto_secret_load_data, then its decoding; QEMU's texts."""
        props = self.props
        if "data" in props:
            data = props["data"].encode()
        elif "file" in props:
            path = props["file"]
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as exc:
                raise QapiError(f"Unable to read {path}: Failed to open file “{path}”: "
                                f"{exc.strerror}") from None
        else:
            raise QapiError("Either 'file' or 'data' must be provided")
        if "keyid" in props:
            raise QapiError(f"secret '{self.id}': keyid (AES-256-CBC encrypted data) is not "
                            "supported by livemig")
        if props.get("format", "raw") == "base64":
            try:
                data = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise QapiError("Base64 data contains invalid characters") from None
        self.value = data
