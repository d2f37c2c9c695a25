"""Small JSON status pages for a service's own HTTP port (health, stats): a path -> page map
served by the standard library's threading HTTP server. The public API is FastAPI (ingest,
accounting); these are the internal pages of the coordinator and the reconciler."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler
from typing import Any

#: a page: the HTTP status and the JSON body
Page = Callable[[], tuple[int, Any]]


def handler_for(pages: Mapping[str, Page]) -> type[BaseHTTPRequestHandler]:
    """A request handler answering GET for `pages` (query strings and a trailing slash
    ignored) with their JSON, 404 for any other path; no access log."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            page = pages.get(self.path.split("?")[0].rstrip("/"))
            status, body = page() if page else (404, {"error": "not found"})
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
