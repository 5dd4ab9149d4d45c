"""demo: the API gives the PNGs `colorize` writes, refuses bad input with one clear 4xx line, and serves no file."""

import asyncio
import builtins
import io
import json
import os
import socket
import struct
import threading
import urllib.parse
import zlib

import numpy as np
import pytest
import skimage.data
from PIL import Image
from skimage import color
from starlette.testclient import TestClient

import smsanet_jax.demo as demo_package
from smsanet_jax import cli, colorize, inference
from smsanet_jax.demo import DemoEngine, Limits, app, engine, listen, server
from tests import tiny_checkpoint


@pytest.fixture(scope="module")
def colorizer(tmp_path_factory):
    workdir, _ = tiny_checkpoint.trained_workdir(tmp_path_factory)
    return inference.load_colorizer(workdir=workdir)


@pytest.fixture(scope="module")
def demo(colorizer):
    return DemoEngine(colorizer)


@pytest.fixture(scope="module")
def client(demo):
    return TestClient(app.create_app(demo))


def jpeg(rgb, quality=90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo_bytes():
    """A 300x171 colour JPEG (any aspect ratio is fine)."""
    return jpeg(np.asarray(Image.fromarray(skimage.data.astronaut()).resize((300, 171), Image.Resampling.BICUBIC)))


def upload(client, content) -> dict:
    response = client.post("/api/photos", content=content)
    assert response.status_code == 200, response.text
    return response.json()


def huge_png(side: int) -> bytes:
    """A valid side x side 1-bit PNG, all black: a few KB that decode to side^2 pixels (a bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (side + 7) // 8)  # Filter byte, then the packed bits.
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


# --- The page and the model ------------------------------------------------------------------


def test_the_page_is_served_from_package_data_with_a_strict_policy(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "style.css"):
        assert name in page.text
        assert client.get(f"/{name}").status_code == 200
    # Nothing on the page comes from elsewhere.
    for name in ("/", "/app.js", "/style.css"):
        assert "http://" not in client.get(name).text and "https://" not in client.get(name).text
    info = client.get("/api/info").json()
    assert info["max_upload_bytes"] == 50_000_000 and info["max_pixels"] == 50_000_000
    assert "step 4" in info["model"]


@pytest.mark.parametrize("with_hints", [False, True])
def test_colorize_gives_the_png_the_colorize_command_writes(client, colorizer, photo_bytes, tmp_path, with_hints):
    photo = upload(client, photo_bytes)
    assert (photo["width"], photo["height"]) == (300, 171)
    points = []
    if with_hints:
        ab = client.post("/api/ab", json={"colors": ["#e07020", "#2050ff"]}).json()["ab"]
        points = [{"x": 60, "y": 40, "a": ab[0][0], "b": ab[0][1], "radius": 1}]
        points += [{"x": 250, "y": 120, "a": ab[1][0], "b": ab[1][1], "radius": 3}]
    shown = client.post("/api/colorize", json={"photo": photo["photo"], "hints": points})
    assert shown.status_code == 200 and shown.headers["content-type"] == "image/png"
    download = client.get(f"/api/photos/{photo['photo']}/results/{shown.headers['x-result']}.png")
    assert download.status_code == 200

    (tmp_path / "photo.jpg").write_bytes(photo_bytes)
    (tmp_path / "hints.json").write_text(json.dumps(points))
    network = inference.PhotoColorizer(colorizer, batch_size=8, num_devices=1)
    report = colorize.colorize(
        network, [str(tmp_path / "photo.jpg")], str(tmp_path / "out"), hints_file=str(tmp_path / "hints.json")
    )
    assert not report.failed
    expected = (tmp_path / "out" / "photo.png").read_bytes()
    for response in (shown, download):
        pixels, written = (np.asarray(Image.open(io.BytesIO(b)), np.int16) for b in (response.content, expected))
        assert pixels.shape == (171, 300, 3)
        assert np.abs(pixels - written).max() <= 1
    # In fact the same pixels, and the download byte for byte: the same network call and encoder.
    assert np.array_equal(Image.open(io.BytesIO(shown.content)), Image.open(io.BytesIO(expected)))
    assert download.content == expected


def test_only_the_latest_colorization_can_be_downloaded(client, photo_bytes):
    photo = upload(client, photo_bytes)["photo"]
    first = client.post("/api/colorize", json={"photo": photo, "hints": []}).headers["x-result"]
    second = client.post("/api/colorize", json={"photo": photo, "hints": [{"x": 1, "y": 1, "a": 9, "b": 9}]})
    assert int(second.headers["x-result"]) > int(first)
    stale = client.get(f"/api/photos/{photo}/results/{first}.png")
    assert stale.status_code == 404 and "no longer the latest" in stale.json()["error"]
    assert client.get(f"/api/photos/{photo}/results/{second.headers['x-result']}.png").status_code == 200
    assert client.get(f"/api/photos/{photo}/results/latest.png").status_code == 404
    assert client.get(f"/api/photos/unknown/results/{second.headers['x-result']}.png").status_code == 404


def test_hints_change_the_colours_near_them(client, photo_bytes):
    photo = upload(client, photo_bytes)["photo"]
    plain = client.post("/api/colorize", json={"photo": photo, "hints": []}).content
    hinted = client.post(
        "/api/colorize", json={"photo": photo, "hints": [{"x": 60, "y": 40, "a": 70, "b": -60}]}
    ).content
    ab = [color.rgb2lab(np.asarray(Image.open(io.BytesIO(b))))[..., 1:] for b in (plain, hinted)]
    change = np.linalg.norm(ab[1] - ab[0], axis=-1)
    assert change[38:43, 58:63].mean() > 5 * max(change[:, 200:].mean(), 0.1)


def test_the_gray_input_is_what_the_gray_baseline_writes(client, photo_bytes, tmp_path):
    photo = upload(client, photo_bytes)["photo"]
    gray = client.get(f"/api/photos/{photo}/gray.png")
    assert gray.status_code == 200
    (tmp_path / "photo.jpg").write_bytes(photo_bytes)
    network = inference.PhotoColorizer(inference.load_colorizer(baseline="gray"), num_devices=1)
    colorize.colorize(network, [str(tmp_path / "photo.jpg")], str(tmp_path / "out"))
    assert np.array_equal(Image.open(io.BytesIO(gray.content)), Image.open(tmp_path / "out" / "photo.png"))


def test_grayscale_and_odd_sized_photos_are_colorized_at_their_size(client):
    gray = Image.fromarray(skimage.data.camera()).resize((97, 203))
    buffer = io.BytesIO()
    gray.save(buffer, format="PNG")
    photo = upload(client, buffer.getvalue())
    result = client.post("/api/colorize", json={"photo": photo["photo"], "hints": []})
    assert Image.open(io.BytesIO(result.content)).size == (97, 203)


def test_picker_colours_become_lab_ab_as_skimage_computes_it(client):
    colors = ["#e07020", "#2050ff", "#000000", "#ffffff", "#7f7f7f"]
    ab = np.array(client.post("/api/ab", json={"colors": colors}).json()["ab"])
    rgb = np.array([[int(c[i : i + 2], 16) for i in (1, 3, 5)] for c in colors], np.float64) / 255
    np.testing.assert_allclose(ab, color.rgb2lab(rgb)[:, 1:], atol=0.006)


def test_a_loaded_hints_file_is_checked_and_gets_swatches(client, photo_bytes):
    photo = upload(client, photo_bytes)["photo"]
    response = client.post("/api/hints", json={"photo": photo, "hints": [{"x": 5, "y": 6, "a": 40, "b": 50}]})
    assert response.status_code == 200
    assert response.json()["hints"] == [{"x": 5, "y": 6, "a": 40, "b": 50, "radius": 1}]
    (swatch,) = response.json()["colors"]
    lab = color.rgb2lab(np.array([[int(swatch[i : i + 2], 16) / 255 for i in (1, 3, 5)]]))[0]
    assert abs(lab[0] - engine.SWATCH_LIGHTNESS) < 1 and np.hypot(*(lab[1:] - [40, 50])) < 2


# --- Bad input ---------------------------------------------------------------------------------


def bad_uploads(photo_bytes):
    yield "empty", b"", 400, "empty file"
    yield "text", b"hello, this is not an image\n" * 10, 400, "not an image"
    yield "truncated JPEG", photo_bytes[: len(photo_bytes) // 2], 400, "not an image"
    yield "8000x8000 PNG", huge_png(8000), 413, "8000x8000 is 64.0 megapixels; the limit is 50 megapixels"
    # Pillow itself refuses to open this one (a decompression bomb): the size is not known exactly.
    yield "20000x20000 PNG", huge_png(20000), 413, "over 179 megapixels; the limit is 50 megapixels"
    yield "60 MB file", b"\xff" * 60_000_000, 413, "the limit is 50 MB (start the demo with a larger --max-upload-mb)"
    # Without a Content-Length: the body is counted as it arrives.
    yield "60 MB stream", (b"\xff" * 1_000_000 for _ in range(60)), 413, "the limit is 50 MB"


def test_bad_uploads_are_refused_clearly_and_the_server_goes_on(client, photo_bytes):
    assert len(huge_png(20000)) < 100_000
    for what, content, status, message in bad_uploads(photo_bytes):
        response = client.post("/api/photos", content=content)
        assert response.status_code == status, (what, response.text)
        assert message in response.json()["error"], (what, response.json())
        photo = upload(client, photo_bytes)  # The next good request works.
        assert client.post("/api/colorize", json={"photo": photo["photo"]}).status_code == 200


@pytest.mark.parametrize(
    "points, message",
    [
        ({"photo.jpg": []}, "expected a list of"),
        ([{"x": 1, "y": 2, "a": 3}], "hints[0]: a point needs x, y, a and b"),
        ([{"x": 1, "y": 2, "a": "red", "b": 3}], "must be finite numbers"),
        ([{"x": 1, "y": 2, "a": float("nan"), "b": 3}], "must be finite numbers"),
        ([{"x": 1, "y": 2, "a": 3, "b": 4, "radius": -1}], "radius must be an integer"),
        ([{"x": 1, "y": 2, "a": 3, "b": 4, "radius": 1.5}], "radius must be an integer"),
        ([{"x": 1, "y": 2, "a": 3, "b": 4, "colour": "red"}], "unknown field"),
        ([{"x": 300, "y": 2, "a": 3, "b": 4}], "outside the 300x171 image"),
        ([{"x": -1, "y": 2, "a": 3, "b": 4}], "outside the 300x171 image"),
        (None, "expected a list of"),
    ],
)
def test_malformed_hints_are_refused_with_a_clear_4xx(client, photo_bytes, points, message):
    photo = upload(client, photo_bytes)["photo"]
    body = json.dumps({"photo": photo, "hints": points})  # Python writes NaN as JSON's NaN extension.
    for path in ("/api/colorize", "/api/hints"):
        if path == "/api/colorize" and points is None:
            continue  # colorize without hints is the automatic colorization.
        response = client.post(path, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, (path, response.text)
        assert message in response.json()["error"], (path, response.json())


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"\xff\xfe", 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (b'{"photo": "no-such-photo", "hints": []}', 404, "upload it again"),
        (b'{"photo": ["a list"], "hints": []}', 404, "upload it again"),
        (b'{"hints": []}', 404, "upload it again"),
    ],
)
def test_malformed_requests_are_refused_with_a_clear_4xx(client, body, status, message):
    for path in ("/api/colorize", "/api/hints"):
        response = client.post(path, content=body, headers={"content-type": "application/json"})
        assert response.status_code == status, (path, response.text)
        assert message in response.json()["error"], (path, response.json())


@pytest.mark.parametrize("colors", [["red"], ["#12345g"], [7], "#ffffff", None])
def test_bad_colours_are_refused(client, colors):
    response = client.post("/api/ab", json={"colors": colors})
    assert response.status_code == 400 and "#" in response.json()["error"]


def test_a_huge_json_request_is_refused(client):
    response = client.post("/api/colorize", content=b"[" + b"0," * 1_000_000 + b"0]")
    assert response.status_code == 413


def test_the_oldest_photos_are_dropped_and_named_as_such(colorizer, photo_bytes):
    client = TestClient(app.create_app(DemoEngine(colorizer, Limits(max_photos=2))))
    first, _, _ = (upload(client, photo_bytes)["photo"] for _ in range(3))
    response = client.post("/api/colorize", json={"photo": first, "hints": []})
    assert response.status_code == 404 and "upload it again" in response.json()["error"]


def test_a_full_queue_answers_busy(colorizer, photo_bytes, monkeypatch):
    client = TestClient(app.create_app(DemoEngine(colorizer, Limits(max_queue=1))))
    photo = upload(client, photo_bytes)["photo"]
    started, release = threading.Event(), threading.Event()
    merge = inference.merge_full_resolution

    def slow_merge(*args):
        started.set()
        release.wait(30)
        return merge(*args)

    monkeypatch.setattr(inference, "merge_full_resolution", slow_merge)
    first = threading.Thread(target=lambda: client.post("/api/photos", content=photo_bytes))
    first.start()
    assert started.wait(30)
    response = client.post("/api/colorize", json={"photo": photo, "hints": []})
    release.set()
    first.join()
    assert response.status_code == 503 and "server busy" in response.json()["error"]
    assert client.post("/api/colorize", json={"photo": photo, "hints": []}).status_code == 200


@pytest.mark.parametrize(
    "limits, message",
    [
        (Limits(max_upload_mb=0), "--max-upload-mb must be a number > 0"),
        (Limits(max_upload_mb=float("inf")), "--max-upload-mb must be a number > 0"),
        (Limits(max_pixels=0), "--max-pixels must be between 1 and"),
        (Limits(max_pixels=10**12), "Pillow refuses larger images"),
    ],
)
def test_limits_out_of_range_name_their_option(colorizer, limits, message):
    with pytest.raises(ValueError, match=message):
        DemoEngine(colorizer, limits)


# --- No file is ever read for a request ----------------------------------------------------------


def asgi_get(application, raw_path: bytes) -> tuple[int, bytes]:
    """GET with a raw request path exactly as uvicorn hands it over (no client-side normalisation)."""
    path, _, query = raw_path.partition(b"?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": urllib.parse.unquote(path.decode("latin-1")),
        "raw_path": path,
        "query_string": query,
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8000")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(application(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_request_paths_never_reach_the_filesystem(demo, tmp_path, monkeypatch):
    secret = tmp_path / "secret.txt"
    secret.write_text("THE-SECRET-CONTENT")
    application = app.create_app(demo)  # The page's files are read here, once.
    package = os.path.dirname(app.__file__)
    relative = os.path.relpath(secret, os.path.join(package, "static")).encode()
    opened = []
    real_open, real_os_open = builtins.open, os.open
    monkeypatch.setattr(builtins, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    monkeypatch.setattr(os, "open", lambda *a, **k: opened.append(a[0]) or real_os_open(*a, **k))
    quoted = urllib.parse.quote(str(secret)).encode()
    paths = [
        b"/" + relative,
        b"/../../../../../../../../.." + str(secret).encode(),
        b"/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e" + quoted,
        b"/%2E%2E%2F%2E%2E%2F%2E%2E%2F%2E%2E%2F%2E%2E%2F%2E%2E%2F%2E%2E" + quoted.replace(b"/", b"%2F"),
        b"/" + str(secret).encode(),
        b"//" + str(secret).encode().lstrip(b"/"),
        b"/app.js/../../" + relative,
        b"/static/app.js",
        b"/app.py",
        b"/engine.py",
        b"/api/photos/..%2F..%2F..%2F" + quoted.replace(b"/", b"%2F") + b"/gray.png",
        b"/api/photos/../../" + relative + b"/gray.png",
        b"/?file=" + quoted,
    ]
    for path in paths:
        status, body = asgi_get(application, path)
        assert b"THE-SECRET-CONTENT" not in body and b"import" not in body, path
        assert status in (200, 404), path  # 200: only "/?file=...", which is the page itself.
        assert status == 404 or path.startswith(b"/?"), path
    assert opened == []


def test_a_loopback_server_answers_only_its_own_names(demo):
    application = app.create_app(demo, allowed_hosts=server.LOOPBACK_NAMES)
    assert TestClient(application, base_url="http://localhost:8000").get("/").status_code == 200
    assert TestClient(application, base_url="http://127.0.0.1:8000").get("/").status_code == 200
    assert TestClient(application, base_url="http://attacker.example").get("/").status_code == 400


# --- Listening and the command line ------------------------------------------------------------------


def test_listen_binds_and_names_a_busy_port():
    first = listen("127.0.0.1", 0)
    try:
        assert first.loopback and first.url == f"http://127.0.0.1:{first.port}/"
        with pytest.raises(ValueError, match=f"--port {first.port}: already in use"):
            listen("127.0.0.1", first.port)
    finally:
        first.socket.close()
    with pytest.raises(ValueError, match="--port must be between 0 and 65535"):
        listen("127.0.0.1", 70000)
    with pytest.raises(ValueError, match="--host no-such-host.invalid"):
        listen("no-such-host.invalid", 0)
    everywhere = listen("0.0.0.0", 0)
    everywhere.socket.close()
    assert not everywhere.loopback


def cli_demo(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", *argv])
    return exit_info.value.code, capsys.readouterr()


def test_cli_prints_the_url_and_warns_off_loopback(colorizer, tmp_path_factory, monkeypatch, capsys):
    workdir, _ = tiny_checkpoint.trained_workdir(tmp_path_factory)
    served = []
    monkeypatch.setattr(demo_package, "serve", lambda engine, listener: served.append(listener.url))
    code, out = cli_demo(["--workdir", workdir, "--port", "0"], capsys)
    assert code == 0 and served and served[0] in out.out and "authentication" not in out.err
    code, out = cli_demo(["--workdir", workdir, "--host", "0.0.0.0", "--port", "0"], capsys)
    assert code == 0 and "no authentication" in out.err


def test_cli_refuses_a_busy_port_and_bad_limits(tmp_path_factory, capsys):
    workdir, _ = tiny_checkpoint.trained_workdir(tmp_path_factory)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out = cli_demo(["--workdir", workdir, "--port", str(port)], capsys)
    assert code == 2 and f"smsanet-jax demo: error: --port {port}: already in use" in out.err
    bad = (("--max-upload-mb", "0"), ("--max-upload-mb", "nan"), ("--max-pixels", "-5"), ("--port", "-1"))
    for option, value in bad:
        code, out = cli_demo(["--workdir", workdir, "--port", "0", option, value], capsys)
        assert code == 2 and f"error: {option}" in out.err, out.err
    code, out = cli_demo(["--baseline", "gray", "--params", "x.msgpack", "--port", "0"], capsys)
    assert code == 2 and "exactly one model" in out.err
