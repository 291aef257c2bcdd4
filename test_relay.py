"""Tests for relay.py over real loopback sockets.

Two fakes stand in for the outside world:

* ``FakeOpenAI``: an in-process Realtime server speaking GA events. It checks
  the Bearer key, records everything the relay sends, and can refuse or delay
  the handshake, drop the session, echo audio, or send any event a test asks.
* ``FakeTwilio``: a Media Streams client. It sends ``connected``, ``start``,
  ``media`` every 20 ms and ``stop``, and plays received audio on a real-time
  clock (8 bytes per ms), echoing each mark when playback reaches it and every
  pending mark at once after a ``clear``, as Twilio does.

Run with ``python -m pytest -q``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import hmac
import itertools
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
import xml.etree.ElementTree as ElementTree
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any

import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types.realtime import RealtimeClientEvent
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

import relay

API_KEY = "sk-test-key-0123456789"
FRAME = 160  # bytes of mu-law in one 20 ms Twilio frame
HERE = os.path.dirname(os.path.abspath(__file__))


def run(scenario: Callable[[], Awaitable[None]], limit: float = 30) -> None:
    """Run one async test scenario, failing instead of hanging if it gets stuck."""

    async def bounded() -> None:
        async with asyncio.timeout(limit):
            await scenario()

    asyncio.run(bounded())


def pcm(payloads: list[str]) -> bytes:
    """The audio carried by these base64 payloads, in order."""
    return b"".join(base64.b64decode(payload) for payload in payloads)


def audio(call: int, index: int, size: int = FRAME) -> str:
    """A distinct, recognisable base64 payload for frame ``index`` of call ``call``."""
    head = f"c{call}f{index}:".encode()
    return base64.b64encode(head + bytes((index + i) % 256 for i in range(size - len(head)))).decode()


async def eventually(check: Callable[[], bool], limit: float = 5.0) -> None:
    """Wait until ``check()`` holds (polling), or fail the test."""
    async with asyncio.timeout(limit):
        while not check():
            await asyncio.sleep(0.01)


# The fake OpenAI Realtime server --------------------------------------------------

CLIENT_EVENT = pydantic.TypeAdapter(RealtimeClientEvent)
SUMMARY_TEXT = "The caller asked about an order. Request: where order A-1 is."
USAGE = {"total_tokens": 120, "input_tokens": 90, "output_tokens": 30,
         "input_token_details": {"text_tokens": 60, "audio_tokens": 30, "cached_tokens": 20,
                                 "cached_tokens_details": {"text_tokens": 12, "audio_tokens": 8}},
         "output_token_details": {"text_tokens": 10, "audio_tokens": 20}}


def unknown_fields(value: Any, path: str = "event") -> list[str]:
    """Fields the official SDK's types do not know, anywhere in a parsed client event."""
    if isinstance(value, pydantic.BaseModel):
        found = [f"{path}.{name}" for name in value.model_extra or {}]
        for name in type(value).model_fields:
            found += unknown_fields(getattr(value, name), f"{path}.{name}")
        return found
    if isinstance(value, list):
        return [field for i, item in enumerate(value) for field in unknown_fields(item, f"{path}[{i}]")]
    return []


def sdk_problems(event: dict[str, Any]) -> list[str]:
    """Why openai-python's RealtimeClientEvent union would not take this event as it is."""
    try:
        return unknown_fields(CLIENT_EVENT.validate_python(event))
    except pydantic.ValidationError as error:
        return [f"{event.get('type')}: {error}"]


class FakeSession:
    """One Realtime session as the fake server sees it."""

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        self.received: list[dict[str, Any]] = []
        self.headers = ws.request.headers if ws.request else None
        self.tasks: list[asyncio.Task[None]] = []
        self.active = ""  # the response in progress, as the server has announced it
        self.refused: list[str] = []  # the event_ids of requests refused because one was active
        self.responses = 0
        self.usages: list[Any] = []  # the usage of each response.done sent, None where it had none

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in self.received if event.get("type") == kind]

    def appended(self) -> list[str]:
        return [event["audio"] for event in self.of_type("input_audio_buffer.append")]

    def caller_audio(self) -> bytes:
        """All caller audio received, in order (the relay may join frames when it runs late)."""
        return pcm(self.appended())

    async def send(self, event: dict[str, Any]) -> None:
        """Send a server event; the session keeps track of its active response, as OpenAI does."""
        if event["type"] == "response.created":
            self.active = event["response"]["id"]
        elif event["type"] == "response.done":
            self.active = ""
            self.usages.append(event["response"].get("usage"))
        await self.ws.send(json.dumps(event))

    def close_slowly(self) -> None:
        """Send a 1011 close frame but read nothing more for now, as over a slow network:
        the relay sees the session closing while it still has things to send. ``resume()`` ends it."""
        self.ws.transport.pause_reading()
        self.ws.protocol.send_close(1011, "server trouble")
        self.ws.send_data()

    def resume(self) -> None:
        self.ws.transport.resume_reading()

    async def say(self, item_id: str, chunks: list[str], response_id: str = "resp_1") -> None:
        """Stream assistant audio the way the GA API does."""
        for chunk in chunks:
            await self.send(
                {
                    "type": "response.output_audio.delta",
                    "response_id": response_id,
                    "item_id": item_id,
                    "output_index": 0,
                    "content_index": 0,
                    "delta": chunk,
                }
            )

    def next_response_id(self) -> str:
        self.responses += 1
        return f"resp_auto_{self.responses}"

    async def begin(self, response_id: str = "") -> str:
        """Start a response (``response.created``), as for a request or for server VAD."""
        response_id = response_id or self.next_response_id()
        await self.send({"type": "response.created",
                         "response": {"id": response_id, "object": "realtime.response", "status": "in_progress"}})
        return response_id

    async def finish(self, response_id: str = "", status: str = "completed", output: list[Any] | None = None,
                     metadata: Any = None) -> None:
        """End the active response (``response.done``), with its usage and the request's metadata."""
        await self.send({"type": "response.done", "response": {
            "id": response_id or self.active, "object": "realtime.response", "status": status,
            "output": output or [], "usage": USAGE, "metadata": metadata}})

    async def refuse(self, request: dict[str, Any]) -> None:
        """The error the GA server gives a response.create while a response is active."""
        await self.send({"type": "error", "event_id": f"event_{len(self.received)}", "error": {
            "type": "invalid_request_error", "code": "conversation_already_has_active_response",
            "message": f"Conversation already has an active response in progress: {self.active}. "
                       "Wait until the response is finished before creating a new one.",
            "param": None, "event_id": request.get("event_id")}})
        self.refused.append(request.get("event_id"))

    async def answer(self, request: dict[str, Any]) -> None:
        """What the GA server does for an accepted response.create: a response, start to end.

        A text-only request gets a text message, as an out-of-band summary does.
        """
        options = request.get("response", {})
        output = []
        if options.get("output_modalities") == ["text"]:
            output = [{"type": "message", "role": "assistant", "status": "completed",
                       "content": [{"type": "output_text", "text": SUMMARY_TEXT}]}]
        await self.begin()
        await self.finish(output=output, metadata=options.get("metadata"))


Responder = Callable[[FakeSession, dict[str, Any]], Awaitable[None]]


async def begin_only(session: FakeSession, request: dict[str, Any]) -> None:
    """A responder whose responses stay active until the test ends them (``response_done``)."""
    await session.begin()


class FakeOpenAI:
    """An in-process OpenAI Realtime server (GA interface) on a loopback port.

    By default it answers as the GA server does: it confirms each item the client adds
    (``conversation.item.added`` then ``.done``, with the client's id), answers each
    accepted ``response.create`` with ``response.created`` ... ``response.done``, refuses
    one while a response is active (``conversation_already_has_active_response``, naming
    the client's ``event_id``), and confirms truncations. ``respond`` scripts responses
    instead. Every client event is checked against openai-python's types.
    """

    def __init__(self) -> None:
        self.sessions: list[FakeSession] = []
        self.refuse_status: int | None = None
        self.handshake_delay = 0.0
        self.handshakes = 0  # attempts, refused ones included
        self.echo_audio = False  # answer each append with the same audio as a delta
        self.configure = asyncio.Event()  # cleared: hold back session.updated until set
        self.configure.set()
        self.on_event: Callable[[FakeSession, dict[str, Any]], Awaitable[None]] | None = None
        self.respond: Responder = FakeSession.answer  # what an accepted response.create gets
        self.sdk_problems: list[str] = []

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[FakeOpenAI]:
        async with serve(self.handle, "127.0.0.1", 0, process_request=self.check) as server:
            self.port = server.sockets[0].getsockname()[1]
            yield self
        assert not self.sdk_problems, self.sdk_problems  # every event the relay sent is one the SDK knows

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def check(self, connection: ServerConnection, request: Request) -> Response | None:
        self.handshakes += 1
        if self.handshake_delay:
            await asyncio.sleep(self.handshake_delay)
        if self.refuse_status:
            return connection.respond(self.refuse_status, "refused by the fake\n")
        if request.headers.get("Authorization") != f"Bearer {API_KEY}":
            return connection.respond(401, "bad key\n")
        if not request.path.startswith("/v1/realtime?model="):
            return connection.respond(404, "no such path\n")
        return None

    async def handle(self, ws: ServerConnection) -> None:
        session = FakeSession(ws)
        self.sessions.append(session)
        await session.send({"type": "session.created", "session": {"type": "realtime"}})
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                event = json.loads(message)
                session.received.append(event)
                self.sdk_problems += sdk_problems(event)
                await self.react(session, event)

    async def react(self, session: FakeSession, event: dict[str, Any]) -> None:
        """Answer the relay as the real API would."""
        kind = event["type"]
        if kind == "session.update":
            session.tasks.append(asyncio.create_task(self.confirm(session, event)))
        elif kind == "input_audio_buffer.append" and self.echo_audio:
            await session.say(f"item_{len(session.received)}", [event["audio"]])
        elif kind == "conversation.item.create":
            item = {"id": f"item_{len(session.received)}", **event["item"], "status": "completed"}
            for confirmation in ("conversation.item.added", "conversation.item.done"):
                await session.send({"type": confirmation, "previous_item_id": None, "item": item})
        elif kind == "conversation.item.truncate":
            await session.send({"type": "conversation.item.truncated", "item_id": event["item_id"],
                                "content_index": event["content_index"], "audio_end_ms": event["audio_end_ms"]})
        elif kind == "response.cancel" and session.active:
            await session.finish(status="cancelled")
        elif kind == "response.cancel":
            await session.send({"type": "error", "event_id": f"event_{len(session.received)}", "error": {
                "type": "invalid_request_error", "code": "response_cancel_not_active",
                "message": "Cancellation failed: no active response found", "param": None,
                "event_id": event.get("event_id")}})
        elif kind == "response.create" and session.active:
            await session.refuse(event)
        elif kind == "response.create":
            await self.respond(session, event)
        if self.on_event is not None:
            await self.on_event(session, event)

    async def confirm(self, session: FakeSession, update: dict[str, Any]) -> None:
        await self.configure.wait()
        with contextlib.suppress(ConnectionClosed):
            await session.send({"type": "session.updated", "session": update["session"]})

    async def session(self, index: int = 0) -> FakeSession:
        await eventually(lambda: len(self.sessions) > index)
        return self.sessions[index]


# The fake Twilio client --------------------------------------------------------------


class FakeTwilio:
    """A Twilio Media Streams client with a real-time playback clock."""

    def __init__(self, url: str, number: int = 1) -> None:
        self.url = url
        self.number = number
        self.stream_sid = f"MZ{number:032d}"
        self.call_sid = f"CA{number:032d}"
        self.received: list[dict[str, Any]] = []
        self.media: list[str] = []
        self.marks_echoed: list[str] = []
        self.clears = 0
        # The phone's playback queue: ("audio", nbytes) and ("mark", name) in arrival order.
        self.queue: collections.deque[tuple[str, Any]] = collections.deque()
        self.queued = asyncio.Event()
        self.played_bytes = 0  # all audio played since the call began
        self.chunk_started = 0.0  # when the chunk now playing began
        self.chunk_bytes = 0  # size of the chunk now playing
        self.closed = asyncio.Event()
        self.ws: ClientConnection | None = None
        self.chunk = 0
        self.clear_echo_delay = 0.0  # hold back the echoes a clear causes, to test late ones
        self.late_echoes: asyncio.Task[None] | None = None
        self.played_at_clear: list[int] = []

    async def open(self, start: bool = True, headers: dict[str, str] | None = None, **start_extra: Any) -> FakeTwilio:
        self.ws = await connect(self.url, compression=None, additional_headers=headers)
        self.opened_at = time.monotonic()
        self.reader = asyncio.create_task(self.read())
        self.player = asyncio.create_task(self.play())
        await self.send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        if start:
            await self.start(**start_extra)
        return self

    async def start(self, **extra: Any) -> None:
        start = {
            "accountSid": "AC" + "0" * 32,
            "streamSid": self.stream_sid,
            "callSid": self.call_sid,
            "tracks": ["inbound"],
            "customParameters": {"caller": "+15550001111"},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        }
        start.update(extra)
        await self.send({"event": "start", "sequenceNumber": "1", "start": start, "streamSid": self.stream_sid})

    async def send(self, event: dict[str, Any] | str | bytes) -> None:
        assert self.ws is not None
        await self.ws.send(event if isinstance(event, (str, bytes)) else json.dumps(event))

    async def send_media(self, payloads: list[str], pace: float = 0.02) -> None:
        """Send caller audio, one frame every ``pace`` seconds on a steady clock, as Twilio does.

        Each frame's timestamp is its time in the stream, as Twilio stamps it.
        """
        due = time.monotonic()
        for payload in payloads:
            self.chunk += 1
            await self.send(
                {
                    "event": "media",
                    "sequenceNumber": str(self.chunk + 1),
                    "media": {
                        "track": "inbound",
                        "chunk": str(self.chunk),
                        "timestamp": str(int((time.monotonic() - self.opened_at) * 1000)),
                        "payload": payload,
                    },
                    "streamSid": self.stream_sid,
                }
            )
            if pace:
                due += pace
                await asyncio.sleep(due - time.monotonic())

    async def stop(self) -> None:
        await self.send({"event": "stop", "sequenceNumber": "999", "streamSid": self.stream_sid,
                         "stop": {"accountSid": "AC" + "0" * 32, "callSid": self.call_sid}})

    async def read(self) -> None:
        assert self.ws is not None
        try:
            async for message in self.ws:
                event = json.loads(message)
                self.received.append(event)
                assert event.get("streamSid") == self.stream_sid, event
                if event["event"] == "media":
                    payload = event["media"]["payload"]
                    self.media.append(payload)
                    self.queue.append(("audio", len(base64.b64decode(payload))))
                    self.queued.set()
                elif event["event"] == "mark":
                    assert event["mark"]["name"], event
                    self.queue.append(("mark", event["mark"]["name"]))
                    self.queued.set()
                elif event["event"] == "clear":
                    self.on_clear()
                else:
                    raise AssertionError(f"Twilio does not accept {event!r}")
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()

    def on_clear(self) -> None:
        """Twilio drops queued audio and echoes every pending mark at once."""
        self.clears += 1
        self.played_bytes += self.playing_now()
        self.played_at_clear.append(self.played_bytes)
        self.chunk_bytes = 0
        pending = [value for kind, value in self.queue if kind == "mark"]
        self.queue.clear()
        self.player.cancel()
        self.player = asyncio.create_task(self.play())
        self.late_echoes = asyncio.create_task(self.echo_all(pending))

    async def echo_all(self, names: list[str]) -> None:
        await asyncio.sleep(self.clear_echo_delay)
        for name in names:
            await self.echo(name)

    def playing_now(self) -> int:
        """Bytes of the current chunk already played, by the real-time clock."""
        if not self.chunk_bytes:
            return 0
        return min(self.chunk_bytes, int((time.monotonic() - self.chunk_started) * 8000))

    async def echo(self, name: str) -> None:
        self.marks_echoed.append(name)
        with contextlib.suppress(ConnectionClosed):
            await self.send({"event": "mark", "sequenceNumber": "0", "streamSid": self.stream_sid,
                             "mark": {"name": name}})

    async def play(self) -> None:
        """Drain queued audio at 8 bytes per ms; echo marks as playback reaches them.

        Chunks are scheduled on absolute times, so playback keeps real time however
        late each sleep wakes up, as a phone's does.
        """
        ends = time.monotonic()
        while True:
            if not self.queue:
                while not self.queue:
                    self.queued.clear()
                    await self.queued.wait()
                ends = max(ends, time.monotonic())  # after a gap, playback resumes now
            kind, value = self.queue.popleft()
            if kind == "audio":
                self.chunk_started, self.chunk_bytes = ends, value
                ends += value / 8000
                await asyncio.sleep(ends - time.monotonic())
                self.played_bytes += value
                self.chunk_bytes = 0
            else:
                await self.echo(value)

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        await self.shutdown()

    async def shutdown(self) -> None:
        tasks = [task for task in (self.reader, self.player, self.late_echoes) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def close_code(self) -> int | None:
        assert self.ws is not None
        return self.ws.close_code


# Running the relay ---------------------------------------------------------------------


BUILT_IN_TOOLS = {name: relay.TOOLS[name] for name in ("end_call", "transfer_call")}


def relay_config(fake: FakeOpenAI, **env: str) -> relay.Config:
    base = {"OPENAI_API_KEY": API_KEY, "OPENAI_BASE_URL": fake.base_url, "OPENAI_CONNECT_TIMEOUT": "2"}
    return relay.load_config({**base, **env})


@contextlib.asynccontextmanager
async def running_relay(fake: FakeOpenAI, tools: Mapping[str, relay.Tool] | None = None,
                        **env: str) -> AsyncIterator[tuple[relay.Relay, str]]:
    """The real relay, in process, on a loopback port; yields it and its WebSocket URL.

    Its tools are the relay's own two, or ``tools``, and its AGENTS table is empty: never
    whatever a user has added to relay.py, so the suite passes however the agent is customised.
    """
    the_relay = relay.Relay(relay_config(fake, **env), BUILT_IN_TOOLS if tools is None else tools, {})
    async with relay.serve_calls(the_relay, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        the_relay.port = port  # type: ignore[attr-defined]
        yield the_relay, f"ws://127.0.0.1:{port}/media-stream"


async def http_get(port: int, path: str, method: str = "GET", headers: str = "") -> tuple[int, dict[str, str], bytes]:
    """A minimal HTTP/1.1 client, so the tests need nothing beyond the standard library."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    fields = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if line)}
    if method == "HEAD":
        body = b""
    elif "content-length" in fields:  # Chromium's DevTools keeps the connection open after it
        body = await reader.readexactly(int(fields["content-length"]))
    else:
        body = await reader.read()
    writer.close()
    return status, fields, body


def configured(call: relay.Call) -> bool:
    """The call's OpenAI session has confirmed every session.update it was sent."""
    return call.link.session is not None and call.link.session.configured


async def ready_status(port: int) -> int:
    return (await http_get(port, "/ready"))[0]


async def eventually_async(probe: Callable[[], Awaitable[Any]], wanted: Any, limit: float = 5.0) -> None:
    """Wait until ``await probe()`` gives ``wanted`` (polling), or fail the test."""
    async with asyncio.timeout(limit):
        while await probe() != wanted:
            await asyncio.sleep(0.02)


async def health(the_relay: relay.Relay) -> dict[str, Any]:
    status, _, body = await http_get(the_relay.port, "/health")  # type: ignore[attr-defined]
    assert status == 200
    return json.loads(body)


# Configuration ----------------------------------------------------------------------------


def test_config_defaults_and_realtime_url() -> None:
    config = relay.load_config({"OPENAI_API_KEY": API_KEY})
    assert config.openai_url == "wss://api.openai.com/v1/realtime?model=gpt-realtime-2.1"
    assert (config.host, config.port, config.voice) == ("0.0.0.0", 8080, "alloy")
    assert (config.vad_threshold, config.vad_prefix_padding_ms, config.vad_silence_duration_ms) == (0.5, 300, 500)
    assert config.drain_seconds == 10
    assert "Tessa" in config.instructions
    assert API_KEY not in repr(config)
    local = relay.load_config({"OPENAI_API_KEY": API_KEY, "OPENAI_BASE_URL": "http://127.0.0.1:9/v1/",
                               "OPENAI_MODEL": "my-model"})
    assert local.openai_url == "ws://127.0.0.1:9/v1/realtime?model=my-model"
    hook = "https://crm.example.com/hooks/calls/"  # kept as written: many receivers redirect /calls to /calls/
    assert relay.load_config({"OPENAI_API_KEY": API_KEY, "CALL_REPORT_URL": hook}).call_report_url == hook


@pytest.mark.parametrize(
    ("env", "complaint"),
    [
        ({"OPENAI_API_KEY": ""}, "OPENAI_API_KEY"),
        ({"VOICE": "robot"}, "alloy, ash, ballad, coral, echo, sage, shimmer, verse, marin, cedar"),
        ({"VAD_THRESHOLD": "1.5"}, "VAD_THRESHOLD"),
        ({"VAD_THRESHOLD": "loud"}, "VAD_THRESHOLD"),
        ({"VAD_SILENCE_DURATION_MS": "-1"}, "VAD_SILENCE_DURATION_MS"),
        ({"VAD_PREFIX_PADDING_MS": "lots"}, "VAD_PREFIX_PADDING_MS"),
        ({"PORT": "99999"}, "PORT"),
        ({"OPENAI_BASE_URL": "ftp://example.com"}, "OPENAI_BASE_URL"),
        ({"LOG_LEVEL": "CHATTY"}, "LOG_LEVEL"),
        ({"DTMF": "maybe"}, "DTMF"),
        ({"LOG_TRANSCRIPTS": "2"}, "LOG_TRANSCRIPTS"),
        ({"MAX_CALL_SECONDS": "20000"}, "MAX_CALL_SECONDS must be between 1 and 14400"),
        ({"MAX_CALL_SECONDS": "7200", "SESSION_CONTINUITY": "off"}, "MAX_CALL_SECONDS above 3600 needs SESSION_CONT"),
        ({"SESSION_CONTINUITY": "sometimes"}, "SESSION_CONTINUITY"),
        ({"RECONNECT_SECONDS": "0"}, "RECONNECT_SECONDS"),
        ({"SESSION_ROLLOVER_SECONDS": "3590"}, "SESSION_ROLLOVER_SECONDS"),
        ({"MCP_SERVER_URL": "http://mcp.example.com"}, "MCP_SERVER_URL must be an https:// URL"),
        ({"MCP_SERVER_URL": "https://"}, "MCP_SERVER_URL"),
        ({"MCP_SERVER_LABEL": "my tools"}, "MCP_SERVER_LABEL"),
        ({"MCP_ALLOWED_TOOLS": "lookup, two words"}, "MCP_ALLOWED_TOOLS"),
        ({"TWILIO_ACCOUNT_SID": "AC123", "TWILIO_AUTH_TOKEN": "0" * 32}, "TWILIO_ACCOUNT_SID must be AC followed by 32"),
        ({"TWILIO_ACCOUNT_SID": "AC" + "0" * 32, "TWILIO_API_KEY": "SKnope", "TWILIO_API_SECRET": "s"},
         "TWILIO_API_KEY must be SK followed by 32"),
        ({"TWILIO_ACCOUNT_SID": "AC" + "0" * 32, "TWILIO_API_KEY": "SK" + "0" * 32}, "go together"),
        ({"TWILIO_API_KEY": "SK" + "0" * 32, "TWILIO_API_SECRET": "s"}, "TWILIO_API_KEY needs TWILIO_ACCOUNT_SID"),
        ({"TWILIO_ACCOUNT_SID": "AC" + "0" * 32}, "TWILIO_ACCOUNT_SID needs TWILIO_AUTH_TOKEN"),
        ({"TWILIO_API_BASE_URL": "api.twilio.com"}, "TWILIO_API_BASE_URL"),
        ({"TRANSFER_TO": "+15551234567"}, "TRANSFER_TO needs Twilio's REST API"),
        ({"RECORD_CALLS": "on"}, "RECORD_CALLS needs Twilio's REST API"),
        ({"TWILIO_ACCOUNT_SID": "AC" + "0" * 32, "TWILIO_AUTH_TOKEN": "0" * 32, "TRANSFER_TO": "555-1234"},
         "TRANSFER_TO must be an E.164 number"),
        # The mistakes of a first try (issue 15): each one refused with what to do.
        ({"OPENAI_API_KEY": "sk-your-key-here"}, "OPENAI_API_KEY is still sk-your-key-here, the example from .env"),
        ({"PUBLIC_URL": "http://relay.example.com"}, r"PUBLIC_URL must be an https:// URL \(plain http:// only"),
        ({"PUBLIC_URL": "ws://relay.example.com"}, "PUBLIC_URL must be an https:// URL"),
        ({"PUBLIC_URL": "https://relay.example.com?x=1"}, "PUBLIC_URL must be the relay's address without a query"),
        ({"TWILIO_API_BASE_URL": "http://api.twilio.com"}, "TWILIO_API_BASE_URL must be an https:// URL"),
        ({"OPENAI_BASE_URL": "http://api.openai.com/v1"}, "OPENAI_BASE_URL must be an https:// URL"),
        ({"MCP_SERVER_URL": "http://127.0.0.1:9/mcp"}, "MCP_SERVER_URL must be an https:// URL that OpenAI can reach"),
        ({"TWILIO_AUTH_TOKEN": "x"}, r"TWILIO_AUTH_TOKEN must be the 32 hex digits .* \(1 characters\)"),
        ({"TWILIO_AUTH_TOKEN": "g" * 32}, "TWILIO_AUTH_TOKEN must be the 32 hex digits"),
        ({"PORT": "80.5"}, "PORT must be a whole number, got '80.5'"),
        ({"MAX_CALLS": "2.5"}, "MAX_CALLS must be a whole number"),
        ({"WARM_SESSIONS": "1.5"}, "WARM_SESSIONS must be a whole number"),
        ({"VAD_PREFIX_PADDING_MS": "300.7"}, "VAD_PREFIX_PADDING_MS must be a whole number"),
        ({"VAD_SILENCE_DURATION_MS": "0.5"}, "VAD_SILENCE_DURATION_MS must be a whole number"),
        ({"OPENAI_BASE_URL": "https://exa mple.com"}, "OPENAI_BASE_URL must be a URL like https://api.openai.com/v1, "
                                                      "without spaces"),
        ({"PUBLIC_URL": "https://relay.example.com/my path"}, "PUBLIC_URL must be a URL like"),
        ({"TWILIO_API_BASE_URL": "https://[api.twilio.com"}, "TWILIO_API_BASE_URL must be a URL like"),
        ({"OPENAI_MODEL": "gpt 4"}, "OPENAI_MODEL must be a model name without spaces"),
        ({"CALL_SUMMARY": "on"}, "CALL_SUMMARY=on needs CALL_REPORT_URL"),
        ({"CALL_REPORT_URL": "http://crm.example.com/calls"}, r"CALL_REPORT_URL must be an https:// URL \(plain"),
        ({"CALL_REPORT_URL": "crm.example.com"}, "CALL_REPORT_URL must be a URL like https://crm.example.com/calls"),
        ({"BROWSER_PHONE_TOKEN": "short"}, r"BROWSER_PHONE_TOKEN must be at least 16 .* \(5 characters\)"),
        ({"TURN_DETECTION": "vad"}, "TURN_DETECTION must be one of server_vad, semantic_vad; got 'vad'"),
        ({"VAD_EAGERNESS": "fast"}, "VAD_EAGERNESS must be one of auto, low, medium, high"),
        ({"NOISE_REDUCTION": "none"}, "NOISE_REDUCTION must be one of near_field, far_field, off"),
        ({"IDLE_SECONDS": "-1"}, "IDLE_SECONDS must be between 0 and 600"),
        ({"IDLE_PROMPTS": "1.5"}, "IDLE_PROMPTS must be a whole number"),
        ({"TOOL_FILLER_SECONDS": "soon"}, "TOOL_FILLER_SECONDS must be a number"),
    ],
)
def test_bad_settings_are_refused(env: dict[str, str], complaint: str) -> None:
    with pytest.raises(relay.ConfigError, match=complaint):
        relay.load_config({"OPENAI_API_KEY": API_KEY, **env})


def test_loopback_urls_may_be_plain_http_and_whole_numbers_may_be_written_as_such() -> None:
    """The tests and local trials talk to this machine over plain http; nothing else may."""
    for host in ("127.0.0.1", "127.1.2.3", "localhost", "[::1]"):
        config = relay.load_config({"OPENAI_API_KEY": API_KEY, "OPENAI_BASE_URL": f"http://{host}:9/v1",
                                    "PUBLIC_URL": f"http://{host}:8080", "PORT": "8080.0", "MAX_CALLS": "2"})
        assert config.openai_url == f"ws://{host}:9/v1/realtime?model=gpt-realtime-2.1"
        assert config.public_url == f"http://{host}:8080"
        assert (config.port, config.max_calls) == (8080, 2)
    assert relay.load_config({"OPENAI_API_KEY": API_KEY, "TWILIO_AUTH_TOKEN": "AB" * 16}).twilio_auth_token == "AB" * 16


def test_a_wrong_auth_token_is_never_echoed() -> None:
    secret = "my-real-secret-pasted-in-the-wrong-place"
    with pytest.raises(relay.ConfigError) as refused:
        relay.load_config({"OPENAI_API_KEY": API_KEY, "TWILIO_AUTH_TOKEN": secret})
    assert secret not in str(refused.value)


def test_every_setting_is_documented() -> None:
    """Every variable relay.py reads is in README's table and in .env.example."""
    source = open(os.path.join(HERE, "relay.py")).read()
    names = set(re.findall(r'env(?:\.get\(|, )"([A-Z_]+)"', source))
    names |= {field.metadata["env"] for field in dataclasses.fields(relay.Config) if field.metadata}
    assert {"OPENAI_API_KEY", "VOICE", "GREETING", "MAX_CALL_SECONDS"} <= names
    readme = open(os.path.join(HERE, "README.md")).read()
    example = open(os.path.join(HERE, ".env.example")).read()
    for name in names:
        assert f"| `{name}` |" in readme, name
        assert re.search(rf"^#? ?{name}=", example, re.MULTILINE), name


def start_relay_process(env: dict[str, str]) -> Awaitable[asyncio.subprocess.Process]:
    """Start ``python relay.py`` as a newcomer would, with a clean environment."""
    clean = {"PATH": os.environ.get("PATH", ""), "HOST": "127.0.0.1", "PORT": "0", **env}
    return asyncio.create_subprocess_exec(
        sys.executable, "relay.py", cwd=HERE, env=clean,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


START_UP_TOKEN = "c0ffee00" * 4


@pytest.mark.parametrize(
    ("env", "complaint"),
    [
        ({"OPENAI_API_KEY": ""}, b"OPENAI_API_KEY is not set"),
        ({"OPENAI_API_KEY": API_KEY, "VOICE": "robot"}, b"VOICE must be one of alloy, ash"),
        ({"OPENAI_API_KEY": API_KEY, "TWILIO_ACCOUNT_SID": "ACnope", "TWILIO_AUTH_TOKEN": START_UP_TOKEN},
         b"TWILIO_ACCOUNT_SID must be AC followed by 32 hex digits"),
        ({"OPENAI_API_KEY": "sk-your-key-here"}, b"OPENAI_API_KEY is still sk-your-key-here"),
        # Found only when the relay binds its socket:
        ({"OPENAI_API_KEY": API_KEY, "HOST": "relay.invalid"},
         b"HOST 'relay.invalid' is not an address of this machine"),
        ({"OPENAI_API_KEY": API_KEY, "PORT": "{busy_port}"}, b"is in use by another program: stop that program, or"),
    ],
)
def test_start_up_refuses_bad_configuration(env: dict[str, str], complaint: bytes) -> None:
    async def scenario() -> None:
        with socket.create_server(("127.0.0.1", 0)) as busy:
            busy_port = str(busy.getsockname()[1])  # held until the relay has tried it
            process = await start_relay_process({name: value.format(busy_port=busy_port) for name, value in env.items()})
            _, stderr = await process.communicate()
        assert process.returncode == 1
        assert complaint in stderr
        assert len(stderr.strip().splitlines()) == 1  # one clear line, no traceback
        assert API_KEY.encode() not in stderr and START_UP_TOKEN.encode() not in stderr

    run(scenario)


async def start_up_lines(env: dict[str, str]) -> list[str]:
    """What ``python relay.py`` logs at start-up, up to the agent's line, as "LEVEL message"; then it stops."""
    process = await start_relay_process({"OPENAI_API_KEY": API_KEY, **env})
    assert process.stderr is not None
    lines: list[str] = []
    while not lines or not lines[-1].startswith("INFO agent:"):
        line = (await process.stderr.readline()).decode()
        assert line, f"relay exited at start-up after {lines}"
        _, level, _, message = line.rstrip("\n").split(" ", 3)
        lines.append(f"{level} {message}")
    process.terminate()
    await process.communicate()
    return lines


def test_start_up_says_what_to_give_twilio_and_what_the_agent_is() -> None:
    async def scenario() -> None:
        public = {"PUBLIC_URL": "https://relay.example.com", "TWILIO_AUTH_TOKEN": START_UP_TOKEN,
                  "VOICE": "coral", "OPENAI_MODEL": "my-realtime-model", "MCP_SERVER_URL": "https://mcp.example.com/mcp",
                  "MCP_SERVER_LABEL": "shop"}
        listening, webhook, agent = await start_up_lines(public)
        assert re.fullmatch(r"INFO relay listening on port \d+: health check http://127\.0\.0\.1:\d+/health", listening)
        assert webhook == ('INFO Twilio: set your number\'s "A call comes in" webhook to https://relay.example.com/twiml'
                           " (GET or POST); calls then stream to wss://relay.example.com/media-stream")
        offered = ", ".join(relay.tool_names(relay.offered_tools(relay.load_config({"OPENAI_API_KEY": API_KEY, **public}), relay.TOOLS)))
        assert "end_call" in offered and offered.endswith("shop (MCP server)")
        assert agent == f"INFO agent: model my-realtime-model, voice coral, tools: {offered}"

        warning, listening, webhook, agent = await start_up_lines({"HOST": "0.0.0.0", "END_CALL_TOOL": "off"})
        assert warning.startswith("WARNING TWILIO_AUTH_TOKEN is not set")
        port = listening.split("port ")[1].split(":")[0]
        assert listening.endswith(f"health check http://localhost:{port}/health")
        assert f"webhook to https://<public address>/twiml (GET or POST), where <public address> reaches port {port}" \
            in webhook and "Set PUBLIC_URL to see it here" in webhook
        assert agent.startswith("INFO agent: model gpt-realtime-2.1, voice alloy, tools: ")
        assert "end_call" not in agent

    run(scenario)


# HTTP routes ----------------------------------------------------------------------------------


def test_health_has_the_seed_shape_and_counts_calls() -> None:
    async def scenario() -> None:
        async with FakeOpenAI().running() as fake, running_relay(fake) as (the_relay, url):
            body = await health(the_relay)
            assert set(body) == {"status", "uptime", "timestamp", "connections", "errors", "openai_configured"}
            assert body["status"] == "healthy" and body["openai_configured"] is True
            assert body["uptime"].endswith("s") and body["uptime"][:-1].isdigit()
            assert body["timestamp"].endswith("Z") and len(body["timestamp"]) == len("2026-01-01T00:00:00.000Z")
            assert body["connections"] == {"active": 0, "total": 0} and body["errors"] == 0

            twilios = [await FakeTwilio(url, n).open() for n in (1, 2)]
            await eventually(lambda: len(fake.sessions) == 2)
            assert (await health(the_relay))["connections"] == {"active": 2, "total": 2}
            await twilios[0].stop()
            await twilios[0].closed.wait()
            await eventually(lambda: len(the_relay.calls) == 1)
            assert (await health(the_relay))["connections"] == {"active": 1, "total": 2}
            await twilios[1].close()
            await eventually(lambda: len(the_relay.calls) == 0)
            assert (await health(the_relay))["connections"] == {"active": 0, "total": 2}
            await twilios[0].shutdown()

    run(scenario)


def test_health_answers_head_and_plain_http_gets_a_helpful_answer() -> None:
    async def scenario() -> None:
        async with FakeOpenAI().running() as fake, running_relay(fake) as (the_relay, _):
            status, fields, body = await http_get(the_relay.port, "/health", method="HEAD")  # type: ignore[attr-defined]
            assert status == 200 and fields["content-type"] == "application/json" and body == b""
            status, _, body = await http_get(the_relay.port, "/media-stream")  # type: ignore[attr-defined]
            assert status == 426 and b"Twilio Media Streams" in body
            assert not fake.sessions  # a plain request costs nothing

    run(scenario)


def test_every_path_upgrades_to_a_media_stream() -> None:
    async def scenario() -> None:
        async with FakeOpenAI().running() as fake, running_relay(fake) as (_, url):
            root = url.removesuffix("/media-stream")
            for path in ("", "/", "/media-stream", "/anything?x=1"):
                twilio = await FakeTwilio(root + path).open()
                await twilio.stop()
                await twilio.closed.wait()
                await twilio.shutdown()
            assert len(fake.sessions) == 4

    run(scenario)


# A call, end to end -------------------------------------------------------------------------------


def test_session_update_is_the_ga_shape() -> None:
    async def scenario() -> None:
        async with FakeOpenAI().running() as fake, running_relay(
            fake, VOICE="marin", INSTRUCTIONS="Be brief.", VAD_THRESHOLD="0.7",
            VAD_PREFIX_PADDING_MS="200", VAD_SILENCE_DURATION_MS="650",
        ) as (_, url):
            twilio = await FakeTwilio(url).open()
            session = await fake.session()
            await eventually(lambda: bool(session.received))
            assert "openai-beta" not in {name.lower() for name in session.headers}
            assert session.headers["Authorization"] == f"Bearer {API_KEY}"
            assert "permessage-deflate" not in session.headers.get("Sec-WebSocket-Extensions", "")
            first = session.received[0]
            assert first["type"] == "session.update"
            config = first["session"]
            assert config["type"] == "realtime"
            assert config["output_modalities"] == ["audio"]
            assert config["instructions"].startswith("Be brief.")
            assert config["audio"]["input"]["format"] == {"type": "audio/pcmu"}
            assert config["audio"]["output"] == {"format": {"type": "audio/pcmu"}, "voice": "marin"}
            vad = config["audio"]["input"]["turn_detection"]
            assert vad["type"] == "server_vad"
            assert (vad["threshold"], vad["prefix_padding_ms"], vad["silence_duration_ms"]) == (0.7, 200, 650)
            await twilio.close()

    run(scenario)


def test_audio_both_ways_byte_exact_and_in_order_across_concurrent_calls() -> None:
    async def scenario() -> None:
        fake = FakeOpenAI()
        fake.echo_audio = True
        async with fake.running(), running_relay(fake) as (_, url):
            calls = 4
            frames = {n: [audio(n, i) for i in range(40)] for n in range(1, calls + 1)}
            twilios = [await FakeTwilio(url, n).open() for n in frames]
            await asyncio.gather(*(t.send_media(frames[t.number]) for t in twilios))
            for twilio in twilios:
                await eventually(lambda twilio=twilio: pcm(twilio.media) == pcm(frames[twilio.number]))
            by_call = {session.caller_audio().split(b"f", 1)[0]: session.caller_audio() for session in fake.sessions}
            for twilio in twilios:
                assert by_call[f"c{twilio.number}".encode()] == pcm(frames[twilio.number])
            await asyncio.gather(*(t.close() for t in twilios))

    run(scenario)


def test_no_caller_audio_is_lost_while_openai_is_slow_to_answer() -> None:
    async def scenario() -> None:
        fake = FakeOpenAI()
        fake.handshake_delay = 0.6
        async with fake.running(), running_relay(fake) as (_, url):
            twilio = await FakeTwilio(url).open()
            frames = [audio(1, i) for i in range(60)]  # 1.2 s: half of it before OpenAI answers
            await twilio.send_media(frames)
            session = await fake.session()
            await eventually(lambda: session.caller_audio() == pcm(frames))
            assert session.received[0]["type"] == "session.update"
            await twilio.close()

    run(scenario)


def media_frame(twilio: FakeTwilio, index: int, timestamp: int) -> dict[str, Any]:
    """Frame ``index`` of caller audio, stamped with ``timestamp`` (ms into the stream)."""
    return {"event": "media", "streamSid": twilio.stream_sid,
            "media": {"track": "inbound", "chunk": str(index), "timestamp": str(timestamp),
                      "payload": audio(twilio.number, index)}}


def test_frames_handled_late_are_joined_in_pairs_and_nothing_is_lost() -> None:
    async def scenario() -> None:
        async with one_call() as (_, _, twilio, session):
            await twilio.send(media_frame(twilio, 0, timestamp=0))  # on time
            await eventually(lambda: len(session.appended()) == 1)
            await asyncio.sleep(0.1)  # the next frames are stamped as if 100 ms had not passed
            for index in range(1, 8):
                await twilio.send(media_frame(twilio, index, timestamp=20))
            await twilio.stop()  # sends the last frame, still waiting for a partner
            await twilio.closed.wait()
            frames = [audio(1, i) for i in range(8)]
            assert session.caller_audio() == pcm(frames)
            sizes = [len(base64.b64decode(a)) for a in session.appended()]
            assert sizes == [FRAME, 2 * FRAME, 2 * FRAME, 2 * FRAME, FRAME]

    run(scenario)


def test_early_audio_is_bounded_and_keeps_the_newest(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        fake = FakeOpenAI()
        fake.handshake_delay = 1.0
        async with fake.running(), running_relay(fake) as (_, url):
            twilio = await FakeTwilio(url).open()
            frames = [audio(1, i) for i in range(relay.EARLY_AUDIO_LIMIT + 50)]
            await twilio.send_media(frames, pace=0)
            session = await fake.session()
            await eventually(lambda: session.caller_audio() == pcm(frames[50:]))
            await twilio.close()

    with caplog.at_level(logging.WARNING, logger="relay"):
        run(scenario)
    assert sum("dropping the oldest caller audio" in r.message for r in caplog.records) == 1


def test_twilio_stop_closes_openai_and_leaves_no_task_behind() -> None:
    async def scenario() -> None:
        async with FakeOpenAI().running() as fake, running_relay(fake) as (the_relay, url):
            baseline = len(asyncio.all_tasks())
            twilio = await FakeTwilio(url).open()
            session = await fake.session()
            await twilio.stop()
            await session.ws.wait_closed()
            await twilio.closed.wait()
            await eventually(lambda: len(the_relay.calls) == 0)
            await twilio.shutdown()
            await eventually(lambda: len(asyncio.all_tasks()) <= baseline)
            assert twilio.close_code == 1000

    run(scenario)


def test_without_continuity_openai_hanging_up_mid_call_closes_twilio(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with FakeOpenAI().running() as fake, running_relay(fake, SESSION_CONTINUITY="off") as (the_relay, url):
            twilio = await FakeTwilio(url).open()
            session = await fake.session()
            await session.ws.close(1011, "server trouble")
            await twilio.closed.wait()
            assert twilio.close_code == 1011
            assert (await health(the_relay))["errors"] == 1
            assert fake.handshakes == 1  # no second session
            await twilio.shutdown()

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    assert any("code 1011 'server trouble'" in r.message and "CA" in r.message for r in caplog.records)


OPENAI_FAILURES = {
    **{f"refused {status}": ({"refuse_status": status}, {}, f"refused the connection: HTTP {status}")
       for status in (401, 403, 429, 500, 503)},
    "wrong key": ({}, {"OPENAI_API_KEY": "sk-wrong"}, "refused the connection: HTTP 401"),
    "slow": ({"handshake_delay": 5}, {"OPENAI_CONNECT_TIMEOUT": "0.3"}, "did not answer within 0.3 s"),
    "unreachable": ({"stopped": True}, {}, "could not be reached"),
}


@pytest.mark.parametrize("case", OPENAI_FAILURES)
def test_openai_failing_to_answer_hands_the_call_back_to_twilio(case: str, caplog: pytest.LogCaptureFixture) -> None:
    behaviour, env, complaint = OPENAI_FAILURES[case]

    async def scenario() -> None:
        fake = FakeOpenAI()
        fake.refuse_status = behaviour.get("refuse_status")
        fake.handshake_delay = behaviour.get("handshake_delay", 0)
        async with fake.running():
            if not behaviour.get("stopped"):
                await fail_one_call(fake)
        if behaviour.get("stopped"):  # the fake's port is closed now
            await fail_one_call(fake)

    async def fail_one_call(fake: FakeOpenAI) -> None:
        async with running_relay(fake, **env) as (the_relay, url):
            twilio = await FakeTwilio(url).open()
            await twilio.closed.wait()
            assert twilio.close_code == 1011  # Twilio then plays the TwiML after <Connect>
            assert (await health(the_relay))["errors"] == 1
            await twilio.shutdown()

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(complaint in line and "[call 1 " in line for line in errors)  # names the call
    assert not any(API_KEY in r.getMessage() for r in caplog.records)


def test_openai_error_events_are_logged_loudly_and_the_call_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with FakeOpenAI().running() as fake, running_relay(fake) as (the_relay, url):
            twilio = await FakeTwilio(url).open()
            session = await fake.session()
            await session.send({"type": "error", "event_id": "e1", "error": {
                "type": "invalid_request_error", "code": "unknown_parameter",
                "message": "Unknown parameter: 'session.voicez'.", "param": "session.voicez"}})
            await session.send({"type": "rate_limits.updated", "rate_limits": []})
            await session.say("item_1", [audio(9, 1)])
            await eventually(lambda: len(twilio.media) == 1)
            assert (await health(the_relay))["errors"] == 1
            await twilio.close()

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("unknown_parameter" in m and "session.voicez" in m and "invalid_request_error" in m for m in errors)


def test_messages_from_openai_the_relay_cannot_read_are_logged_and_the_call_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        async with one_call() as (_, the_relay, twilio, session):
            for message in ("not json", "[" * 5000, "[1, 2]", '{"no_type": 1}'):
                await session.ws.send(message)
            await session.send({"type": "conversation.item.added", "item": {"id": ["not", "an", "id"]}})
            await session.say("item_1", [audio(9, 1)])
            await eventually(lambda: len(twilio.media) == 1)
            assert the_relay.calls and the_relay.stats.errors("relay_bug") == 0

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    unreadable = [r for r in caplog.records if "ignoring unreadable message from OpenAI" in r.getMessage()]
    assert len(unreadable) == 4 and all(r.levelno == logging.WARNING for r in unreadable)


def test_a_request_refused_for_another_reason_frees_the_floor(caplog: pytest.LogCaptureFixture) -> None:
    async def refuse_the_greeting(session: FakeSession, request: dict[str, Any]) -> None:
        if "Greet" not in request.get("response", {}).get("instructions", ""):
            return await session.answer(request)
        await session.send({"type": "error", "event_id": "event_9", "error": {
            "type": "invalid_request_error", "code": "invalid_value", "message": "Invalid 'instructions'.",
            "param": "response.instructions", "event_id": request["event_id"]}})

    async def scenario() -> None:
        fake = FakeOpenAI()
        fake.respond = refuse_the_greeting
        async with fake.running(), running_relay(fake) as (_, url):
            twilio = await FakeTwilio(url).open()
            session = await fake.session()
            await eventually(lambda: len(session.of_type("response.create")) == 1)  # the greeting, refused
            await press(twilio, "5")
            await eventually(lambda: len(session.of_type("response.create")) == 2)  # the press is answered
            assert "instructions" not in session.of_type("response.create")[1].get("response", {})
            await twilio.close()

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    assert any("code=invalid_value" in r.getMessage() and "(about relay_response_1)" in r.getMessage()
               for r in caplog.records if r.levelno == logging.ERROR)


def test_a_stalled_openai_session_is_noticed_and_replaced() -> None:
    async def scenario() -> None:
        async with one_call() as (fake, _, twilio, first):
            first.ws.transport.pause_reading()  # the TCP connection stays open; nothing comes back
            bound = relay.PING_INTERVAL + relay.PING_TIMEOUT + 3  # a liveness bound, not a speed test
            await eventually(lambda: len(fake.sessions) == 2, limit=bound)
            await eventually(lambda: bool(fake.sessions[1].of_type("session.update")))
            assert not twilio.closed.is_set()
            first.resume()

    run(scenario, limit=40)


def test_bad_input_from_twilio_is_logged_and_the_call_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with FakeOpenAI().running() as fake, running_relay(fake) as (the_relay, url):
            bystander = await FakeTwilio(url, 2).open()
            twilio = await FakeTwilio(url, 1).open(start=False)
            await twilio.send_media([audio(1, 0)])  # media before start
            await twilio.send({"event": "start", "start": {"callSid": "CAx"}})  # no streamSid
            await twilio.start()
            for bad in ("not json", b"\x00\x01binary", "[1, 2]", "42", '{"no_event": 1}', '{"event": 7}',
                        '{"event": "media"}', '{"event": "media", "media": {"payload": 5}}',
                        '{"event": "something_new"}'):
                await twilio.send(bad)
            frames = [audio(1, i) for i in range(1, 6)]
            await twilio.send_media(frames)
            await bystander.send_media([audio(2, 0)])
            await eventually(lambda: any(s.caller_audio() == pcm(frames) for s in fake.sessions))
            await eventually(lambda: any(s.caller_audio() == pcm([audio(2, 0)]) for s in fake.sessions))
            assert (await health(the_relay))["errors"] == 10
            assert len(the_relay.calls) == 2
            await asyncio.gather(twilio.close(), bystander.close())

    with caplog.at_level(logging.DEBUG, logger="relay"):
        run(scenario)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for problem in ("media before start", "start without start.streamSid", "non-JSON text", "binary frame",
                    "JSON that is not an object", "event without a valid 'event' field",
                    "media without media.payload"):
        assert any(problem in w and "call " in w for w in warnings), problem
    assert any("unknown Twilio event 'something_new'" in r.getMessage() for r in caplog.records)


def test_a_second_signal_exits_at_once() -> None:
    async def scenario() -> None:
        async with FakeOpenAI().running() as fake:
            process = await start_relay_process({"OPENAI_API_KEY": API_KEY, "OPENAI_BASE_URL": fake.base_url,
                                                 "DRAIN_SECONDS": "600"})
            port, _ = await read_port(process)
            twilio = await FakeTwilio(f"ws://127.0.0.1:{port}/media-stream").open()
            await fake.session()
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            process.send_signal(signal.SIGTERM)
            _, stderr = await process.communicate()  # well before DRAIN_SECONDS
            assert process.returncode == 1
            assert b"second SIGTERM: exiting at once" in stderr
            await twilio.shutdown()

    run(scenario)


# Natural conversation: barge-in, greeting, keypad, hang-up, long calls -------------------------------

CHUNK_MS = 100  # the fake's assistant deltas: 100 ms of audio each, sent faster than real time


def speech(item: int, count: int, ms: int = CHUNK_MS) -> list[str]:
    """``count`` distinct chunks of assistant audio, ``ms`` long each."""
    return [audio(item, i, ms * 8) for i in range(count)]


@contextlib.asynccontextmanager
async def one_call(tools: Mapping[str, relay.Tool] | None = None,
                   **env: str) -> AsyncIterator[tuple[FakeOpenAI, relay.Relay, FakeTwilio, FakeSession]]:
    """A relay with one call up and its OpenAI session configured."""
    env.setdefault("GREETING", "")
    async with FakeOpenAI().running() as fake, running_relay(fake, tools, **env) as (the_relay, url):
        twilio = await FakeTwilio(url).open()
        session = await fake.session()
        await eventually(lambda: all(configured(call) and call.stream_sid for call in the_relay.calls))
        yield fake, the_relay, twilio, session
        await twilio.close()


async def speech_started(session: FakeSession) -> None:
    await session.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": 1000, "item_id": "item_user"})


async def speech_stopped(session: FakeSession) -> None:
    """The caller's turn ends; server VAD's answer to it follows, as it does with the real API."""
    await session.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 1500, "item_id": "item_user"})


def test_barge_in_truncates_at_what_the_caller_heard(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with one_call() as (_, _, twilio, session):
            await session.say("item_a", speech(1, 10))  # 1 s of audio, sent at once
            await eventually(lambda: twilio.played_bytes >= 3500)
            await speech_started(session)
            await eventually(lambda: bool(session.of_type("conversation.item.truncate")))
            truncate = session.of_type("conversation.item.truncate")[0]
            heard_ms = twilio.played_at_clear[0] / 8
            assert twilio.clears == 1
            assert (truncate["item_id"], truncate["content_index"]) == ("item_a", 0)
            # Within one chunk of what the phone played (plus a little for loopback scheduling),
            # and never more than was sent.
            assert heard_ms - CHUNK_MS - 20 <= truncate["audio_end_ms"] <= heard_ms
            assert truncate["audio_end_ms"] <= 10 * CHUNK_MS
            assert not session.of_type("response.cancel")  # server VAD already cancels

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    assert any("the caller interrupted: heard" in r.message and "of 1000 ms sent" in r.message for r in caplog.records)


def test_marks_are_sent_every_100_ms_of_audio_and_at_the_end_of_an_item() -> None:
    async def scenario() -> None:
        async with one_call() as (_, the_relay, twilio, session):
            await session.say("item_a", speech(1, 12, ms=20))  # 240 ms in 20 ms deltas
            await session.send({"type": "response.output_audio.done", "response_id": "resp_1",
                                "item_id": "item_a", "output_index": 0, "content_index": 0})
            (call,) = the_relay.calls
            await eventually(lambda: len(twilio.media) == 12 and call.phone.playback.drained.is_set())
            kinds = [event["event"] for event in twilio.received]
            assert kinds.count("mark") == 3  # after 100 ms, 200 ms, and the 40 ms tail
            assert kinds[5] == "mark" and kinds[11] == "mark" and kinds[-1] == "mark"
            assert twilio.played_bytes == 12 * 160

    run(scenario)


def test_barge_in_between_marks_counts_real_time_playback() -> None:
    async def scenario() -> None:
        async with one_call() as (_, _, twilio, session):
            await session.say("item_a", speech(1, 50, ms=20))  # 1 s in 20 ms deltas
            await eventually(lambda: twilio.played_bytes >= 4400)  # 550 ms: mid-way between marks
            await speech_started(session)
            await eventually(lambda: bool(session.of_type("conversation.item.truncate")))
            truncate = session.of_type("conversation.item.truncate")[0]
            heard_ms = twilio.played_at_clear[0] / 8
            assert heard_ms - 20 <= truncate["audio_end_ms"] <= heard_ms
            assert truncate["audio_end_ms"] > 500  # more than the last echoed mark told

    run(scenario)


def test_late_audio_of_an_interrupted_answer_is_not_played() -> None:
    async def scenario() -> None:
        async with one_call() as (_, _, twilio, session):
            await session.say("item_a", speech(1, 10))
            await eventually(lambda: len(twilio.media) == 10 and twilio.played_bytes >= 1600)
            await speech_started(session)
            await eventually(lambda: twilio.clears == 1)
            await session.say("item_a", speech(2, 3))  # still in flight when the caller spoke
            await session.say("item_b", speech(3, 1), response_id="resp_2")  # the next answer
            await eventually(lambda: len(twilio.media) == 11)
            assert twilio.media[10:] == speech(3, 1)

    run(scenario)


def test_no_clear_or_truncate_when_nothing_is_playing() -> None:
    async def scenario() -> None:
        async with one_call() as (_, the_relay, twilio, session):
            await session.say("item_a", speech(1, 2, ms=20))
            await session.send({"type": "response.output_audio.done", "response_id": "resp_1",
                                "item_id": "item_a", "output_index": 0, "content_index": 0})
            (call,) = the_relay.calls
            await eventually(lambda: len(twilio.marks_echoed) == 1 and call.phone.playback.drained.is_set())
            await speech_started(session)
            await session.say("item_b", speech(2, 1), response_id="resp_2")
            await eventually(lambda: len(twilio.media) == 3)
            assert twilio.clears == 0
            assert not session.of_type("conversation.item.truncate")

    run(scenario)


def test_late_mark_echoes_after_a_clear_do_not_credit_the_next_answer() -> None:
    async def scenario() -> None:
        async with one_call() as (_, _, twilio, session):
            twilio.clear_echo_delay = 0.3  # the stale echoes arrive while item_b plays
            await session.say("item_a", speech(1, 10))
            await eventually(lambda: twilio.played_bytes >= 2400)
            await speech_started(session)
            await eventually(lambda: twilio.clears == 1)
            await session.say("item_b", speech(2, 10), response_id="resp_2")
            await eventually(lambda: twilio.late_echoes is not None and twilio.late_echoes.done())
            await eventually(lambda: twilio.played_bytes >= twilio.played_at_clear[0] + 3000)
            await speech_started(session)
            await eventually(lambda: len(session.of_type("conversation.item.truncate")) == 2)
            truncate = session.of_type("conversation.item.truncate")[1]
            heard_ms = (twilio.played_at_clear[1] - twilio.played_at_clear[0]) / 8
            assert truncate["item_id"] == "item_b"
            assert heard_ms - CHUNK_MS - 20 <= truncate["audio_end_ms"] <= heard_ms

    run(scenario)


def test_an_earlier_answer_heard_in_full_does_not_count_for_the_next() -> None:
    async def scenario() -> None:
        async with one_call() as (_, the_relay, twilio, session):
            await session.say("item_a", speech(1, 2))
            (call,) = the_relay.calls
            await eventually(lambda: twilio.played_bytes == 1600 and call.phone.playback.drained.is_set())
            await session.say("item_b", speech(2, 10), response_id="resp_2")
            await speech_started(session)  # before the first chunk of item_b has played
            await eventually(lambda: bool(session.of_type("conversation.item.truncate")))
            truncate = session.of_type("conversation.item.truncate")[0]
            assert truncate["item_id"] == "item_b"
            assert truncate["audio_end_ms"] <= (twilio.played_at_clear[0] - 1600) / 8

    run(scenario)


@contextlib.asynccontextmanager
async def a_call_not_yet_configured() -> AsyncIterator[tuple[FakeOpenAI, relay.Relay, FakeTwilio, FakeSession]]:
    """One call whose session.update OpenAI has yet to answer: ``fake.configure.set()`` answers it."""
    fake = FakeOpenAI()
    fake.configure.clear()
    async with fake.running(), running_relay(fake) as (the_relay, url):
        twilio = await FakeTwilio(url).open()
        yield fake, the_relay, twilio, await fake.session()
        await twilio.close()


def test_the_agent_greets_only_once_the_session_is_configured() -> None:
    async def scenario() -> None:
        async with a_call_not_yet_configured() as (fake, _, twilio, session):
            await twilio.send_media([audio(1, i) for i in range(5)])
            await eventually(lambda: session.caller_audio() == pcm([audio(1, i) for i in range(5)]))  # the relay is live...
            assert not session.of_type("response.create")  # ...but waits for session.updated
            fake.configure.set()
            await eventually(lambda: bool(session.of_type("response.create")))
            (greeting,) = session.of_type("response.create")
            assert "Hi, this is Tessa. How can I help you today?" in greeting["response"]["instructions"]

    run(scenario)


def test_no_greeting_over_an_answer_to_a_caller_who_spoke_first() -> None:
    async def scenario() -> None:
        async with a_call_not_yet_configured() as (fake, the_relay, _, session):
            await response_created(session, "resp_vad")  # server VAD answers "Hello?" before session.updated
            fake.configure.set()
            await eventually(lambda: all(configured(call) for call in the_relay.calls))
            await asyncio.sleep(0.1)
            assert not session.of_type("response.create")  # no conversation_already_has_active_response

    run(scenario)


def test_an_empty_greeting_lets_the_caller_speak_first() -> None:
    async def scenario() -> None:
        async with one_call(GREETING="") as (_, _, twilio, session):
            await twilio.send_media([audio(1, 0)])
            await eventually(lambda: len(session.appended()) == 1)
            assert not session.of_type("response.create")

    run(scenario)


async def press(twilio: FakeTwilio, digit: str) -> None:
    await twilio.send({"event": "dtmf", "streamSid": twilio.stream_sid, "sequenceNumber": "5",
                       "dtmf": {"track": "inbound_track", "digit": digit}})


def test_a_keypad_press_reaches_the_model(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with one_call() as (_, _, twilio, session):
            await press(twilio, "5")
            await eventually(lambda: bool(session.of_type("response.create")))
            kinds = [event["type"] for event in session.received]
            (item,) = session.of_type("conversation.item.create")
            assert item["item"]["role"] == "user"
            assert item["item"]["content"] == [{"type": "input_text", "text": "The caller pressed 5 on the keypad."}]
            assert kinds.index("conversation.item.create") < kinds.index("response.create")

    with caplog.at_level(logging.DEBUG, logger="relay"):
        run(scenario)
    assert not any("5" in r.getMessage().split("]", 1)[1] for r in caplog.records if "pressed" in r.getMessage())


def test_keypad_presses_can_be_turned_off() -> None:
    async def scenario() -> None:
        async with one_call(DTMF="off") as (_, _, twilio, session):
            await press(twilio, "5")
            await twilio.send_media([audio(1, 0)])
            await eventually(lambda: len(session.appended()) == 1)
            assert not session.of_type("conversation.item.create")

    run(scenario)


async def call_end_call(session: FakeSession, reason: str = "the caller said goodbye") -> None:
    await session.send({"type": "response.output_item.done", "response_id": "resp_1", "output_index": 1,
                        "item": {"id": "item_fc", "type": "function_call", "status": "completed",
                                 "name": "end_call", "call_id": "call_42",
                                 "arguments": json.dumps({"reason": reason})}})
    await session.send({"type": "response.done", "response": {"id": "resp_1", "status": "completed"}})


def test_end_call_hangs_up_after_the_goodbye_has_played(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with one_call() as (_, _, twilio, session):
            tools = session.of_type("session.update")[0]["session"]["tools"]
            assert [tool["name"] for tool in tools] == ["end_call"]
            await session.say("item_bye", speech(1, 5))  # a 500 ms goodbye
            await call_end_call(session)
            await twilio.closed.wait()
            assert twilio.played_bytes == 5 * CHUNK_MS * 8  # every byte was heard first
            assert twilio.close_code == 1000
            outputs = [e["item"] for e in session.of_type("conversation.item.create")]
            assert outputs == [{"type": "function_call_output", "call_id": "call_42", "output": '{"ok": true}',
                                "id": "relay_1"}]

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    lines = [r.getMessage() for r in caplog.records]
    assert any("hanging up: the agent ended the call" in line for line in lines)
    assert not any("the caller said goodbye" in line for line in lines)  # the model's words: DEBUG only


def test_end_call_tool_can_be_turned_off() -> None:
    async def scenario() -> None:
        async with one_call(END_CALL_TOOL="off") as (_, _, _, session):
            assert "tools" not in session.of_type("session.update")[0]["session"]

    run(scenario)


def test_max_call_seconds_says_goodbye_then_hangs_up(caplog: pytest.LogCaptureFixture) -> None:
    async def goodbye(session: FakeSession, event: dict[str, Any]) -> None:
        if event["type"] == "response.create":
            await session.say("item_bye", speech(9, 2), response_id="resp_bye")
            await session.send({"type": "response.done", "response": {"id": "resp_bye"}})

    async def scenario() -> None:
        fake = FakeOpenAI()
        fake.on_event = goodbye
        async with fake.running(), running_relay(fake, MAX_CALL_SECONDS="1", GREETING="") as (_, url):
            twilio = await FakeTwilio(url).open()
            await twilio.closed.wait()
            session = await fake.session()
            (request,) = session.of_type("response.create")
            assert "time limit" in request["response"]["instructions"]
            assert twilio.media == speech(9, 2)
            assert twilio.played_bytes == 2 * CHUNK_MS * 8
            assert twilio.close_code == 1000
            await twilio.shutdown()

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    assert any("hanging up: the call reached MAX_CALL_SECONDS (1 s)" in r.message for r in caplog.records)


async def session_expired(session: FakeSession) -> None:
    """What OpenAI sends when a session reaches its 60 minutes."""
    await session.send({"type": "error", "error": {
        "type": "invalid_request_error", "code": "session_expired",
        "message": "Your session hit the maximum duration of 60 minutes.", "param": None}})


def test_without_continuity_an_expired_openai_session_ends_the_call_cleanly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        async with one_call(SESSION_CONTINUITY="off") as (_, _, twilio, session):
            await session_expired(session)
            await twilio.closed.wait()
            assert twilio.close_code == 1000

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    assert any("hanging up: the OpenAI session expired" in r.message for r in caplog.records)


def test_without_continuity_an_expiry_mid_answer_hangs_up_once_what_was_sent_has_played(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        async with one_call(SESSION_CONTINUITY="off") as (_, _, twilio, session):
            await agent_begins(session, "resp_1", "item_a")
            await session.say("item_a", speech(1, 5, ms=50))  # 250 ms: marks at 100 and 200, a 50 ms tail
            await session_expired(session)
            await twilio.closed.wait()
            assert twilio.played_bytes == 5 * 50 * 8  # all of it was heard, the tail included
            assert twilio.close_code == 1000

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    assert any("hanging up: the OpenAI session expired" in r.getMessage() for r in caplog.records)
    assert not any("still playing" in r.getMessage() for r in caplog.records)  # no wait on an unmarked tail


@pytest.mark.parametrize("on", [True, False])
def test_transcripts_are_logged_only_when_asked(on: bool, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with one_call(LOG_TRANSCRIPTS="on" if on else "off", SESSION_CONTINUITY="off") as (
            _, _, twilio, session
        ):
            audio_input = session.of_type("session.update")[0]["session"]["audio"]["input"]
            assert ("transcription" in audio_input) is on  # continuity, off here, would turn it on too
            await session.send({"type": "conversation.item.input_audio_transcription.completed",
                                "item_id": "item_u", "content_index": 0, "transcript": "I need a taxi"})
            await session.send({"type": "response.output_audio_transcript.done", "item_id": "item_a",
                                "content_index": 0, "transcript": "Sure, where to?"})
            await session.say("item_a", speech(1, 1))
            await eventually(lambda: len(twilio.media) == 1)

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.endswith("caller: I need a taxi") and "CA" in line for line in lines) is on
    assert any(line.endswith("agent: Sure, where to?") and "CA" in line for line in lines) is on


# Production hardening: signatures, TwiML, limits, metrics, hostile input ---------------------------

AUTH_TOKEN = "7e57" * 8  # the form of a real one: 32 hex digits


def twilio_signature(url: str, token: str = AUTH_TOKEN) -> str:
    """What Twilio puts in X-Twilio-Signature, computed here independently of relay.py."""
    return base64.b64encode(hmac.new(token.encode(), url.encode(), hashlib.sha1).digest()).decode()


async def raw_request(port: int, path: str, headers: dict[str, str], websocket: bool = True) -> tuple[int, bytes]:
    """Send one handshake (or plain GET) with exactly these headers; return status and body."""
    lines = [f"GET {path} HTTP/1.1"]
    if websocket:
        headers = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                   "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(), **headers}
    lines += [f"{name}: {value}" for name, value in headers.items()]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split()[1])
    body = b"" if status == 101 else await reader.read()
    writer.close()
    return status, body


def parse_metrics(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


async def metrics(the_relay: relay.Relay) -> dict[str, float]:
    status, fields, body = await http_get(the_relay.port, "/metrics")  # type: ignore[attr-defined]
    assert status == 200 and fields["content-type"].startswith("text/plain; version=0.0.4")
    return parse_metrics(body.decode())


def test_signed_handshakes_are_accepted_and_others_refused_for_free(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        env = {"TWILIO_AUTH_TOKEN": AUTH_TOKEN, "PUBLIC_URL": "https://relay.example.com"}
        async with FakeOpenAI().running() as fake, running_relay(fake, **env) as (the_relay, url):
            port = the_relay.port  # type: ignore[attr-defined]
            signed = twilio_signature("wss://relay.example.com/media-stream")
            twilio = await FakeTwilio(url).open(headers={"X-Twilio-Signature": signed})
            await fake.session()
            with_port = twilio_signature("wss://relay.example.com:443/media-stream")
            assert (await raw_request(port, "/media-stream", {"X-Twilio-Signature": with_port}))[0] == 101
            for bad in ({}, {"X-Twilio-Signature": "AAAA"},
                        {"X-Twilio-Signature": twilio_signature("wss://relay.example.com/other")},
                        {"X-Twilio-Signature": twilio_signature("wss://relay.example.com/media-stream", "wrong")},
                        {"X-Twilio-Signature": "sïgnature"},
                        {"X-Twilio-Signature": signed, "X-Forwarded-For": "203.0.113.9, 10.0.0.1"}):
                path = "/other" if bad.get("X-Forwarded-For") else "/media-stream"
                status, _ = await raw_request(port, path, bad)
                assert status == 403, bad
            await eventually(lambda: len(fake.sessions) == 2)
            assert len(fake.sessions) == 2  # refusals never dialled OpenAI
            assert (await metrics(the_relay))['relay_calls_refused_total{reason="signature"}'] == 6
            await twilio.close()

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert any("203.0.113.9" in line and "Invalid Twilio signature" in line for line in refusals)
    assert not any(AUTH_TOKEN in r.getMessage() for r in caplog.records)


def test_signatures_behind_a_tls_proxy_are_checked_against_the_wss_url() -> None:
    async def scenario() -> None:
        async with FakeOpenAI().running() as fake, running_relay(fake, TWILIO_AUTH_TOKEN=AUTH_TOKEN) as (the_relay, _):
            port = the_relay.port  # type: ignore[attr-defined]
            proxied = {"Host": "relay.example.com", "X-Forwarded-Proto": "https"}
            path = "/media-stream?tenant=7"
            good = twilio_signature("wss://relay.example.com/media-stream?tenant=7")
            assert (await raw_request(port, path, {**proxied, "X-Twilio-Signature": good}))[0] == 101
            plain = twilio_signature("ws://relay.example.com/media-stream?tenant=7")
            assert (await raw_request(port, path, {**proxied, "X-Twilio-Signature": plain}))[0] == 403
            direct = {"Host": "relay.example.com", "X-Twilio-Signature": plain}  # no proxy: plain ws
            assert (await raw_request(port, path, direct))[0] == 101
            odd_host = {"Host": "rélay.example.com", "X-Forwarded-Proto": "https", "X-Twilio-Signature": good}
            assert (await raw_request(port, path, odd_host))[0] == 403  # refused, not a server error
            await eventually(lambda: len(fake.sessions) == 2)

    run(scenario)


def test_twiml_route_connects_the_call_to_this_relay() -> None:
    async def scenario() -> None:
        async with FakeOpenAI().running() as fake, running_relay(fake, TWILIO_AUTH_TOKEN=AUTH_TOKEN) as (the_relay, _):
            port = the_relay.port  # type: ignore[attr-defined]
            path = "/twiml?CallSid=CA123&From=%2B15550001111"
            proxied = {"Host": "relay.example.com", "X-Forwarded-Proto": "https"}
            signature = twilio_signature("https://relay.example.com" + path)
            status, body = await raw_request(port, path, {**proxied, "X-Twilio-Signature": signature}, websocket=False)
            assert status == 200
            twiml = ElementTree.fromstring(body)
            assert [child.tag for child in twiml] == ["Connect", "Say", "Hangup"]
            assert twiml.find("Connect/Stream").get("url") == "wss://relay.example.com/media-stream"
            assert twiml.find("Say").text == relay.STREAM_END_MESSAGE  # fits the agent's own goodbye too
            status, _ = await raw_request(port, path, proxied, websocket=False)
            assert status == 403
            assert not fake.sessions

    run(scenario)


def test_calls_beyond_max_calls_are_refused_with_503_before_dialling_openai() -> None:
    async def scenario() -> None:
        async with FakeOpenAI().running() as fake, running_relay(fake, MAX_CALLS="3") as (the_relay, url):
            results = await asyncio.gather(*(FakeTwilio(url, n).open() for n in range(8)), return_exceptions=True)
            admitted = [r for r in results if isinstance(r, FakeTwilio)]
            assert len(admitted) == 3
            assert all(getattr(r, "response", None) and r.response.status_code == 503
                       for r in results if not isinstance(r, FakeTwilio))
            status, body = await raw_request(the_relay.port, "/media-stream", {})  # type: ignore[attr-defined]
            assert status == 503
            assert (await metrics(the_relay))['relay_calls_refused_total{reason="capacity"}'] == 6
            await eventually(lambda: len(fake.sessions) == 3)
            await admitted[0].close()
            await eventually(lambda: len(the_relay.calls) == 2)
            again = await FakeTwilio(url, 9).open()  # a freed place is usable again
            await eventually(lambda: len(fake.sessions) == 4)
            await asyncio.gather(again.close(), *(t.close() for t in admitted[1:]))

    run(scenario)


def test_a_frame_over_the_cap_closes_only_that_call(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with FakeOpenAI().running() as fake, running_relay(fake) as (the_relay, url):
            bystander = await FakeTwilio(url, 2).open()
            twilio = await FakeTwilio(url, 1).open()
            await twilio.send("x" * (relay.MAX_FRAME_BYTES + 1))
            await twilio.closed.wait()
            assert twilio.close_code == 1009
            await bystander.send_media([audio(2, 0)])
            await eventually(lambda: any(s.caller_audio() == pcm([audio(2, 0)]) for s in fake.sessions))
            assert the_relay.stats.errors("twilio_frame_too_big") == 1
            await asyncio.gather(twilio.shutdown(), bystander.close())

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    assert any("frame over 65536 bytes" in r.getMessage() and "CA" in r.getMessage() for r in caplog.records)


def test_metrics_count_calls_audio_and_barge_ins() -> None:
    async def scenario() -> None:
        async with one_call() as (_, the_relay, twilio, session):
            await twilio.send_media([audio(1, i) for i in range(5)], pace=0)
            await eventually(lambda: session.caller_audio() == pcm([audio(1, i) for i in range(5)]))
            await session.say("item_a", speech(1, 10))
            await eventually(lambda: twilio.played_bytes >= 1600)
            await speech_started(session)
            await eventually(lambda: twilio.clears == 1)
            await session.say("item_a", speech(2, 2))  # dropped: the caller interrupted it
            await session.say("item_b", speech(3, 1), response_id="resp_2")
            await eventually(lambda: len(twilio.media) == 11)
            numbers = await metrics(the_relay)
            assert numbers["relay_calls_active"] == 1 and numbers["relay_calls_total"] == 1
            assert numbers['relay_audio_frames_total{direction="caller_to_openai"}'] == 5
            assert numbers['relay_audio_bytes_total{direction="caller_to_openai"}'] == 5 * FRAME
            assert numbers['relay_audio_frames_total{direction="openai_to_caller"}'] == 11
            assert numbers['relay_audio_bytes_total{direction="openai_to_caller"}'] == 11 * CHUNK_MS * 8
            assert numbers["relay_barge_ins_total"] == 1
            assert numbers['relay_frames_dropped_total{reason="interrupted_answer"}'] == 2
            assert numbers["relay_openai_connect_seconds_count"] == 1
            assert numbers['relay_openai_connect_seconds_bucket{le="+Inf"}'] == 1
            assert numbers["relay_call_duration_seconds_count"] == 0
        assert parse_metrics(the_relay.metrics())["relay_call_duration_seconds_count"] == 1

    run(scenario)


def test_a_call_parameter_cannot_break_the_metrics_or_add_to_their_labels() -> None:
    async def scenario() -> None:
        async with FakeOpenAI().running() as fake, running_relay(fake) as (the_relay, url):
            twilio = await FakeTwilio(url).open(customParameters={"direction": 'x"} 1\nrelay_forged_total 7'})
            await eventually(lambda: bool(the_relay.calls) and all(call.stream_sid for call in the_relay.calls))
            numbers = await metrics(the_relay)
            started = {name: n for name, n in numbers.items() if name.startswith("relay_calls_started_total")}
            assert started == {'relay_calls_started_total{direction="inbound"}': 1}
            assert "relay_forged_total" not in numbers
            await twilio.close()

    run(scenario)


def test_a_socket_that_never_starts_a_stream_is_closed() -> None:
    async def scenario() -> None:
        async with FakeOpenAI().running() as fake, running_relay(fake) as (the_relay, url):
            idle = await FakeTwilio(url).open(start=False)
            await idle.closed.wait()
            assert idle.close_code == 1008
            assert the_relay.stats.errors("no_start") == 1
            await idle.shutdown()

    run(scenario, limit=relay.START_TIMEOUT + 10)


HOSTILE_FRAMES: list[str | bytes] = [
    "not json", "{", "[1, 2, 3]", "42", '"a string"', "null", "true",
    '{"event": 7}', '{"event": null}', '{"event": ["media"]}', '{"no_event": "media"}',
    '{"event": "start"}', '{"event": "start", "start": "nope"}', '{"event": "start", "start": {"streamSid": 5}}',
    '{"event": "media"}', '{"event": "media", "media": []}', '{"event": "media", "media": {"payload": 12}}',
    '{"event": "media", "media": {"payload": "!!not base64!!"}}', '{"event": "media", "media": {"payload": "abc"}}',
    '{"event": "mark"}', '{"event": "mark", "mark": {"name": 3}}',
    '{"event": "dtmf", "dtmf": {"digit": "12"}}', '{"event": "dtmf", "dtmf": {"digit": "\\"; drop"}}',
    "[" * 5000,  # nested deeper than a parser can follow
    b"\x00\x01\x02", b"",
]


@contextlib.asynccontextmanager
async def call_under_attack() -> AsyncIterator[tuple[FakeOpenAI, relay.Relay, str, Callable[[], Awaitable[None]]]]:
    """A relay with a normal call running beside whatever the test throws at it.

    Yields the fake, the relay, the URL, and a check that the normal call lost nothing.
    """
    async with FakeOpenAI().running() as fake, running_relay(fake) as (the_relay, url):
        normal = await FakeTwilio(url, 1).open()
        frames = [audio(1, i) for i in range(30)]
        sending = asyncio.create_task(normal.send_media(frames, pace=0.01))

        async def check() -> None:
            await sending
            await eventually(lambda: any(s.caller_audio() == pcm(frames) for s in fake.sessions))
            assert (await health(the_relay))["connections"]["active"] >= 1
            assert the_relay.stats.errors("relay_bug") == 0

        yield fake, the_relay, url, check
        await normal.close()
        await eventually(lambda: not the_relay.calls)


def test_hostile_frames_beside_a_normal_call(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with call_under_attack() as (fake, the_relay, url, normal_call_is_intact):
            hostile = await FakeTwilio(url, 2).open()
            for frame in HOSTILE_FRAMES:
                await hostile.send(frame)
            await hostile.send_media([audio(2, 0)])  # the hostile call itself still works
            await eventually(lambda: any(s.caller_audio() == pcm([audio(2, 0)]) for s in fake.sessions))
            assert the_relay.stats.errors("bad_twilio_input") == len(HOSTILE_FRAMES)  # each counted once
            flood = await FakeTwilio(url, 3).open()
            for _ in range(10_000):
                await flood.send("{}")
            await flood.send_media([audio(3, 0)])
            await eventually(lambda: any(s.caller_audio() == pcm([audio(3, 0)]) for s in fake.sessions))
            silent_reader, silent_writer = await asyncio.open_connection("127.0.0.1", the_relay.port)  # type: ignore[attr-defined]
            non_utf8 = await FakeTwilio(url, 4).open()
            await non_utf8.ws.send(b"\xff\xfe\xfd", text=True)  # type: ignore[union-attr]
            await non_utf8.closed.wait()
            assert non_utf8.close_code == 1007
            reset = await FakeTwilio(url, 5).open()
            reset.ws.transport.abort()  # type: ignore[union-attr]
            await normal_call_is_intact()
            await eventually(lambda: len(the_relay.calls) == 3)  # normal, hostile, flood
            assert the_relay.stats.errors("bad_twilio_input") >= 10_000
            assert the_relay.stats.errors("twilio_connection_lost") == 2  # non-UTF-8, reset
            silent_writer.close()
            await asyncio.gather(hostile.close(), flood.close(), non_utf8.shutdown(), reset.shutdown())

    with caplog.at_level(logging.WARNING, logger="relay"):
        run(scenario, limit=60)
    assert len(caplog.records) < 100  # bad input is logged once per kind per call, not per frame


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
twilio_like = st.fixed_dictionaries(
    {"event": st.sampled_from(["connected", "start", "media", "mark", "dtmf", "unknown"])},
    optional={"start": json_values, "media": json_values, "mark": json_values, "dtmf": json_values,
              "streamSid": json_values, "sequenceNumber": json_values},
)
hostile_frames = st.lists(
    st.one_of(st.binary(max_size=40), st.text(max_size=40), json_values.map(json.dumps), twilio_like.map(json.dumps)),
    min_size=1, max_size=25,
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=hostile_frames)
def test_generated_hostile_frames_never_hurt_the_relay(frames: list[str | bytes]) -> None:
    async def scenario() -> None:
        async with call_under_attack() as (_, _, url, normal_call_is_intact):
            hostile = await FakeTwilio(url, 2).open(start=False)
            with contextlib.suppress(ConnectionClosed):
                for frame in frames:
                    await hostile.send(frame)
            await normal_call_is_intact()
            await hostile.close()

    run(scenario)


# Warm sessions ------------------------------------------------------------------------------------


def test_warm_sessions_let_a_call_skip_the_handshake() -> None:
    async def scenario() -> None:
        fake = FakeOpenAI()
        async with fake.running():
            await warm_call(fake)
            # Shutting down the relay closed the warm sessions nobody used.
            await eventually(lambda: all(s.ws.state is State.CLOSED for s in fake.sessions))

    async def warm_call(fake: FakeOpenAI) -> None:
        async with running_relay(fake, WARM_SESSIONS="2") as (the_relay, url):
            await eventually(lambda: len(fake.sessions) == 2 and all(s.received for s in fake.sessions))
            warm = list(fake.sessions)
            assert all(s.received[0]["type"] == "session.update" for s in warm)
            await warm[0].ws.close()  # OpenAI dropped one while it waited: it must not be used
            fake.handshake_delay = 0.5  # new dials are slow from now on
            twilio = await FakeTwilio(url).open(customParameters={})
            await twilio.send_media([audio(1, i) for i in range(3)])
            await eventually(lambda: warm[1].caller_audio() == pcm([audio(1, i) for i in range(3)]))
            assert len(warm[1].of_type("session.update")) == 1  # configured once, before the call
            await eventually(lambda: len(fake.sessions) >= 3)  # a replacement is being dialled
            await twilio.close()
            await eventually(lambda: not the_relay.calls)
            assert any(s.ws.state is State.OPEN for s in fake.sessions)  # the replacement, still warm

    run(scenario)


def test_warm_sessions_are_replaced_before_they_grow_old(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay, "WARM_SESSION_MAX_AGE", 0.3)  # 4 minutes in real life

    async def scenario() -> None:
        async with FakeOpenAI().running() as fake, running_relay(fake, WARM_SESSIONS="1"):
            await eventually(lambda: len(fake.sessions) >= 3)
            await eventually(lambda: all(s.ws.state is State.CLOSED for s in fake.sessions[:2]))
            assert sum(s.ws.state is State.OPEN for s in fake.sessions) <= 1

    run(scenario)


# Who may speak: the turn-taking rules as sequences of events, without sockets -------------------

Step = tuple[str, tuple[Any, ...], str | None]  # a Floor event, its arguments, the decision expected


def decision_of(decision: relay.Decision) -> str | None:
    """"ask" for a response.create (checked against the SDK's types), the ending's kind, or None."""
    if isinstance(decision, relay.End):
        return decision.kind
    if decision is None:
        return None
    assert decision["type"] == "response.create" and decision["event_id"].startswith("relay_response_")
    assert not sdk_problems(decision), sdk_problems(decision)
    return "ask"


def play_floor(steps: list[Step]) -> relay.Floor:
    """Feed a fresh Floor these events; after each, check the decision it returns."""
    floor = relay.Floor(idle_prompts=2)
    for name, arguments, wanted in steps:
        decision = getattr(floor, name)(*arguments)
        if name == "new_item":
            decision = None  # an item id, not a decision: the caller asks next() once it is sent
        assert decision_of(decision) == wanted, (name, arguments, decision, floor.state)
    return floor


UP = ("ready", (), None)
NEXT = "next"


@pytest.mark.parametrize(("when", "asks_again"), [
    ("before the output", True),  # the VAD answer began before the output existed
    ("before OpenAI confirmed the output", True),  # it cannot have seen it
    ("after OpenAI confirmed the output", False),  # it saw it, and speaks the result itself
])
def test_floor_a_tool_result_crossing_a_vad_answer(when: str, asks_again: bool) -> None:
    vad = ("created", (), None)
    steps: list[Step] = [UP, ("created", (), None), ("tool_started", (), None), ("done", (), None)]
    if when == "before the output":
        steps.append(vad)
    steps += [("tool_finished", (), None), ("new_item", (), None)]
    if when == "before OpenAI confirmed the output":
        steps.append(vad)
    steps.append(("confirmed", ("relay_1",), None))
    if when == "after OpenAI confirmed the output":
        steps.append(vad)
    steps += [(NEXT, (), None), ("done", (), "ask" if asks_again else None)]
    assert play_floor(steps).state == ("BUSY" if asks_again else "FREE")


def test_floor_no_greeting_over_an_answer_to_a_caller_who_spoke_first() -> None:
    floor = play_floor([UP, ("created", (), None), ("greet", ("Hi!",), None), ("done", (), None),
                        ("greet", ("Hi!",), None)])
    assert floor.state == "FREE"  # greeted once, by not talking over the caller
    play_floor([UP, ("greet", ("Hi!",), "ask"), ("created", (), None), ("done", (), None), ("greet", ("Hi!",), None)])
    play_floor([("greet", ("Hi!",), None), UP, ("greet", ("Hi!",), "ask")])  # no session yet: it waits


def test_floor_a_refusal_because_a_response_was_active_asks_again_after_it() -> None:
    play_floor([UP, ("new_item", (), None), (NEXT, (), "ask"),  # a keypad press
                ("created", (), None),  # server VAD's answer began first...
                ("refused", ("relay_response_1", relay.ACTIVE_RESPONSE), None),  # ...so the request is refused
                ("done", (), "ask"),  # the press is still owed
                ("created", (), None), ("done", (), None)])


def test_floor_a_refusal_for_another_reason_frees_the_floor() -> None:
    floor = play_floor([UP, ("greet", ("Hi!",), "ask"),
                        ("refused", ("relay_response_1", "invalid_value"), None),  # the greeting is refused
                        ("new_item", (), None), (NEXT, (), "ask")])  # a keypad press is still answered
    assert floor.state == "BUSY"
    floor = play_floor([UP, ("new_item", (), None), (NEXT, (), "ask"),
                        ("refused", ("relay_response_1", "invalid_value"), None), (NEXT, (), None)])
    assert floor.state == "FREE"  # a plain request refused for its own sake is not sent again and again
    play_floor([UP, ("new_item", (), None), (NEXT, (), "ask"),
                ("refused", ("some_other_event", "invalid_value"), None), ("created", (), None), ("done", (), None)])


def test_floor_a_drop_during_a_tool_answers_in_the_new_session() -> None:
    floor = play_floor([UP, ("created", (), None), ("tool_started", (), None), ("done", (), None),
                        ("lost", (set(),), None), ("pick_up", ("Pick up.",), "ask"),
                        ("tool_finished", (), None), ("new_item", (), None),  # its result, as a note
                        (NEXT, (), None), UP,  # the pick-up is under way
                        ("created", (), None), ("confirmed", ("relay_1",), None), ("done", (), "ask")])
    assert floor.state == "BUSY"
    # An item kept while no session is up is answered once one is: after a drop, and at call start.
    play_floor([UP, ("new_item", (), None), ("lost", ({"relay_1"},), None), (NEXT, (), None), ("ready", (), "ask")])
    play_floor([("new_item", (), None), (NEXT, (), None), ("ready", (), "ask")])


def test_floor_an_answer_owed_while_the_caller_speaks_waits_for_their_turn_to_end() -> None:
    """Never over the caller: the answer turn detection gives their turn sees what is owed."""
    floor = play_floor([UP, ("created", (), None), ("tool_started", (), None), ("done", (), None),
                        ("speech_started", (), None), ("tool_finished", (), None), ("new_item", (), None),
                        ("confirmed", ("relay_1",), None), (NEXT, (), None),  # the caller speaks: no request
                        ("speech_stopped", (), None), ("created", (), None),  # their turn's answer sees it
                        ("done", (), None)])
    assert floor.state == "FREE" and not floor.owed
    # A result OpenAI confirms only after that answer began is asked for after it.
    play_floor([UP, ("speech_started", (), None), ("new_item", (), None), (NEXT, (), None),
                ("speech_stopped", (), None), ("created", (), None), ("confirmed", ("relay_1",), None),
                ("done", (), "ask")])
    # Should turn detection's answer not come, the silence that follows is the relay's to fill.
    floor = play_floor([UP, ("speech_started", (), None), ("new_item", (), None), (NEXT, (), None),
                        ("speech_stopped", (), None), ("silent", ("owed",), "ask")])
    assert floor.silence == ""
    # A session lost while the caller speaks leaves no speaker behind: the next one is asked.
    play_floor([UP, ("speech_started", (), None), ("new_item", (), None), ("lost", ({"relay_1"},), None),
                ("ready", (), "ask")])


def test_floor_hang_up_and_transfer_wait_for_the_floor_then_end_it() -> None:
    floor = play_floor([UP, ("created", (), None), ("tool_started", (), None),
                        ("end", ("hang_up", "the agent ended the call", "agent_hung_up"), None),
                        ("tool_finished", (), None), ("new_item", (), None), (NEXT, (), None),
                        ("done", (), "hang_up"), (NEXT, (), None), ("say", ("Goodbye.",), None)])
    assert floor.state == "ENDED"
    play_floor([UP, ("end", ("transfer", "", "transferred"), None), (NEXT, (), "transfer"), ("ending_failed", (), None),
                ("new_item", (), None), (NEXT, (), "ask")])  # a failed transfer is told to the agent
    play_floor([UP, ("created", (), None), ("end", ("hang_up", "", "agent_hung_up"), None),
                ("lost", (set(),), "hang_up")])  # the session is gone: no answer will come
    play_floor([UP, ("created", (), None), ("end_now", ("hang_up", "time limit", "time_limit"), "hang_up"),
                ("end_now", ("hang_up", "time limit", "time_limit"), None)])


CHECK_IN = [("silent", ("caller",), "ask"), ("created", (), None), ("done", (), None)]


def test_floor_a_silent_caller_is_checked_on_then_said_goodbye_to() -> None:
    floor = play_floor([UP, *CHECK_IN, *CHECK_IN,  # IDLE_PROMPTS=2 check-ins...
                        ("silent", ("caller",), "ask"), ("created", (), None),  # ...then the goodbye
                        ("done", (), "hang_up")])
    assert floor.ending is not None and floor.ending.cause == "silence" and floor.state == "ENDED"
    floor = relay.Floor(idle_prompts=0)
    floor.ready()
    assert decision_of(floor.silent("caller")) == "ask" and floor.ending is not None  # no check-in: goodbye


def test_floor_the_caller_speaking_starts_the_ladder_again_and_calls_off_the_goodbye() -> None:
    floor = play_floor([UP, *CHECK_IN, *CHECK_IN, ("silent", ("caller",), "ask"), ("created", (), None),
                        ("speech_started", (), None),  # the caller answers the goodbye...
                        ("done", (), None),  # ...so the call goes on
                        ("speech_stopped", (), None), *CHECK_IN])
    assert floor.ending is None and floor.check_ins == 1
    floor = play_floor([UP, *CHECK_IN, *CHECK_IN, ("caller_is_there", (), None), *CHECK_IN])  # a keypad press
    assert floor.check_ins == 1


def test_floor_no_silence_is_filled_while_anything_goes_on() -> None:
    """A timer that fires late, after its silence has ended, decides nothing."""
    for steps in ([UP, ("created", (), None)],  # a response runs
                  [UP, ("speech_started", (), None)],  # the caller speaks
                  [UP, ("new_item", (), None), (NEXT, (), "ask")],  # something owed is being answered
                  [UP, ("end", ("transfer", "", "transferred"), None)],  # a transfer waits
                  [UP, ("end_now", ("hang_up", "", "agent_hung_up"), "hang_up")],  # a hang-up is under way
                  []):  # no session
        floor = play_floor([*steps, ("silent", ("caller",), None), ("silent", ("tool",), None)])
        assert floor.silence == ""


def test_floor_a_slow_tool_gets_one_filler_line_then_one_answer() -> None:
    floor = play_floor([UP, ("created", (), None), ("tool_started", (), None), ("done", (), None),
                        ("silent", ("caller",), None),  # a tool runs: it is not the caller's silence
                        ("silent", ("tool",), "ask"), ("created", (), None), ("done", (), None),
                        ("silent", ("tool",), None),  # never twice for one wait
                        ("tool_finished", (), None), ("new_item", (), None), (NEXT, (), "ask"),
                        ("created", (), None), ("confirmed", ("relay_1",), None), ("done", (), None)])
    assert floor.silence == "caller" and floor.state == "FREE"
    floor = play_floor([UP, ("created", (), None), ("tool_started", (), None), ("done", (), None),
                        ("silent", ("tool",), "ask"), ("tool_finished", (), None), ("new_item", (), None),
                        (NEXT, (), None),  # the filler is under way: the result is answered after it
                        ("created", (), None), ("done", (), "ask")])
    assert not floor.filled  # the next slow tool gets its own filler line


# An agent that can act: tools, MCP, per-call context ------------------------------------------


@pytest.fixture
def shop_tools() -> Iterator[dict[str, Any]]:
    """Tools made with relay.tool, exactly as a newcomer adds theirs; ``tools`` is the set to serve.

    relay.TOOLS is put back as it was at once, so a user's own tools are neither removed nor
    offered. ``order_status`` waits for a token on ``gate`` before answering, so a test
    decides when it finishes. ``seen`` records what each call of it was given.
    """
    state: dict[str, Any] = {"gate": asyncio.Queue(), "seen": []}
    users_tools = dict(relay.TOOLS)

    @relay.tool({"type": "object", "properties": {"order": {"type": "string"}}, "required": ["order"]})
    async def order_status(call: relay.Call, order: str) -> dict[str, Any]:
        """Say where an order is."""
        state["seen"].append({"call_sid": call.call_sid, "parameters": dict(call.parameters),
                              "started_at": call.started_at, "order": order})
        await state["gate"].get()
        return {"order": order, "status": "shipped"}

    @relay.tool()
    async def opening_hours(call: relay.Call) -> dict[str, Any]:
        """When the shop is open."""
        return {"hours": "9 to 5"}

    @relay.tool()
    async def broken(call: relay.Call) -> None:
        """A tool with a bug."""
        raise RuntimeError("the database is down")

    @relay.tool(timeout=0.2)
    async def stuck(call: relay.Call) -> None:
        """A tool that never answers."""
        await asyncio.sleep(60)

    @relay.tool()
    async def abandoned(call: relay.Call) -> None:
        """A tool whose own request was cancelled under it."""
        request = asyncio.get_running_loop().create_future()
        request.cancel()
        await request

    names = ("order_status", "opening_hours", "broken", "stuck", "abandoned")
    state["tools"] = {**BUILT_IN_TOOLS, **{name: relay.TOOLS[name] for name in names}}
    relay.TOOLS.clear()
    relay.TOOLS.update(users_tools)
    yield state


def test_the_relay_serves_every_tool_in_relay_py() -> None:
    config = relay.load_config({"OPENAI_API_KEY": API_KEY})
    served = relay.Relay(config)
    assert served.tools is relay.TOOLS and served.warm.tools is relay.TOOLS
    names = {tool["name"] for tool in relay.offered_tools(config, served.tools)}
    assert names == {name for name, tool in relay.TOOLS.items() if tool.offered_if(config)}
    assert "end_call" in names and "transfer_call" not in names  # transfer_call needs TRANSFER_TO


async def function_call(session: FakeSession, name: str, arguments: str, call_id: str,
                        response_id: str = "resp_1") -> None:
    await session.send({"type": "response.output_item.done", "response_id": response_id, "output_index": 0,
                        "item": {"id": f"item_{call_id}", "type": "function_call", "status": "completed",
                                 "name": name, "call_id": call_id, "arguments": arguments}})


async def response_created(session: FakeSession, response_id: str) -> None:
    await session.send({"type": "response.created", "response": {"id": response_id, "status": "in_progress"}})


async def response_done(session: FakeSession, response_id: str) -> None:
    await session.send({"type": "response.done", "response": {"id": response_id, "status": "completed"}})


def tool_outputs(session: FakeSession) -> dict[str, Any]:
    """The function_call_output items the relay sent, by call_id, with their output decoded."""
    return {event["item"]["call_id"]: json.loads(event["item"]["output"])
            for event in session.of_type("conversation.item.create")
            if event["item"]["type"] == "function_call_output"}


def test_the_session_offers_the_tools_it_is_given(shop_tools: dict[str, Any]) -> None:
    async def scenario() -> None:
        async with one_call(shop_tools["tools"]) as (_, _, _, session):
            tools = {tool["name"]: tool for tool in session.of_type("session.update")[0]["session"]["tools"]}
            assert set(tools) == {"end_call", "order_status", "opening_hours", "broken", "stuck", "abandoned"}
            assert tools["order_status"] == {
                "type": "function", "name": "order_status", "description": "Say where an order is.",
                "parameters": {"type": "object", "properties": {"order": {"type": "string"}}, "required": ["order"]},
            }
            assert tools["end_call"]["description"].startswith("Hang up the phone call. Use it only after")
            assert tools["opening_hours"]["parameters"] == {"type": "object", "properties": {}}
            assert session.of_type("session.update")[0]["session"]["tool_choice"] == "auto"

    run(scenario)


def test_two_tools_in_one_response_give_two_outputs_then_exactly_one_response(
    shop_tools: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with one_call(shop_tools["tools"]) as (_, the_relay, twilio, session):
            # Round 1: one tool is still running when the response ends.
            await response_created(session, "resp_1")
            await function_call(session, "order_status", '{"order": "SECRET-ORDER-99"}', "call_1")
            await function_call(session, "opening_hours", "{}", "call_2")
            await eventually(lambda: "call_2" in tool_outputs(session))  # each output goes as soon as it is ready
            await session.say("item_x", speech(1, 3))  # the audio pumps never wait for a tool
            await eventually(lambda: len(twilio.media) == 3)
            await response_done(session, "resp_1")
            await asyncio.sleep(0.2)
            assert "call_1" not in tool_outputs(session) and not session.of_type("response.create")
            shop_tools["gate"].put_nowait("go")
            await eventually(lambda: len(session.of_type("response.create")) == 1)
            assert tool_outputs(session) == {"call_1": {"order": "SECRET-ORDER-99", "status": "shipped"},
                                             "call_2": {"hours": "9 to 5"}}
            kinds = [event["type"] for event in session.received]
            assert kinds.index("response.create") > max(i for i, k in enumerate(kinds) if k == "conversation.item.create")
            # Round 2: both tools finish while the response is still active.
            await response_created(session, "resp_2")
            await response_done(session, "resp_2")
            await response_created(session, "resp_3")
            shop_tools["gate"].put_nowait("go")
            await function_call(session, "order_status", '{"order": "B-2"}', "call_3", "resp_3")
            await function_call(session, "opening_hours", "{}", "call_4", "resp_3")
            await eventually(lambda: {"call_3", "call_4"} <= set(tool_outputs(session)))
            await asyncio.sleep(0.2)
            assert len(session.of_type("response.create")) == 1  # not while resp_3 is active
            await response_done(session, "resp_3")
            await eventually(lambda: len(session.of_type("response.create")) == 2)
            await response_created(session, "resp_4")
            await response_done(session, "resp_4")
            await asyncio.sleep(0.2)
            assert len(session.of_type("response.create")) == 2  # resp_4 spoke the results: nothing more
            (call,) = the_relay.calls
            seen = shop_tools["seen"][0]
            assert seen["call_sid"] == twilio.call_sid and seen["parameters"] == {"caller": "+15550001111"}
            assert seen["started_at"] == call.started_at and seen["order"] == "SECRET-ORDER-99"
            numbers = await metrics(the_relay)
            assert numbers['relay_tool_calls_total{tool="order_status",outcome="ok"}'] == 2
            assert numbers['relay_tool_calls_total{tool="opening_hours",outcome="ok"}'] == 2
            assert numbers["relay_tool_call_seconds_count"] == 4

    with caplog.at_level(logging.DEBUG, logger="relay"):
        run(scenario)
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert sum("tool order_status: ok in" in line and "CA" in line for line in info) == 2
    assert not any("SECRET-ORDER-99" in line for line in info)  # arguments at DEBUG only
    assert any("SECRET-ORDER-99" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)


def test_failing_tools_and_bad_calls_give_the_model_an_error_and_the_call_goes_on(
    shop_tools: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    calls = {
        "c_raise": ("broken", "{}", "error"),
        "c_timeout": ("stuck", "{}", "timeout"),
        "c_cancelled": ("abandoned", "{}", "error"),
        "c_not_json": ("order_status", '{"order": ', "bad_arguments"),
        "c_too_deep": ("order_status", "[" * 5000, "bad_arguments"),
        "c_not_object": ("order_status", "[1, 2]", "bad_arguments"),
        "c_wrong_name": ("order_status", '{"item": "A"}', "bad_arguments"),
        "c_unknown": ("launch_rockets", "{}", "unknown_tool"),
    }

    async def scenario() -> None:
        async with one_call(shop_tools["tools"]) as (_, the_relay, twilio, session):
            await response_created(session, "resp_1")
            for call_id, (name, arguments, _) in calls.items():
                await function_call(session, name, arguments, call_id)
            await response_done(session, "resp_1")
            await eventually(lambda: set(tool_outputs(session)) == set(calls))
            assert all(set(output) == {"error"} for output in tool_outputs(session).values())
            assert "the database is down" in tool_outputs(session)["c_raise"]["error"]
            assert "0.2 seconds" in tool_outputs(session)["c_timeout"]["error"]
            assert "launch_rockets" in tool_outputs(session)["c_unknown"]["error"]
            await eventually(lambda: len(session.of_type("response.create")) == 1)
            await session.say("item_a", speech(1, 2))  # the call goes on
            await eventually(lambda: len(twilio.media) == 2)
            assert len(the_relay.calls) == 1 and the_relay.stats.errors("relay_bug") == 0
            numbers = await metrics(the_relay)
            for name, _, outcome in calls.values():
                label = "unknown" if name == "launch_rockets" else name
                assert numbers[f'relay_tool_calls_total{{tool="{label}",outcome="{outcome}"}}'] >= 1
            assert numbers['relay_tool_calls_total{tool="order_status",outcome="bad_arguments"}'] == 4

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("tool broken failed" in r.getMessage() and r.exc_info for r in warnings)
    assert any("tool stuck did not finish within 0.2 s" in r.getMessage() and r.exc_info for r in warnings)
    assert any("tool broken: error in" in r.getMessage() for r in caplog.records)


def test_a_caller_who_barges_in_while_a_tool_runs_still_hears_its_result(shop_tools: dict[str, Any]) -> None:
    async def vad_wins_the_race(session: FakeSession, request: dict[str, Any]) -> None:
        await session.begin("resp_vad3")  # server VAD answers the caller just before the request arrives
        await session.refuse(request)

    async def scenario() -> None:
        async with one_call(shop_tools["tools"]) as (fake, _, _, session):
            creates = lambda: len(session.of_type("response.create"))  # noqa: E731
            # The result comes in while the caller's new answer is playing: it is spoken after it.
            await response_created(session, "resp_1")
            await function_call(session, "order_status", '{"order": "A"}', "call_1")
            await response_done(session, "resp_1")
            await speech_started(session)
            await speech_stopped(session)
            await response_created(session, "resp_vad")  # server VAD answers the caller
            shop_tools["gate"].put_nowait("go")
            await eventually(lambda: "call_1" in tool_outputs(session))
            await asyncio.sleep(0.2)
            assert creates() == 0  # never while a response is active
            await response_done(session, "resp_vad")
            await eventually(lambda: creates() == 1)  # the fake answers it, start to end
            # The result comes in after the caller's answer has ended: it is spoken at once.
            await response_created(session, "resp_3")
            await function_call(session, "order_status", '{"order": "B"}', "call_2", "resp_3")
            await response_done(session, "resp_3")
            await speech_started(session)
            await speech_stopped(session)
            await response_created(session, "resp_vad2")
            await response_done(session, "resp_vad2")
            await asyncio.sleep(0.2)
            assert creates() == 1
            shop_tools["gate"].put_nowait("go")
            await eventually(lambda: creates() == 2)
            await asyncio.sleep(0.2)
            assert creates() == 2
            # The result crosses an answer that server VAD begins at that moment: that answer has
            # not seen it, and OpenAI refuses the relay's request. The relay asks again after it.
            await response_created(session, "resp_5")
            await function_call(session, "order_status", '{"order": "C"}', "call_3", "resp_5")
            await response_done(session, "resp_5")
            fake.respond = vad_wins_the_race
            shop_tools["gate"].put_nowait("go")
            await eventually(lambda: creates() == 3)
            fake.respond = FakeSession.answer
            await asyncio.sleep(0.2)
            assert creates() == 3  # never while that answer is active
            await response_done(session, "resp_vad3")
            await eventually(lambda: creates() == 4)
            await asyncio.sleep(0.2)
            assert creates() == 4 and not session.active  # answered once: nothing more

    run(scenario)


def test_a_tool_result_that_comes_while_the_caller_speaks_is_not_spoken_over_them(
    shop_tools: dict[str, Any],
) -> None:
    async def scenario() -> None:
        async with one_call(shop_tools["tools"]) as (_, _, _, session):
            await response_created(session, "resp_1")
            await function_call(session, "order_status", '{"order": "A"}', "call_1")
            await response_done(session, "resp_1")
            await speech_started(session)  # the caller goes on talking
            shop_tools["gate"].put_nowait("go")
            await eventually(lambda: "call_1" in tool_outputs(session))
            await asyncio.sleep(0.2)
            assert not session.of_type("response.create")  # never over the caller
            await speech_stopped(session)
            await response_created(session, "resp_vad")  # server VAD answers their turn, the result in view
            await response_done(session, "resp_vad")
            await asyncio.sleep(0.2)
            assert not session.of_type("response.create")  # that answer has covered the result

    run(scenario)


def test_an_answer_owed_when_the_callers_turn_ends_is_asked_for_if_turn_detection_gives_none(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        async with one_call() as (_, _, twilio, session):
            await speech_started(session)
            await press(twilio, "1")  # while the caller speaks: their turn's answer should see it
            await eventually(lambda: bool(session.of_type("conversation.item.create")))
            await speech_stopped(session)
            await session.send({"type": "error", "event_id": "event_9", "error": {  # that answer fails
                "type": "server_error", "code": "server_error", "message": "The server had an error",
                "param": None, "event_id": None}})
            await eventually(lambda: bool(session.of_type("response.create")))
            assert "response" not in session.of_type("response.create")[0]  # the answer, not a check-in

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    assert any("no answer to the caller's turn came within 1.5 s" in r.getMessage() for r in caplog.records)


def test_a_remote_mcp_server_is_offered_and_its_failures_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    token = "mcp-bearer-secret-123"

    async def scenario() -> None:
        async with one_call(MCP_SERVER_URL="https://mcp.example.com/mcp", MCP_SERVER_LABEL="crm",
                            MCP_AUTHORIZATION=token, MCP_ALLOWED_TOOLS="find_customer, book_visit") as (
            _, the_relay, twilio, session
        ):
            tools = session.of_type("session.update")[0]["session"]["tools"]
            assert tools[-1] == {"type": "mcp", "server_label": "crm", "server_url": "https://mcp.example.com/mcp",
                                 "require_approval": "never", "authorization": token,
                                 "allowed_tools": ["find_customer", "book_visit"]}
            await session.send({"type": "mcp_list_tools.failed", "event_id": "ev_1", "item_id": "item_list"})
            await session.send({"type": "response.mcp_call.failed", "event_id": "ev_2", "item_id": "item_mcp1",
                                "output_index": 0})
            await session.send({"type": "conversation.item.done", "item": {
                "id": "item_list", "type": "mcp_list_tools", "server_label": "crm",
                "tools": [{"name": "find_customer", "input_schema": {}}, {"name": "book_visit", "input_schema": {}}]}})
            await response_created(session, "resp_1")
            await session.send({"type": "response.output_item.done", "response_id": "resp_1", "output_index": 0,
                                "item": {"id": "item_mcp2", "type": "mcp_call", "server_label": "crm",
                                         "name": "find_customer", "arguments": '{"phone": "+15550001111"}',
                                         "output": "Ann Smith"}})
            await session.send({"type": "conversation.item.done", "item": {
                "id": "item_ask", "type": "mcp_approval_request", "server_label": "crm",
                "name": "book_visit", "arguments": "{}"}})
            await eventually(lambda: bool(session.of_type("conversation.item.create")))
            (denial,) = session.of_type("conversation.item.create")
            assert denial["item"]["type"] == "mcp_approval_response"
            assert (denial["item"]["approval_request_id"], denial["item"]["approve"]) == ("item_ask", False)
            await asyncio.sleep(0.1)
            assert not session.of_type("response.create")  # not while resp_1 is active
            await response_done(session, "resp_1")  # OpenAI does not speak MCP results by itself
            await eventually(lambda: len(session.of_type("response.create")) == 1)
            await session.say("item_a", speech(1, 1))  # the call goes on
            await eventually(lambda: len(twilio.media) == 1)
            assert the_relay.stats.errors("mcp_list_tools") == 1

    with caplog.at_level(logging.DEBUG, logger="relay"):
        run(scenario)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert any(level == logging.ERROR and "crm" in line and "https://mcp.example.com/mcp" in line
               for level, line in lines)
    assert any(level == logging.WARNING and "MCP tool call on crm failed" in line for level, line in lines)
    assert any(level == logging.INFO and "MCP server crm offers 2 tool(s)" in line for level, line in lines)
    assert any(level == logging.INFO and "MCP tool find_customer on crm: ok" in line for level, line in lines)
    assert any(level == logging.WARNING and "book_visit: denied" in line for level, line in lines)
    assert not any(token in line or "+15550001111" in line.split("]", 1)[-1] for _, line in lines)


def call_parameters_config() -> dict[str, str]:
    return {"instructions": "You are Max, the bakery's assistant.", "greeting": "Bakery, Max speaking.",
            "voice": "cedar", "caller_name": "Ann", "from": "+15550001111"}


def test_call_parameters_reconfigure_the_session_and_the_greeting_waits_for_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        fake = FakeOpenAI()
        async with fake.running(), running_relay(fake, GREETING="Hello from the environment.") as (the_relay, url):
            twilio = await FakeTwilio(url).open(start=False)  # "start" comes after OpenAI is configured
            session = await fake.session()
            await eventually(lambda: len(session.of_type("session.update")) == 1)
            await eventually(lambda: all(configured(call) for call in the_relay.calls))
            fake.configure.clear()  # hold back OpenAI's confirmation of the next update
            await twilio.start(customParameters=call_parameters_config())
            await eventually(lambda: len(session.of_type("session.update")) == 2)
            update = session.of_type("session.update")[1]["session"]
            assert update["audio"]["output"]["voice"] == "cedar"
            assert update["instructions"].startswith("You are Max, the bakery's assistant.")
            assert "Call details:\n- caller_name: Ann\n- from: +15550001111" in update["instructions"]
            assert "Tessa" not in update["instructions"]
            await asyncio.sleep(0.2)
            assert not session.of_type("response.create")  # the greeting waits for the update
            fake.configure.set()
            await eventually(lambda: bool(session.of_type("response.create")))
            (greeting,) = session.of_type("response.create")
            assert "Bakery, Max speaking." in greeting["response"]["instructions"]
            await twilio.close()

    with caplog.at_level(logging.DEBUG, logger="relay"):
        run(scenario)
    assert not any("Ann" in r.getMessage() for r in caplog.records)  # names only, never values
    assert any("custom parameters: caller_name, from, greeting, instructions, voice" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("parameters", [{}, call_parameters_config()])
def test_a_call_whose_start_comes_first_needs_one_session_update(parameters: dict[str, str]) -> None:
    async def scenario() -> None:
        fake = FakeOpenAI()
        fake.handshake_delay = 0.3  # Twilio's "start" arrives while OpenAI is still answering
        async with fake.running(), running_relay(fake) as (_, url):
            twilio = await FakeTwilio(url).open(customParameters=parameters)
            session = await fake.session()
            await eventually(lambda: bool(session.of_type("response.create")))  # greeted
            (update,) = session.of_type("session.update")
            assert ("Call details:\n- caller_name: Ann" in update["session"]["instructions"]) is bool(parameters)
            voice = update["session"]["audio"]["output"]["voice"]
            assert voice == ("cedar" if parameters else "alloy")
            await twilio.close()

    run(scenario)


def test_an_unknown_voice_parameter_is_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        fake = FakeOpenAI()
        fake.handshake_delay = 0.2
        async with fake.running(), running_relay(fake, VOICE="sage") as (_, url):
            twilio = await FakeTwilio(url).open(customParameters={"voice": "robot", "account": "gold"})
            session = await fake.session()
            await eventually(lambda: bool(session.of_type("session.update")))
            update = session.of_type("session.update")[0]["session"]
            assert update["audio"]["output"]["voice"] == "sage"
            assert update["instructions"].endswith("Call details:\n- account: gold")
            await twilio.close()

    with caplog.at_level(logging.WARNING, logger="relay"):
        run(scenario)
    assert any("ignoring the voice parameter: 'robot'" in r.getMessage() for r in caplog.records)


def test_twiml_passes_the_caller_and_the_number_dialled_as_parameters() -> None:
    async def scenario() -> None:
        async with FakeOpenAI().running() as fake, running_relay(fake) as (the_relay, _):
            port = the_relay.port  # type: ignore[attr-defined]
            path = "/twiml?CallSid=CA1&From=%2B15550001111&To=%2B15559998888&Caller=x"
            status, body = await raw_request(port, path, {"Host": "relay.example.com"}, websocket=False)
            assert status == 200
            stream = ElementTree.fromstring(body).find("Connect/Stream")
            assert stream.get("url") == "ws://relay.example.com/media-stream"
            assert [(p.get("name"), p.get("value")) for p in stream.findall("Parameter")] == [
                ("from", "+15550001111"), ("to", "+15559998888")]
            status, body = await raw_request(port, "/twiml?From=client%3A%22Ann%22%20%26%20%3CBob%3E",
                                             {"Host": "relay.example.com"}, websocket=False)
            (parameter,) = ElementTree.fromstring(body).findall("Connect/Stream/Parameter")
            assert parameter.get("value") == 'client:"Ann" & <Bob>'  # escaped, so the XML stays valid
            status, body = await raw_request(port, "/twiml", {"Host": "relay.example.com"}, websocket=False)
            assert not ElementTree.fromstring(body).findall("Connect/Stream/Parameter")

    run(scenario)


# What Twilio's console sends a number's webhook by default: a POST, its form signed with the URL.
WEBHOOK_FORM = [("AccountSid", "AC" + "0" * 32), ("AnsweredBy", "human"), ("CallSid", "CA" + "ab" * 16),
                ("CallStatus", "ringing"), ("Caller", "+15550001111"), ("FromCity", ""), ("From", "+15550001111"),
                ("To", "+15559998888"), ("Direction", "outbound-api")]


def post_signature(url: str, form: list[tuple[str, str]]) -> str:
    """Twilio's signature of a POST: the URL, then each field's name and value, sorted by name."""
    return twilio_signature(url + "".join(name + value for name, value in sorted(form)))


async def exchange(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Write one request exactly as given and read the whole answer: status, headers, body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    assert answer, "an empty reply"
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    return int(status_line.split()[1]), {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}, body


def post_request(path: str, body: str, headers: dict[str, str]) -> bytes:
    fields = {"Host": "relay.example.com", "Content-Type": "application/x-www-form-urlencoded",
              "Content-Length": str(len(body.encode())), **headers}
    return (f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
            + body).encode()


def test_twiml_answers_twilios_post_webhook_and_checks_its_signature(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        body = urllib.parse.urlencode(WEBHOOK_FORM)
        async with FakeOpenAI().running() as fake, running_relay(fake, TWILIO_AUTH_TOKEN=AUTH_TOKEN) as (the_relay, _):
            port = the_relay.port  # type: ignore[attr-defined]
            proxied = {"X-Forwarded-Proto": "https"}
            signed = post_signature("https://relay.example.com/twiml?tenant=7", WEBHOOK_FORM)
            status, fields, answer = await exchange(port, post_request(
                "/twiml?tenant=7", body, {**proxied, "X-Twilio-Signature": signed}))
            assert status == 200 and fields["content-type"] == "text/xml"
            stream = ElementTree.fromstring(answer).find("Connect/Stream")
            assert stream.get("url") == "wss://relay.example.com/media-stream"
            assert [(p.get("name"), p.get("value")) for p in stream.findall("Parameter")] == [
                ("from", "+15550001111"), ("to", "+15559998888"), ("answered_by", "human"),
                ("tenant", "7")]  # the webhook URL's own fields are passed on too
            with_port = post_signature("https://relay.example.com:443/twiml", WEBHOOK_FORM)
            assert (await exchange(port, post_request("/twiml", body, {**proxied, "X-Twilio-Signature": with_port})))[0] == 200
            tampered = body.replace("human", "machine_start")
            for headers, sent in (({}, body),  # unsigned
                                  ({"X-Twilio-Signature": twilio_signature("https://relay.example.com/twiml")}, body),
                                  ({"X-Twilio-Signature": with_port}, tampered)):
                status, _, answer = await exchange(port, post_request("/twiml", sent, {**proxied, **headers}))
                assert (status, answer) == (403, b"Invalid Twilio signature.\n")
            assert (await metrics(the_relay))['relay_calls_refused_total{reason="signature"}'] == 3
        async with FakeOpenAI().running() as fake, running_relay(fake) as (the_relay, _):
            status, _, answer = await exchange(the_relay.port, post_request("/twiml", body, {}))  # type: ignore[attr-defined]
            assert status == 200  # no TWILIO_AUTH_TOKEN: nothing to check
            assert ElementTree.fromstring(answer).find("Connect/Stream").get("url") == "ws://relay.example.com/media-stream"
        assert not fake.sessions

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    lines = [r.getMessage() for r in caplog.records]
    assert lines.count(f"TwiML for call CA{'ab' * 16} (POST /twiml), answered by human") == 3
    assert not any("+1555" in line for line in lines)  # the numbers are personal data


def test_other_methods_and_posts_elsewhere_get_405_and_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with FakeOpenAI().running() as fake, running_relay(fake) as (the_relay, _):
            port = the_relay.port  # type: ignore[attr-defined]
            for method, path, body, allowed in (("PUT", "/twiml", "From=%2B1555", "GET, POST"),
                                                ("DELETE", "/health", "x" * 100_000, "GET, HEAD"),
                                                ("OPTIONS", "/media-stream", "", "GET, HEAD")):
                length = f"Content-Length: {len(body)}\r\n" if body else ""
                request = f"{method} {path} HTTP/1.1\r\nHost: relay.example.com\r\n{length}\r\n{body}".encode()
                status, fields, answer = await exchange(port, request)
                assert (status, fields["allow"]) == (405, allowed)
                assert answer == b"Only GET here; POST is for /twiml, Twilio's webhook.\n"
            for path in ("/media-stream", "/health"):
                status, fields, _ = await exchange(port, post_request(path, "From=%2B15550001111", {}))
                assert (status, fields["allow"]) == (405, "GET, HEAD")
            assert (await health(the_relay))["status"] == "healthy"  # GET and HEAD still work
            assert (await metrics(the_relay))['relay_calls_refused_total{reason="method"}'] == 5
            assert not fake.sessions

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert len(refusals) == 5
    assert refusals[0] == "refused PUT /twiml from 127.0.0.1: Only GET here; POST is for /twiml, Twilio's webhook."


def test_a_post_that_is_too_large_slow_or_not_a_form_gets_a_clear_status(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay, "FORM_TIMEOUT", 0.2)

    async def scenario() -> None:
        async with FakeOpenAI().running() as fake, running_relay(fake) as (the_relay, _):
            port = the_relay.port  # type: ignore[attr-defined]
            big = "Note=" + "x" * relay.MAX_FORM_BYTES
            at_the_cap = "Note=" + "x" * (relay.MAX_FORM_BYTES - 5)
            chunked = post_request("/twiml", "", {"Transfer-Encoding": "chunked"}).replace(b"Content-Length: 0\r\n", b"")
            unsized = post_request("/twiml", "", {}).replace(b"Content-Length: 0\r\n", b"")
            cases = [
                (post_request("/twiml", at_the_cap, {}), 200, b"<Response>"),
                (post_request("/twiml", big, {}), 413, f"The form is larger than {relay.MAX_FORM_BYTES} bytes.".encode()),
                (post_request("/twiml", "From=%2B1555", {"Content-Length": "9" * 5000}), 413, b"The form is larger"),
                (post_request("/twiml", "From=%2B1555", {"Content-Length": "100"}), 408, b"The form came too slowly."),
                (chunked, 411, b"A POST here needs a Content-Length"),
                (unsized, 411, b"A POST here needs a Content-Length"),
                (post_request("/twiml", "From=%2B1555", {"Content-Length": "3, 4"}), 411, b"needs a Content-Length"),
                (post_request("/twiml", '{"From": "+1555"}', {"Content-Type": "application/json"}), 415,
                 b"POST /twiml takes a form"),
                (post_request("/twiml", "", {"X-Long": "y" * 9000}), 431, b"Failed to open a WebSocket connection"),
            ]
            for request, wanted, words in cases:
                status, _, answer = await exchange(port, request)
                assert status == wanted and words in answer, (request[:60], status, answer)
            # A POST whose form comes in pieces, the head split mid-line, is read in full.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            request = post_request("/twiml", urllib.parse.urlencode(WEBHOOK_FORM), {})
            for piece in (request[:3], request[3:40], request[40:-30], request[-30:]):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.01)
            answer = await reader.read()
            writer.close()
            assert answer.startswith(b"HTTP/1.1 200 OK") and b'<Parameter name="answered_by" value="human" />' in answer
            assert (await metrics(the_relay))['relay_calls_refused_total{reason="form"}'] == 7
            assert not fake.sessions

    run(scenario)


# Call control through Twilio's REST API ---------------------------------------------------------

ACCOUNT_SID = "AC" + "a1" * 16
API_KEY = "SK" + "b2" * 16
API_SECRET = "twilio-api-secret-for-tests"
TWILIO_ERRORS = {
    "401": (401, {"code": 20003, "message": "Authenticate", "more_info": "https://www.twilio.com/docs/errors/20003",
                  "status": 401}),
    "404": (404, {"code": 20404, "message": "The requested resource was not found",
                  "more_info": "https://www.twilio.com/docs/errors/20404", "status": 404}),
    "500": (500, {"code": 20500, "message": "Internal Server Error",
                  "more_info": "https://www.twilio.com/docs/errors/20500", "status": 500}),
}


class FakeTwilioRest:
    """Twilio's REST API on a loopback port: checks Basic auth, records requests, fails on demand.

    As Twilio does, redirecting a call (``Twiml=``) or completing it ends its media stream:
    the fake Twilio client registered for that CallSid sends ``stop`` and closes.
    """

    def __init__(self, username: str = API_KEY, password: str = API_SECRET) -> None:
        self.authorization = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.played_at_request: list[int] = []  # what the call's phone had played when each came
        self.failure: tuple[int, dict[str, Any]] | None = None  # answer every request with this
        self.cut = False  # answer with a body cut short, as a dropped connection leaves it, and do nothing
        self.delay = 0.0
        self.streams: dict[str, FakeTwilio] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[FakeTwilioRest]:
        server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        async with server:
            yield self
        for task in self.tasks:
            task.cancel()

    def env(self) -> dict[str, str]:
        return {"TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_API_KEY": API_KEY, "TWILIO_API_SECRET": API_SECRET,
                "TWILIO_API_BASE_URL": f"http://127.0.0.1:{self.port}"}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        request_line, *lines = head.split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines if line)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        method, path, _ = request_line.split(" ")
        status, reply = await self.answer(method, path, headers, body.decode())
        data = json.dumps(reply).encode()
        writer.write(f"HTTP/1.1 {status} Fake\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + data[: 10 if self.cut else None])
        await writer.drain()
        writer.close()

    async def answer(self, method: str, path: str, headers: dict[str, str], body: str) -> tuple[int, dict[str, Any]]:
        if headers.get("authorization") != self.authorization:
            return TWILIO_ERRORS["401"]
        assert method == "POST" and headers["content-type"] == "application/x-www-form-urlencoded"
        fields = dict(urllib.parse.parse_qsl(body))
        self.requests.append((path, fields))
        call_sid = re.search(r"/Calls/(CA\w{32})", path)
        stream = self.streams.get(call_sid.group(1)) if call_sid else None
        self.played_at_request.append(stream.played_bytes if stream else -1)
        await asyncio.sleep(self.delay)
        if self.failure:
            return self.failure
        if self.cut:  # the connection drops in the middle of this answer: the request did nothing
            return 500, {"code": 20500, "message": "cut off"}
        resource = path.removeprefix(f"/2010-04-01/Accounts/{ACCOUNT_SID}/")
        if resource == "Calls.json":
            return 201, {"sid": "CA" + "c3" * 16, "status": "queued", "to": fields["To"]}
        if call_sid and resource == f"Calls/{call_sid.group(1)}/Recordings.json":
            return 201, {"sid": "RE" + "d4" * 16, "status": "in-progress", "channels": 2}
        if call_sid and resource == f"Calls/{call_sid.group(1)}.json":
            if stream is not None:
                task = asyncio.create_task(self.end_stream(stream))
                self.tasks.add(task)
            return 200, {"sid": call_sid.group(1), "status": fields.get("Status", "in-progress")}
        return TWILIO_ERRORS["404"]

    async def end_stream(self, twilio: FakeTwilio) -> None:
        with contextlib.suppress(ConnectionClosed):
            await twilio.stop()
            await twilio.ws.close()  # type: ignore[union-attr]


@contextlib.asynccontextmanager
async def rest_call(
    failure: str = "", respond: Responder = FakeSession.answer, **env: str
) -> AsyncIterator[tuple[FakeTwilioRest, relay.Relay, FakeTwilio, FakeSession]]:
    """One call on a relay with REST call control, against the fake REST API."""
    fake = FakeOpenAI()
    fake.respond = respond
    async with fake.running(), FakeTwilioRest().running() as rest:
        rest.failure = TWILIO_ERRORS[failure] if failure else None
        async with running_relay(fake, **{"GREETING": "", **rest.env(), **env}) as (the_relay, url):
            twilio = FakeTwilio(url)
            rest.streams[twilio.call_sid] = twilio
            await twilio.open()
            session = await fake.session()
            await eventually(lambda: all(configured(call) and call.stream_sid for call in the_relay.calls))
            yield rest, the_relay, twilio, session
            await twilio.close()


def no_secrets_in(lines: list[str]) -> bool:
    basic = base64.b64encode(f"{API_KEY}:{API_SECRET}".encode()).decode()
    return not any(API_SECRET in line or basic in line or AUTH_TOKEN in line for line in lines)


@pytest.mark.parametrize("ending", ["end_call", "session_expired", "max_call_seconds"])
def test_the_relay_hangs_up_through_rest_after_the_goodbye(ending: str, caplog: pytest.LogCaptureFixture) -> None:
    # Without continuity: with it, an expired session is replaced instead (tested elsewhere).
    env = {"SESSION_CONTINUITY": "off", **({"MAX_CALL_SECONDS": "1"} if ending == "max_call_seconds" else {})}

    async def scenario() -> None:
        async with rest_call(respond=begin_only, **env) as (rest, the_relay, twilio, session):
            if ending == "max_call_seconds":
                await eventually(lambda: bool(session.of_type("response.create")))  # "say goodbye"
            await session.say("item_bye", speech(1, 5))  # a 500 ms goodbye
            if ending == "end_call":
                await call_end_call(session)
            elif ending == "session_expired":
                await session_expired(session)
            else:
                await response_done(session, "resp_1")
            await twilio.closed.wait()
            ((path, fields),) = rest.requests
            assert path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{twilio.call_sid}.json"
            assert fields == {"Status": "completed"}
            assert rest.played_at_request == [5 * CHUNK_MS * 8]  # after the goodbye had played
            assert the_relay.stats.errors("twilio_rest") == 0

    with caplog.at_level(logging.DEBUG):
        run(scenario)
    lines = [r.getMessage() for r in caplog.records]
    assert any("hanging up:" in line for line in lines)
    assert no_secrets_in(lines)


def test_a_caller_who_hangs_up_during_the_goodbye_is_not_hung_up_on_again() -> None:
    async def scenario() -> None:
        async with rest_call(respond=begin_only) as (rest, the_relay, twilio, session):
            await session.say("item_bye", speech(1, 30))  # a 3 s goodbye
            await call_end_call(session)
            await eventually(lambda: twilio.played_bytes > 0)
            await twilio.stop()  # the caller hangs up while it plays
            await twilio.close()
            await eventually(lambda: not the_relay.calls)
            assert rest.requests == []  # Twilio has ended the call already: nothing to ask of it
            assert the_relay.stats.errors("twilio_rest") == 0
            assert "relay_hang_ups_total" not in "".join(await metrics(the_relay))  # the caller ended it

    run(scenario)


def test_a_caller_who_hangs_up_during_the_handover_line_is_not_transferred(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with FakeReceiver().running() as receiver, rest_call(
                TRANSFER_TO="+15551234567", CALL_REPORT_URL=receiver.url) as (rest, the_relay, twilio, session):
            await response_created(session, "resp_1")
            await session.say("item_handover", speech(1, 30))  # a 3 s handover line
            await function_call(session, "transfer_call", "{}", "call_t")
            await response_done(session, "resp_1")
            await eventually(lambda: twilio.played_bytes > 0)
            await twilio.stop()  # the caller hangs up while it plays
            await twilio.close()
            await eventually(lambda: bool(receiver.posts))
            assert rest.requests == []  # nobody is left to transfer
            assert not session.of_type("response.create")  # nor to hear an apology
            assert receiver.reports()[0]["ending"] == "caller_hung_up"

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    assert any("the caller hung up (Twilio stopped the stream)" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("failure", ["500", "404", "401", "slow", "cut"])
def test_a_failed_rest_hang_up_falls_back_to_closing_the_stream(
    failure: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(relay, "TWILIO_REST_TIMEOUT", 0.5)  # 10 s in real life

    async def scenario() -> None:
        env = {"TWILIO_API_SECRET": "wrong-secret"} if failure == "401" else {}
        async with rest_call(failure if failure in ("500", "404") else "", **env) as (rest, the_relay, twilio, session):
            rest.delay = 3 if failure == "slow" else 0
            rest.cut = failure == "cut"
            await session.say("item_bye", speech(1, 2))
            await call_end_call(session)
            await twilio.closed.wait()
            assert twilio.close_code == 1000  # Twilio then plays the TwiML after <Connect>
            assert not any(event["event"] == "stop" for event in twilio.received)
            assert the_relay.stats.errors("twilio_rest") == 1
            assert (await health(the_relay))["errors"] == 1

    with caplog.at_level(logging.DEBUG):
        run(scenario)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    expected = {"500": "HTTP 500, Twilio error 20500: Internal Server Error (https://www.twilio.com/docs/errors/20500)",
                "404": "HTTP 404, Twilio error 20404: The requested resource was not found",
                "401": "HTTP 401, Twilio error 20003: Authenticate", "slow": "no usable answer",
                "cut": "HTTP 500, its answer cut off"}[failure]
    assert any("Twilio did not hang up: " + expected in line and "CA" in line for line in errors), errors
    assert no_secrets_in([r.getMessage() for r in caplog.records])
    assert not any("wrong-secret" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("target", "noun"), [("+15551234567", "Number"), ("sip:frontdesk@example.com", "Sip")])
def test_transfer_dials_a_person_after_the_handover_line(target: str, noun: str, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with rest_call(TRANSFER_TO=target, TRANSFER_MESSAGE="Connecting you to the front desk.") as (
            rest, the_relay, twilio, session
        ):
            config = session.of_type("session.update")[0]["session"]
            assert "transfer_call" in [tool["name"] for tool in config["tools"]]
            assert "call the transfer_call tool" in config["instructions"]
            await response_created(session, "resp_1")
            await session.say("item_handover", speech(1, 5))  # "Let me transfer you."
            await function_call(session, "transfer_call", '{"reason": "wants a person"}', "call_t")
            await response_done(session, "resp_1")
            await twilio.closed.wait()  # Twilio ended the stream after the redirect
            ((path, fields),) = rest.requests
            assert path.endswith(f"/Calls/{twilio.call_sid}.json") and set(fields) == {"Twiml"}
            assert rest.played_at_request == [5 * CHUNK_MS * 8]  # the handover line was heard first
            twiml = ElementTree.fromstring(fields["Twiml"])
            assert [child.tag for child in twiml] == ["Say", "Dial", "Say", "Hangup"]
            assert twiml[0].text == "Connecting you to the front desk."
            assert [(child.tag, child.text) for child in twiml.find("Dial")] == [(noun, target)]
            assert tool_outputs(session)["call_t"]["ok"] is True
            assert not session.of_type("response.create")  # the agent does not speak again
            await session.ws.wait_closed()  # OpenAI is closed as usual
            assert (await metrics(the_relay))['relay_transfers_total{outcome="ok"}'] == 1

    with caplog.at_level(logging.INFO):
        run(scenario)
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"transferred to ***{target[-4:]}" in line and "CA" in line for line in lines)
    assert not any("the caller hung up" in line for line in lines)
    assert not any(target in line for line in lines)  # masked to its last 4 characters


def test_a_failed_transfer_keeps_the_call_and_the_agent_says_so(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with rest_call("404", TRANSFER_TO="+15551234567") as (rest, the_relay, twilio, session):
            await response_created(session, "resp_1")
            await session.say("item_handover", speech(1, 2))
            await function_call(session, "transfer_call", "{}", "call_t")
            await response_done(session, "resp_1")
            await eventually(lambda: bool(session.of_type("response.create")))
            notes = [e["item"] for e in session.of_type("conversation.item.create") if e["item"]["type"] == "message"]
            assert [note["role"] for note in notes] == ["system"]
            assert notes[0]["content"][0]["text"].startswith("The transfer failed: HTTP 404, Twilio error 20404")
            kinds = [event["type"] for event in session.received]
            assert kinds.index("response.create") > kinds.index("conversation.item.create")
            await response_created(session, "resp_2")
            await session.say("item_sorry", speech(2, 2), response_id="resp_2")  # the agent apologises
            await response_done(session, "resp_2")
            await eventually(lambda: len(twilio.media) == 4)
            assert not twilio.closed.is_set() and len(the_relay.calls) == 1
            numbers = await metrics(the_relay)
            assert numbers['relay_transfers_total{outcome="failed"}'] == 1
            assert numbers['relay_errors_total{kind="twilio_rest"}'] == 1
            assert len(session.of_type("response.create")) == 1

    with caplog.at_level(logging.INFO):
        run(scenario)
    assert any("Twilio did not transfer: HTTP 404" in r.getMessage() for r in caplog.records)


def test_a_transfer_that_fails_after_the_time_limit_does_not_lift_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay, "GOODBYE_PLAYBACK_LIMIT", 0.5)  # 8 s in real life

    async def scenario() -> None:
        async with rest_call("404", TRANSFER_TO="+15551234567", MAX_CALL_SECONDS="1") as (rest, the_relay, twilio,
                                                                                          session):
            rest.delay = 3  # Twilio refuses the transfer only after the time limit has come
            await response_created(session, "resp_1")
            await function_call(session, "transfer_call", "{}", "call_t")
            await response_done(session, "resp_1")
            await eventually(lambda: bool(rest.requests))
            rest.delay = 0
            await twilio.closed.wait()  # the call ends at its limit all the same
            numbers = await metrics(the_relay)
            assert numbers['relay_transfers_total{outcome="failed"}'] == 1
            assert numbers['relay_hang_ups_total{cause="time_limit"}'] == 1

    run(scenario)


@pytest.mark.parametrize("failure", ["", "500"])
def test_calls_are_recorded_from_the_start_when_asked(failure: str, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with rest_call(failure, RECORD_CALLS="on") as (rest, the_relay, twilio, session):
            await eventually(lambda: bool(rest.requests))
            ((path, fields),) = rest.requests
            assert path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{twilio.call_sid}/Recordings.json"
            assert fields == {"RecordingChannels": "dual"}
            await twilio.send_media([audio(1, i) for i in range(3)])  # the call goes on either way
            await eventually(lambda: session.caller_audio() == pcm([audio(1, i) for i in range(3)]))
            assert the_relay.stats.errors("twilio_rest") == (1 if failure else 0)

    with caplog.at_level(logging.INFO):
        run(scenario)
    lines = [r.getMessage() for r in caplog.records]
    if failure:
        assert any("Twilio did not start recording: HTTP 500" in line for line in lines)
    else:
        assert any("recording the call: RE" + "d4" * 16 in line for line in lines)


def test_the_auth_token_works_for_rest_and_for_signatures() -> None:
    async def scenario() -> None:
        async with FakeOpenAI().running() as fake, FakeTwilioRest(ACCOUNT_SID, AUTH_TOKEN).running() as rest:
            env = {"TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "GREETING": "",
                   "TWILIO_API_BASE_URL": f"http://127.0.0.1:{rest.port}"}
            async with running_relay(fake, **env) as (the_relay, url):
                twilio = FakeTwilio(url)
                rest.streams[twilio.call_sid] = twilio
                await twilio.open(headers={"X-Twilio-Signature": twilio_signature(url)})
                session = await fake.session()
                await call_end_call(session)
                await twilio.closed.wait()
                assert [fields for _, fields in rest.requests] == [{"Status": "completed"}]
                _, body = await raw_request(the_relay.port, "/twiml", {"Host": "relay.example.com",  # type: ignore[attr-defined]
                                            "X-Twilio-Signature": twilio_signature("http://relay.example.com/twiml")},
                                            websocket=False)
                assert ElementTree.fromstring(body).find("Say").text == relay.CUT_OFF_MESSAGE

    run(scenario)


def run_call_command(args: list[str], env: dict[str, str]) -> Awaitable[asyncio.subprocess.Process]:
    """``python relay.py call ...`` as an operator runs it, with a clean environment."""
    return asyncio.create_subprocess_exec(
        sys.executable, "relay.py", "call", *args, cwd=HERE, env={"PATH": os.environ.get("PATH", ""), **env},
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


def test_relay_py_call_places_an_outbound_call_to_the_relay() -> None:
    async def scenario() -> None:
        async with FakeTwilioRest().running() as rest:
            env = {**rest.env(), "TWILIO_PHONE_NUMBER": "+15550002222", "PUBLIC_URL": "https://relay.example.com"}
            process = await run_call_command(["+15553334444", "--greeting", "Hi Ann, it's Tessa from the clinic.",
                                              "--param", "customer_id=42", "--param", "note=a=b"], env)
            stdout, stderr = await process.communicate()
            assert process.returncode == 0, stderr
            assert stdout.decode() == "CA" + "c3" * 16 + "\n"
            ((path, fields),) = rest.requests
            assert path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls.json"
            assert (fields["To"], fields["From"]) == ("+15553334444", "+15550002222")
            twiml = ElementTree.fromstring(fields["Twiml"])
            assert [child.tag for child in twiml] == ["Connect", "Say", "Hangup"]
            stream = twiml.find("Connect/Stream")
            assert stream.get("url") == "wss://relay.example.com/media-stream"
            assert {p.get("name"): p.get("value") for p in stream.findall("Parameter")} == {
                "direction": "outbound", "customer_id": "42", "note": "a=b",
                "greeting": "Hi Ann, it's Tessa from the clinic."}
            assert API_SECRET.encode() not in stdout + stderr

    run(scenario)


CALL_COMMAND_ERRORS = {
    "no credentials": ({"TWILIO_ACCOUNT_SID": ""}, "+15553334444", "outbound calls need TWILIO_ACCOUNT_SID"),
    "no caller id": ({"TWILIO_PHONE_NUMBER": ""}, "+15553334444", "outbound calls need TWILIO_PHONE_NUMBER"),
    "no public url": ({"PUBLIC_URL": ""}, "+15553334444", "outbound calls need PUBLIC_URL"),
    "bad number": ({}, "555-1234", "the number to call must be a phone number in E.164 form"),
    "bad caller id": ({"TWILIO_PHONE_NUMBER": "12"}, "+15553334444", "TWILIO_PHONE_NUMBER must be a phone number"),
    "refused": ({"TWILIO_API_SECRET": "wrong-secret"}, "+15553334444",
                "Twilio did not place the call: HTTP 401, Twilio error 20003: Authenticate"),
    "no sid": ({}, "+15553334444", "Twilio's answer has no Call SID, so the call may not have been placed"),
    "bad auth token": ({"TWILIO_AUTH_TOKEN": "secret"}, "+15553334444", "TWILIO_AUTH_TOKEN must be the 32 hex"),
}


@pytest.mark.parametrize("case", CALL_COMMAND_ERRORS)
def test_relay_py_call_says_what_is_wrong_in_one_line(case: str) -> None:
    override, number, complaint = CALL_COMMAND_ERRORS[case]

    async def scenario() -> None:
        async with FakeTwilioRest().running() as rest:
            env = {**rest.env(), "TWILIO_PHONE_NUMBER": "+15550002222", "PUBLIC_URL": "https://relay.example.com",
                   **override}
            if not env["TWILIO_ACCOUNT_SID"]:
                del env["TWILIO_API_KEY"], env["TWILIO_API_SECRET"]
            if case == "no sid":
                rest.failure = (201, {"status": "queued"})  # a success, yet no sid
            process = await run_call_command([number], env)
            stdout, stderr = await process.communicate()
            assert process.returncode != 0 and stdout == b""
            assert complaint in stderr.decode()
            assert len(stderr.strip().splitlines()) == 1
            assert b"secret" not in stderr

    run(scenario)


def test_relay_py_help_explains_serving_and_calling() -> None:
    async def help_text(*args: str) -> str:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "relay.py", *args, "--help", cwd=HERE, env={"PATH": os.environ.get("PATH", "")},
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        stdout, _ = await process.communicate()
        assert process.returncode == 0  # no OPENAI_API_KEY needed to read the help
        return stdout.decode()

    async def scenario() -> None:
        overview = await help_text()
        assert "Without a command, serve calls" in overview and "place an outbound call" in overview
        calling = await help_text("call")
        assert calling.startswith("usage: python relay.py call [-h] [--greeting GREETING]")
        assert "--instructions" in calling and "NAME=VALUE" in calling and "TWILIO_PHONE_NUMBER" in calling

    run(scenario)


# Real phone lines: silent callers, noisy lines, slow tools --------------------------------------


def instructions_asked(session: FakeSession) -> list[str | None]:
    """The instructions of each response.create the relay sent (None: a plain request)."""
    return [event.get("response", {}).get("instructions") for event in session.of_type("response.create")]


def speaking_for(chunks: int, heard: list[tuple[int, int]], phones: list[FakeTwilio]) -> Responder:
    """A responder whose every answer is ``chunks`` of audio; it notes, as each request comes,
    how much of the agent's audio the phone had played and how much had been sent to it."""
    async def respond(session: FakeSession, request: dict[str, Any]) -> None:
        (phone,) = phones
        heard.append((phone.played_bytes, len(phone.media) * CHUNK_MS * 8))
        response_id = await session.begin()
        await session.say(f"item_{response_id}", speech(7, chunks), response_id)
        await session.finish()

    return respond


def test_a_silent_caller_is_checked_on_then_said_goodbye_to_and_hung_up(caplog: pytest.LogCaptureFixture) -> None:
    heard: list[tuple[int, int]] = []
    phones: list[FakeTwilio] = []

    async def scenario() -> None:
        # Each answer is 1 s of audio, longer than IDLE_SECONDS: a silence timed from
        # response.done would ask while the caller is still hearing the agent.
        env = {"IDLE_SECONDS": "0.5", "TOOL_FILLER_SECONDS": "0"}
        async with rest_call(respond=speaking_for(10, heard, phones), **env) as (rest, the_relay, twilio, session):
            phones.append(twilio)
            await twilio.closed.wait()
            assert instructions_asked(session) == [relay.IDLE_CHECK_IN, relay.IDLE_CHECK_IN, relay.IDLE_GOODBYE]
            assert heard == [(0, 0), (8000, 8000), (16000, 16000)]  # each asked once every word was heard
            ((path, fields),) = rest.requests  # hung up cleanly through REST, as end_call does
            assert path.endswith(f"/Calls/{twilio.call_sid}.json") and fields == {"Status": "completed"}
            assert rest.played_at_request == [24000]  # after the goodbye was heard
            numbers = await metrics(the_relay)
            assert numbers['relay_hang_ups_total{cause="silence"}'] == 1
            assert numbers["relay_idle_check_ins_total"] == 2

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    lines = [r.getMessage() for r in caplog.records]
    assert any("the caller has said nothing for 0.5 s: the agent checks in (1 of 2)" in line for line in lines)
    assert any("the caller has said nothing for 0.5 s after 2 check-in(s): the agent says goodbye" in line
               for line in lines)
    assert any("hanging up: the caller said nothing after 2 check-in(s)" in line for line in lines)


def test_the_caller_speaking_or_pressing_a_key_starts_the_ladder_again() -> None:
    async def scenario() -> None:
        async with one_call(IDLE_SECONDS="0.3", IDLE_PROMPTS="1") as (_, _, twilio, session):
            await eventually(lambda: len(instructions_asked(session)) == 1)  # the first check-in
            await speech_started(session)  # the caller answers it, and server VAD answers them
            await session.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 1500,
                                "item_id": "item_user"})
            await session.begin()
            await session.finish()
            await eventually(lambda: len(instructions_asked(session)) == 2)
            await press(twilio, "5")
            await eventually(lambda: len(instructions_asked(session)) == 4)
            await twilio.closed.wait()
            assert instructions_asked(session) == [
                relay.IDLE_CHECK_IN,
                relay.IDLE_CHECK_IN,  # not a goodbye: the caller had spoken since the first
                None,  # the keypad press, answered
                relay.IDLE_CHECK_IN,  # again a check-in, not a goodbye
                relay.IDLE_GOODBYE,
            ]

    run(scenario)


def test_no_check_in_while_a_tool_runs(shop_tools: dict[str, Any]) -> None:
    async def scenario() -> None:
        env = {"IDLE_SECONDS": "0.3", "TOOL_FILLER_SECONDS": "0"}
        async with one_call(shop_tools["tools"], **env) as (_, _, twilio, session):
            await response_created(session, "resp_1")
            await session.say("item_wait", speech(1, 8))  # "Let me check", 800 ms
            await function_call(session, "order_status", '{"order": "A-1"}', "call_1")
            await response_done(session, "resp_1")
            await asyncio.sleep(1.5)  # the audio plays, then the tool runs on
            assert not session.of_type("response.create")
            shop_tools["gate"].put_nowait("go")
            await eventually(lambda: len(instructions_asked(session)) == 2)
            assert instructions_asked(session) == [None, relay.IDLE_CHECK_IN]  # the result, then a check-in

    run(scenario)


def test_no_check_in_while_a_transfer_is_under_way() -> None:
    async def scenario() -> None:
        env = {"IDLE_SECONDS": "0.3", "TRANSFER_TO": "+15551234567"}
        async with rest_call(respond=begin_only, **env) as (rest, the_relay, twilio, session):
            rest.delay = 1.5  # Twilio takes its time to redirect the call
            await response_created(session, "resp_1")
            await function_call(session, "transfer_call", "{}", "call_t")
            await response_done(session, "resp_1")
            await twilio.closed.wait()
            assert [fields for _, fields in rest.requests] == [{"Twiml": relay.transfer_twiml(the_relay.config)}]
            assert not session.of_type("response.create")

    run(scenario)


def test_idle_seconds_0_turns_the_idle_check_off() -> None:
    async def scenario() -> None:
        async with one_call(IDLE_SECONDS="0") as (_, the_relay, _, session):
            (call,) = the_relay.calls
            await asyncio.sleep(1.0)
            assert call.dead_air.timer is None  # nothing is timed (the default would time 10 s)
            assert not session.of_type("response.create") and the_relay.calls == {call}

    run(scenario)


@pytest.mark.parametrize(("env", "detection", "noise"), [
    ({}, {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500,
          "create_response": True, "interrupt_response": True}, {"type": "near_field"}),
    ({"TURN_DETECTION": "semantic_vad", "VAD_EAGERNESS": "low"},
     {"type": "semantic_vad", "eagerness": "low", "create_response": True, "interrupt_response": True},
     {"type": "near_field"}),
    ({"TURN_DETECTION": "Semantic_VAD"},
     {"type": "semantic_vad", "eagerness": "auto", "create_response": True, "interrupt_response": True},
     {"type": "near_field"}),
    ({"NOISE_REDUCTION": "far_field", "VAD_THRESHOLD": "0.7"},
     {"type": "server_vad", "threshold": 0.7, "prefix_padding_ms": 300, "silence_duration_ms": 500,
      "create_response": True, "interrupt_response": True}, {"type": "far_field"}),
    ({"NOISE_REDUCTION": "off"}, None, None),
])
def test_turn_detection_and_noise_reduction_go_into_the_session(
    env: dict[str, str], detection: dict[str, Any] | None, noise: dict[str, Any] | None
) -> None:
    config = relay.load_config({"OPENAI_API_KEY": API_KEY, **env})
    update = relay.session_update(config, relay.persona_for_call(config, {}), BUILT_IN_TOOLS, "session_update_1")
    assert not sdk_problems(update), sdk_problems(update)
    audio_input = update["session"]["audio"]["input"]
    if detection is not None:
        assert audio_input["turn_detection"] == detection
    assert audio_input["noise_reduction"] == noise  # off is an explicit null: OpenAI's own default may change


def test_every_session_update_carries_turn_detection_and_noise_reduction() -> None:
    async def scenario() -> None:
        fake = FakeOpenAI()
        env = {"TURN_DETECTION": "semantic_vad", "VAD_EAGERNESS": "high", "NOISE_REDUCTION": "far_field"}
        async with fake.running(), running_relay(fake, None, **env) as (the_relay, url):
            twilio = await FakeTwilio(url).open(start=False)
            session = await fake.session()
            await eventually(lambda: all(configured(call) for call in the_relay.calls))
            await twilio.start(customParameters={"voice": "cedar"})  # a per-call override
            await eventually(lambda: len(session.of_type("session.update")) == 2)
            for update in session.of_type("session.update"):
                audio_input = update["session"]["audio"]["input"]
                assert audio_input["turn_detection"]["type"] == "semantic_vad"
                assert audio_input["turn_detection"]["eagerness"] == "high"
                assert audio_input["noise_reduction"] == {"type": "far_field"}
            assert session.of_type("session.update")[1]["session"]["audio"]["output"]["voice"] == "cedar"
            await twilio.close()

    run(scenario)


def test_settings_that_semantic_vad_ignores_are_warned_about_at_start_up() -> None:
    config = relay.load_config({"OPENAI_API_KEY": API_KEY, "TURN_DETECTION": "semantic_vad",
                                "VAD_THRESHOLD": "0.8", "VAD_SILENCE_DURATION_MS": "700"})
    assert config.warnings == ("TURN_DETECTION=semantic_vad ignores VAD_THRESHOLD, VAD_SILENCE_DURATION_MS "
                               "(settings of server_vad)",)
    assert relay.load_config({"OPENAI_API_KEY": API_KEY, "VAD_EAGERNESS": "low"}).warnings == (
        "TURN_DETECTION=server_vad ignores VAD_EAGERNESS (a setting of semantic_vad)",)
    assert relay.load_config({"OPENAI_API_KEY": API_KEY, "VAD_THRESHOLD": "0.8"}).warnings == ()

    async def scenario() -> None:
        lines = await start_up_lines({"TURN_DETECTION": "semantic_vad", "VAD_PREFIX_PADDING_MS": "200"})
        assert "WARNING TURN_DETECTION=semantic_vad ignores VAD_PREFIX_PADDING_MS (settings of server_vad)" in lines

    run(scenario)


def test_a_slow_tool_gets_one_filler_line_and_one_answer_after_its_result(
    shop_tools: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    heard: list[tuple[int, int]] = []

    async def scenario() -> None:
        async with one_call(shop_tools["tools"], IDLE_SECONDS="0", TOOL_FILLER_SECONDS="0.3") as (
                fake, the_relay, twilio, session):
            fake.respond = speaking_for(2, heard, [twilio])
            await response_created(session, "resp_1")
            await session.say("item_wait", speech(1, 6))  # "Let me check that for you."
            await function_call(session, "order_status", '{"order": "A-1"}', "call_1")
            await response_done(session, "resp_1")
            await eventually(lambda: len(instructions_asked(session)) == 1)
            assert instructions_asked(session) == [relay.TOOL_FILLER]
            assert heard == [(4800, 4800)]  # once "let me check" had been heard, not at response.done
            await asyncio.sleep(1.0)
            assert len(instructions_asked(session)) == 1  # never twice for one tool call
            shop_tools["gate"].put_nowait("go")
            await eventually(lambda: len(instructions_asked(session)) == 2)
            await asyncio.sleep(0.5)
            assert instructions_asked(session) == [relay.TOOL_FILLER, None]  # the result: one answer
            assert "call_1" in tool_outputs(session)
            assert (await metrics(the_relay))["relay_tool_fillers_total"] == 1

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    assert any("a tool is still running 0.3 s after the agent's last words: the agent fills the wait"
               in r.getMessage() for r in caplog.records)


def test_a_fast_tool_gets_no_filler_line(shop_tools: dict[str, Any]) -> None:
    async def scenario() -> None:
        async with one_call(shop_tools["tools"], IDLE_SECONDS="0", TOOL_FILLER_SECONDS="0.3") as (_, _, _, session):
            await response_created(session, "resp_1")
            await function_call(session, "opening_hours", "{}", "call_1")
            await response_done(session, "resp_1")
            await eventually(lambda: len(instructions_asked(session)) == 1)
            await asyncio.sleep(1.0)
            assert instructions_asked(session) == [None]  # the result only

    run(scenario)


# After the call: the report, usage, reply latency -----------------------------------------------


REPORT_SECRET = "report-secret-for-tests"


class FakeReceiver:
    """A server of the user's that receives call reports, on a loopback port.

    It records each POST, and answers it with the next of ``statuses`` (200 once they are
    used up; 0: an answer cut off before its body), or not at all while ``answering`` is clear.
    """

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self.answering = asyncio.Event()
        self.answering.set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[FakeReceiver]:
        server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/calls"
        async with server:
            yield self

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        request_line, *lines = head.split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines if line)}
        body = await reader.readexactly(int(headers["content-length"]))
        assert request_line.startswith("POST /calls "), request_line
        self.posts.append((headers, body))
        await self.answering.wait()
        status = self.statuses.pop(0) if self.statuses else 200
        length = 10 if status == 0 else 0
        writer.write(f"HTTP/1.1 {status or 200} Fake\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        writer.close()

    def reports(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.posts]


def readme_verifier() -> Callable[..., bool]:
    """``verify_relay_signature`` exactly as README gives it to a receiver."""
    with open(os.path.join(HERE, "README.md")) as file:
        readme = file.read()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.DOTALL) if "def verify_relay_signature" in b)
    namespace: dict[str, Any] = {}
    exec(block, namespace)  # noqa: S102 - README's own example, run as a receiver would run it
    return namespace["verify_relay_signature"]


def usage_sent(sessions: list[FakeSession]) -> dict[str, Any]:
    """What the report's usage must say: the sum of the usage in every response.done OpenAI sent."""
    usages = [usage for session in sessions for usage in session.usages]

    def total(*path: str) -> int:
        return sum(functools.reduce(lambda part, key: part[key], path, usage) for usage in usages if usage)

    return {"responses": len(usages), "inputTokens": total("input_tokens"), "outputTokens": total("output_tokens"),
            "input": {"text": total("input_token_details", "text_tokens"),
                      "audio": total("input_token_details", "audio_tokens"),
                      "cached": total("input_token_details", "cached_tokens"),
                      "cachedText": total("input_token_details", "cached_tokens_details", "text_tokens"),
                      "cachedAudio": total("input_token_details", "cached_tokens_details", "audio_tokens")},
            "output": {"text": total("output_token_details", "text_tokens"),
                       "audio": total("output_token_details", "audio_tokens")}}


ENDINGS = {
    "caller_hung_up": {},
    "agent_hung_up": {},
    "time_limit": {"MAX_CALL_SECONDS": "1"},
    "silence": {"IDLE_SECONDS": "0.2", "IDLE_PROMPTS": "0"},
    "transferred": {"TRANSFER_TO": "+15551234567"},
    "openai_failed": {"SESSION_CONTINUITY": "off"},
    "twilio_lost": {},
    "shutdown": {"DRAIN_SECONDS": "0.2"},
}


async def end_the_call(how: str, the_relay: relay.Relay, twilio: FakeTwilio, session: FakeSession) -> None:
    """End the call the way ``how`` names; time_limit and silence end by themselves."""
    if how == "caller_hung_up":
        await twilio.stop()
    elif how == "agent_hung_up":
        await call_end_call(session)
    elif how == "transferred":
        await function_call(session, "transfer_call", "{}", "call_t")
        await response_done(session, "resp_1")
    elif how == "openai_failed":
        await drop(session, "1011")
    elif how == "twilio_lost":
        await twilio.ws.close()  # type: ignore[union-attr]
    elif how == "shutdown":
        await relay.drain(the_relay)


@pytest.mark.parametrize("how", list(ENDINGS))
def test_each_call_sends_one_signed_report_that_says_how_it_ended(how: str, caplog: pytest.LogCaptureFixture) -> None:
    verify = readme_verifier()

    async def scenario() -> None:
        async with FakeReceiver().running() as receiver:
            env = {"CALL_REPORT_URL": receiver.url, "CALL_REPORT_SECRET": REPORT_SECRET, **ENDINGS[how]}
            async with rest_call(respond=FakeSession.answer, **env) as (_, the_relay, twilio, session):
                await end_the_call(how, the_relay, twilio, session)
                await twilio.closed.wait()
                await eventually(lambda: bool(receiver.posts) and not the_relay.reports.sending, limit=10)
                (report,) = receiver.reports()
                ((headers, body),) = receiver.posts
                assert verify(body, headers["x-relay-signature"], REPORT_SECRET)
                assert not verify(body + b" ", headers["x-relay-signature"], REPORT_SECRET)
                assert not verify(body, headers["x-relay-signature"], "another secret")
                assert headers["idempotency-key"] == twilio.call_sid
                assert headers["content-type"] == "application/json"
                assert report["ending"] == how
                assert report["transferredTo"] == ("***4567" if how == "transferred" else None)
                assert (report["callSid"], report["streamSid"]) == (twilio.call_sid, twilio.stream_sid)
                assert (report["direction"], report["from"], report["to"], report["answeredBy"]) == (
                    "inbound", None, None, None)
                assert report["parameters"] == {"caller": "+15550001111"}
                started, ended = (datetime.datetime.fromisoformat(report[key])
                                  for key in ("startedAt", "endedAt"))
                assert report["startedAt"].endswith("Z") and started < ended
                assert report["durationSeconds"] == pytest.approx((ended - started).total_seconds(), abs=0.002)
                assert report["usage"] == usage_sent([session])
                assert report["openaiSessions"] == 1 and report["reconnects"] == 0
                numbers = await metrics(the_relay)
                assert numbers['relay_call_reports_total{outcome="delivered"}'] == 1

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    assert sum(f"call ended: {how}, " in r.getMessage() for r in caplog.records) == 1
    assert sum("call report delivered" in r.getMessage() and "CA" in r.getMessage() for r in caplog.records) == 1


def test_the_report_holds_the_conversation_tools_recording_and_summary(
    shop_tools: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    secrets = (API_KEY, API_SECRET, AUTH_TOKEN, "mcp-token-for-tests", REPORT_SECRET)

    async def scenario() -> None:
        fake = FakeOpenAI()
        async with fake.running(), FakeTwilioRest().running() as rest, FakeReceiver().running() as receiver:
            env = {**rest.env(), "GREETING": "", "RECORD_CALLS": "on", "CALL_SUMMARY": "on",
                   "CALL_REPORT_URL": receiver.url, "CALL_REPORT_SECRET": REPORT_SECRET,
                   "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "MCP_SERVER_URL": "https://mcp.example.com/mcp",
                   "MCP_AUTHORIZATION": "mcp-token-for-tests"}
            async with running_relay(fake, shop_tools["tools"], **env) as (the_relay, url):
                twilio = FakeTwilio(url)
                rest.streams[twilio.call_sid] = twilio
                await twilio.open(headers={"X-Twilio-Signature": twilio_signature(url)})
                session = await fake.session()
                await eventually(lambda: all(configured(call) for call in the_relay.calls) and bool(rest.requests))
                await caller_said(session, "item_c1", "Where is my order A-1?")
                await agent_begins(session, "resp_a", "item_a1")
                await session.say("item_a1", speech(1, 10), "resp_a")  # 1 s of audio
                await function_call(session, "opening_hours", "{}", "call_1", "resp_a")
                await session.send({"type": "response.output_item.done", "response_id": "resp_a", "output_index": 1,
                                    "item": {"id": "item_mcp", "type": "mcp_call", "server_label": "tools",
                                             "name": "lookup", "arguments": "{}", "output": "A-1 shipped"}})
                await agent_transcript(session, "item_a1", "Let me check. It shipped yesterday and it will arrive")
                await response_done(session, "resp_a")
                await eventually(lambda: twilio.played_bytes >= 2400)
                await caller_said(session, "item_c2", "Thanks, bye.")  # over the agent: a barge-in
                await eventually(lambda: twilio.clears == 1)
                await twilio.stop()
                await twilio.closed.wait()
                await eventually(lambda: bool(receiver.posts) and not the_relay.reports.sending, limit=10)
                (report,) = receiver.reports()
                assert report["transcript"] == [
                    {"role": "caller", "text": "Where is my order A-1?", "interrupted": False},
                    {"role": "agent", "text": "Let me check. It shipped yesterday and it will arrive",
                     "interrupted": True},
                    {"role": "caller", "text": "Thanks, bye.", "interrupted": False},
                ]
                (mcp, tool) = report["tools"]  # in the order they finished
                assert (tool["name"], tool["outcome"], type(tool["durationMs"])) == ("opening_hours", "ok", int)
                assert mcp == {"name": "lookup", "outcome": "ok", "durationMs": None, "server": "tools"}
                assert report["bargeIns"] == 1 and report["recordingSid"] == "RE" + "d4" * 16
                assert report["summary"] == SUMMARY_TEXT
                summary = session.of_type("response.create")[-1]
                assert summary == {"type": "response.create", "event_id": "relay_summary", "response": {
                    "conversation": "none", "output_modalities": ["text"],
                    "instructions": relay.SUMMARY_INSTRUCTIONS, "metadata": {"relay": "summary"}}}
                assert report["usage"] == usage_sent([session])  # the summary's response included
                assert report["ending"] == "caller_hung_up"
                body = receiver.posts[0][1].decode()
                assert not [secret for secret in secrets if secret in body]
                numbers = await metrics(the_relay)
                assert numbers['relay_tokens_total{direction="output",kind="audio"}'] == report["usage"]["output"][
                    "audio"]
                assert numbers['relay_tokens_total{direction="input",kind="cached"}'] == report["usage"]["input"][
                    "cached"]

    with caplog.at_level(logging.DEBUG, logger="relay"):
        run(scenario)
    lines = [r.getMessage() for r in caplog.records]
    assert not [secret for secret in secrets for line in lines if secret in line]
    assert not any("Where is my order" in line for line in lines if "report" in line)  # never the body


def test_a_summary_that_never_comes_delays_the_report_only_by_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay, "SUMMARY_TIMEOUT", 0.5)

    async def silent_on_summaries(session: FakeSession, request: dict[str, Any]) -> None:
        if request.get("event_id") != "relay_summary":
            await session.answer(request)

    async def scenario() -> None:
        async with FakeReceiver().running() as receiver:
            env = {"CALL_REPORT_URL": receiver.url, "CALL_REPORT_SECRET": REPORT_SECRET, "CALL_SUMMARY": "on"}
            async with rest_call(respond=silent_on_summaries, **env) as (_, _, twilio, session):
                await twilio.stop()
                await eventually(lambda: bool(receiver.posts), limit=5)
                (report,) = receiver.reports()
                assert report["summary"] is None and report["ending"] == "caller_hung_up"
                assert session.of_type("response.create")[-1]["event_id"] == "relay_summary"
                await session.ws.wait_closed()  # OpenAI was closed all the same

    run(scenario)


def test_a_summary_asked_while_the_agent_speaks_cancels_the_answer_first() -> None:
    async def scenario() -> None:
        async with FakeReceiver().running() as receiver:
            env = {"CALL_REPORT_URL": receiver.url, "CALL_REPORT_SECRET": REPORT_SECRET, "CALL_SUMMARY": "on"}
            async with rest_call(respond=FakeSession.answer, **env) as (_, _, twilio, session):
                await session.begin()  # the agent is speaking when the caller hangs up
                await eventually(lambda: bool(session.active))
                await asyncio.sleep(0.1)
                await twilio.stop()
                await eventually(lambda: bool(receiver.posts), limit=5)
                kinds = [event["type"] for event in session.received]
                assert kinds[-2:] == ["response.cancel", "response.create"]
                assert receiver.reports()[0]["summary"] == SUMMARY_TEXT
                assert not session.refused

    run(scenario)


def test_a_rollover_that_falls_due_while_the_summary_is_asked_does_not_cut_it_off() -> None:
    async def slow_summaries(session: FakeSession, request: dict[str, Any]) -> None:
        if request.get("event_id") == "relay_summary":
            await asyncio.sleep(1.5)  # the session is due for its rollover meanwhile
        await session.answer(request)

    async def scenario() -> None:
        async with FakeReceiver().running() as receiver:
            env = {"CALL_REPORT_URL": receiver.url, "CALL_REPORT_SECRET": REPORT_SECRET, "CALL_SUMMARY": "on",
                   "SESSION_ROLLOVER_SECONDS": "1"}
            async with rest_call(respond=slow_summaries, **env) as (_, _, twilio, session):
                await twilio.stop()
                await eventually(lambda: bool(receiver.posts), limit=5)
                assert receiver.reports()[0]["summary"] == SUMMARY_TEXT

    run(scenario)


@pytest.mark.parametrize(("statuses", "posts", "outcome"), [
    ((500,), 2, "delivered"),  # a server error is retried
    ((429, 503), 3, "delivered"),
    ((0,), 2, "delivered"),  # an answer cut off on its way is no proof of delivery
    ((400,), 1, "failed"),  # any other 4xx is final
    ((500, 500, 500, 500), 4, "failed"),  # three more tries, then it gives up
])
def test_reports_are_retried_after_server_errors_only(
    statuses: tuple[int, ...], posts: int, outcome: str, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(relay, "REPORT_RETRY_DELAYS", (0.05, 0.05, 0.05))

    async def scenario() -> None:
        async with FakeReceiver(*statuses).running() as receiver, rest_call(
                CALL_REPORT_URL=receiver.url, CALL_REPORT_SECRET=REPORT_SECRET) as (_, the_relay, twilio, _):
            await twilio.stop()
            await eventually(lambda: the_relay.stats.counts["relay_call_reports_total", outcome] == 1, limit=5)
            await asyncio.sleep(0.3)
            assert len(receiver.posts) == posts
            assert len({headers["idempotency-key"] for headers, _ in receiver.posts}) == 1
            assert len({body for _, body in receiver.posts}) == 1  # the same report each time
            numbers = await metrics(the_relay)
            assert numbers[f'relay_call_reports_total{{outcome="{outcome}"}}'] == 1

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    if outcome == "failed":
        (line,) = errors
        assert f"call report for CA{1:032d} could not be delivered: HTTP {statuses[-1]}" in line
    else:
        assert not errors


def test_a_report_to_a_server_that_is_down_is_retried_then_counted_as_failed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(relay, "REPORT_RETRY_DELAYS", (0.05, 0.05, 0.05))
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens there once it is closed

    async def scenario() -> None:
        async with rest_call(CALL_REPORT_URL=f"http://127.0.0.1:{port}/calls") as (_, the_relay, twilio, _):
            await twilio.stop()
            await eventually(lambda: the_relay.stats.counts["relay_call_reports_total", "failed"] == 1, limit=5)

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    assert sum("call report not delivered yet: no answer" in r.getMessage() for r in caplog.records) == 3


def test_reports_on_their_way_at_shutdown_get_drain_seconds_then_an_error_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(relay, "REPORT_TIMEOUT", 1.0)

    async def scenario() -> None:
        async with FakeReceiver().running() as receiver:
            receiver.answering.clear()  # the receiver hangs
            async with rest_call(CALL_REPORT_URL=receiver.url, CALL_REPORT_SECRET=REPORT_SECRET) as (
                    _, the_relay, twilio, _):
                await twilio.stop()
                await eventually(lambda: bool(receiver.posts), limit=5)
                await the_relay.reports.drain(0.2)
                assert the_relay.stats.counts["relay_call_reports_total", "failed"] == 1 and not the_relay.reports.sending
                receiver.answering.set()

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    assert any(r.levelno == logging.ERROR and r.getMessage() == f"call report for CA{1:032d} could not be delivered "
               "before shutdown" for r in caplog.records)


def test_a_report_url_without_a_secret_is_allowed_with_a_warning() -> None:
    config = relay.load_config({"OPENAI_API_KEY": API_KEY, "CALL_REPORT_URL": "https://crm.example.com/calls"})
    assert config.call_report_url == "https://crm.example.com/calls"
    assert any("without CALL_REPORT_SECRET: reports go unsigned" in warning for warning in config.warnings)
    assert "report" not in repr(config).lower()  # the secret, like every other, stays out of reprs
    signed = relay.load_config({"OPENAI_API_KEY": API_KEY, "CALL_REPORT_URL": "https://crm.example.com/calls",
                                "CALL_REPORT_SECRET": REPORT_SECRET})
    assert signed.warnings == () and REPORT_SECRET not in repr(signed)
    # A report turns on the input transcription its transcript needs, also without continuity.
    for env, transcribed in (({"SESSION_CONTINUITY": "off"}, False),
                             ({"SESSION_CONTINUITY": "off", "CALL_REPORT_URL": "https://crm.example.com/c"}, True)):
        config = relay.load_config({"OPENAI_API_KEY": API_KEY, **env})
        update = relay.session_update(config, relay.persona_for_call(config, {}), BUILT_IN_TOOLS, "session_update_1")
        assert ("transcription" in update["session"]["audio"]["input"]) is transcribed


def test_the_reply_latency_is_observed_once_per_answered_turn() -> None:
    async def answer(session: FakeSession, response_id: str, item: int) -> None:
        await response_created(session, response_id)
        await session.say(f"item_{item}", speech(item, 3), response_id)  # three chunks: one observation
        await response_done(session, response_id)

    async def scenario() -> None:
        async with one_call(IDLE_SECONDS="0") as (_, the_relay, twilio, session):
            for turn in (1, 2):
                await caller_said(session, f"item_c{turn}", "Hello?")
                await answer(session, f"resp_{turn}", turn)
                await eventually(lambda turn=turn: len(twilio.media) == 3 * turn)  # type: ignore[misc]
            await press(twilio, "5")  # answered too, but not after the caller's speech
            await eventually(lambda: bool(session.of_type("response.create")))
            await answer(session, "resp_3", 3)
            await eventually(lambda: len(twilio.media) == 9)
            numbers = await metrics(the_relay)
            assert numbers["relay_reply_seconds_count"] == 2
            assert numbers['relay_reply_seconds_bucket{le="+Inf"}'] == 2

    run(scenario)


def test_a_new_session_is_told_the_newest_turns_and_the_report_keeps_them_all() -> None:
    transcript = relay.Transcript()
    for turn in range(300):
        transcript.write(f"item_{turn}", "user" if turn % 2 else "assistant", f"turn {turn}")
    transcript.note("system", "The opening_hours tool was called with {} and returned: 9 to 5")
    items = transcript.items()
    assert len(items) == relay.MEMORY_TURNS
    assert items[-2]["item"]["content"][0]["text"] == "turn 299"  # the note comes last
    assert [turn["text"] for turn in transcript.spoken()] == [f"turn {turn}" for turn in range(300)]


# The load benchmark, at a small scale ----------------------------------------------------------


@pytest.mark.parametrize("profile", ["steady", "realistic"])
def test_the_benchmark_runs_and_the_relay_loses_nothing(profile: str) -> None:
    result = asyncio.run(bench_level(calls=6, seconds=2, profile=profile, extra_env={}))
    assert result["configured"] == 6
    assert result["frames"] > 6 * 2 * 50 * 0.5
    assert (result["lost"], result["reordered"]) == (0, 0)
    assert result["relay_cpu"] > 0 and result["kib_per_call"] > 0


# Outbound calls that reach voicemail, and an agent for each number --------------------------------


MESSAGE = "Hi Ann, this is Tessa from the clinic: your glasses are ready. Goodbye!"
CALLEE, OUR_NUMBER = "+15553334444", "+15550002222"


def stream_parameters(twiml: bytes) -> dict[str, str] | None:
    """The <Parameter>s of the TwiML's <Connect><Stream>, or None if it does not connect."""
    stream = ElementTree.fromstring(twiml).find("Connect/Stream")
    return None if stream is None else {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}


async def signed_twiml(port: int, query: str, **twilio_fields: str) -> bytes:
    """GET /twiml as Twilio fetches a call's Url: its own fields appended, the whole URL signed."""
    path = "/twiml?" + "&".join(part for part in (query, urllib.parse.urlencode(twilio_fields)) if part)
    status, body = await raw_request(port, path, {"Host": "relay.example.com", "X-Forwarded-Proto": "https",
                                                  "X-Twilio-Signature": twilio_signature(
                                                      "https://relay.example.com" + path)}, websocket=False)
    assert status == 200, body
    return body


async def placed_call(args: list[str]) -> dict[str, str]:
    """Run ``relay.py call`` against the fake REST API; return the Calls.json form it posted."""
    async with FakeTwilioRest().running() as rest:
        env = {**rest.env(), "TWILIO_PHONE_NUMBER": OUR_NUMBER, "PUBLIC_URL": "https://relay.example.com"}
        process = await run_call_command(args, env)
        _, stderr = await process.communicate()
        assert process.returncode == 0, stderr
        ((path, fields),) = rest.requests
        assert path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls.json"
        return fields


@pytest.mark.parametrize(("answered_by", "wanted"), [
    ("human", "connect"), ("unknown", "connect"),  # AMD could not tell: a person is the safer guess
    ("machine_end_beep", "message"), ("machine_end_silence", "message"), ("machine_end_other", "message"),
    ("fax", "hang up"),
])
def test_relay_py_call_voicemail_detects_machines_and_twiml_answers_by_who_answered(
    answered_by: str, wanted: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        fields = await placed_call([CALLEE, "--voicemail", MESSAGE, "--greeting", "Hi Ann!", "--param", "order=A-1"])
        assert set(fields) == {"To", "From", "Url", "Method", "MachineDetection"}  # no inline Twiml
        assert (fields["Method"], fields["MachineDetection"]) == ("GET", "DetectMessageEnd")
        url = urllib.parse.urlsplit(fields["Url"])
        assert (url.scheme, url.netloc, url.path) == ("https", "relay.example.com", "/twiml")
        assert dict(urllib.parse.parse_qsl(url.query)) == {
            "direction": "outbound", "order": "A-1", "greeting": "Hi Ann!", "voicemail": MESSAGE}
        async with FakeOpenAI().running() as fake, running_relay(fake, TWILIO_AUTH_TOKEN=AUTH_TOKEN) as (the_relay, _):
            port = the_relay.port  # type: ignore[attr-defined]
            body = await signed_twiml(port, url.query, CallSid="CA" + "ab" * 16, From=OUR_NUMBER, To=CALLEE,
                                      AnsweredBy=answered_by, Direction="outbound-api")
            parameters = stream_parameters(body)
            base = {"direction": "outbound", "order": "A-1", "greeting": "Hi Ann!", "from": OUR_NUMBER, "to": CALLEE,
                    "answered_by": answered_by}
            if wanted == "connect":
                assert parameters == base  # the person hears the agent's greeting, as on any call
            elif wanted == "message":
                assert parameters == {**base, "voicemail": MESSAGE}
            else:
                assert parameters is None and [child.tag for child in ElementTree.fromstring(body)] == ["Hangup"]
            numbers = await metrics(the_relay)
            assert numbers[f'relay_outbound_answered_total{{answered_by="{answered_by}"}}'] == 1
            assert not fake.sessions  # /twiml dials nobody

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    assert any(f"answered by {answered_by}" in r.getMessage() for r in caplog.records)
    assert not any(MESSAGE in r.getMessage() for r in caplog.records)


def test_relay_py_call_voicemail_hangup_hangs_up_on_machines_only() -> None:
    async def scenario() -> None:
        fields = await placed_call([CALLEE, "--voicemail", "hangup"])
        query = urllib.parse.urlsplit(fields["Url"]).query
        async with FakeOpenAI().running() as fake, running_relay(fake, TWILIO_AUTH_TOKEN=AUTH_TOKEN) as (the_relay, _):
            port = the_relay.port  # type: ignore[attr-defined]
            machine = await signed_twiml(port, query, From=OUR_NUMBER, To=CALLEE, AnsweredBy="machine_end_beep")
            assert [child.tag for child in ElementTree.fromstring(machine)] == ["Hangup"]
            person = await signed_twiml(port, query, From=OUR_NUMBER, To=CALLEE, AnsweredBy="human")
            assert stream_parameters(person) == {"direction": "outbound", "from": OUR_NUMBER, "to": CALLEE,
                                                 "answered_by": "human"}

    run(scenario)


def test_without_voicemail_an_outbound_call_is_connected_at_once_as_before() -> None:
    async def scenario() -> None:
        fields = await placed_call([CALLEE])
        assert set(fields) == {"To", "From", "Twiml"}  # no detection: nobody waits for it

    run(scenario)


def test_a_machine_hears_the_message_in_the_agents_voice_then_the_relay_hangs_up(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    heard: list[tuple[int, int]] = []
    phones: list[FakeTwilio] = []
    monkeypatch.setattr(relay, "GOODBYE_PLAYBACK_LIMIT", 1.0)  # 8 s in real life: the message plays longer

    async def scenario() -> None:
        fake = FakeOpenAI()
        fake.respond = speaking_for(20, heard, phones)
        async with fake.running(), FakeTwilioRest().running() as rest:
            async with running_relay(fake, None, **rest.env(), GREETING="") as (the_relay, url):
                twilio = FakeTwilio(url)
                rest.streams[twilio.call_sid] = twilio
                phones.append(twilio)
                await twilio.open(start=False)
                session = await fake.session()
                await eventually(lambda: all(configured(call) for call in the_relay.calls))
                await twilio.start(customParameters={"direction": "outbound", "greeting": "Hi Ann!",
                                                     "answered_by": "machine_end_beep", "voicemail": MESSAGE})
                await twilio.closed.wait()
                update = session.of_type("session.update")[-1]["session"]
                assert update["audio"]["input"]["turn_detection"] is None  # its beeps cannot interrupt the message
                assert "voicemail" not in update["instructions"] and MESSAGE not in update["instructions"]
                assert instructions_asked(session) == [relay.VOICEMAIL_INSTRUCTIONS + MESSAGE]  # not the greeting
                assert rest.requests[-1][1] == {"Status": "completed"}
                assert rest.played_at_request == [20 * CHUNK_MS * 8]  # hung up once the message had played
                assert (await metrics(the_relay))['relay_hang_ups_total{cause="voicemail"}'] == 1

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    assert any("hanging up: the voicemail message has been left" in r.getMessage() for r in caplog.records)


BAKERY, GARAGE = "+15551230001", "+15551230002"
AGENTS = {BAKERY: {"instructions": "You are Max, the bakery's assistant.", "greeting": "Bakery, Max speaking.",
                   "voice": "cedar"},
          GARAGE: {"greeting": "Garage, how can we help?"}}


def test_twiml_gives_each_number_its_agent_and_a_parameter_in_the_url_wins() -> None:
    async def scenario() -> None:
        async with FakeOpenAI().running() as fake, relay.serve_calls(
                relay.Relay(relay_config(fake), BUILT_IN_TOOLS, AGENTS), "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]

            async def parameters(path: str) -> dict[str, str] | None:
                status, body = await raw_request(port, path, {"Host": "relay.example.com"}, websocket=False)
                assert status == 200
                return stream_parameters(body)

            assert await parameters(f"/twiml?From=%2B15550001111&To={urllib.parse.quote(BAKERY)}") == {
                **AGENTS[BAKERY], "from": "+15550001111", "to": BAKERY}
            assert await parameters(f"/twiml?From=%2B15550001111&To={urllib.parse.quote(GARAGE)}") == {
                **AGENTS[GARAGE], "from": "+15550001111", "to": GARAGE}
            assert await parameters("/twiml?From=%2B15550001111&To=%2B15559998888") == {
                "from": "+15550001111", "to": "+15559998888"}  # not in the table: the default agent
            bakery = urllib.parse.quote(BAKERY)
            won = await parameters(f"/twiml?greeting=Hello+from+the+URL&From=%2B15550001111&To={bakery}")
            assert won is not None and won["greeting"] == "Hello from the URL" and won["voice"] == "cedar"
            # An outbound call made from the bakery's number gets the bakery's agent.
            outbound = await parameters(f"/twiml?direction=outbound&From={urllib.parse.quote(BAKERY)}&To=%2B15553334444")
            assert outbound is not None and outbound["greeting"] == "Bakery, Max speaking."

    run(scenario)


@pytest.mark.parametrize(("agents", "complaint"), [
    ({"5551230001": {"greeting": "Hi"}}, r"AGENTS\['5551230001'\] in relay.py: the key must be one of your Twilio"),
    ({BAKERY: {"voice": "Alloy"}}, r"voice must be one of alloy, ash"),
    ({BAKERY: {"persona": "x"}}, r"'persona' is not one of instructions, greeting, voice"),
    ({BAKERY: {"greeting": 5}}, r"every value must be a string"),
])
def test_bad_agents_are_refused_at_start_up(agents: dict[str, Any], complaint: str) -> None:
    with pytest.raises(relay.ConfigError, match=complaint):
        relay.check_agents(agents)
    relay.check_agents(AGENTS)  # the examples above are fine
    relay.check_agents(relay.AGENTS)  # and so is relay.py's own table, whatever a user has put in it


@pytest.mark.parametrize(("args", "complaint"), [
    ([CALLEE, "--voicemail", "hangup", "--instructions", "Be brief. " * 400],
     "the call's /twiml URL would be 4[0-9]{3} characters, and Twilio takes at most 4000: shorten"),
    ([CALLEE, "--instructions", "Be brief. " * 400], "the call's TwiML would be 4[0-9]{3} characters"),
    ([CALLEE, "--voicemail", MESSAGE, "--param", "Order=A-1"],
     "with --voicemail, a --param name must start with a lowercase letter"),
    ([CALLEE, "--voicemail", " "], '--voicemail takes the message to leave, or "hangup"'),
])
def test_relay_py_call_refuses_what_twilio_would_refuse(args: list[str], complaint: str) -> None:
    async def scenario() -> None:
        async with FakeTwilioRest().running() as rest:
            env = {**rest.env(), "TWILIO_PHONE_NUMBER": OUR_NUMBER, "PUBLIC_URL": "https://relay.example.com"}
            process = await run_call_command(args, env)
            stdout, stderr = await process.communicate()
            assert process.returncode != 0 and stdout == b"" and not rest.requests
            assert re.search(complaint, stderr.decode()), stderr
            assert len(stderr.strip().splitlines()) == 1

    run(scenario)


# The browser phone: /phone in a real Chromium, with a fake microphone ---------------------------------


PHONE_TOKEN = "phone-token-for-the-tests-0123"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None or shutil.which("espeak-ng") is None,
                                    reason="needs chromium and espeak-ng (.ci/run installs them)")


class Browser:
    """Headless Chromium from the system, driven over the DevTools protocol, with a fake microphone.

    The microphone plays ``wav`` in a loop, as Chromium's fake capture device does.
    """

    def __init__(self, wav: str) -> None:
        self.wav = wav
        self.profile = tempfile.mkdtemp(prefix="relay-chromium-")
        self.ids = itertools.count(1)

    async def __aenter__(self) -> Browser:
        assert CHROMIUM is not None
        self.process = await asyncio.create_subprocess_exec(
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={self.profile}", "--remote-debugging-port=0", "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={self.wav}",
            "--autoplay-policy=no-user-gesture-required", "--window-size=900,900", "about:blank",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        assert self.process.stderr is not None
        async with asyncio.timeout(20):
            while True:
                line = (await self.process.stderr.readline()).decode()
                assert line, "chromium exited"
                if "DevTools listening on ws://" in line:
                    port = int(line.split("ws://127.0.0.1:")[1].split("/")[0])
                    break
        self.drain = asyncio.create_task(self.process.stderr.read())  # keep its pipe from filling up
        _, _, body = await http_get(port, "/json/list")
        (page,) = [target for target in json.loads(body) if target["type"] == "page"]
        self.page = await connect(page["webSocketDebuggerUrl"], max_size=None, compression=None)
        return self

    async def __aexit__(self, *_: Any) -> None:
        await self.page.close()
        self.process.kill()
        await self.process.wait()
        self.drain.cancel()
        shutil.rmtree(self.profile, ignore_errors=True)

    async def command(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events that come meanwhile are skipped)."""
        number = next(self.ids)
        await self.page.send(json.dumps({"id": number, "method": method, "params": params}))
        while True:
            reply = json.loads(await self.page.recv())
            if reply.get("id") == number:
                assert "error" not in reply, reply
                return reply["result"]

    async def evaluate(self, expression: str) -> Any:
        """Run JavaScript in the page, as a click would (a user gesture); return its value."""
        result = await self.command("Runtime.evaluate", expression=expression, awaitPromise=True,
                                    returnByValue=True, userGesture=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    async def until(self, expression: str, limit: float = 10) -> Any:
        """Poll a JavaScript expression until it is truthy; return it."""
        async with asyncio.timeout(limit):
            while not (value := await self.evaluate(expression)):
                await asyncio.sleep(0.05)
        return value


def spoken_wav(folder: str, text: str) -> str:
    """A WAV of ``text`` spoken by espeak-ng: the fake microphone's voice."""
    path = os.path.join(folder, "caller.wav")
    subprocess.run(["espeak-ng", "-w", path, text], check=True, capture_output=True)
    return path


def mulaw_to_linear(byte: int) -> int:
    """G.711 mu-law to 16-bit linear, as the standard decoder does."""
    byte = ~byte & 0xFF
    magnitude = (((byte & 0x0F) << 3) + 0x84) << ((byte >> 4) & 0x07)
    return (0x84 - magnitude) if byte & 0x80 else (magnitude - 0x84)


@needs_chromium
def test_the_browser_phone_calls_the_agent_as_a_phone_would(
    shop_tools: dict[str, Any], tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    wav = spoken_wav(str(tmp_path), "Hello, I would like to know where my order is. It is order A one.")

    async def scenario() -> None:
        fake = FakeOpenAI()
        env = {"BROWSER_PHONE": "on", "BROWSER_PHONE_TOKEN": PHONE_TOKEN, "GREETING": "", "IDLE_SECONDS": "0"}
        async with fake.running(), running_relay(fake, shop_tools["tools"], **env) as (the_relay, _), \
                Browser(wav) as browser:
            port = the_relay.port  # type: ignore[attr-defined]
            await browser.command("Page.navigate", url=f"http://127.0.0.1:{port}/phone?token={PHONE_TOKEN}")
            await browser.until("document.readyState === 'complete' && !!document.querySelector('#call')")
            await browser.evaluate("document.querySelector('#caller').value = '+15550001111';"
                                   "document.querySelector('#params').value = 'caller_name=Ann';"
                                   "document.querySelector('#call').click()")
            session = await fake.session()
            await eventually(lambda: all(configured(call) and call.stream_sid for call in the_relay.calls), limit=10)
            (call,) = the_relay.calls
            assert call.phone.direction == "browser" and call.parameters == {"from": "+15550001111", "caller_name": "Ann"}

            # The caller's speech reaches OpenAI as mu-law at 8 kHz, in 20 ms frames, and it is not silence.
            await eventually(lambda: len(session.appended()) >= 100, limit=10)
            frames = [base64.b64decode(payload) for payload in session.appended()]
            assert all(len(frame) % FRAME == 0 for frame in frames)  # 160 samples: 20 ms at 8 kHz (maybe joined)
            loud = max(abs(mulaw_to_linear(byte)) for frame in frames for byte in frame)
            assert loud > 2000 and len({byte for frame in frames for byte in frame}) > 40

            # The agent's audio plays, and its marks come back as it plays, not all at once.
            await session.say("item_a", speech(1, 10))  # 1 s
            await session.send({"type": "response.output_audio.done", "response_id": "resp_1", "item_id": "item_a",
                                "output_index": 0, "content_index": 0})
            await browser.until("window.phone.marksEchoed.length > 0")
            assert call.phone.playback.pending  # marks still to be heard when the first came back
            await eventually(lambda: call.phone.playback.drained.is_set(), limit=10)
            assert len(await browser.evaluate("window.phone.marksEchoed")) == call.phone.playback.marks_sent

            # A keypad press reaches the agent as it does from a phone.
            await browser.evaluate("document.querySelector('.key[data-digit=\"5\"]').click()")
            await eventually(lambda: any(e["item"].get("content", [{}])[0].get("text") ==
                                         "The caller pressed 5 on the keypad."
                                         for e in session.of_type("conversation.item.create")))

            # What was said, and the tool call, appear on the page.
            await caller_said(session, "item_c1", "Where is my order A-1?")
            await agent_begins(session, "resp_b", "item_b1")
            await function_call(session, "opening_hours", "{}", "call_1", "resp_b")
            await agent_transcript(session, "item_b1", "We are open from nine to five.")
            await response_done(session, "resp_b")
            text = await browser.until("['nine to five', 'opening_hours'].every((words) =>"
                                       " document.querySelector('#transcript').innerText.includes(words))"
                                       " && document.querySelector('#transcript').innerText")
            assert "Where is my order A-1?" in text and "opening_hours" in text
            screenshot = os.environ.get("RELAY_PHONE_SCREENSHOT")
            if screenshot:  # README's picture: RELAY_PHONE_SCREENSHOT=.readme/phone.png python -m pytest -k browser
                shot = await browser.command("Page.captureScreenshot", format="png")
                with open(screenshot, "wb") as file:
                    file.write(base64.b64decode(shot["data"]))

            # Hanging up ends the call and closes the OpenAI session.
            await browser.evaluate("document.querySelector('#hangup').click()")
            await session.ws.wait_closed()
            await eventually(lambda: not the_relay.calls)
            assert await browser.until("window.phone.state === 'ended'")

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario, limit=60)
    lines = [r.getMessage() for r in caplog.records]
    assert any("stream started (direction browser" in line for line in lines)
    assert any("the caller hung up" in line for line in lines)
    assert not any(PHONE_TOKEN in line for line in lines)


def test_the_browser_phone_needs_its_token_and_dials_nobody_without_it(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with FakeOpenAI().running() as fake:
            env = {"BROWSER_PHONE": "on", "BROWSER_PHONE_TOKEN": PHONE_TOKEN, "TWILIO_AUTH_TOKEN": AUTH_TOKEN}
            async with running_relay(fake, None, **env) as (the_relay, _):
                port = the_relay.port  # type: ignore[attr-defined]
                for path in ("/phone", "/phone?token=wrong", f"/phone?token={PHONE_TOKEN}x"):
                    assert (await http_get(port, path))[0] == 401
                status, headers, body = await http_get(port, f"/phone?token={PHONE_TOKEN}")
                assert status == 200 and headers["content-type"].startswith("text/html")
                assert b"Browser phone" in body and b"<script src" not in body  # nothing from elsewhere
                for token in ("", "wrong"):
                    with pytest.raises(InvalidStatus) as refused:
                        await connect(f"ws://127.0.0.1:{port}/browser-phone?token={token}", open_timeout=2)
                    assert refused.value.response.status_code == 403
                assert fake.handshakes == 0  # no OpenAI dial for any of them
                # The right token is enough: a browser has no Twilio signature to give.
                twilio = await FakeTwilio(f"ws://127.0.0.1:{port}/browser-phone?token={PHONE_TOKEN}").open()
                await eventually(lambda: fake.handshakes == 1)
                await twilio.close()
                numbers = await metrics(the_relay)
                assert numbers['relay_calls_refused_total{reason="token"}'] == 5
                assert numbers['relay_calls_started_total{direction="browser"}'] == 1
                # Twilio's path keeps its signature check.
                with pytest.raises(InvalidStatus) as refused:
                    await connect(f"ws://127.0.0.1:{port}/media-stream", open_timeout=2)
                assert refused.value.response.status_code == 403
            async with running_relay(fake) as (the_relay, _):  # BROWSER_PHONE is off by default
                port = the_relay.port  # type: ignore[attr-defined]
                assert (await http_get(port, f"/phone?token={PHONE_TOKEN}"))[0] == 404
                with pytest.raises(InvalidStatus) as refused:
                    await connect(f"ws://127.0.0.1:{port}/browser-phone?token={PHONE_TOKEN}", open_timeout=2)
                assert refused.value.response.status_code == 404

    with caplog.at_level(logging.DEBUG, logger="relay"):
        run(scenario)
    assert not any(PHONE_TOKEN in r.getMessage() for r in caplog.records)


def test_the_start_up_line_gives_the_browser_phones_url_with_a_fresh_token() -> None:
    async def scenario() -> None:
        tokens = []
        for _ in range(2):
            lines = await start_up_lines({"BROWSER_PHONE": "on"})
            (line,) = [line for line in lines if "browser phone: open http://localhost:" in line]
            tokens.append(re.search(r"/phone\?token=([A-Za-z0-9_-]+) ", line).group(1))  # type: ignore[union-attr]
            assert "not for the public" in line
        assert tokens[0] != tokens[1] and all(len(token) >= 16 for token in tokens)
        lines = await start_up_lines({})
        assert not any("browser phone" in line for line in lines)

    run(scenario)


# A call survives OpenAI: session continuity, /ready --------------------------------------------------


async def caller_said(session: FakeSession, item_id: str, text: str) -> None:
    """A caller's turn as the GA API reports it: speech starts, then its transcript comes."""
    await session.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": 0, "item_id": item_id})
    await session.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 900, "item_id": item_id})
    await session.send({"type": "conversation.item.input_audio_transcription.completed", "item_id": item_id,
                        "content_index": 0, "transcript": text})


async def agent_begins(session: FakeSession, response_id: str, item_id: str) -> None:
    await response_created(session, response_id)
    await session.send({"type": "response.output_item.added", "response_id": response_id, "output_index": 0,
                        "item": {"id": item_id, "type": "message", "role": "assistant", "content": []}})


async def agent_transcript(session: FakeSession, item_id: str, text: str) -> None:
    await session.send({"type": "response.output_audio_transcript.done", "item_id": item_id,
                        "content_index": 0, "transcript": text})


async def drop(session: FakeSession, how: str) -> None:
    """OpenAI losing a session: a 1011 close, or the TCP connection reset."""
    if how == "1011":
        await session.ws.close(1011, "server trouble")
    else:
        session.ws.transport.abort()


def restored_turns(session: FakeSession) -> list[tuple[str, str, str]]:
    """The message items a new session was given: (role, content type, text)."""
    return [(event["item"]["role"], event["item"]["content"][0]["type"], event["item"]["content"][0]["text"])
            for event in session.of_type("conversation.item.create") if event["item"]["type"] == "message"]


@pytest.mark.parametrize("how", ["1011", "reset"])
def test_a_dropped_session_is_replaced_and_the_call_goes_on(how: str, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with one_call() as (fake, the_relay, twilio, first):
            assert first.of_type("session.update")[0]["session"]["audio"]["input"]["transcription"] == {
                "model": "gpt-4o-mini-transcribe"}  # continuity keeps the caller's words
            await caller_said(first, "item_u1", "A table for two, please.")
            await agent_begins(first, "resp_1", "item_a1")
            await first.say("item_a1", speech(1, 2))
            await agent_transcript(first, "item_a1", "Sure, for what time?")
            await response_done(first, "resp_1")
            await eventually(lambda: twilio.played_bytes == 2 * CHUNK_MS * 8)
            await caller_said(first, "item_u2", "Eight tonight.")
            await agent_begins(first, "resp_2", "item_a2")
            await agent_transcript(first, "item_a2", "Booked for eight.")
            await response_done(first, "resp_2")
            await eventually(lambda: not twilio.queue)  # every mark echoed: nothing is playing
            before = [audio(1, i) for i in range(5)]
            await twilio.send_media(before)
            await eventually(lambda: first.caller_audio() == pcm(before))

            fake.handshake_delay = 0.3  # the caller goes on talking into the gap
            await drop(first, how)
            await eventually(lambda: fake.handshakes == 2)
            during, after = [audio(1, i) for i in range(5, 15)], [audio(1, i) for i in range(15, 20)]
            await twilio.send_media(during)
            second = await fake.session(1)
            await twilio.send_media(after)
            await eventually(lambda: second.caller_audio() == pcm(during + after))  # none lost, in order

            assert second.received[0]["type"] == "session.update"
            assert second.received[0]["session"] == first.of_type("session.update")[-1]["session"]
            assert "caller: +15550001111" in second.received[0]["session"]["instructions"]  # per-call values
            assert restored_turns(second) == [
                ("user", "input_text", "A table for two, please."),
                ("assistant", "output_text", "Sure, for what time?"),
                ("user", "input_text", "Eight tonight."),
                ("assistant", "output_text", "Booked for eight."),
            ]
            kinds = [event["type"] for event in second.received]
            assert kinds.index("input_audio_buffer.append") > max(
                i for i, kind in enumerate(kinds) if kind == "conversation.item.create")
            assert not second.of_type("response.create")  # nobody was waiting for an answer
            assert twilio.clears == 0  # nothing was playing
            await second.say("item_b1", speech(2, 1), response_id="resp_3")  # the call goes on
            await eventually(lambda: twilio.media[-1:] == speech(2, 1))
            assert not twilio.closed.is_set()
            numbers = await metrics(the_relay)
            assert numbers['relay_openai_reconnects_total{reason="dropped"}'] == 1
            assert numbers['relay_errors_total{kind="openai_connection"}'] == 1

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    lines = [r.getMessage() for r in caplog.records]
    assert any("OpenAI session replaced after" in line and "4 turn(s) of conversation restored" in line
               and "CA" in line for line in lines)
    assert not any("Booked for eight" in line or "Eight tonight" in line for line in lines)  # no transcripts


def test_a_drop_while_the_agent_speaks_clears_the_phone_and_the_agent_picks_up() -> None:
    async def scenario() -> None:
        async with one_call() as (fake, _, twilio, first):
            await caller_said(first, "item_u1", "When are you open?")
            await agent_begins(first, "resp_1", "item_a1")
            answer = "We open at nine and close at six every day except Sunday when we rest."
            await agent_transcript(first, "item_a1", answer)
            await first.say("item_a1", speech(1, 10))  # a second of answer
            await eventually(lambda: twilio.played_bytes >= 400 * 8)
            await drop(first, "1011")
            await eventually(lambda: twilio.clears == 1)  # the old session's audio is gone
            second = await fake.session(1)
            await eventually(lambda: bool(second.of_type("response.create")))
            (pick_up,) = second.of_type("response.create")
            assert "pick up where the conversation left off" in pick_up["response"]["instructions"]
            (user, (role, kind, cut)) = restored_turns(second)
            assert user == ("user", "input_text", "When are you open?")
            assert (role, kind) == ("assistant", "output_text")
            assert cut.endswith("[cut off: the caller interrupted here]")  # what they heard, no more
            assert answer.startswith(cut.removesuffix(" [cut off: the caller interrupted here]"))
            assert len(cut) < len(answer)
            await second.say("item_b1", speech(2, 2), response_id="resp_2")
            await eventually(lambda: twilio.media[-2:] == speech(2, 2))
            assert len(second.of_type("response.create")) == 1  # exactly one

    run(scenario)


async def order_status_running(session: FakeSession, shop_tools: dict[str, Any]) -> None:
    """The agent's answer calls order_status, which waits for the test's go-ahead."""
    await agent_begins(session, "resp_1", "item_a1")
    await function_call(session, "order_status", '{"order": "A7"}', "call_1")
    await eventually(lambda: len(shop_tools["seen"]) == 1)


def test_a_tool_running_across_a_drop_answers_in_the_new_session(shop_tools: dict[str, Any]) -> None:
    async def scenario() -> None:
        async with one_call(shop_tools["tools"]) as (fake, _, twilio, first):
            await order_status_running(first, shop_tools)
            fake.respond = begin_only  # the pick-up line stays active until the test ends it
            await drop(first, "1011")
            second = await fake.session(1)
            await eventually(lambda: len(second.of_type("response.create")) == 1)  # the agent picks up
            await shop_tools["gate"].put("go")
            await eventually(lambda: any("order_status" in text for _, _, text in restored_turns(second)))
            (note,) = [event["item"] for event in second.of_type("conversation.item.create")
                       if event["item"]["role"] == "system"]
            assert '"status": "shipped"' in note["content"][0]["text"]
            assert not second.of_type("function_call_output")  # the new session never saw the call
            await asyncio.sleep(0.1)
            assert len(second.of_type("response.create")) == 1  # not while the pick-up is active
            await second.finish()
            await eventually(lambda: len(second.of_type("response.create")) == 2)  # now the result is spoken
            assert not twilio.closed.is_set()

    run(scenario)


def test_a_redial_that_keeps_failing_hands_the_call_back_to_twilio(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with one_call(RECONNECT_SECONDS="1") as (fake, _, twilio, first):
            fake.refuse_status = 500
            await drop(first, "1011")
            async with asyncio.timeout(1 + 1):  # RECONNECT_SECONDS plus 1 s, as promised
                await twilio.closed.wait()
            assert twilio.close_code == 1011  # Twilio then runs the TwiML after <Connect>
            assert fake.handshakes >= 4  # it tried again, with a short backoff

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("refused the connection: HTTP 500" in line and "CA" in line for line in lines)


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_key_on_redial_is_not_retried(status: int) -> None:
    async def scenario() -> None:
        async with one_call() as (fake, _, twilio, first):
            fake.refuse_status = status
            await drop(first, "reset")
            await twilio.closed.wait()
            assert twilio.close_code == 1011
            assert fake.handshakes == 2  # one redial, no retry

    run(scenario)


def test_a_session_is_rolled_over_at_a_quiet_moment_before_its_limit(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with one_call(SESSION_ROLLOVER_SECONDS="1") as (fake, the_relay, twilio, first):
            await caller_said(first, "item_u1", "Tell me a long story.")
            await agent_begins(first, "resp_1", "item_a1")  # the agent is answering when the session is due
            await asyncio.sleep(1.5)
            assert len(fake.sessions) == 1  # it waits for neither side to be speaking
            await agent_transcript(first, "item_a1", "Once upon a time.")
            await response_done(first, "resp_1")
            second = await fake.session(1)
            await first.ws.wait_closed()
            assert first.ws.close_code == 1000  # the relay closed it itself
            await eventually(lambda: len(restored_turns(second)) == 2)
            assert restored_turns(second)[1] == ("assistant", "output_text", "Once upon a time.")
            assert not second.of_type("response.create")  # nobody was waiting: no apology
            assert twilio.clears == 0 and not twilio.closed.is_set()
            assert (await metrics(the_relay))['relay_openai_reconnects_total{reason="rollover"}'] >= 1

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    assert any("OpenAI session rolled over after" in r.getMessage() for r in caplog.records)


def test_an_expired_session_is_replaced_when_continuity_is_on(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with one_call() as (fake, the_relay, twilio, first):
            await session_expired(first)
            second = await fake.session(1)
            await second.say("item_b1", speech(2, 1))
            await eventually(lambda: twilio.media == speech(2, 1))
            assert (await metrics(the_relay))['relay_openai_reconnects_total{reason="expired"}'] == 1
            assert not twilio.closed.is_set()

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    assert not any("hanging up" in r.getMessage() for r in caplog.records)


def test_new_sessions_that_die_at_once_hand_the_call_back_within_reconnect_seconds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        async with one_call(RECONNECT_SECONDS="1") as (fake, the_relay, twilio, first):
            async def die_once_configured(session: FakeSession, event: dict[str, Any]) -> None:
                if event["type"] == "session.update" and session is not first:
                    await asyncio.sleep(0.05)
                    await session.ws.close(1011, "server trouble")

            fake.on_event = die_once_configured
            await drop(first, "1011")
            async with asyncio.timeout(1 + 1):  # RECONNECT_SECONDS plus 1 s, however each one fails
                await twilio.closed.wait()
            assert twilio.close_code == 1011
            assert fake.handshakes <= 4  # a pause between new sessions, not a storm of them

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    assert any("closed every new session within 1 s" in r.getMessage() for r in caplog.records)


def test_a_start_that_comes_during_a_gap_reaches_the_new_session() -> None:
    async def scenario() -> None:
        async with FakeOpenAI().running() as fake, running_relay(fake) as (the_relay, url):
            twilio = await FakeTwilio(url).open(start=False)
            first = await fake.session()
            await eventually(lambda: all(configured(call) for call in the_relay.calls))
            fake.handshake_delay = 0.3
            await drop(first, "1011")
            await eventually(lambda: fake.handshakes == 2)
            await twilio.start()  # sent while no session is up
            second = await fake.session(1)
            await eventually(lambda: bool(second.of_type("response.create")))
            assert "caller: +15550001111" in second.of_type("session.update")[-1]["session"]["instructions"]
            (greeting,) = second.of_type("response.create")  # the caller is greeted, on the new session
            assert "Hi, this is Tessa." in greeting["response"]["instructions"]
            assert not twilio.closed.is_set()
            await twilio.close()

    run(scenario)


def test_what_is_sent_while_openai_closes_reaches_the_new_session_once(shop_tools: dict[str, Any]) -> None:
    async def scenario() -> None:
        async with one_call(shop_tools["tools"]) as (fake, the_relay, twilio, first):
            await order_status_running(first, shop_tools)
            (call,) = the_relay.calls
            closing = call.link.session.socket  # type: ignore[union-attr]
            first.close_slowly()
            await eventually(lambda: closing.state is not State.OPEN)  # type: ignore[union-attr]
            await shop_tools["gate"].put("go")  # the tool answers while the session is closing...
            await press(twilio, "7")  # ...and the caller presses a key
            await asyncio.sleep(0.05)
            first.resume()
            second = await fake.session(1)
            await eventually(lambda: any("pressed 7" in text for _, _, text in restored_turns(second)))
            items = [event["item"] for event in second.of_type("conversation.item.create")]
            assert not [item for item in items if item["type"] == "function_call_output"]  # a call it never saw
            texts = [text for _, _, text in restored_turns(second)]
            assert sum("order_status" in text and "shipped" in text for text in texts) == 1  # as a note, once
            assert sum("pressed 7" in text for text in texts) == 1
            await asyncio.sleep(0.2)
            assert len(second.of_type("response.create")) == 1  # the agent picks up, once

    run(scenario)


def test_a_drop_while_the_caller_talks_leaves_a_warm_replacement_hearing_them() -> None:
    """With a warm session the new one is live before the caller's frame, caught in the old
    session's close, fails: that failure must not cut the new session off."""
    async def scenario() -> None:
        fake = FakeOpenAI()
        async with fake.running(), running_relay(fake, WARM_SESSIONS="1", GREETING="") as (the_relay, url):
            await eventually(lambda: len(the_relay.warm.ready) == 1)
            twilio = await FakeTwilio(url).open()
            await eventually(lambda: len(the_relay.calls) == 1)
            (call,) = the_relay.calls
            await eventually(lambda: configured(call) and len(the_relay.warm.ready) == 1)
            first = fake.sessions[0]
            closing = call.link.session.socket  # type: ignore[union-attr]
            first.close_slowly()
            await eventually(lambda: closing.state is not State.OPEN)
            await twilio.send_media([audio(1, 0)], pace=0)  # its send waits for the old session's close
            await asyncio.sleep(0.05)
            first.resume()
            await eventually(lambda: call.record.reconnects == 1)
            second = next(session for session in fake.sessions[1:]
                          if session.ws.remote_address == call.link.session.socket.local_address)  # type: ignore[union-attr]
            frames = [audio(1, index) for index in range(1, 11)]
            await twilio.send_media(frames)
            await eventually(lambda: pcm(frames) in second.caller_audio())
            await twilio.close()

    run(scenario)


def test_a_session_that_worked_then_drops_gets_a_redial_of_its_own() -> None:
    async def scenario() -> None:
        async with one_call(RECONNECT_SECONDS="2") as (fake, the_relay, twilio, first):
            await drop(first, "1011")
            second = await fake.session(1)
            await eventually(lambda: all(configured(call) for call in the_relay.calls))
            await agent_begins(second, "resp_2", "item_b1")  # it works: the agent talks
            await second.say("item_b1", speech(2, 2), response_id="resp_2")
            await response_done(second, "resp_2")
            await eventually(lambda: twilio.media[-2:] == speech(2, 2))
            await asyncio.sleep(1.6)  # the first gap's 2 s are over by now
            await drop(second, "1011")  # an unrelated second drop
            third = await fake.session(2)
            await eventually(lambda: bool(third.of_type("session.update")))
            assert not twilio.closed.is_set()

    run(scenario)


def test_a_planned_rollover_waits_for_a_running_tool_and_does_not_apologise(shop_tools: dict[str, Any]) -> None:
    async def scenario() -> None:
        async with one_call(shop_tools["tools"], SESSION_ROLLOVER_SECONDS="1") as (fake, _, twilio, first):
            await caller_said(first, "item_u1", "Where is order A7?")
            await response_created(first, "resp_1")  # the model answers with a function call only
            await function_call(first, "order_status", '{"order": "A7"}', "call_1")
            await response_done(first, "resp_1")
            await asyncio.sleep(1.5)
            assert len(fake.sessions) == 1  # not while the tool runs
            await shop_tools["gate"].put("go")
            await eventually(lambda: len(first.of_type("response.create")) == 1)  # its result is spoken first
            await agent_begins(first, "resp_2", "item_a2")
            await agent_transcript(first, "item_a2", "Order A7 has shipped.")
            await response_done(first, "resp_2")
            second = await fake.session(1)
            await eventually(lambda: bool(restored_turns(second)))
            await asyncio.sleep(0.2)
            assert not second.of_type("response.create")  # nothing was owed: no apology
            assert not twilio.closed.is_set()

    run(scenario)


def test_both_sides_dying_at_once_end_the_call_without_a_relay_bug() -> None:
    async def scenario() -> None:
        async with one_call() as (_, the_relay, twilio, first):
            await agent_begins(first, "resp_1", "item_a1")
            await first.say("item_a1", speech(1, 10))
            await eventually(lambda: twilio.played_bytes >= 200 * 8)
            twilio.ws.transport.abort()  # type: ignore[union-attr]
            first.ws.transport.abort()
            await eventually(lambda: not the_relay.calls)
            assert the_relay.stats.errors("relay_bug") == 0

    run(scenario)


def test_a_keypress_during_a_gap_survives_however_much_audio_comes() -> None:
    async def scenario() -> None:
        async with one_call() as (fake, _, twilio, first):
            fake.handshake_delay = 1.0
            await drop(first, "1011")
            await eventually(lambda: fake.handshakes == 2)
            await press(twilio, "7")
            frames = [audio(1, i) for i in range(relay.EARLY_AUDIO_LIMIT + 50)]
            await twilio.send_media(frames, pace=0)  # more than the gap keeps: the oldest audio goes
            second = await fake.session(1)
            await eventually(lambda: second.caller_audio() == pcm(frames[50:]))
            assert ("user", "input_text", "The caller pressed 7 on the keypad.") in restored_turns(second)
            (create,) = second.of_type("response.create")  # the press is answered, once
            kinds = [event["type"] for event in second.received]
            assert kinds.index("response.create") > kinds.index("conversation.item.create")

    run(scenario)


def test_a_transfer_that_fails_across_a_drop_is_answered_once_in_the_new_session() -> None:
    async def scenario() -> None:
        async with FakeOpenAI().running() as fake, FakeTwilioRest().running() as rest:
            rest.failure = TWILIO_ERRORS["404"]
            env = {"GREETING": "", "TRANSFER_TO": "+15551234567", **rest.env()}
            async with running_relay(fake, **env) as (the_relay, url):
                twilio = FakeTwilio(url)
                rest.streams[twilio.call_sid] = twilio
                await twilio.open()
                first = await fake.session()
                await eventually(lambda: all(configured(call) for call in the_relay.calls))
                await response_created(first, "resp_1")
                await first.say("item_handover", speech(1, 5))
                await function_call(first, "transfer_call", "{}", "call_t")
                await response_done(first, "resp_1")
                await asyncio.sleep(0.1)  # the transfer waits for the handover line to play
                await drop(first, "1011")
                second = await fake.session(1)
                await eventually(lambda: len(second.of_type("response.create")) == 2)  # picks up, then answers
                await asyncio.sleep(0.3)
                assert len(second.of_type("response.create")) == 2 and not second.refused  # never two at once
                assert any("The transfer failed" in text for _, _, text in restored_turns(second))
                assert "dropped" in second.of_type("response.create")[0]["response"]["instructions"]
                assert not twilio.closed.is_set()
                await twilio.close()

    run(scenario)


def test_ready_says_503_at_max_calls_while_health_stays_200() -> None:
    async def scenario() -> None:
        async with FakeOpenAI().running() as fake, running_relay(fake, MAX_CALLS="1") as (the_relay, url):
            port = the_relay.port  # type: ignore[attr-defined]
            status, headers, body = await http_get(port, "/ready")
            assert (status, json.loads(body)) == (200, {"status": "ready", "calls": 0, "max_calls": 1})
            assert headers["content-type"] == "application/json"
            twilio = await FakeTwilio(url).open()
            await eventually_async(lambda: ready_status(port), 503)
            status, _, body = await http_get(port, "/ready")
            assert json.loads(body) == {"status": "full", "calls": 1, "max_calls": 1}
            assert (await http_get(port, "/ready", method="HEAD"))[0] == 503
            assert (await http_get(port, "/health"))[0] == 200
            await twilio.close()
            await eventually_async(lambda: ready_status(port), 200)

    run(scenario)


def test_a_held_frame_goes_out_even_when_no_next_frame_comes() -> None:
    async def scenario() -> None:
        async with one_call() as (_, _, twilio, session):
            await twilio.send(media_frame(twilio, 0, timestamp=0))
            await eventually(lambda: len(session.appended()) == 1)
            await asyncio.sleep(0.1)
            await twilio.send(media_frame(twilio, 1, timestamp=20))  # handled 80 ms late: held for a partner
            await eventually(lambda: len(session.appended()) == 2)  # no partner, no stop: it goes out alone
            assert session.caller_audio() == pcm([audio(1, 0), audio(1, 1)])
            assert not twilio.closed.is_set()

    run(scenario)


# Shutdown ---------------------------------------------------------------------------------------


async def read_port(process: asyncio.subprocess.Process) -> tuple[int, str]:
    """Read the relay's log until it says which port it listens on; return it and the log so far."""
    assert process.stderr is not None
    log = ""
    while True:
        line = (await process.stderr.readline()).decode()
        assert line, "relay exited before listening"
        log += line
        if "relay listening on port" in line:
            return int(line.split("relay listening on port ")[1].split(":")[0]), log


def test_sigterm_drains_running_calls_then_closes_them_with_1012() -> None:
    """Also: /ready says 503 while draining, and health probes write no websockets lines."""
    async def scenario() -> None:
        async with FakeOpenAI().running() as fake:
            process = await start_relay_process({"OPENAI_API_KEY": API_KEY, "OPENAI_BASE_URL": fake.base_url,
                                                 "DRAIN_SECONDS": "1"})
            port, start_up_log = await read_port(process)
            assert "TWILIO_AUTH_TOKEN is not set: anyone who knows this relay's URL can open calls" in start_up_log
            assert API_KEY not in start_up_log
            url = f"ws://127.0.0.1:{port}/media-stream"
            staying, leaving = FakeTwilio(url, 1), FakeTwilio(url, 2)
            await staying.open()
            await leaving.open()
            await eventually(lambda: len(fake.sessions) == 2)
            for path in ("/health", "/ready", "/health"):
                assert (await http_get(port, path))[0] == 200
            process.send_signal(signal.SIGTERM)
            await eventually_async(lambda: ready_status(port), 503)
            status, _, body = await http_get(port, "/ready")
            assert json.loads(body) == {"status": "draining", "calls": 2, "max_calls": 50}
            assert (await http_get(port, "/health"))[0] == 200  # alive all the same
            with pytest.raises(InvalidStatus) as refused:
                await connect(url, open_timeout=1)  # no new calls
            assert refused.value.response.status_code == 503
            await leaving.send_media([audio(2, 0)])  # running calls still work while draining
            await eventually(lambda: any(s.appended() for s in fake.sessions))
            await leaving.stop()
            await leaving.closed.wait()
            assert leaving.close_code == 1000
            await staying.closed.wait()
            assert staying.close_code == 1012
            _, stderr = await process.communicate()
            assert process.returncode == 0
            assert b"stopped: 2 call(s) served" in stderr
            assert b" websockets." not in stderr  # websockets' INFO lines are kept out at LOG_LEVEL=INFO
            await asyncio.gather(staying.shutdown(), leaving.shutdown())

    run(scenario)


def test_sigterm_gives_reports_drain_seconds_then_logs_those_that_could_not_go() -> None:
    async def scenario() -> None:
        async with FakeOpenAI().running() as fake, FakeReceiver().running() as receiver:
            receiver.answering.clear()  # a receiver that hangs
            process = await start_relay_process({"OPENAI_API_KEY": API_KEY, "OPENAI_BASE_URL": fake.base_url,
                                                 "DRAIN_SECONDS": "1", "CALL_REPORT_URL": receiver.url,
                                                 "CALL_REPORT_SECRET": REPORT_SECRET})
            port, _ = await read_port(process)
            twilio = await FakeTwilio(f"ws://127.0.0.1:{port}/media-stream").open()
            await fake.session()
            await twilio.stop()
            await eventually(lambda: bool(receiver.posts))
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(8):  # well before a try's 10 s timeout: the relay does not wait for it
                _, stderr = await process.communicate()
            assert process.returncode == 0
            assert b"delivering 1 call report(s), for up to 1 s" in stderr
            assert f"ERROR relay: call report for {twilio.call_sid} could not be delivered before shutdown".encode() in stderr
            assert REPORT_SECRET.encode() not in stderr and b"customParameters" not in stderr
            receiver.answering.set()
            await twilio.shutdown()

    run(scenario)


# Load benchmark ------------------------------------------------------------------------------------
#
#   python test_relay.py bench [--calls 50,100,150,200,250] [--seconds 20] [--profile steady|realistic]
#
# Starts relay.py as its own process pinned to CPU 0, and runs the fake OpenAI and the fake
# Twilio calls in this process pinned to CPU 1. Each call sends a 160-byte frame every 20 ms.
# "steady": the fake OpenAI echoes every frame back as an audio delta, and Twilio echoes every
# mark at once. "realistic": the caller talks all the time, the agent talks 2 s in every 5, in
# deltas of 100-200 ms sent faster than real time, and Twilio echoes marks as playback reaches them.


BENCH_HANDSHAKE_DELAY = 0.3  # seconds the fake OpenAI takes to accept, like the real one
BENCH_WARM_UP = 1.0  # each call's first second (OpenAI still connecting) is left out of latency


class BenchStats:
    """Everything one load level measures."""

    def __init__(self) -> None:
        self.up_sent: dict[tuple[int, int], float] = {}  # (call, seq) -> when Twilio sent it
        self.down_sent: dict[tuple[int, int], float] = {}  # (call, seq) -> when OpenAI sent it
        self.uplink: list[float] = []
        self.downlink: list[float] = []
        self.round_trip: list[float] = []
        self.seen_up: dict[int, list[int]] = collections.defaultdict(list)  # seqs OpenAI got, per call
        self.seen_down: dict[int, list[int]] = collections.defaultdict(list)  # seqs Twilio got back
        self.sent_down: dict[int, int] = collections.Counter()  # deltas OpenAI sent, per call
        self.opened: dict[int, float] = {}  # Twilio socket open
        self.handshake_done: dict[int, float] = {}  # OpenAI handshake complete
        self.configured: dict[int, float] = {}  # session.update received
        self.first_audio: dict[int, float] = {}  # the call's first audio reached OpenAI
        self.call_started: dict[int, float] = {}
        self.window_over = False  # after the measured window the agent stops talking


def frame_payload(call: int, seq: int, size: int) -> str:
    return base64.b64encode(struct.pack(">II", call, seq) + bytes(size - 8)).decode()


TRAILER = 0xFFFFFFFF  # the seq of frames sent after the measured window, never counted


def frame_ids(payload: str, unit: int) -> list[tuple[int, int]]:
    """The (call, seq) of every frame in a payload; the relay may have joined frames."""
    data = base64.b64decode(payload)
    return [struct.unpack_from(">II", data, offset) for offset in range(0, len(data), unit)]  # type: ignore[misc]


class SansIOPeer(asyncio.Protocol):
    """One WebSocket end for the load generator, driven by callbacks.

    websockets' Sans-I/O protocol does the handshake, framing, masking and pings; this
    feeds it bytes and writes out what it produces. With no task switch per message the
    generator costs far less than the relay it measures, so the figures are the relay's.
    """

    def __init__(self, ws: ClientProtocol | ServerProtocol) -> None:
        self.ws = ws
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.ws.receive_data(data)
        for event in self.ws.events_received():
            if isinstance(event, Frame):
                if event.opcode is Opcode.TEXT:
                    self.on_text(event.data.decode())
            else:
                self.on_handshake(event)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def flush(self) -> None:
        for chunk in self.ws.data_to_send():
            if chunk:
                self.transport.write(chunk)  # type: ignore[attr-defined]
            else:
                self.transport.close()

    def send_text(self, text: str) -> None:
        if self.ws.state is State.OPEN:
            self.ws.send_text(text.encode())
            self.flush()

    def on_handshake(self, event: Request | Response) -> None:
        raise NotImplementedError

    def on_text(self, text: str) -> None:
        raise NotImplementedError


class BenchOpenAI(SansIOPeer):
    """The fake OpenAI for the benchmark: one instance per session."""

    def __init__(self, stats: BenchStats, profile: str) -> None:
        super().__init__(ServerProtocol(max_size=None))
        self.stats, self.profile = stats, profile
        self.call = -1
        self.configured = self.accepted = 0.0
        self.talker: asyncio.Task[None] | None = None

    def on_handshake(self, event: Request | Response) -> None:
        """Accept after BENCH_HANDSHAKE_DELAY, like the real API."""
        assert isinstance(event, Request)
        asyncio.get_running_loop().call_later(BENCH_HANDSHAKE_DELAY, self.accept, event)

    def accept(self, request: Request) -> None:
        self.ws.send_response(self.ws.accept(request))  # type: ignore[union-attr]
        self.accepted = time.perf_counter()
        self.flush()

    def on_text(self, message: str) -> None:
        stats = self.stats
        if '"input_audio_buffer.append"' not in message[:40]:
            if '"session.update"' in message[:30] and self.call == -1:
                self.configured = time.perf_counter()
            return
        audio_b64 = json.loads(message)["audio"]
        arrived = time.perf_counter()
        for call, seq in frame_ids(audio_b64, FRAME):
            if call not in stats.configured:
                self.call = call
                stats.configured[call], stats.handshake_done[call] = self.configured, self.accepted
                stats.first_audio[call] = arrived
                if self.profile == "realistic":
                    self.talker = asyncio.ensure_future(self.talk(call))
                else:  # as the real API does, audio comes inside a response: one that never ends
                    self.send_text('{"type":"response.created","response":{"id":"r","status":"in_progress"}}')
            if seq == TRAILER:
                continue
            stats.seen_up[call].append(seq)
            sent = stats.up_sent.get((call, seq))
            if sent is not None and sent - stats.call_started[call] > BENCH_WARM_UP:
                stats.uplink.append(arrived - sent)
            if self.profile == "steady":
                stats.down_sent[(call, seq)] = time.perf_counter()
                stats.sent_down[call] += 1
        if self.profile == "steady":  # echo the append as it came, joined frames and all
            self.send_text('{"type":"response.output_audio.delta","response_id":"r","item_id":"i'
                           f'{self.call}","output_index":0,"content_index":0,"delta":"{audio_b64}"}}')

    async def talk(self, call: int) -> None:
        """The agent: a 2 s response every 5 s, in 100-200 ms deltas sent as fast as 20 ms apart."""
        stats, seq, turn = self.stats, 0, 0
        rng = random.Random(call)
        await asyncio.sleep(rng.uniform(0, 5))
        while self.ws.state is State.OPEN:
            turn += 1
            spoken = 0
            self.send_text(f'{{"type":"response.created","response":{{"id":"r{turn}","status":"in_progress"}}}}')
            while spoken < 2000 and not stats.window_over:
                ms = rng.randrange(100, 201, 20)
                stats.down_sent[(call, seq)] = time.perf_counter()
                stats.sent_down[call] += 1
                self.send_text('{"type":"response.output_audio.delta","response_id":"r","item_id":"i'
                               f'{call}-{turn}","output_index":0,"content_index":0,'
                               f'"delta":"{frame_payload(call, seq, ms * 8)}"}}')
                seq += 1
                spoken += ms
                await asyncio.sleep(0.02)
            self.send_text(f'{{"type":"response.done","response":{{"id":"r{turn}","status":"completed"}}}}')
            await asyncio.sleep(5 - 2000 / 1000 - 0.02 * 13)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.talker is not None:
            self.talker.cancel()
        super().connection_lost(exc)


class BenchCall(SansIOPeer):
    """One simulated Twilio call."""

    def __init__(self, number: int, url: str, stats: BenchStats, profile: str) -> None:
        super().__init__(ClientProtocol(parse_uri(url), max_size=None))
        self.number, self.url, self.stats, self.profile = number, url, stats, profile
        self.sid = f"MZ{number:032d}"
        self.seq = 0
        self.play_until = 0.0
        self.opened = asyncio.get_running_loop().create_future()

    async def open(self) -> None:
        self.stats.opened[self.number] = time.perf_counter()
        uri = parse_uri(self.url)
        await asyncio.get_running_loop().create_connection(lambda: self, uri.host, uri.port)
        self.ws.send_request(self.ws.connect())  # type: ignore[union-attr]
        self.flush()
        await self.opened
        self.send_text(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        self.send_text(json.dumps({"event": "start", "streamSid": self.sid, "start": {
            "streamSid": self.sid, "callSid": f"CA{self.number:032d}", "customParameters": {}}}))
        self.stats.call_started[self.number] = time.perf_counter()
        self.send_frame()  # Twilio streams from the moment the call starts

    def on_handshake(self, event: Request | Response) -> None:
        assert isinstance(event, Response) and event.status_code == 101, event
        self.opened.set_result(None)

    def send_frame(self, trailer: bool = False) -> None:
        seq = TRAILER if trailer else self.seq
        payload = frame_payload(self.number, seq, FRAME)
        sent = time.perf_counter()
        self.stats.up_sent[(self.number, seq)] = sent
        self.seq += not trailer
        timestamp = int((sent - self.stats.call_started[self.number]) * 1000)
        self.send_text(f'{{"event":"media","streamSid":"{self.sid}","media":{{"track":"inbound",'
                       f'"chunk":"{self.seq}","timestamp":"{timestamp}","payload":"{payload}"}}}}')

    def on_text(self, message: str) -> None:
        stats, call, now = self.stats, self.number, time.perf_counter()
        event = json.loads(message)
        if event["event"] == "mark":
            echo = '{"event":"mark","streamSid":"' + self.sid + '","mark":{"name":"' + event["mark"]["name"] + '"}}'
            if self.profile == "steady":
                self.send_text(echo)
            else:  # echoed when playback reaches it
                asyncio.get_running_loop().call_later(max(0.0, self.play_until - now), self.send_text, echo)
            return
        if event["event"] != "media":
            return
        payload = event["media"]["payload"]
        if self.profile == "realistic":
            self.play_until = max(now, self.play_until) + len(payload) * 3 / 4 / 8000
        start = stats.call_started[call]
        # An echoed delta carries the caller's frames, possibly joined; an agent delta one id.
        ids = frame_ids(payload, FRAME) if self.profile == "steady" else frame_ids(payload[:12], 12)
        for _, seq in ids:
            if seq == TRAILER:
                continue
            stats.seen_down[call].append(seq)
            sent_down = stats.down_sent.get((call, seq))
            sent_up = stats.up_sent.get((call, seq)) if self.profile == "steady" else None
            if sent_down is not None and sent_down - start > BENCH_WARM_UP:
                stats.downlink.append(now - sent_down)
            if sent_up is not None and sent_up - start > BENCH_WARM_UP:
                stats.round_trip.append(now - sent_up)

    async def close(self) -> None:
        self.send_text(json.dumps({"event": "stop", "streamSid": self.sid}))
        if self.ws.state is State.OPEN:
            self.ws.send_close()
            self.flush()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3):
                await self.closed


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def lost_and_reordered(seen: dict[int, list[int]], expected: dict[int, int]) -> tuple[int, int]:
    lost = reordered = 0
    for call, count in expected.items():
        got = seen.get(call, [])
        lost += count - len(set(got))
        reordered += sum(1 for a, b in itertools.pairwise(got) if b < a)
    return lost, reordered


async def bench_level(calls: int, seconds: float, profile: str, extra_env: dict[str, str]) -> dict[str, Any]:
    stats = BenchStats()
    server = await asyncio.get_running_loop().create_server(lambda: BenchOpenAI(stats, profile), "127.0.0.1", 0)
    async with server:
        fake_port = server.sockets[0].getsockname()[1]
        env = {"OPENAI_API_KEY": API_KEY, "OPENAI_BASE_URL": f"http://127.0.0.1:{fake_port}/v1",
               "LOG_LEVEL": "INFO", "GREETING": "", "MAX_CALLS": "100000", **extra_env}
        process = await start_relay_process(env)
        os.sched_setaffinity(process.pid, {0})
        port, _ = await read_port(process)
        assert process.stderr is not None
        drain_log = asyncio.create_task(process.stderr.read())
        url = f"ws://127.0.0.1:{port}/media-stream"
        await asyncio.sleep(1)  # let the relay settle (and fill WARM_SESSIONS, if asked)
        rss_idle = rss_bytes(process.pid)

        bench_calls = [BenchCall(n, url, stats, profile) for n in range(calls)]
        for first in range(0, calls, 10):  # calls arrive at 50 a second, not all at once
            await asyncio.gather(*(call.open() for call in bench_calls[first:first + 10]))
            await asyncio.sleep(0.2)
        assert len(stats.call_started) == calls
        # Twilio paces each call at 20 ms, and calls are not in step: one ticker sends a
        # tenth of the calls every 2 ms, so each call still sends every 20 ms.
        groups = [bench_calls[i::10] for i in range(10)]
        started = time.perf_counter()
        relay_cpu0, own0 = cpu_seconds(process.pid), os.times()
        rss_peak = 0
        tick = 0
        late_ticks = 0
        while time.perf_counter() - started < seconds:
            for call in groups[tick % 10]:
                call.send_frame()
            tick += 1
            delay = started + tick * 0.002 - time.perf_counter()
            if delay < -0.02:
                late_ticks += 1
            await asyncio.sleep(max(0.0, delay))
            if tick % 500 == 0:
                rss_peak = max(rss_peak, rss_bytes(process.pid))
        wall = time.perf_counter() - started
        relay_cpu = (cpu_seconds(process.pid) - relay_cpu0) / wall
        own1 = os.times()
        own_cpu = (own1.user + own1.system - own0.user - own0.system) / wall
        stats.window_over = True
        for call in bench_calls:  # Twilio's stream goes on: this frame flushes any frame held to be joined
            call.send_frame(trailer=True)
        await asyncio.sleep(1.0)  # let frames in flight arrive
        await asyncio.gather(*(call.close() for call in bench_calls))
        process.send_signal(signal.SIGTERM)
        await process.wait()
        await drain_log

    sent_up = {call.number: call.seq for call in bench_calls}
    lost_up, reordered_up = lost_and_reordered(stats.seen_up, sent_up)
    lost_down, reordered_down = lost_and_reordered(stats.seen_down, dict(stats.sent_down))
    setup = [stats.configured[n] - stats.opened[n] for n in stats.configured]
    after_handshake = [stats.configured[n] - stats.handshake_done[n] for n in stats.configured]
    first_audio = [stats.first_audio[n] - stats.opened[n] for n in stats.first_audio]
    ms = 1000
    return {
        "calls": calls,
        "rtt_p50": percentile(stats.round_trip, 0.5) * ms, "rtt_p99": percentile(stats.round_trip, 0.99) * ms,
        "rtt_max": max(stats.round_trip, default=float("nan")) * ms,
        "up_p50": percentile(stats.uplink, 0.5) * ms, "up_p99": percentile(stats.uplink, 0.99) * ms,
        "down_p50": percentile(stats.downlink, 0.5) * ms, "down_p99": percentile(stats.downlink, 0.99) * ms,
        "lost": lost_up + lost_down, "reordered": reordered_up + reordered_down,
        "frames": sum(sent_up.values()) + sum(stats.sent_down.values()),
        "relay_cpu": relay_cpu * 100, "loadgen_cpu": own_cpu * 100, "late_ticks": late_ticks, "ticks": tick,
        "kib_per_call": (rss_peak - rss_idle) / calls / 1024,
        "setup_p50": percentile(setup, 0.5) * ms, "setup_max": max(setup, default=float("nan")) * ms,
        "update_after_handshake_max": max(after_handshake, default=float("nan")) * ms,
        "first_audio_p50": percentile(first_audio, 0.5) * ms,
        "configured": len(stats.configured),
    }


def print_level(result: dict[str, Any], profile: str) -> None:
    r = result
    parts = [f"{r['calls']:4d} calls"]
    if profile == "steady":
        parts.append(f"rtt p50 {r['rtt_p50']:5.1f} p99 {r['rtt_p99']:6.1f} max {r['rtt_max']:6.1f} ms")
    parts += [
        f"up p50 {r['up_p50']:5.1f} p99 {r['up_p99']:6.1f} ms",
        f"down p50 {r['down_p50']:5.1f} p99 {r['down_p99']:6.1f} ms",
        f"lost {r['lost']} reordered {r['reordered']} of {r['frames']}",
        f"relay CPU {r['relay_cpu']:5.1f}%",
        f"{r['kib_per_call']:5.1f} KiB/call",
        f"session.update sent {r['setup_p50']:.0f} ms after Twilio connected (p50), "
        f"<= {r['update_after_handshake_max']:.1f} ms after the handshake"
        if r["setup_p50"] >= 0 else "session configured before the call (warm)",
        f"first caller audio at OpenAI after {r['first_audio_p50']:.0f} ms (p50)",
        f"load generator CPU {r['loadgen_cpu']:4.0f}%",
    ]
    print(" | ".join(parts), flush=True)
    if r["loadgen_cpu"] > 85 or r["late_ticks"] > r["ticks"] / 100:
        print(f"      ^ the load generator was the bottleneck here ({r['late_ticks']} late ticks): "
              "the relay may do better than these figures", flush=True)
    if r["configured"] != r["calls"]:
        print(f"      ^ only {r['configured']} of {r['calls']} calls got a configured session", flush=True)


def bench(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python test_relay.py bench", description="Load benchmark for relay.py")
    parser.add_argument("--calls", default="50,100,150,200,250", help="comma-separated load levels")
    parser.add_argument("--seconds", type=float, default=20, help="measured seconds per level")
    parser.add_argument("--profile", choices=("steady", "realistic"), default="steady")
    parser.add_argument("--env", action="append", default=[], help="extra NAME=VALUE for the relay")
    args = parser.parse_args(argv)
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})  # the relay gets CPU 0 to itself
    relay.keep_read_buffers_off_mmap()  # the load generator reads sockets the same way
    extra_env = dict(item.split("=", 1) for item in args.env)
    print(f"relay.py on CPU 0, load generator on CPU 1 (if there is one); {os.cpu_count()} CPUs; {args.profile} profile; "
          f"{args.seconds:g} s per level; OpenAI handshake {BENCH_HANDSHAKE_DELAY * 1000:.0f} ms", flush=True)
    for calls in (int(n) for n in args.calls.split(",")):
        print_level(asyncio.run(bench_level(calls, args.seconds, args.profile, extra_env)), args.profile)


if __name__ == "__main__":
    if sys.argv[1:2] == ["bench"]:
        bench(sys.argv[2:])
    else:
        sys.exit("usage: python test_relay.py bench [--help]   (run the tests with: python -m pytest -q)")
