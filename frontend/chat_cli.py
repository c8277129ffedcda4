"""Chat with a running server from the terminal: `vlmserve serve api_client URL`.

The answer streams as tokens arrive; the conversation is kept and sent whole each turn.
Commands: `/image PATH_OR_URL` attaches an image to the next message (a local file goes as a
base64 data URL, an http(s) URL as it is), `/reset` starts over, `/exit` (or Ctrl-D) quits.
Ctrl-C during an answer stops it (the server aborts the request). Errors are one line; the
exit status is 1 when the server cannot be reached at the start.
"""

from __future__ import annotations

import argparse
import base64
import mimetypes
import os
import re
import sys
from typing import Any, TextIO

from vlmserve.client import APIClient, APIClientError

HELP = (
    "commands: /image PATH_OR_URL attaches an image to your next message, "
    "/reset starts a new conversation, /exit quits (or Ctrl-D); Ctrl-C stops an answer"
)
USER_PROMPT = "you> "
ANSWER_PREFIX = "assistant> "

# C0 and C1 control characters other than newline and tab: a random-weight model writes them,
# and in a terminal they move the cursor or start escape sequences.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` safe for a terminal: C0 controls as their Unicode pictures (U+241A for 0x1A),
    DEL and C1 controls as U+FFFD."""
    return _CONTROL.sub(lambda m: chr(0x2400 + ord(m[0])) if m[0] < " " else "\ufffd", text)


class UsageError(Exception):
    """A command the user typed wrong (a missing file, say): reported, the chat goes on."""


def image_part(source: str) -> dict[str, Any]:
    """An OpenAI `image_url` content part for a local file, a data: URL or an http(s) URL."""
    if source.startswith(("http://", "https://", "data:")):
        return {"type": "image_url", "image_url": {"url": source}}
    path = os.path.expanduser(source)
    if not os.path.isfile(path):
        raise UsageError(f"no such file: {source}")
    mime = mimetypes.guess_type(path)[0] or ""
    if not mime.startswith("image/"):
        raise UsageError(f"{source} does not look like an image (type {mime or 'unknown'})")
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


class ChatSession:
    """One conversation with one model: history, images waiting for the next message."""

    def __init__(
        self, client: APIClient, model: str, params: dict[str, Any], out: TextIO = sys.stdout
    ) -> None:
        self.client = client
        self.model = model
        self.params = params
        self.out = out
        self.history: list[dict[str, Any]] = []
        self.images: list[dict[str, Any]] = []

    def reset(self) -> None:
        self.history.clear()
        self.images.clear()

    def attach(self, source: str) -> None:
        self.images.append(image_part(source))

    def say(self, text: str) -> None:
        """Send `text` (with any attached images), stream the answer, keep both in history.
        On an error the turn is dropped, images included, and the error is raised."""
        content: str | list[dict[str, Any]] = text
        if self.images:
            content = [{"type": "text", "text": text}, *self.images]
        self.images = []
        messages = [*self.history, {"role": "user", "content": content}]
        stream = self.client.chat_completions_v1(
            self.model,
            messages,
            stream=True,
            stream_options={"include_usage": True},
            **self.params,
        )
        pieces: list[str] = []
        usage, finish, started = None, None, False
        try:
            for chunk in stream:
                if not started:  # after the server accepted the request, not before an error
                    self.out.write(ANSWER_PREFIX)
                    started = True
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content") or ""
                    finish = choice.get("finish_reason") or finish
                    pieces.append(piece)
                    self.out.write(printable(piece))
                    self.out.flush()
        except KeyboardInterrupt:
            stream.close()  # closes the connection: the server aborts the request
            finish = "stopped by you"
        except BaseException:
            if started:
                self.out.write("\n")
                self.out.flush()
            raise
        self.history = [*messages, {"role": "assistant", "content": "".join(pieces)}]
        self.out.write("\n" + self.summary(usage, finish) + "\n")
        self.out.flush()

    @staticmethod
    def summary(usage: dict[str, Any] | None, finish: str | None) -> str:
        if usage is None:
            return f"[finish: {finish}]"
        return (
            f"[prompt {usage['prompt_tokens']} tokens, answer {usage['completion_tokens']} "
            f"tokens, finish: {finish}]"
        )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vlmserve serve api_client",
        description="Chat with a running vlmserve (or any OpenAI-compatible) server.",
        epilog=HELP,
    )
    parser.add_argument("url", help="the server, e.g. http://127.0.0.1:23333")
    parser.add_argument("--api-key", default=os.environ.get("VLMSERVE_API_KEY"))
    parser.add_argument("--model", help="model id (default: the first in /v1/models)")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument(
        "--ignore-eos", action="store_true", help="answer up to --max-tokens, past end-of-text"
    )
    return parser.parse_args(argv)


def command(session: ChatSession, line: str) -> bool:
    """Run a /command; False when it asks to quit."""
    name, _, arg = line.partition(" ")
    match name:
        case "/exit" | "/quit":
            return False
        case "/reset":
            session.reset()
            print("(conversation cleared)")
        case "/image":
            if not arg.strip():
                raise UsageError("usage: /image PATH_OR_URL")
            session.attach(arg.strip())
            print(f"(image attached to your next message: {arg.strip()})")
        case "/help":
            print(HELP)
        case _:
            raise UsageError(f"unknown command {name}; {HELP}")
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if sys.stdin.isatty():
        import readline  # noqa: F401 - line editing and history for input()
    with APIClient(args.url, api_key=args.api_key) as client:
        try:
            models = client.available_models
        except APIClientError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        model = args.model or (models[0] if models else None)
        if model is None or model not in models:
            print(f"error: model {model!r} is not served; the server has {models}", file=sys.stderr)
            return 1
        params = {
            k: v
            for k, v in (("temperature", args.temperature), ("max_tokens", args.max_tokens))
            if v is not None
        } | ({"ignore_eos": True} if args.ignore_eos else {})
        session = ChatSession(client, model, params)
        print(f"connected to {args.url}, model {model}\n{HELP}")
        while True:
            try:
                line = input(USER_PROMPT).strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if not command(session, line):
                        return 0
                else:
                    session.say(line)
            except (UsageError, APIClientError) as exc:
                print(f"error: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
