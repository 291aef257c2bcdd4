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
import base64
import binascii
import collections
import contextlib
import ctypes
import dataclasses
import datetime
import hashlib
import hmac
import json
import logging
import os
import signal
import sys
import time
import urllib.parse
import xml.sax.saxutils
from collections.abc import AsyncIterator, Mapping
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
    "Always answer in the language the caller speaks. "
    "When the caller says goodbye or the conversation is clearly finished, "
    "say a short goodbye and then call the end_call tool to hang up."
)
DEFAULT_GREETING = "Hi, this is Tessa. How can I help you today?"
TIME_LIMIT_GOODBYE = (
    "The call has reached its time limit. Tell the caller so in one short sentence and say goodbye."
)
TRANSCRIPTION_MODEL = "gpt-4o-mini-transcribe"  # used only when LOG_TRANSCRIPTS is on
# What the caller hears when the stream ends, before the call hangs up (see /twiml).
FALLBACK_MESSAGE = "Thank you for calling. If we were cut off, please call again. Goodbye."

CLOSE_TIMEOUT = 1.0  # seconds to wait for a peer to acknowledge a close
EARLY_AUDIO_LIMIT = 250  # frames kept while OpenAI connects: 5 s of 20 ms frames
GOODBYE_PLAYBACK_LIMIT = 8.0  # seconds a goodbye may take to play before the relay hangs up
BYTES_PER_MS = 8  # G.711 mu-law at 8 kHz: one byte per sample
MAX_FRAME_BYTES = 2**16  # from Twilio; a media frame is under 1 KiB
START_TIMEOUT = 10.0  # seconds for Twilio to send "start" before the relay gives up on a socket
MAX_PENDING_MARKS = 1000  # marks awaiting their echo; a peer that never echoes cannot grow it
COALESCE_WHEN_LATE = 0.02  # seconds behind Twilio's clock before caller frames are joined
WARM_SESSION_MAX_AGE = 240.0  # seconds; a call must still fit in the session's 60 minutes
MARK_EVERY_MS = 100  # agent audio between two marks: fewer messages, yet barge-in stays exact


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
    greeting: str = DEFAULT_GREETING
    dtmf: bool = True
    end_call_tool: bool = True
    max_call_seconds: float = 3300.0
    log_transcripts: bool = False
    twilio_auth_token: str = ""
    public_url: str = ""
    max_calls: int = 50
    warm_sessions: int = 0

    def __repr__(self) -> str:
        """Keep the secrets out of any log line or traceback that shows the config."""
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


def _public_url(raw: str) -> str:
    """Accept https://host or wss://host (with an optional path); keep it as https://host/path."""
    if not raw:
        return ""
    parts = urllib.parse.urlsplit(raw.rstrip("/"))
    scheme = {"https": "https", "wss": "https", "http": "http", "ws": "http"}.get(parts.scheme)
    if scheme is None or not parts.netloc or parts.query:
        raise ConfigError(f"PUBLIC_URL must look like https://relay.example.com, got {raw!r}")
    return urllib.parse.urlunsplit((scheme, parts.netloc, parts.path, "", ""))


def _switch(env: Mapping[str, str], name: str, default: bool) -> bool:
    """Read an on/off setting; anything unrecognised is refused rather than guessed."""
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be on or off (true/false, 1/0), got {raw!r}")


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
        # Unlike the other settings, an empty GREETING is meaningful: no greeting.
        greeting=env.get("GREETING", DEFAULT_GREETING).strip(),
        dtmf=_switch(env, "DTMF", True),
        end_call_tool=_switch(env, "END_CALL_TOOL", True),
        max_call_seconds=_number(env, "MAX_CALL_SECONDS", 3300, 1, 3600),
        log_transcripts=_switch(env, "LOG_TRANSCRIPTS", False),
        twilio_auth_token=env.get("TWILIO_AUTH_TOKEN", "").strip(),
        public_url=_public_url(env.get("PUBLIC_URL", "").strip()),
        max_calls=int(_number(env, "MAX_CALLS", 50, 1, 100000)),
        warm_sessions=int(_number(env, "WARM_SESSIONS", 0, 0, 100)),
    )


# 2. What the relay tells OpenAI ----------------------------------------------


END_CALL_TOOL = {
    "type": "function",
    "name": "end_call",
    "description": (
        "Hang up the phone call. Use it only after you have said goodbye, when the caller "
        "wants to end the call or the conversation is finished."
    ),
    "parameters": {
        "type": "object",
        "properties": {"reason": {"type": "string", "description": "Why the call is ending."}},
    },
}


def session_update(config: Config) -> dict[str, Any]:
    """The GA ``session.update``: mu-law both ways, server-side turn detection."""
    audio_input: dict[str, Any] = {
        "format": {"type": "audio/pcmu"},
        "turn_detection": {
            "type": "server_vad",
            "threshold": config.vad_threshold,
            "prefix_padding_ms": config.vad_prefix_padding_ms,
            "silence_duration_ms": config.vad_silence_duration_ms,
            # The server cancels the agent's answer when the caller speaks, so the
            # relay never sends response.cancel itself; it only clears the phone.
            "create_response": True,
            "interrupt_response": True,
        },
    }
    if config.log_transcripts:
        audio_input["transcription"] = {"model": TRANSCRIPTION_MODEL}
    session: dict[str, Any] = {
        "type": "realtime",
        "output_modalities": ["audio"],
        "instructions": config.instructions,
        "audio": {
            "input": audio_input,
            "output": {"format": {"type": "audio/pcmu"}, "voice": config.voice},
        },
    }
    if config.end_call_tool:
        session["tools"] = [END_CALL_TOOL]
        session["tool_choice"] = "auto"
    return {"type": "session.update", "session": session}


def respond(instructions: str) -> dict[str, Any]:
    """Ask the model to speak now, following these instructions for this one answer."""
    return {"type": "response.create", "response": {"instructions": instructions}}


def user_text(text: str) -> dict[str, Any]:
    """A text message from the caller's side of the conversation."""
    return {
        "type": "conversation.item.create",
        "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]},
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


class WarmSessions:
    """OpenAI sessions opened and configured ahead of calls, so a call skips the handshake.

    Off unless WARM_SESSIONS is set. An idle session costs no tokens (OpenAI bills
    responses, not connections), but each is a Realtime session held open, and it must
    leave a call room inside OpenAI's 60-minute limit: so they are replaced every few
    minutes, and as soon as a call takes one.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.ready: collections.deque[tuple[float, ClientConnection]] = collections.deque()
        self.taken = asyncio.Event()

    def take(self) -> ClientConnection | None:
        """A configured session that is still open, if there is one (keep_ready retires old ones)."""
        while self.ready:
            _, session = self.ready.popleft()
            self.taken.set()
            if session.state is State.OPEN:
                return session
        return None

    async def keep_ready(self) -> None:
        """Dial until WARM_SESSIONS are ready; replace old and taken ones; runs until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            while self.ready and loop.time() - self.ready[0][0] >= WARM_SESSION_MAX_AGE:
                await self.ready.popleft()[1].close()
            missing = self.config.warm_sessions - len(self.ready)
            opened = await asyncio.gather(*(self.open_one() for _ in range(missing)), return_exceptions=True)
            for result in opened:
                if isinstance(result, ClientConnection):
                    self.ready.append((loop.time(), result))
                else:
                    logger.warning("could not open a warm OpenAI session: %s", result)
            if len(self.ready) < self.config.warm_sessions:
                await asyncio.sleep(5)  # OpenAI is refusing or unreachable: do not hammer it
                continue
            self.taken.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(self.ready[0][0] + WARM_SESSION_MAX_AGE):
                    await self.taken.wait()  # until a call takes one, or the oldest grows too old

    async def open_one(self) -> ClientConnection:
        session = await connect_openai(self.config)
        await session.send(json.dumps(session_update(self.config)))
        return session

    async def close(self) -> None:
        sessions = [session for _, session in self.ready]
        self.ready.clear()
        await asyncio.gather(*(session.close() for session in sessions))


# 3. One phone call -------------------------------------------------------------


def decoded_size(payload: str) -> int:
    """Bytes of audio in a base64 payload, without decoding it."""
    return len(payload) * 3 // 4 - payload[-2:].count("=")


@dataclasses.dataclass(frozen=True)
class Interruption:
    """Where the caller cut the agent off: what they heard of an item, and what was sent."""

    item_id: str
    content_index: int
    heard_ms: int
    sent_ms: int


class Playback:
    """How much of the agent's audio the caller has actually heard.

    The relay sends Twilio a mark after every 100 ms or so of agent audio, and Twilio
    echoes a mark when playback reaches it. Each mark name is used once and remembered
    with the item and the byte offset it ends at, so an echo says exactly how far into
    that item the caller has heard (8 bytes of mu-law = 1 ms); between echoes, playback
    runs in real time, never past the next mark. After a ``clear``, Twilio echoes every
    pending mark at once; those names have been forgotten by then, so the late echoes
    credit nothing.
    """

    def __init__(self) -> None:
        self.pending: dict[str, tuple[str, int, int]] = {}  # mark -> (item, content, end byte)
        self.marks_sent = 0
        self.item_id = ""  # the item being streamed to Twilio now
        self.content_index = 0
        self.item_bytes = 0  # how much of it has been sent
        self.marked_bytes = 0  # how much of it is covered by a mark
        self.heard_item = ""  # the item of the last echoed mark
        self.heard_bytes = 0  # how far into it playback had got
        self.heard_at = 0.0  # and when
        self.muted: set[str] = set()  # items cut off by the caller: their late audio is dropped
        self.drained = asyncio.Event()  # set while nothing is queued on the phone
        self.drained.set()

    def sent(self, item_id: str, content_index: int, size: int) -> str | None:
        """Record a chunk sent to Twilio; return the name of a mark to send after it, if due."""
        if item_id != self.item_id:
            self.item_id, self.content_index, self.item_bytes, self.marked_bytes = item_id, content_index, 0, 0
        self.item_bytes += size
        self.drained.clear()
        if self.item_bytes - self.marked_bytes >= MARK_EVERY_MS * BYTES_PER_MS:
            return self.mark()
        return None

    def finish(self) -> str | None:
        """The item is complete: return a mark for its unmarked tail, if it has one."""
        return self.mark() if self.item_bytes > self.marked_bytes else None

    def mark(self) -> str:
        self.marks_sent += 1
        name = f"m{self.marks_sent}"
        self.pending[name] = (self.item_id, self.content_index, self.item_bytes)
        self.marked_bytes = self.item_bytes
        if len(self.pending) > MAX_PENDING_MARKS:
            del self.pending[next(iter(self.pending))]
        return name

    def played(self, name: str) -> None:
        """Twilio echoed a mark: playback reached it."""
        mark = self.pending.pop(name, None)
        if mark is None:
            return  # a late echo after a clear, or a mark we never sent
        self.heard_item, _, self.heard_bytes = mark
        self.heard_at = time.monotonic()
        if not self.pending and self.marked_bytes == self.item_bytes:
            self.drained.set()

    def interrupt(self) -> Interruption | None:
        """The caller spoke: mute the agent's current audio and say what was cut off, if anything."""
        self.muted = {item for item, _, _ in self.pending.values()} | {self.item_id}
        if self.pending:
            item_id, content_index, playable = next(iter(self.pending.values()))  # the oldest: playing now
        elif self.item_bytes > self.marked_bytes:
            item_id, content_index, playable = self.item_id, self.content_index, self.item_bytes
        else:
            return None  # everything sent has been played
        heard = 0
        if self.heard_item == item_id:
            since_echo = int((time.monotonic() - self.heard_at) * 1000) * BYTES_PER_MS
            heard = min(self.heard_bytes + since_echo, playable)
        sent = self.item_bytes if item_id == self.item_id else playable
        self.pending.clear()
        self.marked_bytes = self.item_bytes
        self.drained.set()
        return Interruption(item_id, content_index, heard // BYTES_PER_MS, sent // BYTES_PER_MS)


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
        self.sid_json = '""'  # the streamSid as a JSON string, for the hand-written messages
        self.call_sid = ""
        self.stream_started = asyncio.Event()
        # Caller audio that arrives while OpenAI is still connecting, sent once it is ready.
        self.early: collections.deque[str] = collections.deque(maxlen=EARLY_AUDIO_LIMIT)
        self.openai_ready = False
        self.held_audio = b""  # a caller frame waiting to be joined with the next one
        self.least_lag = float("inf")  # see falling_behind()
        self.session_configured = False
        self.greeted = False
        self.responding = False  # between response.created and response.done
        self.playback = Playback()
        self.hang_up_reason = ""  # set when the relay decides to end the call
        self.warned: set[str] = set()
        self.close_code = 1000  # 1011 when OpenAI failed; either way Twilio goes on with the TwiML
        self.log = CallLog(logger, {"call": self})
        self.stats = relay.stats

    @property
    def label(self) -> str:
        return f"call {self.number} {self.call_sid or '-'} {self.stream_sid or '-'}"

    async def run(self) -> None:
        """Run both pumps until either side ends, then close both sockets."""
        pumps = [
            asyncio.create_task(self.twilio_to_openai()),
            asyncio.create_task(self.openai_to_twilio()),
        ]
        timer = asyncio.create_task(self.watch_the_clock())
        try:
            done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is not None:
                    self.relay.count_error("relay_bug")
                    self.log.error("pump failed", exc_info=task.exception())
        finally:
            for task in (*pumps, timer):
                task.cancel()
            await asyncio.gather(*pumps, timer, return_exceptions=True)
            if self.openai is not None:
                await self.openai.close()
            await self.twilio.close(self.close_code)

    async def to_openai(self, event: dict[str, Any] | str) -> None:
        """Send an event to OpenAI, or keep it until the session is configured."""
        message = event if isinstance(event, str) else json.dumps(event)
        if self.openai_ready:
            await self.openai.send(message)  # type: ignore[union-attr]
            return
        if len(self.early) == self.early.maxlen:
            self.stats.dropped["early_audio_overflow"] += 1
            if "early audio overflow" not in self.warned:
                self.warned.add("early audio overflow")
                self.log.warning("OpenAI is slow to connect: dropping the oldest caller audio")
        self.early.append(message)

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
            if closed.sent is not None and closed.sent.code == 1009:
                self.relay.count_error("twilio_frame_too_big")
                self.log.warning("Twilio sent a frame over %d bytes: closing the call (1009)", MAX_FRAME_BYTES)
            else:
                self.relay.count_error("twilio_connection_lost")
                self.log.warning("Twilio connection lost: %s", closed)

    async def on_twilio_event(self, event: dict[str, Any]) -> bool:
        """Handle one Twilio event; return False when the stream is over."""
        kind = event.get("event")
        if kind == "media":
            await self.on_media(event)
        elif kind == "mark":
            self.on_mark(event)
        elif kind == "start":
            await self.on_start(event)
        elif kind == "dtmf":
            await self.on_dtmf(event)
        elif kind == "stop":
            self.log.info("the caller hung up (Twilio stopped the stream)")
            if self.held_audio:
                await self.send_caller_audio(binascii.b2a_base64(self.held_audio, newline=False).decode())
            return False
        elif kind == "connected":
            self.log.debug("Twilio connected")
        elif isinstance(kind, str):
            self.log.debug("ignoring unknown Twilio event %r", kind)
        else:
            self.bad_input("event without a valid 'event' field", repr(event)[:80])
        return True

    async def on_start(self, event: dict[str, Any]) -> None:
        start = event.get("start")
        if not isinstance(start, dict) or not isinstance(start.get("streamSid"), str):
            self.bad_input("start without start.streamSid", repr(event)[:120])
            return
        self.stream_sid = start["streamSid"]
        self.sid_json = json.dumps(self.stream_sid)
        self.call_sid = str(start.get("callSid", ""))
        parameters = start.get("customParameters")
        names = sorted(parameters) if isinstance(parameters, dict) else []
        self.log.info("stream started (custom parameters: %s)", ", ".join(names) or "none")
        self.stream_started.set()
        await self.greet()

    async def on_media(self, event: dict[str, Any]) -> None:
        if not self.stream_sid:
            self.bad_input("media before start", "dropped")
            return
        media = event.get("media")
        payload = media.get("payload") if isinstance(media, dict) else None
        if not isinstance(payload, str):
            self.bad_input("media without media.payload", repr(event)[:120])
            return
        try:
            audio = binascii.a2b_base64(payload, strict_mode=True)
        except binascii.Error:
            self.bad_input("media payload that is not base64", repr(payload[:40]))
            return
        self.stats.frames_in += 1
        self.stats.bytes_in += len(audio)
        if self.held_audio:
            audio, self.held_audio = self.held_audio + audio, b""
            payload = binascii.b2a_base64(audio, newline=False).decode()
        elif self.falling_behind(media):
            self.held_audio = audio  # sent with the next frame, which is most likely already here
            return
        await self.send_caller_audio(payload)

    async def send_caller_audio(self, payload: str) -> None:
        # The payload is valid base64, so it can go into the JSON as it is.
        await self.to_openai(f'{{"type":"input_audio_buffer.append","audio":"{payload}"}}')

    def falling_behind(self, media: dict[str, Any]) -> bool:
        """Is this frame being handled more than a frame later than Twilio's clock allows?

        Twilio stamps each frame with its position in the stream. The smallest gap seen
        between that and our clock is the network's delay; anything above it is the relay
        running late. Then two frames are joined into one message (40 ms of audio),
        halving the messages per call until the relay has caught up.
        """
        try:
            lag = time.monotonic() - float(media["timestamp"]) / 1000
        except (KeyError, TypeError, ValueError):
            return False
        if lag < self.least_lag:
            self.least_lag = lag
        return lag - self.least_lag > COALESCE_WHEN_LATE

    def on_mark(self, event: dict[str, Any]) -> None:
        mark = event.get("mark")
        name = mark.get("name") if isinstance(mark, dict) else None
        if not isinstance(name, str):
            self.bad_input("mark without mark.name", repr(event)[:120])
            return
        self.playback.played(name)

    async def on_dtmf(self, event: dict[str, Any]) -> None:
        """A keypad press becomes a line of text for the model, so it can run menus."""
        dtmf = event.get("dtmf")
        digit = dtmf.get("digit") if isinstance(dtmf, dict) else None
        if not isinstance(digit, str) or len(digit) != 1 or digit not in "0123456789*#ABCD":
            self.bad_input("dtmf without a valid dtmf.digit", repr(event)[:120])
            return
        if not self.config.dtmf:
            return
        self.log.info("the caller pressed a key")  # not which one: it may be a PIN
        await self.to_openai(user_text(f"The caller pressed {digit} on the keypad."))
        if not self.responding:  # otherwise the model sees it when it next answers
            await self.to_openai({"type": "response.create"})

    def bad_input(self, problem: str, detail: str) -> None:
        """Count bad input from Twilio, and warn once per kind of problem per call."""
        self.relay.count_error("bad_twilio_input")
        if problem not in self.warned:
            self.warned.add(problem)
            self.log.warning("ignoring bad input from Twilio: %s (%s)", problem, detail)

    # OpenAI -> Twilio

    async def openai_to_twilio(self) -> None:
        """Connect to OpenAI, configure the session, then forward the agent's audio to Twilio."""
        warm = self.relay.warm.take()
        if warm is not None:
            self.openai = warm
            self.log.info("OpenAI connected: using a warm session")
        else:
            started = time.monotonic()
            try:
                self.openai = await connect_openai(self.config)
            except InvalidStatus as refused:
                return self.openai_failed(f"refused the connection: HTTP {refused.response.status_code}")
            except TimeoutError:
                return self.openai_failed(f"did not answer within {self.config.openai_connect_timeout:g} s")
            except (OSError, InvalidHandshake) as error:
                return self.openai_failed(f"could not be reached: {error}")
            connect_seconds = time.monotonic() - started
            self.stats.openai_connect.observe(connect_seconds)
            self.log.info("OpenAI connected in %.0f ms", connect_seconds * 1000)
        try:
            if warm is None:
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
        elif kind == "input_audio_buffer.speech_started":
            await self.on_caller_speech()
        elif kind == "response.created":
            self.responding = True
        elif kind == "response.output_item.done":
            await self.on_output_item(event.get("item"))
        elif kind in ("response.output_audio.done", "response.done"):
            tail = self.playback.finish()
            if tail:
                await self.send_mark(tail)
            if kind == "response.done":
                self.responding = False
                if self.hang_up_reason:
                    await self.hang_up()
        elif kind == "error":
            await self.on_openai_error(event)
        elif kind == "session.updated":
            self.session_configured = True
            self.log.info("session configured: voice %s", self.config.voice)
            await self.greet()
        elif self.config.log_transcripts:
            self.log_transcript(kind, event)

    async def send_audio(self, event: dict[str, Any]) -> None:
        """Forward one chunk of the agent's voice, with a mark to learn when it has been heard."""
        delta, item_id = event.get("delta"), event.get("item_id")
        if not isinstance(delta, str) or not isinstance(item_id, str) or not self.stream_sid:
            return
        if item_id in self.playback.muted:
            self.stats.dropped["interrupted_answer"] += 1
            return  # the rest of an answer the caller has already interrupted
        size = decoded_size(delta)
        self.stats.frames_out += 1
        self.stats.bytes_out += size
        mark = self.playback.sent(item_id, event.get("content_index", 0), size)
        # Hand-written JSON: this runs for every chunk, and json.dumps of a dict costs more.
        await self.twilio.send(
            f'{{"event":"media","streamSid":{self.sid_json},"media":{{"payload":{json.dumps(delta)}}}}}'
        )
        if mark:
            await self.send_mark(mark)

    async def send_mark(self, name: str) -> None:
        await self.twilio.send(f'{{"event":"mark","streamSid":{self.sid_json},"mark":{{"name":"{name}"}}}}')

    async def on_caller_speech(self) -> None:
        """Barge-in: stop the phone playing the agent, and tell OpenAI what the caller heard."""
        cut = self.playback.interrupt()
        if cut is None:
            return  # nothing is playing: there is nothing to stop
        await self.twilio.send(json.dumps({"event": "clear", "streamSid": self.stream_sid}))
        await self.to_openai(
            {
                "type": "conversation.item.truncate",
                "item_id": cut.item_id,
                "content_index": cut.content_index,
                "audio_end_ms": cut.heard_ms,
            }
        )
        self.stats.barge_ins += 1
        self.log.info("the caller interrupted: heard %d ms of %d ms sent", cut.heard_ms, cut.sent_ms)

    async def greet(self) -> None:
        """Have the agent speak first, once the session is configured and the stream has started."""
        if self.greeted or not self.config.greeting or not (self.session_configured and self.stream_sid):
            return
        self.greeted = True
        await self.to_openai(respond(f"Greet the caller by saying exactly this: {self.config.greeting}"))

    async def on_output_item(self, item: Any) -> None:
        """The model called ``end_call``: confirm it, and hang up once this answer is over."""
        if not isinstance(item, dict) or item.get("type") != "function_call" or item.get("name") != "end_call":
            return
        try:
            reason = str(json.loads(item.get("arguments") or "{}").get("reason") or "no reason given")
        except (ValueError, AttributeError):
            reason = "no reason given"
        await self.to_openai(
            {
                "type": "conversation.item.create",
                "item": {"type": "function_call_output", "call_id": item.get("call_id"), "output": '{"ok": true}'},
            }
        )
        self.hang_up_reason = f"the agent ended the call ({reason})"

    async def watch_the_clock(self) -> None:
        """Drop sockets that never start a stream; end calls before OpenAI's 60-minute limit."""
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await self.stream_started.wait()
        except TimeoutError:
            self.relay.count_error("no_start")
            self.log.warning("no 'start' from Twilio within %g s: closing the socket", START_TIMEOUT)
            await self.twilio.close(1008, "no start event")
            return
        await asyncio.sleep(self.config.max_call_seconds)
        self.hang_up_reason = f"the call reached MAX_CALL_SECONDS ({self.config.max_call_seconds:g} s)"
        self.log.info("time limit reached: asking the agent to say goodbye")
        await self.to_openai(respond(TIME_LIMIT_GOODBYE))
        await asyncio.sleep(GOODBYE_PLAYBACK_LIMIT)  # no goodbye came: hang up anyway
        await self.hang_up()

    async def hang_up(self) -> None:
        """Let the goodbye finish playing, then close Twilio's socket.

        Twilio then runs the TwiML after ``<Connect>`` (README puts ``<Hangup/>`` there).
        """
        try:
            async with asyncio.timeout(GOODBYE_PLAYBACK_LIMIT):
                await self.playback.drained.wait()
        except TimeoutError:
            self.log.warning("the goodbye is still playing after %g s", GOODBYE_PLAYBACK_LIMIT)
        self.log.info("hanging up: %s", self.hang_up_reason)
        await self.twilio.close(1000, "call ended")

    async def on_openai_error(self, event: dict[str, Any]) -> None:
        """Errors mean OpenAI ignored something we sent (a bad field keeps the old config)."""
        error = event.get("error") if isinstance(event.get("error"), dict) else {}
        self.relay.count_error("openai_error")
        self.log.error(
            "OpenAI error: type=%s code=%s message=%s param=%s",
            error.get("type"), error.get("code"), error.get("message"), error.get("param"),
        )
        if error.get("code") == "session_expired":
            self.hang_up_reason = "the OpenAI session expired"
            await self.hang_up()

    def log_transcript(self, kind: str, event: dict[str, Any]) -> None:
        if kind == "conversation.item.input_audio_transcription.completed":
            self.log.info("caller: %s", event.get("transcript", ""))
        elif kind == "response.output_audio_transcript.done":
            self.log.info("agent: %s", event.get("transcript", ""))


# 4. The relay: HTTP routes and shared bookkeeping --------------------------------


class Histogram:
    """A Prometheus histogram: counts per upper bound, a sum and a count."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[index] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        buckets = [f'{name}_bucket{{le="{bound:g}"}} {n}' for bound, n in zip(self.bounds, self.counts, strict=True)]
        return [*buckets, f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}",
                f"{name}_count {self.count}"]


@dataclasses.dataclass
class Stats:
    """What the relay has done since it started: shown by /health and /metrics."""

    started: float = dataclasses.field(default_factory=time.monotonic)
    total: int = 0
    barge_ins: int = 0
    frames_in: int = 0  # caller audio frames forwarded to OpenAI
    bytes_in: int = 0
    frames_out: int = 0  # agent audio chunks forwarded to Twilio
    bytes_out: int = 0
    errors: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    refused: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    dropped: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    call_seconds: Histogram = dataclasses.field(
        default_factory=lambda: Histogram((10, 30, 60, 120, 300, 600, 1800, 3600))
    )
    openai_connect: Histogram = dataclasses.field(
        default_factory=lambda: Histogram((0.1, 0.25, 0.5, 1, 2.5, 5, 10))
    )


class Relay:
    """Accepts Twilio's WebSockets, answers plain HTTP routes, and counts what happens."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stats = Stats()
        self.calls: set[Call] = set()
        self.warm = WarmSessions(config)

    def count_error(self, kind: str) -> None:
        self.stats.errors[kind] += 1

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Answer the plain HTTP routes; check every other request before it becomes a call.

        Everything here happens before any OpenAI connection is opened, so a refused
        request costs nothing.
        """
        path = urllib.parse.urlsplit(request.path).path
        if path == "/health":
            return json_response(self.health(), head=request.method == "HEAD")
        if path == "/metrics":
            return text_response(self.metrics(), "text/plain; version=0.0.4; charset=utf-8")
        websocket = header(request, "Upgrade").lower() == "websocket"
        if path != "/twiml" and not websocket:
            return connection.respond(
                426,
                "This is a Twilio Media Streams endpoint: point <Stream url=\"wss://...\"> "
                "at it. TwiML: /twiml  Health check: /health\n",
            )
        if self.config.twilio_auth_token and not self.signed_by_twilio(request, websocket):
            return self.refuse(connection, request, "signature", 403, "Invalid Twilio signature.\n")
        if path == "/twiml" and not websocket:
            return text_response(self.twiml(request), "text/xml")
        if len(self.calls) >= self.config.max_calls:
            response = self.refuse(connection, request, "capacity", 503, "Too many calls; try again soon.\n")
            response.headers["Retry-After"] = "5"
            return response
        return None

    def refuse(self, connection: ServerConnection, request: Request, reason: str, status: int, text: str) -> Response:
        self.stats.refused[reason] += 1
        logger.warning("refused %s %s from %s: %s", request.method, urllib.parse.urlsplit(request.path).path,
                       remote_address(connection), text.strip())
        return connection.respond(status, text)

    def public_origin(self, request: Request, websocket: bool) -> str:
        """Where Twilio reaches us: PUBLIC_URL, or rebuilt from the Host and the proxy's headers.

        TLS usually ends at the platform's edge (Heroku, Render), which says so in
        X-Forwarded-Proto; the relay itself serves plain HTTP and WebSocket.
        """
        if self.config.public_url:
            origin = self.config.public_url
        else:
            secure = header(request, "X-Forwarded-Proto").split(",")[0].strip().lower() == "https"
            origin = f"{'https' if secure else 'http'}://{header(request, 'Host')}"
        return origin.replace("http", "ws", 1) if websocket else origin  # https -> wss

    def signed_by_twilio(self, request: Request, websocket: bool) -> bool:
        """Check X-Twilio-Signature: base64 HMAC-SHA1 of the URL, keyed by the auth token.

        Like Twilio's own validator, accept the URL with and without its default port.
        """
        signature = header(request, "X-Twilio-Signature")
        if not signature:
            return False
        key = self.config.twilio_auth_token.encode()
        given = signature.encode("utf-8", "replace")  # headers may hold any bytes
        for url in url_forms(self.public_origin(request, websocket) + request.path):
            digest = hmac.new(key, url.encode("utf-8", "replace"), hashlib.sha1).digest()
            if hmac.compare_digest(base64.b64encode(digest), given):
                return True
        return False

    def twiml(self, request: Request) -> str:
        """TwiML that connects a call to this relay, for the phone number's webhook (HTTP GET)."""
        stream_url = self.public_origin(request, websocket=True) + "/media-stream"
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Response>\n'
            f"  <Connect><Stream url={xml.sax.saxutils.quoteattr(stream_url)} /></Connect>\n"
            f"  <Say>{xml.sax.saxutils.escape(FALLBACK_MESSAGE)}</Say>\n"
            "  <Hangup/>\n</Response>\n"
        )

    def health(self) -> dict[str, Any]:
        now = datetime.datetime.now(datetime.timezone.utc)
        return {
            "status": "healthy",
            "uptime": f"{time.monotonic() - self.stats.started:.0f}s",
            "timestamp": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "connections": {"active": len(self.calls), "total": self.stats.total},
            "errors": sum(self.stats.errors.values()),
            "openai_configured": True,
        }

    def metrics(self) -> str:
        """The Prometheus text format, written by hand: it is a few lines of text."""
        stats = self.stats
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])

        def labelled(name: str, label: str, counts: Mapping[str, int]) -> list[str]:
            return [f'{name}{{{label}="{key}"}} {value}' for key, value in sorted(counts.items())]

        metric("relay_calls_active", "gauge", "Calls in progress.", [f"relay_calls_active {len(self.calls)}"])
        metric("relay_calls_total", "counter", "Calls accepted.", [f"relay_calls_total {stats.total}"])
        metric("relay_calls_refused_total", "counter", "Handshakes refused, by reason.",
               labelled("relay_calls_refused_total", "reason", stats.refused))
        metric("relay_call_duration_seconds", "histogram", "Length of finished calls.",
               stats.call_seconds.lines("relay_call_duration_seconds"))
        metric("relay_openai_connect_seconds", "histogram", "Time to open the OpenAI WebSocket.",
               stats.openai_connect.lines("relay_openai_connect_seconds"))
        metric("relay_errors_total", "counter", "Errors, by kind.", labelled("relay_errors_total", "kind", stats.errors))
        metric("relay_audio_frames_total", "counter", "Audio messages forwarded, by direction.",
               labelled("relay_audio_frames_total", "direction",
                        {"caller_to_openai": stats.frames_in, "openai_to_caller": stats.frames_out}))
        metric("relay_audio_bytes_total", "counter", "Audio bytes (mu-law) forwarded, by direction.",
               labelled("relay_audio_bytes_total", "direction",
                        {"caller_to_openai": stats.bytes_in, "openai_to_caller": stats.bytes_out}))
        metric("relay_barge_ins_total", "counter", "Times the caller interrupted the agent.",
               [f"relay_barge_ins_total {stats.barge_ins}"])
        metric("relay_frames_dropped_total", "counter", "Audio messages dropped, by reason.",
               labelled("relay_frames_dropped_total", "reason", stats.dropped))
        return "\n".join(lines) + "\n"

    async def handle(self, twilio: ServerConnection) -> None:
        """Carry one call from accept to hang-up."""
        self.stats.total += 1
        call = Call(self, twilio, self.stats.total)
        self.calls.add(call)
        call.log.info("Twilio connected from %s (%d active)", remote_address(twilio), len(self.calls))
        started = time.monotonic()
        try:
            await call.run()
        finally:
            self.calls.discard(call)
            self.stats.call_seconds.observe(time.monotonic() - started)
            call.log.info("call ended (%d active)", len(self.calls))


def header(request: Request, name: str) -> str:
    """The first value of a header, or "": repeated headers must not break the handshake."""
    values = request.headers.get_all(name)
    return values[0] if values else ""


def url_forms(url: str) -> set[str]:
    """The URL as given, with its default port spelled out, and without it."""
    parts = urllib.parse.urlsplit(url)
    default = {"https": 443, "wss": 443, "http": 80, "ws": 80}.get(parts.scheme)
    try:
        port = parts.port
    except ValueError:
        return {url}
    host = parts.netloc.rsplit(":", 1)[0] if port is not None else parts.netloc
    forms = {url}
    if port in (None, default) and default is not None:
        forms.add(urllib.parse.urlunsplit(parts._replace(netloc=host)))
        forms.add(urllib.parse.urlunsplit(parts._replace(netloc=f"{host}:{default}")))
    return forms


def text_response(body: str, content_type: str) -> Response:
    data = body.encode()
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
            ("Connection", "close"),
        ]
    )
    return Response(200, "OK", headers, data)


def json_response(body: dict[str, Any], head: bool = False) -> Response:
    response = text_response(json.dumps(body), "application/json")
    if head:
        response = dataclasses.replace(response, body=b"")
    return response


def remote_address(connection: ServerConnection) -> str:
    """Who is connecting: the first X-Forwarded-For address behind a proxy."""
    forwarded = header(connection.request, "X-Forwarded-For") if connection.request else ""
    if forwarded:
        return forwarded.split(",")[0].strip()
    address = connection.remote_address
    return str(address[0]) if address else "unknown"


@contextlib.asynccontextmanager
async def serve_calls(relay: Relay, host: str, port: int) -> AsyncIterator[Server]:
    """The WebSocket server Twilio connects to, with the limits a phone call needs."""
    async with serve(
        relay.handle,
        host,
        port,
        process_request=relay.process_request,
        compression=None,  # base64 audio barely compresses; deflate only costs CPU
        close_timeout=CLOSE_TIMEOUT,
        max_size=MAX_FRAME_BYTES,  # a larger frame closes that call with 1009
    ) as server:
        warming = asyncio.create_task(relay.warm.keep_ready()) if relay.config.warm_sessions else None
        try:
            yield server
        finally:
            if warming is not None:
                warming.cancel()
                await asyncio.gather(warming, return_exceptions=True)
                await relay.warm.close()


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
        relay.config.drain_seconds, len(relay.calls),
    )
    try:
        async with asyncio.timeout(relay.config.drain_seconds):
            await server.wait_closed()
    except TimeoutError:
        remaining = list(server.connections)
        logger.info("closing %d call(s) that are still running", len(remaining))
        await asyncio.gather(*(c.close(1012, "relay restarting") for c in remaining))


def keep_read_buffers_off_mmap() -> None:
    """Stop every received message from costing three extra system calls.

    asyncio reads each socket into a fresh 256 KiB buffer. glibc hands out blocks that
    large with mmap, then shrinks (mremap) and frees (munmap) them: three system calls
    per WebSocket message, about a third of the relay's CPU under load (seen with
    strace). Raising glibc's threshold above 256 KiB keeps these buffers on the heap.
    Other C libraries (macOS, musl) are left alone.
    """
    m_mmap_threshold = -3  # from glibc's <malloc.h>
    try:
        ctypes.CDLL(None).mallopt(m_mmap_threshold, 512 * 1024)
    except (OSError, AttributeError):
        pass


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
    keep_read_buffers_off_mmap()
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

    if not config.twilio_auth_token:
        logger.warning(
            "TWILIO_AUTH_TOKEN is not set: anyone who knows this relay's URL can open calls on "
            "your OpenAI account. Set it to check Twilio's signature on every call."
        )
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
