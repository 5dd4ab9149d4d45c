"""The `demo` command: an interactive colorizer in the browser (a small Starlette app served by uvicorn).

`DemoEngine` holds the compiled model and the uploaded photos, `app.create_app` serves the page
(plain HTML/JS/CSS from this package's static/ folder) and its API, `listen` binds the address and
`serve` runs the server. Needs the `demo` extra (starlette, uvicorn).
"""

from smsanet_jax.demo.engine import DemoEngine, Limits, RequestError
from smsanet_jax.demo.server import Listener, listen, serve

__all__ = ["DemoEngine", "Limits", "Listener", "RequestError", "listen", "serve"]
