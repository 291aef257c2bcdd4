"""Relay phone calls between Twilio Media Streams and the OpenAI Realtime API.

A caller dials a Twilio number; Twilio's ``<Connect><Stream url="wss://...">``
opens a WebSocket to this relay; the relay opens a WebSocket to OpenAI and
carries the call both ways. Audio is G.711 mu-law at 8 kHz on both sides, so it
passes through untouched.

Read top to bottom:

1. Configuration: every setting, read from the environment once, at start-up.
   Change the voice or the agent's instructions here (or in ``.env``).
2. What the relay tells OpenAI: the session and its messages.
3. ``Call``: one phone call, with its two pumps (Twilio -> OpenAI and
   OpenAI -> Twilio).
4. ``Relay``: the HTTP routes and the bookkeeping shared by all calls.
5. ``main()``: start-up, serving, and a graceful shutdown.

Run it with ``python relay.py``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime
import json
import logging
import os
import signal
import sys
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any

from dotenv import load_dotenv
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.http11 import Request, Response
from websockets.protocol import State

logger = logging.getLogger("relay")


# 1. Configuration ------------------------------------------------------------

VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")

DEFAULT_INSTRUCTIONS = (
    "You are Tessa, a warm and friendly phone assistant. "
    "Keep every answer short and conversational: this is a phone call, not an essay. "
    "Always answer in the language the caller speaks."
)

CLOSE_TIMEOUT = 1.0  # seconds to wait for a peer to acknowledge a close
EARLY_AUDIO_LIMIT = 250  # frames kept while OpenAI connects: 5 s of 20 ms frames


class ConfigError(Exception):
    """A setting is missing or wrong; the message says which and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of the relay, checked once at start-up."""

    openai_api_key: str
    openai_url: str
    host: str = "0.0.0.0"
    port: int = 8080
    voice: str = "alloy"
    instructions: str = DEFAULT_INSTRUCTIONS
    vad_threshold: float = 0.5
    vad_prefix_padding_ms: int = 300
    vad_silence_duration_ms: int = 500
    log_level: str = "INFO"
    drain_seconds: float = 10.0
    openai_connect_timeout: float = 10.0

    def __repr__(self) -> str:
        """Keep the API key out of any log line or traceback that shows the config."""
        return f"Config(openai_url={self.openai_url!r}, voice={self.voice!r}, port={self.port})"


def realtime_url(base_url: str, model: str) -> str:
    """Turn an OpenAI REST base URL into the Realtime WebSocket URL, as the official SDK does."""
    parts = urllib.parse.urlsplit(base_url.rstrip("/"))
    scheme = {"https": "wss", "http": "ws", "wss": "wss", "ws": "ws"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ConfigError(f"OPENAI_BASE_URL must be an http(s) URL, got {base_url!r}")
    query = urllib.parse.urlencode({"model": model})
    return urllib.parse.urlunsplit((scheme, parts.netloc, parts.path + "/realtime", query, ""))


def _number(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    """Read a number from the environment, refusing anything outside [low, high]."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low:g} and {high:g}, got {raw!r}")
    return value


def load_config(env: Mapping[str, str]) -> Config:
    """Build the configuration from environment variables, or say what is wrong."""
    api_key = env.get("OPENAI_API_KEY", "").strip()
    if not api_key:
        raise ConfigError(
            "OPENAI_API_KEY is not set. Put OPENAI_API_KEY=sk-... in a .env file "
            "next to relay.py (see .env.example) or export it in the environment."
        )
    voice = env.get("VOICE", "").strip() or "alloy"
    if voice not in VOICES:
        raise ConfigError(f"VOICE must be one of {', '.join(VOICES)}; got {voice!r}")
    log_level = env.get("LOG_LEVEL", "").strip().upper() or "INFO"
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR; got {log_level!r}")
    model = env.get("OPENAI_MODEL", "").strip() or "gpt-realtime-2.1"
    base_url = env.get("OPENAI_BASE_URL", "").strip() or "https://api.openai.com/v1"
    return Config(
        openai_api_key=api_key,
        openai_url=realtime_url(base_url, model),
        host=env.get("HOST", "").strip() or "0.0.0.0",
        port=int(_number(env, "PORT", 8080, 0, 65535)),
        voice=voice,
        instructions=env.get("INSTRUCTIONS", "").strip() or DEFAULT_INSTRUCTIONS,
        vad_threshold=_number(env, "VAD_THRESHOLD", 0.5, 0.0, 1.0),
        vad_prefix_padding_ms=int(_number(env, "VAD_PREFIX_PADDING_MS", 300, 0, 5000)),
        vad_silence_duration_ms=int(_number(env, "VAD_SILENCE_DURATION_MS", 500, 0, 10000)),
        log_level=log_level,
        drain_seconds=_number(env, "DRAIN_SECONDS", 10, 0, 3600),
        openai_connect_timeout=_number(env, "OPENAI_CONNECT_TIMEOUT", 10, 0.1, 120),
    )


# 2. What the relay tells OpenAI ----------------------------------------------


def session_update(config: Config) -> dict[str, Any]:
    """The GA ``session.update``: mu-law both ways, server-side turn detection."""
    return {
        "type": "session.update",
        "session": {
            "type": "realtime",
            "output_modalities": ["audio"],
            "instructions": config.instructions,
            "audio": {
                "input": {
                    "format": {"type": "audio/pcmu"},
                    "turn_detection": {
                        "type": "server_vad",
                        "threshold": config.vad_threshold,
                        "prefix_padding_ms": config.vad_prefix_padding_ms,
                        "silence_duration_ms": config.vad_silence_duration_ms,
                    },
                },
                "output": {"format": {"type": "audio/pcmu"}, "voice": config.voice},
            },
        },
    }


async def connect_openai(config: Config) -> ClientConnection:
    """Open the Realtime WebSocket. Compression is off: base64 audio barely compresses."""
    return await connect(
        config.openai_url,
        additional_headers={"Authorization": f"Bearer {config.openai_api_key}"},
        compression=None,
        open_timeout=config.openai_connect_timeout,
        close_timeout=CLOSE_TIMEOUT,
        max_size=2**22,
    )


# 3. One phone call -------------------------------------------------------------


class CallLog(logging.LoggerAdapter):
    """Prefix every line with the call it belongs to, so busy logs stay readable."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['call'].label}] {msg}", kwargs


class Call:
    """One phone call: the Twilio socket, the OpenAI socket, and the two pumps between them."""

    def __init__(self, relay: Relay, twilio: ServerConnection, number: int) -> None:
        self.relay = relay
        self.config = relay.config
        self.twilio = twilio
        self.number = number
        self.openai: ClientConnection | None = None
        self.stream_sid = ""
        self.call_sid = ""
        # Caller audio that arrives while OpenAI is still connecting, sent once it is ready.
        self.early: collections.deque[str] = collections.deque(maxlen=EARLY_AUDIO_LIMIT)
        self.openai_ready = False
        self.warned: set[str] = set()
        self.close_code = 1000  # 1011 when OpenAI failed; either way Twilio goes on with the TwiML
        self.log = CallLog(logger, {"call": self})

    @property
    def label(self) -> str:
        return f"call {self.number} {self.call_sid or '-'} {self.stream_sid or '-'}"

    async def run(self) -> None:
        """Run both pumps until either side ends, then close both sockets."""
        pumps = [
            asyncio.create_task(self.twilio_to_openai()),
            asyncio.create_task(self.openai_to_twilio()),
        ]
        try:
            done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is not None:
                    self.relay.count_error("relay_bug")
                    self.log.error("pump failed", exc_info=task.exception())
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            if self.openai is not None:
                await self.openai.close()
            await self.twilio.close(self.close_code)

    # Twilio -> OpenAI

    async def twilio_to_openai(self) -> None:
        """Forward the caller's audio to OpenAI until Twilio says ``stop`` or hangs up."""
        try:
            async for message in self.twilio:
                if isinstance(message, bytes):
                    self.bad_input("binary frame", f"{len(message)} bytes")
                    continue
                try:
                    event = json.loads(message)
                except ValueError:
                    self.bad_input("non-JSON text", repr(message[:80]))
                    continue
                if not isinstance(event, dict):
                    self.bad_input("JSON that is not an object", repr(message[:80]))
                    continue
                if not await self.on_twilio_event(event):
                    return
        except ConnectionClosed as closed:
            self.log.info("Twilio connection lost: %s", closed)

    async def on_twilio_event(self, event: dict[str, Any]) -> bool:
        """Handle one Twilio event; return False when the stream is over."""
        kind = event.get("event")
        if kind == "media":
            await self.on_media(event)
        elif kind == "start":
            self.on_start(event)
        elif kind == "stop":
            self.log.info("Twilio stopped the stream")
            return False
        elif kind in ("connected", "mark", "dtmf"):
            self.log.debug("Twilio %s", kind)
        elif isinstance(kind, str):
            self.log.debug("ignoring unknown Twilio event %r", kind)
        else:
            self.bad_input("event without a valid 'event' field", repr(event)[:80])
        return True

    def on_start(self, event: dict[str, Any]) -> None:
        start = event.get("start")
        if not isinstance(start, dict) or not isinstance(start.get("streamSid"), str):
            self.bad_input("start without start.streamSid", repr(event)[:120])
            return
        self.stream_sid = start["streamSid"]
        self.call_sid = str(start.get("callSid", ""))
        parameters = start.get("customParameters")
        names = sorted(parameters) if isinstance(parameters, dict) else []
        self.log.info("stream started (custom parameters: %s)", ", ".join(names) or "none")

    async def on_media(self, event: dict[str, Any]) -> None:
        if not self.stream_sid:
            self.bad_input("media before start", "dropped")
            return
        media = event.get("media")
        payload = media.get("payload") if isinstance(media, dict) else None
        if not isinstance(payload, str):
            self.bad_input("media without media.payload", repr(event)[:120])
            return
        message = json.dumps({"type": "input_audio_buffer.append", "audio": payload})
        if self.openai_ready:
            await self.openai.send(message)  # type: ignore[union-attr]
        else:
            if len(self.early) == self.early.maxlen and "early audio overflow" not in self.warned:
                self.warned.add("early audio overflow")
                self.log.warning("OpenAI is slow to connect: dropping the oldest caller audio")
            self.early.append(message)

    def bad_input(self, problem: str, detail: str) -> None:
        """Count bad input from Twilio, and warn once per kind of problem per call."""
        self.relay.count_error("bad_twilio_input")
        if problem not in self.warned:
            self.warned.add(problem)
            self.log.warning("ignoring bad input from Twilio: %s (%s)", problem, detail)

    # OpenAI -> Twilio

    async def openai_to_twilio(self) -> None:
        """Connect to OpenAI, configure the session, then forward the agent's audio to Twilio."""
        started = time.monotonic()
        try:
            self.openai = await connect_openai(self.config)
        except InvalidStatus as refused:
            return self.openai_failed(f"refused the connection: HTTP {refused.response.status_code}")
        except TimeoutError:
            return self.openai_failed(f"did not answer within {self.config.openai_connect_timeout:g} s")
        except (OSError, InvalidHandshake) as error:
            return self.openai_failed(f"could not be reached: {error}")
        self.log.info("OpenAI connected in %.0f ms", (time.monotonic() - started) * 1000)
        try:
            await self.openai.send(json.dumps(session_update(self.config)))
            await self.send_early_audio()
            async for message in self.openai:
                await self.on_openai_message(message)
        except ConnectionClosed:
            if self.openai.state is State.OPEN:
                return  # Twilio went away while we were sending: its pump ends the call
        self.openai_failed(
            f"closed the session mid-call: code {self.openai.close_code} {self.openai.close_reason!r}"
        )

    async def send_early_audio(self) -> None:
        """Send the audio that arrived during the handshake, in order, then go live.

        The Twilio pump keeps queueing while this awaits, so nothing overtakes.
        """
        while self.early:
            await self.openai.send(self.early.popleft())  # type: ignore[union-attr]
        self.openai_ready = True

    def openai_failed(self, what: str) -> None:
        """Log and count an OpenAI failure; returning ends the call and hands it back to Twilio."""
        self.relay.count_error("openai_connection")
        self.close_code = 1011
        self.log.error("OpenAI %s", what)

    async def on_openai_message(self, message: str | bytes) -> None:
        try:
            event = json.loads(message)
            kind = event["type"]
        except (ValueError, TypeError, KeyError):
            self.log.warning("ignoring unreadable message from OpenAI: %r", message[:80])
            return
        if kind == "response.output_audio.delta":
            await self.send_audio(event)
        elif kind == "error":
            self.on_openai_error(event)
        elif kind == "session.updated":
            self.log.info("session configured: voice %s", self.config.voice)

    async def send_audio(self, event: dict[str, Any]) -> None:
        delta = event.get("delta")
        if not isinstance(delta, str) or not self.stream_sid:
            return
        media = {"event": "media", "streamSid": self.stream_sid, "media": {"payload": delta}}
        await self.twilio.send(json.dumps(media))

    def on_openai_error(self, event: dict[str, Any]) -> None:
        """Errors mean OpenAI ignored something we sent (a bad field keeps the old config)."""
        error = event.get("error") if isinstance(event.get("error"), dict) else {}
        self.relay.count_error("openai_error")
        self.log.error(
            "OpenAI error: type=%s code=%s message=%s param=%s",
            error.get("type"), error.get("code"), error.get("message"), error.get("param"),
        )


# 4. The relay: HTTP routes and shared bookkeeping --------------------------------


@dataclasses.dataclass
class Stats:
    """Counters shown by /health and logged at shutdown."""

    started: float = dataclasses.field(default_factory=time.monotonic)
    active: int = 0
    total: int = 0
    errors: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)


class Relay:
    """Accepts Twilio's WebSockets, answers plain HTTP routes, and counts what happens."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stats = Stats()

    def count_error(self, kind: str) -> None:
        self.stats.errors[kind] += 1

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Answer plain HTTP routes; let every other path upgrade to a Twilio media stream."""
        path = urllib.parse.urlsplit(request.path).path
        if path == "/health":
            return json_response(self.health(), head=request.method == "HEAD")
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return connection.respond(
                426,
                "This is a Twilio Media Streams endpoint: point <Stream url=\"wss://...\"> "
                "at it. Health check: /health\n",
            )
        return None

    def health(self) -> dict[str, Any]:
        now = datetime.datetime.now(datetime.timezone.utc)
        return {
            "status": "healthy",
            "uptime": f"{time.monotonic() - self.stats.started:.0f}s",
            "timestamp": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "connections": {"active": self.stats.active, "total": self.stats.total},
            "errors": sum(self.stats.errors.values()),
            "openai_configured": True,
        }

    async def handle(self, twilio: ServerConnection) -> None:
        """Carry one call from accept to hang-up."""
        self.stats.active += 1
        self.stats.total += 1
        call = Call(self, twilio, self.stats.total)
        call.log.info("Twilio connected from %s (%d active)", remote_address(twilio), self.stats.active)
        try:
            await call.run()
        finally:
            self.stats.active -= 1
            call.log.info("call ended (%d active)", self.stats.active)


def json_response(body: dict[str, Any], head: bool = False) -> Response:
    data = json.dumps(body).encode()
    headers = Headers(
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
            ("Connection", "close"),
        ]
    )
    return Response(200, "OK", headers, b"" if head else data)


def remote_address(connection: ServerConnection) -> str:
    """The caller's address: the proxy's X-Forwarded-For when there is one."""
    forwarded = connection.request.headers.get("X-Forwarded-For") if connection.request else None
    if forwarded:
        return forwarded.split(",")[0].strip()
    address = connection.remote_address
    return str(address[0]) if address else "unknown"


def serve_calls(relay: Relay, host: str, port: int) -> Server:
    """The WebSocket server Twilio connects to, with the limits a phone call needs."""
    return serve(
        relay.handle,
        host,
        port,
        process_request=relay.process_request,
        compression=None,  # base64 audio barely compresses; deflate only costs CPU
        close_timeout=CLOSE_TIMEOUT,
        max_size=2**16,  # a Twilio media frame is under 1 KiB
    )


# 5. Start-up and shutdown ----------------------------------------------------------


class UTCFormatter(logging.Formatter):
    """ISO-8601 UTC timestamps, so logs from several machines line up."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        moment = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(UTCFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


async def drain(server: Server, relay: Relay) -> None:
    """Stop taking calls, give running calls DRAIN_SECONDS to finish, then close the rest."""
    server.close(close_connections=False)
    logger.info(
        "shutting down: no new calls; waiting up to %g s for %d active call(s)",
        relay.config.drain_seconds, relay.stats.active,
    )
    try:
        async with asyncio.timeout(relay.config.drain_seconds):
            await server.wait_closed()
    except TimeoutError:
        remaining = list(server.connections)
        logger.info("closing %d call(s) that are still running", len(remaining))
        await asyncio.gather(*(c.close(1012, "relay restarting") for c in remaining))


def exit_now(signum: int) -> None:
    """A second Ctrl-C or SIGTERM: the operator does not want to wait."""
    logger.warning("second %s: exiting at once", signal.Signals(signum).name)
    logging.shutdown()
    os._exit(1)


async def main() -> None:
    load_dotenv()
    try:
        config = load_config(os.environ)
    except ConfigError as error:
        sys.exit(f"relay: configuration error: {error}")
    setup_logging(config.log_level)
    relay = Relay(config)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        logger.info("received %s", signal.Signals(signum).name)
        stop.set()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, exit_now, sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    async with serve_calls(relay, config.host, config.port) as server:
        port = server.sockets[0].getsockname()[1]
        logger.info(
            "relay listening on port %d: WebSocket ws://%s:%d/media-stream, health http://%s:%d/health",
            port, config.host, port, config.host, port,
        )
        await stop.wait()
        await drain(server, relay)
    stats = relay.stats
    logger.info(
        "stopped: %d call(s) served, %d error(s), up %.0f s",
        stats.total, sum(stats.errors.values()), time.monotonic() - stats.started,
    )


if __name__ == "__main__":
    asyncio.run(main())
