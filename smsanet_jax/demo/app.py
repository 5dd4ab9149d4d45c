"""The demo's ASGI app (Starlette): the page's three static files and a small JSON/PNG API.

Static files are read once, at start, from the package (`importlib.resources`) by a fixed table of
names; no part of a request's path is ever joined onto a folder, so no request reads a file.

API (errors are JSON `{"error": message}` with a 4xx/5xx status; the server stays up):
  GET  /api/info                      limits and the model's name
  POST /api/photos                    body: the image file's bytes -> {"photo", "width", "height"}
  GET  /api/photos/{photo}/gray.png   the photo's lightness as a gray PNG (the input the page shows)
  POST /api/colorize                  {"photo", "hints": [points]} -> the colorization as a PNG
                                      for display (same pixels, encoded fast); its serial number
                                      in the X-Result header
  GET  /api/photos/{photo}/results/{serial}.png   that colorization as the very file `colorize`
                                      writes, while it is the photo's latest
  POST /api/ab                        {"colors": ["#rrggbb", ...]} -> {"ab": [[a, b], ...]}
  POST /api/hints                     {"photo", "hints": [points]} -> {"hints": checked points,
                                      "colors": swatches}, for a hints file the page loads
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from smsanet_jax.demo import engine as engine_lib

# The page: URL path -> (file in the package's static/ folder, media type). Nothing else is served.
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
# JSON requests carry hints and colours only.
MAX_JSON_BYTES = 1 * engine_lib.MEGABYTE
# Everything the page uses comes from this server; the browser refuses anything else.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; connect-src 'self' blob:; "
    "object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def create_app(engine: engine_lib.DemoEngine, *, allowed_hosts: Sequence[str] | None = None) -> Starlette:
    """The app serving `engine`.

    Args:
      engine: the model and photo store (compiled already).
      allowed_hosts: Host header values accepted (None: any). A loopback server accepts only its
        loopback names, so a web page elsewhere cannot reach it through DNS rebinding.
    """
    static = _read_static()

    def serve_static(request: Request) -> Response:
        content, media_type = static[request.url.path]
        return Response(content, media_type=media_type, headers=SECURITY_HEADERS)

    async def info(request: Request) -> Response:
        del request
        provenance = engine.provenance
        name = os.path.basename(str(provenance["source"]).rstrip("/"))
        step = provenance.get("step")
        return _json(
            {
                "model": f"{name} (step {step})" if step is not None else name,
                "max_upload_bytes": engine.limits.max_upload_bytes,
                "max_pixels": engine.limits.max_pixels,
            }
        )

    async def upload(request: Request) -> Response:
        encoded = await _read_body(request, engine.limits.max_upload_bytes, engine.too_large_message())
        photo_id, stored = await run_in_threadpool(engine.add_photo, encoded)
        width, height = stored.size
        return _json({"photo": photo_id, "width": width, "height": height})

    async def gray(request: Request) -> Response:
        return _png(engine.photo(request.path_params["photo"]).gray_png)

    async def colorize(request: Request) -> Response:
        body = await _read_json(request)
        points = engine_lib.parse_points(body.get("hints", []))
        result = await run_in_threadpool(engine.colorize, body.get("photo"), points)
        png = await run_in_threadpool(engine_lib.encode_png, result.image, preview=True)
        return _png(png, {"X-Result": str(result.serial)})

    async def download(request: Request) -> Response:
        photo, serial = request.path_params["photo"], request.path_params["serial"]
        return _png(await run_in_threadpool(engine.download_png, photo, serial))

    async def ab(request: Request) -> Response:
        colors = (await _read_json(request)).get("colors")
        if not isinstance(colors, list):
            raise engine_lib.RequestError(400, 'expected {"colors": ["#rrggbb", ...]}')
        return _json({"ab": await run_in_threadpool(engine_lib.srgb_to_ab, colors)})

    async def check_hints(request: Request) -> Response:
        body = await _read_json(request)
        points = engine_lib.parse_points(body.get("hints"))
        engine.hint_planes(engine.photo(body.get("photo")), points)  # Every point inside the photo.
        colors = await run_in_threadpool(engine_lib.ab_to_srgb, [(p.a, p.b) for p in points])
        return _json({"hints": engine_lib.points_json(points), "colors": colors})

    routes = [Route(path, serve_static) for path in STATIC_FILES]
    routes += [
        Route("/api/info", info),
        Route("/api/photos", upload, methods=["POST"]),
        Route("/api/photos/{photo}/gray.png", gray),
        Route("/api/colorize", colorize, methods=["POST"]),
        Route("/api/photos/{photo}/results/{serial:int}.png", download),
        Route("/api/ab", ab, methods=["POST"]),
        Route("/api/hints", check_hints, methods=["POST"]),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))] if allowed_hosts else []
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={engine_lib.RequestError: _refused, Exception: _failed},
    )


def _read_static() -> dict[str, tuple[bytes, str]]:
    folder = resources.files(__package__).joinpath("static")
    return {path: (folder.joinpath(name).read_bytes(), media) for path, (name, media) in STATIC_FILES.items()}


async def _read_body(request: Request, limit: int, too_large: str) -> bytes:
    """The request body, refused as soon as it is known to exceed `limit` bytes.

    Raises:
      RequestError: too large, or a bad Content-Length.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise engine_lib.RequestError(400, f"bad Content-Length {declared!r}")
        if int(declared) > limit:
            raise engine_lib.RequestError(413, too_large)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise engine_lib.RequestError(413, too_large)
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_json(request: Request) -> dict[str, Any]:
    """A JSON object body.

    Raises:
      RequestError: too large, not JSON, or not an object.
    """
    body = await _read_body(request, MAX_JSON_BYTES, f"request too large (over {MAX_JSON_BYTES} bytes)")
    try:
        content = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise engine_lib.RequestError(400, f"the request is not valid JSON ({e})") from None
    if not isinstance(content, dict):
        raise engine_lib.RequestError(400, "the request must be a JSON object")
    return content


def _json(content: Any, status: int = 200) -> Response:
    return JSONResponse(content, status_code=status, headers=SECURITY_HEADERS)


def _png(content: bytes, headers: dict[str, str] | None = None) -> Response:
    return Response(content, media_type="image/png", headers={**SECURITY_HEADERS, **(headers or {})})


async def _refused(request: Request, error: Exception) -> Response:
    del request
    return _json({"error": str(error)}, getattr(error, "status", 400))


async def _failed(request: Request, error: Exception) -> Response:
    """A bug (not the user's doing): the page shows one line; the server logs the traceback and goes on."""
    del request
    return _json({"error": f"internal error ({type(error).__name__}: {error}); see the server's log"}, 500)
