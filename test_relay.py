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

import asyncio
import base64
import collections
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import signal
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

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


class FakeSession:
    """One Realtime session as the fake server sees it."""

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        self.received: list[dict[str, Any]] = []
        self.headers = ws.request.headers if ws.request else None
        self.tasks: list[asyncio.Task[None]] = []

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in self.received if event.get("type") == kind]

    def appended(self) -> list[str]:
        return [event["audio"] for event in self.of_type("input_audio_buffer.append")]

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(event))

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


class FakeOpenAI:
    """An in-process OpenAI Realtime server (GA interface) on a loopback port."""

    def __init__(self) -> None:
        self.sessions: list[FakeSession] = []
        self.refuse_status: int | None = None
        self.handshake_delay = 0.0
        self.echo_audio = False  # answer each append with the same audio as a delta
        self.configure = asyncio.Event()  # cleared: hold back session.updated until set
        self.configure.set()
        self.on_event: Callable[[FakeSession, dict[str, Any]], Awaitable[None]] | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[FakeOpenAI]:
        async with serve(self.handle, "127.0.0.1", 0, process_request=self.check) as server:
            self.port = server.sockets[0].getsockname()[1]
            yield self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def check(self, connection: ServerConnection, request: Request) -> Response | None:
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
                await self.react(session, event)

    async def react(self, session: FakeSession, event: dict[str, Any]) -> None:
        """Answer the relay as the real API would."""
        if event["type"] == "session.update":
            session.tasks.append(asyncio.create_task(self.confirm(session, event)))
        elif event["type"] == "input_audio_buffer.append" and self.echo_audio:
            await session.say(f"item_{len(session.received)}", [event["audio"]])
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
        """Send caller audio, one frame every ``pace`` seconds, as Twilio does."""
        for payload in payloads:
            self.chunk += 1
            await self.send(
                {
                    "event": "media",
                    "sequenceNumber": str(self.chunk + 1),
                    "media": {
                        "track": "inbound",
                        "chunk": str(self.chunk),
                        "timestamp": str(self.chunk * 20),
                        "payload": payload,
                    },
                    "streamSid": self.stream_sid,
                }
            )
            if pace:
                await asyncio.sleep(pace)

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
        """Drain queued audio at 8 bytes per ms; echo marks as playback reaches them."""
        while True:
            while not self.queue:
                self.queued.clear()
                await self.queued.wait()
            kind, value = self.queue.popleft()
            if kind == "audio":
                self.chunk_started, self.chunk_bytes = time.monotonic(), value
                await asyncio.sleep(value / 8000)
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


def relay_config(fake: FakeOpenAI, **env: str) -> relay.Config:
    base = {"OPENAI_API_KEY": API_KEY, "OPENAI_BASE_URL": fake.base_url, "OPENAI_CONNECT_TIMEOUT": "2"}
    return relay.load_config({**base, **env})


@contextlib.asynccontextmanager
async def running_relay(fake: FakeOpenAI, **env: str) -> AsyncIterator[tuple[relay.Relay, str]]:
    """The real relay, in process, on a loopback port; yields it and its WebSocket URL."""
    the_relay = relay.Relay(relay_config(fake, **env))
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
    body = await reader.read() if method != "HEAD" else b""
    writer.close()
    return status, fields, body


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
        ({"MAX_CALL_SECONDS": "7200"}, "MAX_CALL_SECONDS"),
    ],
)
def test_bad_settings_are_refused(env: dict[str, str], complaint: str) -> None:
    with pytest.raises(relay.ConfigError, match=complaint):
        relay.load_config({"OPENAI_API_KEY": API_KEY, **env})


def test_every_setting_is_documented() -> None:
    """Every variable relay.py reads is in README's table and in .env.example."""
    source = open(os.path.join(HERE, "relay.py")).read()
    names = set(re.findall(r'env(?:\.get\(|, )"([A-Z_]+)"', source))
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


@pytest.mark.parametrize(
    ("env", "complaint"),
    [
        ({"OPENAI_API_KEY": ""}, b"OPENAI_API_KEY is not set"),
        ({"OPENAI_API_KEY": API_KEY, "VOICE": "robot"}, b"VOICE must be one of alloy, ash"),
    ],
)
def test_start_up_refuses_bad_configuration(env: dict[str, str], complaint: bytes) -> None:
    async def scenario() -> None:
        process = await start_relay_process(env)
        _, stderr = await process.communicate()
        assert process.returncode == 1
        assert complaint in stderr
        assert len(stderr.strip().splitlines()) == 1  # one clear line, no traceback
        assert API_KEY.encode() not in stderr

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
                await eventually(lambda: len(twilio.media) >= 40)
            by_call = {}
            for session in fake.sessions:
                appended = session.appended()
                by_call[base64.b64decode(appended[0]).split(b"f")[0].decode()] = appended
            for twilio in twilios:
                assert by_call[f"c{twilio.number}"] == frames[twilio.number]
                assert twilio.media == frames[twilio.number]
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
            await eventually(lambda: len(session.appended()) == 60)
            assert session.received[0]["type"] == "session.update"
            assert session.appended() == frames
            await twilio.close()

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
            await eventually(lambda: len(session.appended()) == relay.EARLY_AUDIO_LIMIT)
            assert session.appended() == frames[50:]
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


def test_openai_hanging_up_mid_call_closes_twilio(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with FakeOpenAI().running() as fake, running_relay(fake) as (the_relay, url):
            twilio = await FakeTwilio(url).open()
            session = await fake.session()
            await session.ws.close(1011, "server trouble")
            await twilio.closed.wait()
            assert twilio.close_code == 1011
            assert (await health(the_relay))["errors"] == 1
            await twilio.shutdown()

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    assert any("code 1011 'server trouble'" in r.message and "CA" in r.message for r in caplog.records)


@pytest.mark.parametrize("status", [401, 403, 429, 500, 503])
def test_openai_refusing_the_handshake_hands_the_call_back_to_twilio(
    status: int, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        fake = FakeOpenAI()
        fake.refuse_status = status
        async with fake.running(), running_relay(fake) as (the_relay, url):
            twilio = await FakeTwilio(url).open()
            await twilio.closed.wait()
            assert twilio.close_code == 1011
            assert (await health(the_relay))["errors"] == 1
            await twilio.shutdown()

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    assert any(f"HTTP {status}" in r.message for r in caplog.records if r.levelno == logging.ERROR)
    assert not any(API_KEY in r.getMessage() for r in caplog.records)


def test_wrong_api_key_is_refused_by_openai(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with FakeOpenAI().running() as fake, running_relay(fake, OPENAI_API_KEY="sk-wrong") as (_, url):
            twilio = await FakeTwilio(url).open()
            await twilio.closed.wait()
            await twilio.shutdown()

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    assert any("HTTP 401" in r.message for r in caplog.records)


def test_openai_handshake_timeout(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        fake = FakeOpenAI()
        fake.handshake_delay = 5
        async with fake.running(), running_relay(fake, OPENAI_CONNECT_TIMEOUT="0.3") as (the_relay, url):
            twilio = await FakeTwilio(url).open()
            await twilio.closed.wait()
            assert twilio.close_code == 1011
            assert (await health(the_relay))["errors"] == 1
            await twilio.shutdown()

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    assert any("did not answer within 0.3 s" in r.message for r in caplog.records)


def test_unreachable_openai(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        fake = FakeOpenAI()
        async with fake.running():
            pass  # the port is now closed
        async with running_relay(fake) as (the_relay, url):
            twilio = await FakeTwilio(url).open()
            await twilio.closed.wait()
            assert twilio.close_code == 1011
            await twilio.shutdown()

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    assert any("could not be reached" in r.message for r in caplog.records)


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
            await eventually(lambda: any(s.appended() == frames for s in fake.sessions))
            await eventually(lambda: any(s.appended() == [audio(2, 0)] for s in fake.sessions))
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


# Natural conversation: barge-in, greeting, keypad, hang-up, long calls -------------------------------

CHUNK_MS = 100  # the fake's assistant deltas: 100 ms of audio each, sent faster than real time


def speech(item: int, count: int, ms: int = CHUNK_MS) -> list[str]:
    """``count`` distinct chunks of assistant audio, ``ms`` long each."""
    return [audio(item, i, ms * 8) for i in range(count)]


@contextlib.asynccontextmanager
async def one_call(**env: str) -> AsyncIterator[tuple[FakeOpenAI, relay.Relay, FakeTwilio, FakeSession]]:
    """A relay with one call up and its OpenAI session configured."""
    env.setdefault("GREETING", "")
    async with FakeOpenAI().running() as fake, running_relay(fake, **env) as (the_relay, url):
        twilio = await FakeTwilio(url).open()
        session = await fake.session()
        await eventually(lambda: all(call.session_configured and call.stream_sid for call in the_relay.calls))
        yield fake, the_relay, twilio, session
        await twilio.close()


async def speech_started(session: FakeSession) -> None:
    await session.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": 1000, "item_id": "item_user"})


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
            (call,) = the_relay.calls
            await eventually(lambda: len(twilio.marks_echoed) == 2 and call.playback.drained.is_set())
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
            await eventually(lambda: twilio.played_bytes == 1600 and call.playback.drained.is_set())
            await session.say("item_b", speech(2, 10), response_id="resp_2")
            await speech_started(session)  # before the first chunk of item_b has played
            await eventually(lambda: bool(session.of_type("conversation.item.truncate")))
            truncate = session.of_type("conversation.item.truncate")[0]
            assert truncate["item_id"] == "item_b"
            assert truncate["audio_end_ms"] <= (twilio.played_at_clear[0] - 1600) / 8

    run(scenario)


def test_the_agent_greets_only_once_the_session_is_configured() -> None:
    async def scenario() -> None:
        fake = FakeOpenAI()
        fake.configure.clear()
        async with fake.running(), running_relay(fake) as (_, url):
            twilio = await FakeTwilio(url).open()
            session = await fake.session()
            await twilio.send_media([audio(1, i) for i in range(5)])
            await eventually(lambda: len(session.appended()) == 5)  # the relay is live...
            assert not session.of_type("response.create")  # ...but waits for session.updated
            fake.configure.set()
            await eventually(lambda: bool(session.of_type("response.create")))
            (greeting,) = session.of_type("response.create")
            assert "Hi, this is Tessa. How can I help you today?" in greeting["response"]["instructions"]
            await twilio.close()

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
            assert outputs == [{"type": "function_call_output", "call_id": "call_42", "output": '{"ok": true}'}]

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    assert any("hanging up: the agent ended the call (the caller said goodbye)" in r.message for r in caplog.records)


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


def test_an_expired_openai_session_ends_the_call_cleanly(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with one_call() as (_, _, twilio, session):
            await session.send({"type": "error", "error": {
                "type": "invalid_request_error", "code": "session_expired",
                "message": "Your session hit the maximum duration of 60 minutes.", "param": None}})
            await twilio.closed.wait()
            assert twilio.close_code == 1000

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    assert any("hanging up: the OpenAI session expired" in r.message for r in caplog.records)


@pytest.mark.parametrize("on", [True, False])
def test_transcripts_are_logged_only_when_asked(on: bool, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with one_call(LOG_TRANSCRIPTS="on" if on else "off") as (_, _, twilio, session):
            audio_input = session.of_type("session.update")[0]["session"]["audio"]["input"]
            assert ("transcription" in audio_input) is on
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

AUTH_TOKEN = "twilio-auth-token-for-tests"


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
                        {"X-Twilio-Signature": signed, "X-Forwarded-For": "203.0.113.9, 10.0.0.1"}):
                path = "/other" if bad.get("X-Forwarded-For") else "/media-stream"
                status, _ = await raw_request(port, path, bad)
                assert status == 403, bad
            await eventually(lambda: len(fake.sessions) == 2)
            assert len(fake.sessions) == 2  # refusals never dialled OpenAI
            assert (await metrics(the_relay))['relay_calls_refused_total{reason="signature"}'] == 5
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
            assert twiml.find("Say").text
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
            await eventually(lambda: any(s.appended() == [audio(2, 0)] for s in fake.sessions))
            assert the_relay.stats.errors["twilio_frame_too_big"] == 1
            await asyncio.gather(twilio.shutdown(), bystander.close())

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario)
    assert any("frame over 65536 bytes" in r.getMessage() and "CA" in r.getMessage() for r in caplog.records)


def test_metrics_count_calls_audio_and_barge_ins() -> None:
    async def scenario() -> None:
        async with one_call() as (_, the_relay, twilio, session):
            await twilio.send_media([audio(1, i) for i in range(5)], pace=0)
            await eventually(lambda: len(session.appended()) == 5)
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


def test_a_socket_that_never_starts_a_stream_is_closed() -> None:
    async def scenario() -> None:
        async with FakeOpenAI().running() as fake, running_relay(fake) as (the_relay, url):
            idle = await FakeTwilio(url).open(start=False)
            await idle.closed.wait()
            assert idle.close_code == 1008
            assert the_relay.stats.errors["no_start"] == 1
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
            await eventually(lambda: any(s.appended() == frames for s in fake.sessions))
            assert (await health(the_relay))["connections"]["active"] >= 1
            assert the_relay.stats.errors["relay_bug"] == 0

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
            await eventually(lambda: any(s.appended() == [audio(2, 0)] for s in fake.sessions))
            assert the_relay.stats.errors["bad_twilio_input"] == len(HOSTILE_FRAMES)  # each counted once
            flood = await FakeTwilio(url, 3).open()
            for _ in range(10_000):
                await flood.send("{}")
            await flood.send_media([audio(3, 0)])
            await eventually(lambda: any(s.appended() == [audio(3, 0)] for s in fake.sessions))
            silent_reader, silent_writer = await asyncio.open_connection("127.0.0.1", the_relay.port)  # type: ignore[attr-defined]
            non_utf8 = await FakeTwilio(url, 4).open()
            await non_utf8.ws.send(b"\xff\xfe\xfd", text=True)  # type: ignore[union-attr]
            await non_utf8.closed.wait()
            assert non_utf8.close_code == 1007
            reset = await FakeTwilio(url, 5).open()
            reset.ws.transport.abort()  # type: ignore[union-attr]
            await normal_call_is_intact()
            await eventually(lambda: len(the_relay.calls) == 3)  # normal, hostile, flood
            assert the_relay.stats.errors["bad_twilio_input"] >= 10_000
            assert the_relay.stats.errors["twilio_connection_lost"] == 2  # non-UTF-8, reset
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
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            with pytest.raises(OSError):
                await connect(url, open_timeout=1)  # no new calls
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
            await asyncio.gather(staying.shutdown(), leaving.shutdown())

    run(scenario)
