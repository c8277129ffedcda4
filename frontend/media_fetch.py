"""Fetches and decodes a request's images safely (SSRF-guarded, capped), off the event loop.

Three sources are accepted: `data:image/<fmt>;base64,...` URLs, http(s) URLs (public
addresses only, unless the host is in --allowed-media-domains; size, time and redirect
limits), and local paths or `file://` URLs under --allowed-local-media-path. Every failure
is the client's: a 400 with param "messages" and a message naming the problem, never a 500
and never a hang.

Decoded images come back in RGB by a plain `convert("RGB")`, which is what Hugging Face's
`load_image` and image processors (`convert_to_rgb`) do. Compositing RGBA on white would
look better for transparent PNGs, but the model would then see different pixels than it
sees under transformers, and greedy outputs must match transformers token for token.
As transformers' `load_image` does, the EXIF orientation is applied first.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import ipaddress
import os
import re
import socket
import stat
from collections.abc import Callable, Sequence
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import TypeVar
from urllib.parse import unquote

import httpx
import pybase64
from PIL import Image, ImageOps, UnidentifiedImageError

from vlmserve.frontend.errors import APIError, bad_request
from vlmserve.shared.config import Config

PARAM = "messages"
URL_CODE = "invalid_image_url"  # the image could not be got: scheme, host, fetch, file
IMAGE_CODE = "invalid_image"  # the bytes are not a usable image
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# NAT64's well-known prefix embeds an IPv4 address in its last 32 bits (RFC 6052).
NAT64 = ipaddress.ip_network("64:ff9b::/96")
# RFC 3986's scheme; matched by hand because urlsplit raises on some netlocs ("http://[::1").
SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")

T = TypeVar("T")


def _url_error(message: str) -> APIError:
    return bad_request(message, PARAM, URL_CODE)


def _image_error(message: str) -> APIError:
    return bad_request(message, PARAM, IMAGE_CODE)


def _shown(url: str) -> str:
    """The URL as quoted in error messages: no base64 payloads, no kilobytes of query."""
    if url[:5].lower() == "data:":
        return url.partition(",")[0] + ",..."
    return url if len(url) <= 120 else url[:117] + "..."


async def _off_loop(fn: Callable[..., T], *args: object) -> T:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, functools.partial(fn, *args))


# ---- the public interface --------------------------------------------------------------------


def make_client() -> httpx.AsyncClient:
    """The HTTP client for image fetches; one per frontend process, closed at shutdown.

    No proxies from the environment (a proxy would connect to the host itself, past the
    address check), no redirects followed by httpx (each hop is checked here), and a cookie
    jar that keeps nothing, so one image host never sees another's cookies.
    """
    jar = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    return httpx.AsyncClient(trust_env=False, follow_redirects=False, cookies=jar)


async def load_image(url: str, config: Config, client: httpx.AsyncClient) -> Image.Image:
    """The image at `url` (data:, http(s), file:// or a local path), decoded, in RGB.

    Raises a 400 `APIError` naming the problem for anything the server will not or cannot
    load: a refused address or path, a fetch that fails or exceeds the limits, bytes that
    are not a readable image or have more than `config.image_max_pixels` pixels.
    """
    data = await load_bytes(url, config, client, config.image_max_bytes, "image")
    return await _off_loop(decode_image, data, config.image_max_pixels)


async def load_bytes(
    url: str, config: Config, client: httpx.AsyncClient, max_bytes: int, noun: str
) -> bytes:
    """The bytes at `url` (data:, http(s), file:// or a local path), at most `max_bytes`,
    under the same rules for every kind of media; `noun` ("image", "video") names it in
    messages, its data: URLs' MIME type and its `--<noun>-max-bytes` flag."""
    if not url.strip():
        raise _url_error(f"The {noun} URL is empty.")
    if url[:5].lower() == "data:":
        return await _off_loop(parse_data_url, url, max_bytes, noun)
    match = SCHEME.match(url)
    scheme = match.group(1).lower() if match else ""
    if scheme in ("http", "https"):
        return await fetch_url(url, config, client, max_bytes, noun)
    if scheme in ("file", ""):
        return await _off_loop(read_local_file, url, config, max_bytes, noun)
    raise _url_error(
        f"Unsupported {noun} URL scheme `{scheme}:` in {_shown(url)}; use http(s), "
        f"a data:{noun}/...;base64 URL, or (where the server allows) a local file."
    )


async def load_images(
    urls: Sequence[str], config: Config, client: httpx.AsyncClient
) -> list[Image.Image]:
    """All images of one request, fetched concurrently, in order; the first failure cancels
    the rest and is raised. 400 first when there are more than `limit_mm_per_prompt`."""
    check_image_count(len(urls), config)
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(load_image(url, config, client)) for url in urls]
    except ExceptionGroup as failures:
        raise failures.exceptions[0] from None
    return [task.result() for task in tasks]


def check_image_count(n: int, config: Config) -> None:
    """400 when a request carries more images than --limit-mm-per-prompt."""
    if n > config.limit_mm_per_prompt:
        raise bad_request(
            f"Too many images: the request has {n}; this server accepts at most "
            f"{config.limit_mm_per_prompt} per request (--limit-mm-per-prompt).",
            PARAM,
            "too_many_images",
        )


def image_hash(img: Image.Image) -> str:
    """A key of the decoded pixels (mode, size and bytes) for the encoder and prefix caches.

    Hashes `img.tobytes()`, a copy of the whole image: for large images run it off the loop.
    """
    # SHA-256, not BLAKE2b: CPUs' SHA extensions run it ~3x faster over a 640x480 image's
    # 0.9 MB (0.5 vs 1.5 ms here), and every image of every request is hashed.
    digest = hashlib.sha256(f"{img.mode}:{img.width}x{img.height}:".encode())
    digest.update(img.tobytes())
    return digest.hexdigest()[:32]


# ---- data: URLs ------------------------------------------------------------------------------


def parse_data_url(url: str, max_bytes: int, noun: str = "image") -> bytes:
    """The bytes of a `data:image/<fmt>;base64,<data>` URL (`noun`/ for other media), at
    most `max_bytes` decoded."""
    header, comma, payload = url[5:].partition(",")
    params = header.lower().split(";")
    if not comma or not params[0].startswith(f"{noun}/") or "base64" not in params[1:]:
        raise _url_error(
            f"Invalid {noun} data URL {_shown(url)}: expected data:{noun}/<format>;base64,<data>."
        )
    # Refuse by the encoded length before decoding: 4 characters carry 3 bytes.
    if len(payload) // 4 * 3 > max_bytes + 2:
        raise _too_large(_shown(url), max_bytes, noun)
    try:
        data = _b64decode(payload)
    except ValueError:  # binascii.Error, or non-ASCII characters
        raise _url_error(f"The {noun} data URL {_shown(url)} is not valid base64.") from None
    if len(data) > max_bytes:
        raise _too_large(_shown(url), max_bytes, noun)
    return data


def _b64decode(payload: str) -> bytes:
    """Strict base64, by pybase64's SIMD decoder (0.5 ms for a 640x480 PNG's 1.2 MB against
    3 ms for the standard library's); line breaks, common in pasted base64, are taken out
    only when the strict decode fails, since stripping costs as much as decoding."""
    try:
        return pybase64.b64decode(payload, validate=True)
    except ValueError:
        stripped = "".join(payload.split())
        if stripped == payload:
            raise
        return pybase64.b64decode(stripped, validate=True)


def _too_large(shown: str, max_bytes: int, noun: str = "image") -> APIError:
    return _url_error(
        f"The {noun} {shown} is larger than this server's limit of {max_bytes:,} bytes "
        f"(--{noun}-max-bytes)."
    )


# ---- local files -----------------------------------------------------------------------------


def read_local_file(
    url: str, config: Config, max_bytes: int | None = None, noun: str = "image"
) -> bytes:
    """A local image under --allowed-local-media-path, given as a path or a `file://` URL.

    Relative paths are taken from the allowed directory. The path is resolved (symlinks and
    `..`) before the check, and opened without following a final symlink, so neither a
    link nor a `..` leads out of the directory. Blocking: run it off the loop.
    """
    if not config.allowed_local_media_path:
        raise _url_error(
            f"Local {noun} files are not allowed on this server (start it with "
            "--allowed-local-media-path to allow a directory); send an http(s) or data: URL."
        )
    path = url
    if url[:5].lower() == "file:":
        path = url[5:]
        if path.startswith("//"):  # file://host/path; file:/path has no host part
            host, slash, rest = path[2:].partition("/")
            if host not in ("", "localhost"):
                raise _url_error(f"file:// URLs must name a local path, not host `{host}`.")
            path = slash + rest
        path = unquote(path)
    root = os.path.realpath(config.allowed_local_media_path)
    try:
        real = os.path.realpath(os.path.join(root, path))
        if os.path.commonpath([root, real]) != root:
            raise _url_error(
                f"The {noun} path {_shown(url)} is outside the directory this server allows "
                f"local {noun}s from (--allowed-local-media-path)."
            )
        cap = config.image_max_bytes if max_bytes is None else max_bytes
        return _read_regular_file(real, url, cap, noun)
    except ValueError:  # an embedded NUL byte
        raise _url_error(f"Invalid {noun} path {_shown(url)}.") from None


def _read_regular_file(real: str, url: str, max_bytes: int, noun: str = "image") -> bytes:
    # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below anyway.
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW
    try:
        fd = os.open(real, flags)
    except FileNotFoundError:
        raise _url_error(f"No such {noun} file: {_shown(url)}.") from None
    except OSError as exc:
        message = f"The {noun} file {_shown(url)} cannot be read: {exc.strerror}."
        raise _url_error(message) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):  # a directory, FIFO or device (/dev/zero)
            raise _url_error(f"The {noun} path {_shown(url)} is not a regular file.")
        if info.st_size > max_bytes:
            raise _too_large(_shown(url), max_bytes, noun)
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise _too_large(_shown(url), max_bytes, noun)
    return data


# ---- http(s) ---------------------------------------------------------------------------------


async def fetch_url(
    url: str,
    config: Config,
    client: httpx.AsyncClient,
    max_bytes: int | None = None,
    noun: str = "image",
) -> bytes:
    """The body at an http(s) URL, within the fetch timeout (the whole fetch: DNS, every
    redirect hop, the body), the byte cap and the redirect limit, from public hosts only."""
    try:
        async with asyncio.timeout(config.image_fetch_timeout):
            cap = config.image_max_bytes if max_bytes is None else max_bytes
            return await _fetch(url, config, client, cap, noun)
    except (TimeoutError, httpx.TimeoutException):
        raise _url_error(
            f"Timed out after {config.image_fetch_timeout:g} s fetching the image "
            f"{_shown(url)} (--image-fetch-timeout)."
        ) from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # InvalidURL: say, a bad Location
        reason = str(exc) or type(exc).__name__
        raise _url_error(f"Could not fetch the image {_shown(url)}: {reason}.") from None


async def _fetch(
    url: str, config: Config, client: httpx.AsyncClient, max_bytes: int, noun: str
) -> bytes:
    allowed = allowed_hosts(config)
    for _ in range(config.image_max_redirects + 1):
        target = _http_url(url)
        host = target.raw_host.decode("ascii")
        port = target.port or (443 if target.scheme == "https" else 80)
        address = await resolve_checked(host, port, allowed)
        response = await _send_pinned(client, target, address, config.image_fetch_timeout)
        try:
            if response.status_code in REDIRECT_STATUSES:
                location = response.headers.get("location")
                if not location:
                    raise _url_error(f"The image URL {_shown(url)} redirects without a Location.")
                url = str(target.join(location))
                continue
            if not response.is_success:
                raise _url_error(
                    f"Fetching the image {_shown(url)} failed: HTTP {response.status_code}."
                )
            return await _read_capped(response, url, max_bytes, noun)
        finally:
            await response.aclose()
    raise _url_error(
        f"Too many redirects fetching the image: more than {config.image_max_redirects} "
        f"(--image-max-redirects); the last was to {_shown(url)}."
    )


def _http_url(url: str) -> httpx.URL:
    try:
        target = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise _url_error(f"Invalid image URL {_shown(url)}: {exc}.") from None
    if target.scheme not in ("http", "https"):
        raise _url_error(f"Image URLs (and redirects) must be http or https, not {_shown(url)}.")
    if not target.raw_host:
        raise _url_error(f"The image URL {_shown(url)} has no host.")
    return target


async def _send_pinned(
    client: httpx.AsyncClient, target: httpx.URL, address: str, timeout: float
) -> httpx.Response:
    """GET `target`, connecting to `address`, the address that was checked.

    DNS rebinding: resolving the name once to check it and letting httpx resolve it again
    to connect would let a name answer a public address first and 127.0.0.1 second. So
    the request goes to the checked IP (URL host replaced), with the real name in the Host
    header and, for https, as the TLS server name (httpcore's `sni_hostname` extension),
    against which the certificate is also verified. The pool may then reuse a connection
    for another name that resolved to the same (checked, public) IP; that is still the
    address the name resolved to, so nothing private becomes reachable.
    """
    request = client.build_request(
        "GET",
        target.copy_with(host=address),
        headers={"Host": target.netloc.decode("ascii"), "Accept-Encoding": "identity"},
        extensions={"sni_hostname": target.raw_host.decode("ascii")},
        timeout=timeout,
    )
    return await client.send(request, stream=True, follow_redirects=False)


async def _read_capped(
    response: httpx.Response, url: str, max_bytes: int, noun: str = "image"
) -> bytes:
    """The body, read until it ends or passes `max_bytes` (Content-Length is only a hint)."""
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise _too_large(_shown(url), max_bytes, noun)
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(_shown(url), max_bytes, noun)
    return bytes(body)


def allowed_hosts(config: Config) -> frozenset[str]:
    """--allowed-media-domains as normalized host names (lower case, no brackets or dot)."""
    hosts = (
        host.strip().strip("[]").rstrip(".").lower()
        for host in config.allowed_media_domains.split(",")
    )
    return frozenset(host for host in hosts if host)


async def resolve_checked(host: str, port: int, allowed: frozenset[str]) -> str:
    """One address of `host` to connect to; 400 when any of its addresses is not public,
    unless the host is allowed. All addresses are checked, since any may be the one used."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise _url_error(f"Could not resolve the image host `{host}`.") from None
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise _url_error(f"Could not resolve the image host `{host}`.")
    if host.rstrip(".").lower() not in allowed:
        for address in addresses:
            if not is_public_address(address):
                # The address itself stays out of the message: it may describe an
                # internal network to whoever probes it.
                raise _url_error(
                    f"The image host `{host}` resolves to a private, loopback, link-local or "
                    "otherwise non-public address; this server does not fetch from those "
                    "(see --allowed-media-domains)."
                )
    return addresses[0]


def is_public_address(text: str) -> bool:
    """Whether an IP address is globally routable: not private, loopback, link-local,
    multicast, reserved or unspecified, also when an IPv6 address embeds an IPv4 one."""
    address = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        elif address.sixtofour is not None:
            address = address.sixtofour
        elif address in NAT64:
            address = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.is_global and not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


# ---- decoding --------------------------------------------------------------------------------


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """The image in `data` (its first frame, if animated), in RGB. Blocking: run off the loop.

    The pixel cap is checked on the header's size before any pixel is decompressed, so a
    tiny file declaring 20000x20000 costs nothing; PIL's own DecompressionBombError (above
    twice `Image.MAX_IMAGE_PIXELS`, raised by `open`) gives the same answer.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise _too_many_pixels(f"is {width}x{height} pixels", max_pixels)
            img.load()
            try:
                ImageOps.exif_transpose(img, in_place=True)
            except Exception:  # an unreadable orientation: keep the image as stored
                pass
            return img.convert("RGB")
    except APIError:
        raise
    except Image.DecompressionBombError:
        raise _too_many_pixels("has too many pixels to decode", max_pixels) from None
    except UnidentifiedImageError:
        raise _image_error(
            "The image data is not an image in a format this server reads "
            "(JPEG, PNG, WebP, GIF, BMP, ...)."
        ) from None
    except Exception as exc:  # untrusted bytes: any decoder failure is the input's
        raise _image_error(
            f"The image could not be decoded (truncated or corrupt): {exc}"
        ) from None


def _too_many_pixels(detail: str, max_pixels: int) -> APIError:
    return _image_error(
        f"The image {detail}, over this server's limit of {max_pixels:,} pixels "
        "(--image-max-pixels): a decompression bomb, or an image to downscale first."
    )
