"""Client certificates as a login (mutual TLS, `tls_client_cert_users`), the way a Kubernetes
apiserver maps them: the subject's common name is the user.

Only a certificate the TLS layer verified against `tls_client_ca` counts: Python reports an
unverified peer certificate as an empty dict, and the server requires verification whenever a
client CA is configured (controller/cli.py). Off by default, so that a deployment using mTLS as a
second factor next to passwords keeps both.
"""

from __future__ import annotations

import ssl

from aiohttp import web

from api.server.keys import SETTINGS


def client_certificate_user(request: web.Request) -> str | None:
    """The verified client certificate's subject CN, when the server accepts those as logins."""
    settings = request.app.get(SETTINGS)
    transport = request.transport
    if settings is None or not settings.tls_client_cert_users or transport is None:
        return None
    ssl_object = transport.get_extra_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject):
        return None
    certificate = ssl_object.getpeercert()
    if not certificate:
        return None
    subject = certificate.get("subject", ())
    for relative_name in subject if isinstance(subject, tuple) else ():
        for attribute in relative_name:
            if len(attribute) == 2 and attribute[0] == "commonName" and attribute[1]:
                return str(attribute[1])
    return None
