"""The chat playground that ``aetheris serve`` shows at ``/``: one page (``static/playground.html``, ``.js``,
``.css``, shipped in the package; no build step, nothing fetched from elsewhere) that talks to the
server's own ``/v1`` API -- pick a language, chat with streaming, offer a tool and see its call, see
tokens/s. The only server-side work is filling the language list from ``aetheris.languages``.

The page is served with a Content-Security-Policy that allows scripts, styles and requests to this
origin only, so even a rendering bug could not run markup that a model generated; the page itself
writes model output through ``textContent`` only.
"""

from __future__ import annotations

from functools import lru_cache
from html import escape
from importlib.resources import files

from fastapi import HTTPException
from fastapi.responses import HTMLResponse, Response

from aetheris.languages import LANGUAGES

STATIC_TYPES = {"playground.js": "text/javascript", "playground.css": "text/css"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _read(name: str) -> str:
    return (files("aetheris") / "static" / name).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def page() -> str:
    """The playground HTML with one ``<option>`` per Tiny Aya language (value = English name)."""
    options = "\n".join(f'        <option value="{escape(lang.name)}">{escape(lang.name)} ({escape(lang.iso1)})</option>'
                        for lang in sorted(LANGUAGES, key=lambda lang: lang.name))
    return _read("playground.html").replace("<!--LANGUAGE_OPTIONS-->", options)


def add_routes(app) -> None:
    """``GET /`` (the page) and ``GET /static/{name}`` (its script and style sheet) on a FastAPI app.
    Neither needs the API key: the page holds no secrets and asks for the key itself."""

    @app.get("/", include_in_schema=False)
    async def playground():
        return HTMLResponse(page(), headers=SECURITY_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in STATIC_TYPES:  # a fixed list: no paths from the request reach the file system
            raise HTTPException(404, f"no static file '{name[:100]}'")
        return Response(_read(name), media_type=STATIC_TYPES[name], headers=SECURITY_HEADERS)
