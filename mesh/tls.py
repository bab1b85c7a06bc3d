"""TLS for the HTTP API: the server's context from certificate files, and the
client context that verifies a peer against the mesh's CA.

With ``tls_cert`` set a peer serves HTTPS, and every internal call it makes to
another peer (heartbeats, promotion, removal) goes over https, checked
against ``ca``: a mesh runs TLS everywhere or nowhere.
"""

from __future__ import annotations

import ssl

from raftmesh.mesh.settings import Settings, SettingsError


def server_context(settings: Settings) -> ssl.SSLContext | None:
    if not settings.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(
            f"cannot load the TLS certificate {settings.tls_cert} with key {settings.tls_key}: {exc}"
        ) from exc
    return context


def client_context(ca: str | None) -> ssl.SSLContext:
    """Verifies the server's certificate and name: against ``ca`` when given,
    else against the system's trusted roots."""
    try:
        return ssl.create_default_context(cafile=ca or None)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(f"cannot load the CA certificate {ca}: {exc}") from exc
