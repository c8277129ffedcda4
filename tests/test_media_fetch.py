"""Image loading: formats, sources, and every way a client's image is refused with a 400.

Images are served by a local http.server on 127.0.0.1 (allowed through
`allowed_media_domains`, since loopback is otherwise refused).
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import msgspec
import pytest
from PIL import Image

from vlmserve.frontend.errors import APIError
from vlmserve.frontend.media_fetch import (
    check_image_count,
    image_hash,
    is_public_address,
    load_image,
    load_images,
    make_client,
)
from vlmserve.shared.config import Config

RED = (255, 0, 0)
BLUE = (0, 0, 255)


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A real, valid 1-bit PNG of one colour: 20000x20000 is ~50 KB for 400 megapixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    row = b"\0" + b"\0" * ((width + 7) // 8)  # filter byte, then packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def two_frame_gif() -> bytes:
    frames = [Image.new("RGB", (6, 4), RED), Image.new("RGB", (6, 4), BLUE)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


JPEG = encode(Image.new("RGB", (32, 24), RED), "JPEG")
FILES: dict[str, bytes] = {
    "/red.jpg": JPEG,
    "/rgba.png": encode(Image.new("RGBA", (7, 5), (10, 20, 30, 0)), "PNG"),
    "/palette.png": encode(Image.new("RGB", (9, 3), BLUE).convert("P"), "PNG"),
    "/grey.png": encode(Image.new("L", (4, 8), 128), "PNG"),
    "/cmyk.jpg": encode(Image.new("CMYK", (5, 5), (0, 255, 255, 0)), "JPEG"),
    "/red.webp": encode(Image.new("RGB", (10, 12), RED), "WEBP", lossless=True),
    "/anim.gif": two_frame_gif(),
    "/bomb.png": png_bomb(8000, 8000),  # over our cap, under PIL's own limits
    "/big-bomb.png": png_bomb(20000, 20000),  # over PIL's DecompressionBombError limit
    "/truncated.jpg": JPEG[: len(JPEG) // 2],
    "/random.bin": os.urandom(4096),
    "/notes.txt": b"just some text, not an image\n" * 10,
}


class Handler(BaseHTTPRequestHandler):
    """Files by path; /redirect/<n> gets to /red.jpg in n redirects; /to?<url> redirects anywhere;
    /endless streams without Content-Length; /stall answers nothing until the test ends."""

    stall = threading.Event()

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if path in FILES:
            self._send(200, FILES[path])
        elif path.startswith("/redirect/"):
            left = int(path.rsplit("/", 1)[1])
            self._redirect("/red.jpg" if left <= 1 else f"/redirect/{left - 1}")
        elif path == "/to":
            self._redirect(query)
        elif path == "/endless":
            self.send_response(200)
            self.end_headers()  # HTTP/1.0, no Content-Length: the body ends when we close
            for _ in range(64):
                self.wfile.write(b"\xff" * 65536)
        elif path == "/stall":
            self.stall.wait(10)
        else:
            self._send(404, b"not found")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that hang up on /endless are the point of the test


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    server = QuietServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    Handler.stall.set()
    server.shutdown()
    server.server_close()


def config(**changes: object) -> Config:
    settings = {"allowed_media_domains": "127.0.0.1", "image_fetch_timeout": 2.0} | changes
    return msgspec.convert(settings, Config)


def load(url: str, cfg: Config | None = None) -> Image.Image:
    async def run() -> Image.Image:
        async with make_client() as client:
            return await load_image(url, cfg or config(), client)

    return asyncio.run(run())


def refused(url: str, gist: str, cfg: Config | None = None) -> str:
    """Loading `url` is a 400 (param "messages") whose message contains `gist`."""
    with pytest.raises(APIError) as caught:
        load(url, cfg)
    err = caught.value
    assert err.status == 400, err
    assert err.param == "messages"
    assert gist.lower() in err.message.lower(), err.message
    return err.message


def data_url(body: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(body).decode()}"


# ---- formats ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, size, pixel",
    [
        ("/red.jpg", (32, 24), None),
        ("/rgba.png", (7, 5), (10, 20, 30)),  # plain convert, as transformers does: no white
        ("/palette.png", (9, 3), BLUE),
        ("/grey.png", (4, 8), (128, 128, 128)),
        ("/cmyk.jpg", (5, 5), None),
        ("/red.webp", (10, 12), RED),
        ("/anim.gif", (6, 4), RED),  # the first frame
    ],
)
def test_formats_load_as_rgb(base: str, path: str, size: tuple[int, int], pixel: object) -> None:
    img = load(base + path)
    assert img.mode == "RGB"
    assert img.size == size
    if pixel is not None:
        assert img.getpixel((0, 0)) == pixel
    else:  # lossy JPEG: close to red
        red, green, blue = img.getpixel((0, 0))
        assert red > 200 and green < 60 and blue < 60


def test_data_url_and_hash() -> None:
    body = FILES["/palette.png"]
    img = load(data_url(body))
    assert (img.mode, img.size, img.getpixel((1, 1))) == ("RGB", (9, 3), BLUE)
    # Line breaks in the base64 are tolerated; the same pixels hash the same.
    wrapped = data_url(body).replace("base64,", "base64,\n", 1)
    assert image_hash(load(wrapped)) == image_hash(img)
    assert image_hash(img) != image_hash(load(data_url(FILES["/red.webp"])))
    assert image_hash(img) != image_hash(img.convert("L").convert("RGB").resize((3, 9)))


def test_bad_data_urls() -> None:
    refused("data:image/png;base64,@@not base64@@", "not valid base64")
    refused("data:text/plain;base64,aGVsbG8=", "expected data:image/")
    refused("data:image/png,rawbytes", "expected data:image/")
    refused(data_url(FILES["/notes.txt"]), "not an image")
    big = data_url(b"\0" * 5000)
    refused(big, "larger than this server's limit of 4,000 bytes", config(image_max_bytes=4000))


# ---- local files -----------------------------------------------------------------------------


def test_local_files(tmp_path) -> None:
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.png").write_bytes(FILES["/grey.png"])
    (tmp_path / "secret.png").write_bytes(FILES["/grey.png"])
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    os.mkfifo(root / "fifo.png")
    cfg = config(allowed_local_media_path=str(root))

    assert load(str(root / "sub" / "ok.png"), cfg).size == (4, 8)
    assert load(f"file://{root}/sub/ok.png", cfg).size == (4, 8)
    assert load("sub/ok.png", cfg).size == (4, 8)  # relative: from the allowed directory
    assert load(f"{root}/sub/../sub/ok.png", cfg).mode == "RGB"

    refused(str(tmp_path / "secret.png"), "outside the directory", cfg)
    refused(f"{root}/../secret.png", "outside the directory", cfg)
    refused(f"file://{root}/sub/../../secret.png", "outside the directory", cfg)
    refused(str(root / "link.png"), "outside the directory", cfg)
    refused(str(root / "missing.png"), "no such image file", cfg)
    refused(str(root / "fifo.png"), "not a regular file", cfg)  # and no hang
    refused("file://otherhost/etc/passwd", "local path", cfg)
    refused(str(root / "sub" / "ok.png"), "not allowed on this server", config())


# ---- fetching: addresses, redirects, limits --------------------------------------------------


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
     "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255", "::1", "::", "fe80::1%eth0",
     "fc00::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "2002:7f00:1::1",
     "64:ff9b::a9fe:a9fe"],
)  # fmt: skip
def test_non_public_addresses(address: str) -> None:
    assert not is_public_address(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "2001:4860:4860::8888", "::ffff:8.8.8.8"])
def test_public_addresses(address: str) -> None:
    assert is_public_address(address)


def test_loopback_refused_unless_allowed(base: str) -> None:
    port = base.rsplit(":", 1)[1]
    strict = config(allowed_media_domains="")
    refused(base + "/red.jpg", "non-public address", strict)
    refused(f"http://localhost:{port}/red.jpg", "non-public address")  # not in the list
    refused(f"http://[::ffff:127.0.0.1]:{port}/red.jpg", "non-public address")
    refused(f"ftp://127.0.0.1:{port}/red.jpg", "unsupported image url scheme")


@pytest.mark.parametrize(
    "url, gist",
    [
        ("", "empty"),
        ("javascript:alert(1)", "unsupported image url scheme `javascript:`"),
        ("http://[::1", "invalid image url"),
        ("http:///x", "has no host"),
        ("http://no-such-host.invalid/x.png", "could not resolve"),
    ],
)
def test_unusable_urls(url: str, gist: str) -> None:
    refused(url, gist)


def test_redirects(base: str) -> None:
    assert load(base + "/redirect/3").size == (32, 24)  # exactly the limit of 3
    refused(base + "/redirect/4", "too many redirects")
    port = base.rsplit(":", 1)[1]
    # The hop is checked like the first URL: localhost is not an allowed host.
    refused(f"{base}/to?http://localhost:{port}/red.jpg", "`localhost` resolves to")
    refused(f"{base}/to?file:///etc/passwd", "must be http or https")
    refused(base + "/nothing-here", "HTTP 404")


def test_byte_cap_without_content_length(base: str) -> None:
    start = time.monotonic()
    refused(base + "/endless", "larger than this server's limit of 100,000 bytes",
            config(image_max_bytes=100_000))  # fmt: skip
    assert time.monotonic() - start < 2
    # With a Content-Length over the cap, nothing is read.
    refused(base + "/red.jpg", "larger than", config(image_max_bytes=100))


def test_stalled_server_times_out(base: str) -> None:
    start = time.monotonic()
    refused(base + "/stall", "timed out after 0.5 s", config(image_fetch_timeout=0.5))
    assert time.monotonic() - start < 1.5


# ---- decoding --------------------------------------------------------------------------------


def test_decompression_bomb(base: str) -> None:
    assert len(FILES["/big-bomb.png"]) < 100_000
    refused(base + "/bomb.png", "8000x8000 pixels, over this server's limit of 40,000,000")
    # PIL refuses this one in Image.open already; its DecompressionBombError is a 400 too.
    refused(base + "/big-bomb.png", "too many pixels", config(image_max_pixels=10**12))


@pytest.mark.parametrize(
    "path, gist",
    [
        ("/truncated.jpg", "could not be decoded (truncated or corrupt)"),
        ("/random.bin", "not an image"),
        ("/notes.txt", "not an image"),
    ],
)
def test_broken_images(base: str, path: str, gist: str) -> None:
    refused(base + path, gist)


# ---- counts ----------------------------------------------------------------------------------


def test_too_many_images(base: str) -> None:
    cfg = config(limit_mm_per_prompt=2)
    check_image_count(2, cfg)
    with pytest.raises(APIError) as caught:
        check_image_count(3, cfg)
    assert caught.value.status == 400
    assert "at most 2 per request" in caught.value.message

    async def run(urls: list[str]) -> list[Image.Image]:
        async with make_client() as client:
            return await load_images(urls, cfg, client)

    images = asyncio.run(run([base + "/red.jpg", data_url(FILES["/grey.png"])]))
    assert [img.size for img in images] == [(32, 24), (4, 8)]
    with pytest.raises(APIError) as caught:
        asyncio.run(run([base + "/red.jpg"] * 3))
    assert caught.value.status == 400 and "too many images" in caught.value.message.lower()
    with pytest.raises(APIError) as caught:  # one bad image fails the request with its 400
        asyncio.run(run([base + "/red.jpg", base + "/notes.txt"]))
    assert caught.value.status == 400 and "not an image" in caught.value.message
