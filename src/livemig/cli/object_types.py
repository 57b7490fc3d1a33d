"""Every user-creatable object type livemig has: importing this registers them all.

Each type registers itself (``@register_object_type``) where it is defined;
this module only makes sure those modules are loaded before ``-object`` or
``object-add`` builds the ``ObjectOptions`` union.
"""

from livemig.authz import authz as _authz
from livemig.crypto import tlscreds as _tlscreds
from livemig.machine import hostmem as _hostmem
from livemig.qom import secret as _secret

TYPE_MODULES = (_authz, _tlscreds, _hostmem, _secret)
