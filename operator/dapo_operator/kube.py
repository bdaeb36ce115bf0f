"""A small async Kubernetes REST client over aiohttp, authenticated like kopf itself.

It takes the same `kopf.ConnectionInfo` the operator's login handler returns, so the operator
has one source of credentials (service account in the cluster, kubeconfig outside).
"""

from __future__ import annotations

import base64
import ssl
import tempfile
from typing import Any

import aiohttp
import kopf

from dapo.errors import DapoError
from dapo.spec import API_GROUP, API_VERSION, PLURAL

CORE_PATHS = {"Pod": "pods", "ConfigMap": "configmaps", "Service": "services"}


class KubeError(DapoError, RuntimeError):
    """An API call the operator could not complete; the message has the verb, path and answer."""


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if info.insecure:
        return False
    context = ssl.create_default_context(cafile=info.ca_path) if info.ca_path else ssl.create_default_context()
    if info.ca_data:
        data = info.ca_data
        if isinstance(data, bytes):
            data = data.decode()
        if "BEGIN CERTIFICATE" not in data:
            data = base64.b64decode(data).decode()
        context.load_verify_locations(cadata=data)
    cert, key = info.certificate_path, info.private_key_path
    if info.certificate_data and info.private_key_data:
        cert, key = _temp_file(info.certificate_data), _temp_file(info.private_key_data)
    if cert:
        context.load_cert_chain(cert, key)
    return context


def _temp_file(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    handle = tempfile.NamedTemporaryFile(prefix="dapo-kube-", delete=False)
    handle.write(raw)
    handle.close()
    return handle.name


def pod_path(namespace: str, name: str | None = None) -> str:
    return core_path("Pod", namespace, name)


def core_path(kind: str, namespace: str, name: str | None = None) -> str:
    base = f"/api/v1/namespaces/{namespace}/{CORE_PATHS[kind]}"
    return f"{base}/{name}" if name else base


def run_path(namespace: str, name: str, status: bool = False) -> str:
    path = f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/{PLURAL}/{name}"
    return path + "/status" if status else path


class KubeClient:
    """get / list / create / delete / merge-patch; 404 and 409 are answers, not errors."""

    def __init__(self, info: kopf.ConnectionInfo, timeout: float = 30.0):
        self.info = info
        headers = {"Accept": "application/json"}
        if info.token:
            headers["Authorization"] = f"Bearer {info.token}"
        auth = aiohttp.BasicAuth(info.username, info.password or "") if info.username else None
        self._session = aiohttp.ClientSession(
            base_url=None, headers=headers, auth=auth, timeout=aiohttp.ClientTimeout(total=timeout),
            connector=aiohttp.TCPConnector(ssl=_ssl_context(info)),
        )
        self._server = info.server.rstrip("/")

    async def close(self) -> None:
        await self._session.close()

    async def _call(self, method: str, path: str, *, json: Any = None, params: dict[str, str] | None = None,
                    content_type: str = "application/json", ok_missing: bool = False) -> dict[str, Any] | None:
        headers = {"Content-Type": content_type} if json is not None else {}
        async with self._session.request(method, self._server + path, json=json, params=params, headers=headers) as resp:
            if resp.status == 404 and ok_missing:
                return None
            if resp.status == 409 and method == "POST":
                return None  # already exists: creation is idempotent for us
            if resp.status >= 400:
                raise KubeError(f"{method} {path}: HTTP {resp.status}: {(await resp.text())[:500]}")
            return await resp.json(content_type=None)

    async def get(self, path: str) -> dict[str, Any] | None:
        return await self._call("GET", path, ok_missing=True)

    async def list(self, path: str, label_selector: str | None = None) -> list[dict[str, Any]]:
        params = {"labelSelector": label_selector} if label_selector else None
        answer = await self._call("GET", path, params=params)
        return list((answer or {}).get("items") or [])

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        return await self._call("POST", path, json=body)

    async def delete(self, path: str) -> None:
        await self._call("DELETE", path, ok_missing=True)

    async def merge_patch(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        return await self._call("PATCH", path, json=body, content_type="application/merge-patch+json", ok_missing=True)
