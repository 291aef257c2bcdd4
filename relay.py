"""Relay phone calls between Twilio Media Streams and the OpenAI Realtime API.

A caller dials a Twilio number; Twilio's ``<Connect><Stream url="wss://...">``
opens a WebSocket to this relay; the relay opens a WebSocket to OpenAI and
carries the call both ways. Audio is G.711 mu-law at 8 kHz on both sides, so it
passes through untouched.

Read top to bottom:

1. The agent: its persona, its greeting, the lines it is asked to say (a check-in,
   a filler while a tool works...), an agent for each of your numbers (``AGENTS``)
   and its tools. This is the part to make your own: change the instructions, or
   add a tool by writing one decorated ``async`` function.
2. Configuration: ``Config``, every setting with the variable it is read from, its
   default and what it accepts, read once, at start-up.
3. What the relay tells OpenAI: the session and its messages.
4. One phone call: small parts, each with one kind of state (``Floor`` decides
   who may speak), and ``Call``, whose two pumps (Twilio -> OpenAI and
   OpenAI -> Twilio) hand each event to the part it belongs to.
5. ``Relay``: the HTTP routes and the bookkeeping shared by all calls.
6. ``main()``: start-up, serving, and a graceful shutdown; ``relay.py call``.
7. ``PHONE_PAGE``: the browser phone's page, served at ``/phone`` (BROWSER_PHONE).

Run it with ``python relay.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import collections
import contextlib
import ctypes
import dataclasses
import datetime
import errno
import hashlib
import hmac
import http
import http.client
import inspect
import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.sax.saxutils
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from dotenv import load_dotenv
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.http11 import Request, Response
from websockets.protocol import State

logger = logging.getLogger("relay")


# 1. The agent: persona, greeting and tools -------------------------------------

DEFAULT_INSTRUCTIONS = (
    "You are Tessa, a warm and friendly phone assistant. "
    "Keep every answer short and conversational: this is a phone call, not an essay. "
    "Always answer in the language the caller speaks. "
    "When the caller says goodbye or the conversation is clearly finished, "
    "say a short goodbye and then call the end_call tool to hang up."
)
DEFAULT_GREETING = "Hi, this is Tessa. How can I help you today?"
# A different agent for each of your Twilio numbers, as the /twiml webhook answers them: the
# number a call came in on (for `relay.py call`, the number it is made from) -> that agent's
# "instructions", "greeting" and "voice", the same names as the call's <Parameter>s. A number
# that is not here gets the agent above. A <Parameter> in the TwiML itself wins over its entry.
AGENTS: dict[str, dict[str, str]] = {
    # "+15551230001": {"instructions": "You are Max, the assistant of Rosa's Bakery. ...",
    #                  "greeting": "Rosa's Bakery, this is Max. What can I do for you?", "voice": "cedar"},
}
# Added to the default instructions when TRANSFER_TO is set.
TRANSFER_INSTRUCTIONS = (
    " When the caller asks for a person, or you cannot help them, tell them you are "
    "transferring them and then call the transfer_call tool."
)
# What the caller hears if the person does not answer, or after they hang up first.
AFTER_TRANSFER_MESSAGE = "The call could not be connected, or it has ended. Please call again if you need us. Goodbye."

# What the relay asks the agent to say when the call needs it; each is one response's instructions.
TIME_LIMIT_GOODBYE = (
    "The call has reached its time limit. Tell the caller so in one short sentence and say goodbye."
)
# When the caller has said nothing for IDLE_SECONDS, after the agent's last words were heard.
IDLE_CHECK_IN = (
    "The caller has said nothing for a while. In the language of the conversation, ask in a few "
    "words whether they are still there."
)
IDLE_GOODBYE = (
    "The caller has still said nothing. In the language of the conversation, say in one short sentence "
    "that you will hang up now, and say goodbye."
)
# When a tool is still running TOOL_FILLER_SECONDS after the caller heard the agent's last words.
TOOL_FILLER = (
    "The tool you called is still working. In the language of the conversation, tell the caller in one "
    "short sentence that you are still on it. Do not guess its result or say anything you do not know."
)
# After the call (CALL_SUMMARY), for the report: a text answer nobody hears.
SUMMARY_INSTRUCTIONS = (
    "The phone call has ended. For the business's records, summarise it in two or three sentences of "
    "English, then give the caller's request in one line that begins with 'Request:'."
)
# When `relay.py call --voicemail "MESSAGE"` reaches an answering machine, after its beep.
VOICEMAIL_INSTRUCTIONS = (
    "You have reached an answering machine, and it is recording now. Say exactly this message, "
    "then call the end_call tool: "
)
# On a new OpenAI session (SESSION_CONTINUITY), if the agent owed an answer.
PICK_UP_AFTER_DROP = (
    "The line dropped for a moment because of a technical problem and you are back. Say sorry in a few "
    "words, then pick up where the conversation left off."
)
CARRY_ON_AFTER_ROLLOVER = "Carry on the conversation where it left off, as if nothing had happened."


@dataclasses.dataclass(frozen=True)
class Tool:
    """A Python function the model may call. Its name and docstring are what the model sees."""

    function: Callable[..., Awaitable[Any]]
    parameters: dict[str, Any]  # a JSON schema of the keyword arguments
    timeout: float
    offered_if: Callable[[Config], bool]

    @property
    def name(self) -> str:
        return self.function.__name__

    def schema(self) -> dict[str, Any]:
        description = " ".join((inspect.getdoc(self.function) or "").split())
        return {"type": "function", "name": self.name, "description": description, "parameters": self.parameters}


TOOLS: dict[str, Tool] = {}


def tool(
    parameters: dict[str, Any] | None = None,
    *,
    timeout: float = 10.0,
    offered_if: Callable[[Config], bool] = lambda config: True,
) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
    """Offer the decorated ``async def name(call, **arguments)`` to the model as a tool.

    The relay runs it as its own task, so the call's audio never waits for it. It gets
    the ``Call`` (``call.call_sid``, ``call.parameters``...) and the model's arguments,
    and returns anything JSON can encode. If it raises or outlasts ``timeout`` seconds,
    the model is told ``{"error": ...}`` and the call goes on.
    """

    def register(function: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        TOOLS[function.__name__] = Tool(
            function, parameters or {"type": "object", "properties": {}}, timeout, offered_if
        )
        return function

    return register


# The agent's tools. Add yours here: one decorated async function each.


@tool(
    {"type": "object", "properties": {"reason": {"type": "string", "description": "Why the call is ending."}}},
    offered_if=lambda config: config.end_call_tool,
)
async def end_call(call: Call, reason: str = "") -> dict[str, Any]:
    """Hang up the phone call. Use it only after you have said goodbye, when the caller
    wants to end the call or the conversation is finished."""
    call.end_after_answer("the agent ended the call")  # the reason is logged at DEBUG, as all arguments
    return {"ok": True}


@tool(
    {"type": "object", "properties": {"reason": {"type": "string", "description": "Why a person is needed."}}},
    offered_if=lambda config: bool(config.transfer_to),
)
async def transfer_call(call: Call, reason: str = "") -> dict[str, Any]:
    """Transfer the caller to a person. Use it when the caller asks for a human or you
    cannot help them; tell them you are transferring them before you call it."""
    call.transfer_after_answer()
    return {"ok": True, "next": "The caller is transferred as soon as you stop speaking."}


# 2. Configuration ------------------------------------------------------------

VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")
SERVER_VAD_SETTINGS = ("VAD_THRESHOLD", "VAD_PREFIX_PADDING_MS", "VAD_SILENCE_DURATION_MS")
E164 = r"\+[1-9][0-9]{6,14}"  # a phone number: + and up to 15 digits
PLACEHOLDER_API_KEY = "sk-your-key-here"  # what .env.example says until the user puts a key there

TRANSCRIPTION_MODEL = "gpt-4o-mini-transcribe"  # for SESSION_CONTINUITY and LOG_TRANSCRIPTS
# What the caller hears when the stream ends, before the call hangs up (see /twiml). With REST
# call control the relay hangs up through Twilio, so only an abnormal end gets here.
CUT_OFF_MESSAGE = "Sorry, we were cut off. Please call again. Goodbye."
# Without it, the relay's own hang-up ends the stream too: the words must fit both endings.
STREAM_END_MESSAGE = "Thank you for calling. If we were cut off, please call again. Goodbye."
TWILIO_REST_TIMEOUT = 10.0  # seconds for one request to Twilio's REST API

CLOSE_TIMEOUT = 1.0  # seconds to wait for a peer to acknowledge a close
# A session that stops answering is noticed within PING_INTERVAL + PING_TIMEOUT (10 s): a stall
# is silence on the phone, and a ping every 5 s costs nothing beside 50 audio messages a second.
PING_INTERVAL = 5.0
PING_TIMEOUT = 5.0
EARLY_AUDIO_LIMIT = 250  # frames kept while OpenAI connects: 5 s of 20 ms frames
EARLY_EVENT_LIMIT = 100  # other events kept meanwhile: keypad presses, tool outputs, notes
REDIAL_PAUSE = 0.5  # seconds between new sessions that OpenAI closes before they do anything
GOODBYE_PLAYBACK_LIMIT = 8.0  # seconds a goodbye the relay asked for may take to come and play
PLAYBACK_SLACK = 3.0  # seconds after the agent's last words should have played that their mark may echo
TURN_ANSWER_WAIT = 1.5  # seconds turn detection's answer to the caller may take before the relay asks for it
BYTES_PER_MS = 8  # G.711 mu-law at 8 kHz: one byte per sample
MAX_FRAME_BYTES = 2**16  # from Twilio; a media frame is under 1 KiB
MAX_FORM_BYTES = 8 * 1024  # a POST webhook's form body; Twilio's is about 1 KiB
FORM_TIMEOUT = 5.0  # seconds for a POST's body to arrive, well within websockets' 10 s for a request
MAX_HEAD_LINE_BYTES = 8192  # websockets' own limit for one line of a request's head
START_TIMEOUT = 10.0  # seconds for Twilio to send "start" before the relay gives up on a socket
MAX_PENDING_MARKS = 1000  # marks awaiting their echo; a peer that never echoes cannot grow it
COALESCE_WHEN_LATE = 0.02  # seconds behind Twilio's clock before caller frames are joined
FRAME_SECONDS = 0.02  # Twilio sends a frame of caller audio every 20 ms
WARM_SESSION_MAX_AGE = 240.0  # seconds; a call must still fit in the session's 60 minutes
MARK_EVERY_MS = 100  # agent audio between two marks: fewer messages, yet barge-in stays exact
# What SESSION_CONTINUITY remembers of a call, as text; older turns are forgotten first.
MEMORY_TURNS = 200
MEMORY_TURN_CHARS = 2000
MEMORY_CHARS = 24000  # about 6,000 tokens: a new session reads it all before it answers
ROLLOVER_QUIET_WAIT = 60.0  # seconds a planned rollover waits for a quiet moment
MCP_EVENTS = ("mcp_list_tools.failed", "response.mcp_call.failed")  # what the remote MCP server did
# What a call's report keeps of the conversation (a new session gets the MEMORY_* newest part of it).
TRANSCRIPT_TURNS = 2000
TRANSCRIPT_CHARS = 200_000
SUMMARY_TIMEOUT = 10.0  # seconds the report waits for CALL_SUMMARY's answer
REPORT_TIMEOUT = 10.0  # seconds for one try at delivering a report
REPORT_RETRY_DELAYS = (1.0, 5.0, 25.0)  # seconds before each further try, after a failure worth retrying


class ConfigError(Exception):
    """A setting is missing or wrong; the message says which and how to fix it."""


Parse = Callable[[str, str], Any]  # (the variable's name, its value) -> the setting, or ConfigError


def setting(name: str, default: Any, parse: Parse | None = None,
            read: Callable[[Mapping[str, str]], Any] | None = None) -> Any:
    """A Config field read from the environment variable ``name``, once, at start-up.

    Unset or empty, it is ``default``; otherwise ``parse`` checks the value and makes it the
    field's type. A ``read(env)`` of its own replaces both.
    """

    def read_it(env: Mapping[str, str]) -> Any:
        value = env.get(name, "").strip()
        return (parse or (lambda _, text: text))(name, value) if value else default

    return dataclasses.field(default=default, metadata={"env": name, "read": read or read_it})


def between(low: float, high: float, whole: bool = False) -> Parse:
    """A number from ``low`` to ``high``; a ``whole`` one (a count, milliseconds) refuses a fraction."""

    def parse(name: str, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {text!r}") from None
        if not low <= value <= high:
            raise ConfigError(f"{name} must be between {low:g} and {high:g}, got {text!r}")
        if whole and value != int(value):
            raise ConfigError(f"{name} must be a whole number, got {text!r}")
        return int(value) if whole else value

    return parse


def on_or_off(name: str, text: str) -> bool:
    """A switch: anything unrecognised is refused rather than guessed."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be on or off (true/false, 1/0), got {text.lower()!r}")


def one_of(*choices: str) -> Parse:
    """One of a few words; case does not matter."""

    def parse(name: str, text: str) -> str:
        chosen = {word.lower(): word for word in choices}.get(text.lower())
        if chosen is None:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {text!r}")
        return chosen

    return parse


def matching(pattern: str, what: str, secret: bool = False) -> Parse:
    """Text that is ``what``, which ``pattern`` matches in full."""

    def parse(name: str, text: str) -> str:
        if not re.fullmatch(pattern, text):
            # Never echo a secret, not even a wrong one: it may be another of the user's keys.
            got = f"this value is not ({len(text)} characters)" if secret else f"got {text!r}"
            raise ConfigError(f"{name} must be {what}; {got}")
        return text

    return parse


def names(pattern: str) -> Parse:
    """A comma-separated list of names, each matching ``pattern``."""
    one = matching(pattern, "a comma-separated list of names")
    return lambda name, text: tuple(one(name, part.strip()) for part in text.split(",") if part.strip())


def web_address(example: str, schemes: tuple[str, ...] = ("https",)) -> Parse:
    """A URL like ``example`` (see _url), kept as written: a receiver may tell /calls from /calls/."""

    def parse(name: str, text: str) -> str:
        _url(name, text, example, schemes)
        return text

    return parse


def _is_loopback(host: str) -> bool:
    """This machine (127.0.0.0/8, ::1, localhost): the only host plain http:// is safe for."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url(name: str, raw: str, example: str, schemes: tuple[str, ...] = ("https",)) -> urllib.parse.SplitResult:
    """A URL with a host and no spaces, in one of ``schemes``; their plain forms only to this machine.

    Plain http:// (or ws://) is what the tests and local trials use; anywhere else it sends
    audio and keys in the clear, and Twilio refuses to stream to it.
    """
    plain = {"https": "http", "wss": "ws"}
    try:
        parts = urllib.parse.urlsplit(raw)
        host = parts.hostname
    except ValueError:  # e.g. an unclosed [IPv6 address
        host = None
    if re.search(r"\s", raw) or not host or parts.scheme not in {*schemes, *(plain[s] for s in schemes)}:
        raise ConfigError(f"{name} must be a URL like {example}, without spaces; got {raw!r}")
    if parts.scheme not in schemes and not _is_loopback(host):
        raise ConfigError(f"{name} must be an {schemes[0]}:// URL (plain {plain[schemes[0]]}:// only for "
                          f"localhost or 127.0.0.1); got {raw!r}")
    return parts


def _public_url(name: str, text: str) -> str:
    """Where Twilio reaches the relay: https://host or wss://host (with an optional path), kept as https."""
    parts = _url(name, text.rstrip("/"), "https://relay.example.com", ("https", "wss"))
    if parts.query:
        raise ConfigError(f"{name} must be the relay's address without a query, like https://relay.example.com; "
                          f"got {text!r}")
    scheme = "https" if parts.scheme in ("https", "wss") else "http"
    return urllib.parse.urlunsplit((scheme, parts.netloc, parts.path, "", ""))


def _mcp_server_url(name: str, text: str) -> str:
    """An MCP server OpenAI can reach: a public https URL, never this machine."""
    if _url(name, text, "https://mcp.example.com/mcp").scheme != "https":
        raise ConfigError(f"{name} must be an https:// URL that OpenAI can reach, got {text!r}")
    return text


def _api_key(env: Mapping[str, str]) -> str:
    key = env.get("OPENAI_API_KEY", "").strip()
    if not key:
        raise ConfigError("OPENAI_API_KEY is not set. Put OPENAI_API_KEY=sk-... in a .env file "
                          "next to relay.py (see .env.example) or export it in the environment.")
    if key == PLACEHOLDER_API_KEY:
        raise ConfigError(f"OPENAI_API_KEY is still {PLACEHOLDER_API_KEY}, the example from .env.example: "
                          "replace it in .env with your own key (https://platform.openai.com/api-keys)")
    return key


def _instructions(env: Mapping[str, str]) -> str:
    """INSTRUCTIONS, or the default agent's, told when to transfer if TRANSFER_TO is set."""
    transfer = TRANSFER_INSTRUCTIONS if env.get("TRANSFER_TO", "").strip() else ""
    return env.get("INSTRUCTIONS", "").strip() or DEFAULT_INSTRUCTIONS + transfer


AUTH_TOKEN = matching(r"[0-9a-fA-F]{32}", "the 32 hex digits of your Auth Token (Twilio console, Account info)",
                      secret=True)
PHONE_NUMBER = matching(E164, "a phone number in E.164 form, like +15551234567")
BROWSER_PHONE_TOKEN = matching(r"[A-Za-z0-9_-]{16,}", "at least 16 letters, digits, - or _ (it goes in a URL)",
                               secret=True)


@dataclasses.dataclass(frozen=True)
class TwilioAccount:
    """What the relay needs to call Twilio's REST API (HTTP Basic auth)."""

    account_sid: str
    username: str  # an API key (SK...), or the account SID with the auth token
    password: str = dataclasses.field(repr=False)  # never in a log line or a traceback
    base_url: str = "https://api.twilio.com"


def twilio_account(env: Mapping[str, str]) -> TwilioAccount | None:
    """The REST credentials, if any: an API key and secret (preferred), or the auth token."""
    sid = env.get("TWILIO_ACCOUNT_SID", "").strip()
    key = env.get("TWILIO_API_KEY", "").strip()
    secret = env.get("TWILIO_API_SECRET", "").strip()
    token = env.get("TWILIO_AUTH_TOKEN", "").strip()
    base_url = env.get("TWILIO_API_BASE_URL", "").strip() or "https://api.twilio.com"
    base_url = web_address("https://api.twilio.com")("TWILIO_API_BASE_URL", base_url).rstrip("/")
    if token:
        AUTH_TOKEN("TWILIO_AUTH_TOKEN", token)
    if sid and not re.fullmatch(r"AC[0-9a-fA-F]{32}", sid):
        raise ConfigError(f"TWILIO_ACCOUNT_SID must be AC followed by 32 hex digits, got {sid[:40]!r}")
    if key and not re.fullmatch(r"SK[0-9a-fA-F]{32}", key):
        raise ConfigError(f"TWILIO_API_KEY must be SK followed by 32 hex digits, got {key[:40]!r}")
    if bool(key) != bool(secret):
        raise ConfigError("TWILIO_API_KEY and TWILIO_API_SECRET go together: set both, or neither")
    if key and not sid:
        raise ConfigError("TWILIO_API_KEY needs TWILIO_ACCOUNT_SID (the AC... of your account)")
    if not sid:
        return None
    if not key and not token:
        raise ConfigError("TWILIO_ACCOUNT_SID needs TWILIO_AUTH_TOKEN, or TWILIO_API_KEY and TWILIO_API_SECRET")
    return TwilioAccount(sid, key, secret, base_url) if key else TwilioAccount(sid, sid, token, base_url)


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of the relay: the variable it is read from, its default, what it accepts.

    README's Configuration table says what each one does.
    """

    openai_api_key: str = setting("OPENAI_API_KEY", "", read=_api_key)
    openai_base_url: str = setting("OPENAI_BASE_URL", "https://api.openai.com/v1",
                                   web_address("https://api.openai.com/v1", ("https", "wss")))
    openai_model: str = setting("OPENAI_MODEL", "gpt-realtime-2.1",
                                matching(r"\S+", "a model name without spaces, like gpt-realtime-2.1"))
    openai_connect_timeout: float = setting("OPENAI_CONNECT_TIMEOUT", 10.0, between(0.1, 120))
    host: str = setting("HOST", "0.0.0.0")
    port: int = setting("PORT", 8080, between(0, 65535, whole=True))
    public_url: str = setting("PUBLIC_URL", "", _public_url)
    log_level: str = setting("LOG_LEVEL", "INFO", one_of("DEBUG", "INFO", "WARNING", "ERROR"))
    log_transcripts: bool = setting("LOG_TRANSCRIPTS", False, on_or_off)
    # The agent
    voice: str = setting("VOICE", "alloy", one_of(*VOICES))
    instructions: str = setting("INSTRUCTIONS", DEFAULT_INSTRUCTIONS, read=_instructions)
    # Unlike the other settings, an empty GREETING is meaningful: no greeting.
    greeting: str = setting("GREETING", DEFAULT_GREETING,
                            read=lambda env: env.get("GREETING", DEFAULT_GREETING).strip())
    dtmf: bool = setting("DTMF", True, on_or_off)
    end_call_tool: bool = setting("END_CALL_TOOL", True, on_or_off)
    mcp_server_url: str = setting("MCP_SERVER_URL", "", _mcp_server_url)
    mcp_server_label: str = setting("MCP_SERVER_LABEL", "tools",
                                    matching(r"[A-Za-z0-9_-]{1,64}", "letters, digits, _ or - (at most 64)"))
    mcp_authorization: str = setting("MCP_AUTHORIZATION", "")
    mcp_allowed_tools: tuple[str, ...] = setting("MCP_ALLOWED_TOOLS", (), names(r"[A-Za-z0-9_.-]{1,128}"))
    # Turns, silences and noise
    turn_detection: str = setting("TURN_DETECTION", "server_vad", one_of("server_vad", "semantic_vad"))
    vad_threshold: float = setting("VAD_THRESHOLD", 0.5, between(0, 1))
    vad_prefix_padding_ms: int = setting("VAD_PREFIX_PADDING_MS", 300, between(0, 5000, whole=True))
    vad_silence_duration_ms: int = setting("VAD_SILENCE_DURATION_MS", 500, between(0, 10000, whole=True))
    vad_eagerness: str = setting("VAD_EAGERNESS", "auto", one_of("auto", "low", "medium", "high"))  # auto: medium
    noise_reduction: str = setting("NOISE_REDUCTION", "near_field", one_of("near_field", "far_field", "off"))
    idle_seconds: float = setting("IDLE_SECONDS", 10.0, between(0, 600))
    idle_prompts: int = setting("IDLE_PROMPTS", 2, between(0, 10, whole=True))
    tool_filler_seconds: float = setting("TOOL_FILLER_SECONDS", 3.0, between(0, 60))
    # Limits and shutdown
    max_call_seconds: float = setting("MAX_CALL_SECONDS", 3300.0, between(1, 4 * 3600))
    max_calls: int = setting("MAX_CALLS", 50, between(1, 100000, whole=True))
    drain_seconds: float = setting("DRAIN_SECONDS", 10.0, between(0, 3600))
    warm_sessions: int = setting("WARM_SESSIONS", 0, between(0, 100, whole=True))
    # Twilio: signatures, REST call control
    twilio_auth_token: str = setting("TWILIO_AUTH_TOKEN", "", AUTH_TOKEN)
    twilio_rest: TwilioAccount | None = setting("TWILIO_ACCOUNT_SID", None, read=twilio_account)  # None: no REST
    transfer_to: str = setting("TRANSFER_TO", "", matching(rf"{E164}|sip:\S+",
                                                             "an E.164 number (+15551234567) or a sip: URI"))
    transfer_message: str = setting("TRANSFER_MESSAGE", "")
    record_calls: bool = setting("RECORD_CALLS", False, on_or_off)
    # OpenAI sessions that end mid-call
    session_continuity: bool = setting("SESSION_CONTINUITY", True, on_or_off)
    reconnect_seconds: float = setting("RECONNECT_SECONDS", 5.0, between(0.5, 60))
    session_rollover_seconds: float = setting("SESSION_ROLLOVER_SECONDS", 3420.0, between(1, 3500))
    # After the call
    call_report_url: str = setting("CALL_REPORT_URL", "", web_address("https://crm.example.com/calls"))
    call_report_secret: str = setting("CALL_REPORT_SECRET", "")
    call_summary: bool = setting("CALL_SUMMARY", False, on_or_off)
    # The browser phone; its token is made afresh at each start when not given.
    browser_phone: bool = setting("BROWSER_PHONE", False, on_or_off)
    browser_phone_token: str = setting("BROWSER_PHONE_TOKEN", "", BROWSER_PHONE_TOKEN)
    warnings: tuple[str, ...] = ()  # settings that are allowed but may not do what was meant

    def __repr__(self) -> str:
        """Keep the secrets out of any log line or traceback that shows the config."""
        return f"Config(openai_url={self.openai_url!r}, voice={self.voice!r}, port={self.port})"

    @property
    def openai_url(self) -> str:
        """The Realtime WebSocket URL, made from OPENAI_BASE_URL as the official SDK does."""
        parts = urllib.parse.urlsplit(self.openai_base_url.rstrip("/"))
        scheme = "wss" if parts.scheme in ("https", "wss") else "ws"
        query = urllib.parse.urlencode({"model": self.openai_model})
        return urllib.parse.urlunsplit((scheme, parts.netloc, parts.path + "/realtime", query, ""))


def load_config(env: Mapping[str, str]) -> Config:
    """Read every setting from the environment, or say what is wrong."""
    settings = {field.name: field.metadata["read"](env) for field in dataclasses.fields(Config) if field.metadata}
    config = Config(**settings)
    for name, wanted in (("TRANSFER_TO", config.transfer_to), ("RECORD_CALLS", config.record_calls)):
        if wanted and config.twilio_rest is None:
            raise ConfigError(f"{name} needs Twilio's REST API: set TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN "
                              "(or TWILIO_API_KEY and TWILIO_API_SECRET)")
    if config.max_call_seconds > 3600 and not config.session_continuity:
        raise ConfigError("MAX_CALL_SECONDS above 3600 needs SESSION_CONTINUITY=on: "
                          "OpenAI ends every session after 60 minutes")
    if config.call_summary and not config.call_report_url:
        raise ConfigError("CALL_SUMMARY=on needs CALL_REPORT_URL: the summary goes into the call's report")
    return dataclasses.replace(config, warnings=doubtful_settings(env, config),
                               browser_phone_token=config.browser_phone_token or secrets.token_urlsafe(18))


def doubtful_settings(env: Mapping[str, str], config: Config) -> tuple[str, ...]:
    """Settings that are allowed but may not do what was meant: start-up warns about them."""
    warnings = []
    ignored = [name for name in SERVER_VAD_SETTINGS if env.get(name, "").strip()]
    if config.turn_detection == "semantic_vad" and ignored:
        warnings.append(f"TURN_DETECTION=semantic_vad ignores {', '.join(ignored)} (settings of server_vad)")
    if config.turn_detection == "server_vad" and env.get("VAD_EAGERNESS", "").strip():
        warnings.append("TURN_DETECTION=server_vad ignores VAD_EAGERNESS (a setting of semantic_vad)")
    if config.call_report_url and not config.call_report_secret:
        warnings.append("CALL_REPORT_URL is set without CALL_REPORT_SECRET: reports go unsigned, so the "
                        "receiver cannot tell they come from this relay")
    return tuple(warnings)


# 3. What the relay tells OpenAI ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class Persona:
    """Who the agent is on one call: the environment's settings, or the call's own."""

    instructions: str
    voice: str
    greeting: str
    voicemail: str = ""  # a message to leave on an answering machine: then there is nobody to hear


AGENT_SETTINGS = ("instructions", "greeting", "voice")  # what a call's <Parameter>s, or AGENTS, may set
PERSONA_PARAMETERS = (*AGENT_SETTINGS, "voicemail")  # <Parameter> names that are not call details


def check_agents(agents: Mapping[str, Mapping[str, str]]) -> None:
    """Refuse an AGENTS table that would fail on a call: E.164 numbers, known names and voices."""
    for number, agent in agents.items():
        where = f"AGENTS[{number!r}] in relay.py"
        if not isinstance(number, str) or not re.fullmatch(E164, number):
            raise ConfigError(f"{where}: the key must be one of your Twilio numbers in E.164 form, like +15551230001")
        unknown = sorted(set(agent) - set(AGENT_SETTINGS))
        if unknown:
            raise ConfigError(f"{where}: {', '.join(map(repr, unknown))} is not one of {', '.join(AGENT_SETTINGS)}")
        if not all(isinstance(value, str) for value in agent.values()):
            raise ConfigError(f"{where}: every value must be a string")
        if agent.get("voice", VOICES[0]) not in VOICES:
            raise ConfigError(f"{where}: voice must be one of {', '.join(VOICES)}; got {agent['voice']!r}")


def persona_for_call(config: Config, parameters: Mapping[str, str]) -> Persona:
    """Apply a call's ``<Parameter>``s: three override settings, the rest become call details.

    An unknown voice is ignored here; the caller of this function warns about it.
    """
    instructions = parameters.get("instructions") or config.instructions
    details = [f"- {name}: {value}" for name, value in parameters.items() if name not in PERSONA_PARAMETERS]
    if details:
        instructions += "\n\nCall details:\n" + "\n".join(details)
    voice = parameters.get("voice", "")
    return Persona(
        instructions=instructions,
        voice=voice if voice in VOICES else config.voice,
        greeting=parameters.get("greeting", config.greeting).strip(),
        voicemail=parameters.get("voicemail", "").strip(),
    )


def greeting_instructions(persona: Persona) -> str:
    """What the agent is asked to say first: the greeting, or the message for an answering machine."""
    if persona.voicemail:
        return VOICEMAIL_INSTRUCTIONS + persona.voicemail
    return f"Greet the caller by saying exactly this: {persona.greeting}"


def offered_tools(config: Config, tools: Mapping[str, Tool]) -> list[dict[str, Any]]:
    """The relay's own tools that this configuration offers, then the remote MCP server's."""
    offered = [tool.schema() for tool in tools.values() if tool.offered_if(config)]
    if config.mcp_server_url:
        mcp: dict[str, Any] = {
            "type": "mcp",
            "server_label": config.mcp_server_label,
            "server_url": config.mcp_server_url,
            "require_approval": "never",  # nobody on a phone line can approve a tool call
        }
        if config.mcp_authorization:
            mcp["authorization"] = config.mcp_authorization
        if config.mcp_allowed_tools:
            mcp["allowed_tools"] = list(config.mcp_allowed_tools)
        offered.append(mcp)
    return offered


def turn_detection(config: Config) -> dict[str, Any]:
    """How OpenAI tells that the caller has finished: by silence (server_vad), or by meaning."""
    if config.turn_detection == "semantic_vad":
        detection: dict[str, Any] = {"type": "semantic_vad", "eagerness": config.vad_eagerness}
    else:
        detection = {"type": "server_vad", "threshold": config.vad_threshold,
                     "prefix_padding_ms": config.vad_prefix_padding_ms,
                     "silence_duration_ms": config.vad_silence_duration_ms}
    # The server cancels the agent's answer when the caller speaks, so the relay never
    # sends response.cancel itself; it only clears the phone.
    return {**detection, "create_response": True, "interrupt_response": True}


def session_update(config: Config, persona: Persona, tools: Mapping[str, Tool], event_id: str) -> dict[str, Any]:
    """The GA ``session.update``: mu-law both ways, server-side turn detection, the tools.

    ``event_id`` lets an ``error`` caused by this update be told apart (see Call.on_openai_error).
    Turn detection and noise reduction are always written out (null for off), so a
    session never keeps them from an earlier update.
    """
    audio_input: dict[str, Any] = {
        "format": {"type": "audio/pcmu"},
        # An answering machine's beeps and hiss must neither interrupt the message nor be answered.
        "turn_detection": None if persona.voicemail else turn_detection(config),
        "noise_reduction": None if config.noise_reduction == "off" else {"type": config.noise_reduction},
    }
    if config.log_transcripts or config.session_continuity or config.call_report_url:  # keep the caller's words
        audio_input["transcription"] = {"model": TRANSCRIPTION_MODEL}
    session: dict[str, Any] = {
        "type": "realtime",
        "output_modalities": ["audio"],
        "instructions": persona.instructions,
        "audio": {
            "input": audio_input,
            "output": {"format": {"type": "audio/pcmu"}, "voice": persona.voice},
        },
    }
    offered = offered_tools(config, tools)
    if offered:
        session["tools"] = offered
        session["tool_choice"] = "auto"
    return {"type": "session.update", "event_id": event_id, "session": session}


def response_request(event_id: str, instructions: str = "") -> dict[str, Any]:
    """Ask the model to speak now, following ``instructions`` for this one answer if given.

    The ``event_id`` is the relay's own, so that an ``error`` about this request is told apart.
    """
    event: dict[str, Any] = {"type": "response.create", "event_id": event_id}
    if instructions:
        event["response"] = {"instructions": instructions}
    return event


def summary_request() -> dict[str, Any]:
    """An out-of-band text answer: it sees the conversation, but is neither spoken nor added to it."""
    return {"type": "response.create", "event_id": "relay_summary", "response": {
        "conversation": "none", "output_modalities": ["text"], "instructions": SUMMARY_INSTRUCTIONS,
        "metadata": {"relay": "summary"}}}


def response_text(response: Any) -> str:
    """The text of a response.done's output messages."""
    output = response.get("output") if isinstance(response, dict) else None
    texts: list[str] = []
    for item in output if isinstance(output, list) else []:
        content = item.get("content") if isinstance(item, dict) else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
    return " ".join(texts).strip()


def token_counts(usage: Any) -> dict[str, int]:
    """A response.done's usage: input and output tokens, each by text and audio, and cached input."""
    if not isinstance(usage, dict):
        return {}

    def details(value: Any) -> dict[str, Any]:
        return value if isinstance(value, dict) else {}

    heard, said = details(usage.get("input_token_details")), details(usage.get("output_token_details"))
    cached = details(heard.get("cached_tokens_details"))
    counts = {"input": usage.get("input_tokens"), "output": usage.get("output_tokens"),
              "input_text": heard.get("text_tokens"), "input_audio": heard.get("audio_tokens"),
              "input_cached": heard.get("cached_tokens"), "input_cached_text": cached.get("text_tokens"),
              "input_cached_audio": cached.get("audio_tokens"),
              "output_text": said.get("text_tokens"), "output_audio": said.get("audio_tokens")}
    return {kind: n for kind, n in counts.items() if type(n) is int and n >= 0}


def text_message(text: str, role: str = "user") -> dict[str, Any]:
    """A conversation item with a line of text: from the caller's side, or a system note."""
    return {"type": "message", "role": role, "content": [{"type": "input_text", "text": text}]}


async def connect_openai(config: Config, timeout: float | None = None) -> ClientConnection:
    """Open the Realtime WebSocket. Compression is off: base64 audio barely compresses.

    A ping every PING_INTERVAL seconds, answered within PING_TIMEOUT, finds a session whose
    TCP connection stays open while nothing comes back; websockets' defaults take 40 s.
    """
    return await connect(
        config.openai_url,
        additional_headers={"Authorization": f"Bearer {config.openai_api_key}"},
        compression=None,
        open_timeout=timeout or config.openai_connect_timeout,
        close_timeout=CLOSE_TIMEOUT,
        ping_interval=PING_INTERVAL,
        ping_timeout=PING_TIMEOUT,
        max_size=2**22,
    )


class OpenAISession:
    """One Realtime session, from its handshake to its close.

    A call makes a new one for every session it uses, so nothing that a dead session
    was told, confirmed or timed can leak into the next.
    """

    def __init__(self, socket: ClientConnection, opened_at: float) -> None:
        self.socket = socket
        self.opened_at = opened_at  # time.monotonic() of the handshake
        self.told: Persona | None = None  # what the last session.update said
        self.updates_sent = 0
        self.updates_unanswered = 0  # session.update events OpenAI has neither confirmed nor refused
        self.worked = False  # it has answered or heard the caller
        self.end_reason = ""  # why the relay itself closed it: "rollover" or "expired"
        self.rollover: asyncio.TimerHandle | None = None

    @classmethod
    async def dial(cls, config: Config, timeout: float | None = None) -> OpenAISession:
        opened_at = time.monotonic()
        return cls(await connect_openai(config, timeout), opened_at)

    @property
    def is_open(self) -> bool:
        return self.socket.state is State.OPEN

    @property
    def configured(self) -> bool:
        """OpenAI has answered every session.update sent, so the agent is who the call needs."""
        return self.told is not None and not self.updates_unanswered

    async def configure(self, config: Config, persona: Persona, tools: Mapping[str, Tool]) -> None:
        """Tell OpenAI who the agent is, unless this session knows already."""
        if self.told == persona:
            return
        self.told = persona
        self.updates_sent += 1
        self.updates_unanswered += 1
        await self.send(session_update(config, persona, tools, f"session_update_{self.updates_sent}"))

    def update_answered(self) -> None:
        """session.updated, or an error about an update: the session keeps its old settings then."""
        self.updates_unanswered = max(0, self.updates_unanswered - 1)

    async def send(self, event: dict[str, Any] | str) -> None:
        await self.socket.send(event if isinstance(event, str) else json.dumps(event))

    def roll_over_after(self, seconds: float, callback: Callable[[], Any]) -> None:
        """Call ``callback`` when this session is due for its planned rollover."""
        self.rollover = asyncio.get_running_loop().call_later(seconds, callback)

    def stop_rollover(self) -> None:
        if self.rollover is not None:
            self.rollover.cancel()

    async def close(self, reason: str = "") -> None:
        """Close it; ``reason`` says why, when the relay closes it and the call goes on."""
        self.end_reason = self.end_reason or reason
        self.stop_rollover()
        await self.socket.close()


class WarmSessions:
    """OpenAI sessions opened and configured ahead of calls, so a call skips the handshake.

    Off unless WARM_SESSIONS is set. An idle session costs no tokens (OpenAI bills
    responses, not connections), but each is a Realtime session held open, and it must
    leave a call room inside OpenAI's 60-minute limit: so they are replaced every few
    minutes, and as soon as a call takes one.
    """

    def __init__(self, config: Config, tools: Mapping[str, Tool]) -> None:
        self.config = config
        self.tools = tools
        self.ready: collections.deque[OpenAISession] = collections.deque()
        self.taken = asyncio.Event()

    def take(self) -> OpenAISession | None:
        """A configured session that is still open (keep_ready retires old ones)."""
        while self.ready:
            session = self.ready.popleft()
            self.taken.set()
            if session.is_open:
                return session
        return None

    async def keep_ready(self) -> None:
        """Dial until WARM_SESSIONS are ready; replace old and taken ones; runs until cancelled."""
        while True:
            while self.ready and self.age(self.ready[0]) >= WARM_SESSION_MAX_AGE:
                await self.ready.popleft().close()
            missing = self.config.warm_sessions - len(self.ready)
            opened = await asyncio.gather(*(self.open_one() for _ in range(missing)), return_exceptions=True)
            for result in opened:
                if isinstance(result, OpenAISession):
                    self.ready.append(result)
                else:
                    logger.warning("could not open a warm OpenAI session: %s", result)
            if len(self.ready) < self.config.warm_sessions:
                await asyncio.sleep(5)  # OpenAI is refusing or unreachable: do not hammer it
                continue
            self.taken.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WARM_SESSION_MAX_AGE - self.age(self.ready[0])):
                    await self.taken.wait()  # until a call takes one, or the oldest grows too old

    @staticmethod
    def age(session: OpenAISession) -> float:
        return time.monotonic() - session.opened_at

    async def open_one(self) -> OpenAISession:
        session = await OpenAISession.dial(self.config)
        default = persona_for_call(self.config, {})  # the call's own values follow at its "start"
        await session.configure(self.config, default, self.tools)
        return session

    async def close(self) -> None:
        sessions = list(self.ready)
        self.ready.clear()
        await asyncio.gather(*(session.close() for session in sessions))


class TwilioError(Exception):
    """A REST request failed: the message is Twilio's own error, or why nothing answered."""


def twilio_post(account: TwilioAccount, path: str, fields: Mapping[str, str]) -> dict[str, Any]:
    """POST a form to ``/2010-04-01/Accounts/{AccountSid}/{path}`` and return Twilio's JSON.

    Blocking (urllib, standard library only): calls run it with ``asyncio.to_thread``.
    """
    url = f"{account.base_url}/2010-04-01/Accounts/{account.account_sid}/{path}"
    credentials = base64.b64encode(f"{account.username}:{account.password}".encode()).decode()
    request = urllib.request.Request(
        url,
        data=urllib.parse.urlencode(fields).encode(),
        headers={"Authorization": f"Basic {credentials}", "Accept": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=TWILIO_REST_TIMEOUT) as reply:
            return json.loads(reply.read() or b"{}")
    except urllib.error.HTTPError as error:
        raise TwilioError(twilio_error(error)) from None
    except (OSError, ValueError, http.client.HTTPException) as error:  # unreachable, timed out, cut off, not JSON
        raise TwilioError(f"no usable answer from {account.base_url}: {error}") from None


def twilio_error(error: urllib.error.HTTPError) -> str:
    """Twilio's error JSON (code, message, more_info) in one line."""
    try:
        body = error.read()
    except (OSError, http.client.HTTPException):
        return f"HTTP {error.code}, its answer cut off"
    try:
        details = json.loads(body)
        return (f"HTTP {error.code}, Twilio error {details.get('code')}: {details.get('message')} "
                f"({details.get('more_info')})")
    except (ValueError, AttributeError):
        return f"HTTP {error.code}: {body[:200]!r}"


def transfer_twiml(config: Config) -> str:
    """TwiML that says TRANSFER_MESSAGE, dials TRANSFER_TO, and ends the call after it."""
    escape = xml.sax.saxutils.escape
    say = f"<Say>{escape(config.transfer_message)}</Say>" if config.transfer_message else ""
    noun = "Sip" if config.transfer_to.startswith("sip:") else "Number"
    return (
        f"<Response>{say}<Dial><{noun}>{escape(config.transfer_to)}</{noun}></Dial>"
        f"<Say>{escape(AFTER_TRANSFER_MESSAGE)}</Say><Hangup/></Response>"
    )


def carries_over(event: dict[str, Any]) -> bool:
    """Does an event meant for a session that dropped still mean something to the next one?

    Only messages do (keypad presses, notes). Truncates, response.create, tool outputs and
    approvals refer to the old session's items; a tool's result is in the history as a note.
    """
    return event["type"] == "conversation.item.create" and event["item"]["type"] == "message"


def tool_note(name: Any, arguments: Any, output: Any) -> str:
    """A tool call and its result in short form, for a new session to know it happened."""
    return f"The {name} tool was called with {str(arguments)[:300]} and returned: {str(output)[:700]}"


def iso_utc(moment: datetime.datetime) -> str:
    """ISO-8601 in UTC to the millisecond, as logs and reports write times: 2026-12-03T15:04:05.123Z."""
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def masked(target: str) -> str:
    """A number or SIP address for a log line: its last 4 characters."""
    return "***" + target[-4:]


# 4. One phone call -------------------------------------------------------------
#
# A call is a few small parts, each holding one kind of state:
#   Floor       who may speak: every rule about asking the model for a response (no I/O)
#   Phone       the Twilio side: what its start named, agent audio out with its marks, what was heard
#   CallerAudio the caller's frames on their way to OpenAI, joined in pairs while the relay runs late
#   Transcript  the conversation as text, for a new session to carry on
#   OpenAILink  the OpenAI side: the current session, what waits for one, and redialling
#   Continuity  what happens when a session ends: the call ends, or a new session takes over
#   DeadAir     times the silences the agent fills: a caller who says nothing, a slow tool
#   CallControl the time limits; a hang-up or transfer once the last words have played; recording
#   ToolRunner  the model's function calls, and what the remote MCP server did
#   CallRecord  what the call's report will say: tools, barge-ins, sessions, tokens, its ending
#   Call        the two pumps, handing each event to the part it belongs to


@dataclasses.dataclass(frozen=True)
class ResponseRequest:
    """A response.create the relay sent, until OpenAI answers it."""

    event_id: str
    instructions: str
    covered: bool  # an answer was owed when it was sent: if it is refused, one still is
    started: bool = False  # a response began while it was in flight


@dataclasses.dataclass(frozen=True)
class End:
    """The floor's decision to end the call: hang up, or transfer to TRANSFER_TO."""

    kind: str  # "hang_up" or "transfer"
    reason: str  # for the log
    cause: str  # how the call ended, in one word (see how_it_ended): agent_hung_up, voicemail, silence...


Decision = dict[str, Any] | End | None  # a response.create to send, an ending to begin, or nothing
ACTIVE_RESPONSE = "conversation_already_has_active_response"


class Floor:
    """Who may speak next: every rule about asking the model to speak, and no I/O.

    The call tells it what happened and carries out what it decides: a response.create
    to send, a hang-up or transfer to begin, or nothing. No other code sends
    response.create or ends a call on the agent's behalf.

    What it keeps:
        session      an OpenAI session is up (none at call start, nor during a gap)
        request      the relay's own response.create, sent and not answered yet
        responding   a response is running: one the relay asked for, or one server VAD began
        unconfirmed  items the relay added that OpenAI has not confirmed yet
        owed         the conversation gained something that no response has seen
        tools        function calls still running; ``filled`` once the wait was filled
        ending       a hang-up or transfer asked for; ``ended`` once it has begun
        check_ins    times the agent asked a silent caller whether they are still there
        caller_speaking   turn detection heard the caller begin and not yet stop

    Its states, derived from those (``state``):
        ENDED        the hang-up or transfer has begun: nothing more is decided
        BUSY         a request in flight, a response running, or a tool running
        NO_SESSION   nothing going on, but no session to ask: only an ending may begin
        FREE         nothing going on: an ending begins if asked for, else an owed answer,
                     unless the caller is speaking: the answer their turn gets sees it then

    Whose silence it is (``silence``), when nothing is said or asked and no ending waits:
        "caller"     FREE with nothing owed: the caller's turn; after IDLE_SECONDS, a check-in
        "tool"       a tool runs: after TOOL_FILLER_SECONDS, one line to fill the wait
        "owed"       FREE with an answer owed that the caller's turn ended over, and turn
                     detection's answer to it has not begun: after TURN_ANSWER_WAIT, the answer
    The call times it from when the caller has heard the agent's last words.

    Events (each method that can decide returns the decision):
        new_item()          the relay adds an item: owed, and unconfirmed until confirmed()
        owe()               OpenAI ran an MCP tool, whose result it does not speak by itself
        created()           responding; what OpenAI has confirmed counts as answered
        done()              not responding; a request that saw a response begin is over
        refused(id, code)   that request is over; what it covered is owed again, except when
                            a plain request was refused for its own sake (it would be again)
        tool_started(), tool_finished()   (the output that follows brings the decision)
        speech_started(), speech_stopped()   the caller speaks, so they are there (caller_is_there())
        caller_is_there()   the caller spoke or pressed a key: check-ins start again, and a
                            goodbye to a silent caller that has not ended the call yet is called off
        silent(whose)       that silence lasted: a check-in, after IDLE_PROMPTS of them a goodbye
                            then a hang-up, or a tool's filler line
        end(kind, reason, cause)     the ending waits for the floor to be free
        end_now(kind, reason, cause) the ending begins whatever is going on
        ending_failed()     the ending did not happen: Twilio refused a transfer, or the caller hung up first
        lost(kept)          the session is gone with its items, request, response and speech
        ready()             a session is up
        say(instructions)   ask now if nothing is being said or asked, else not at all
        greet(instructions) say() once per call, once a session is up
        pick_up(line)       a new session's first request, sent before what was kept for it
    """

    def __init__(self, idle_prompts: int) -> None:
        self.idle_prompts = idle_prompts  # check-ins before a silent caller is said goodbye to
        self.session = False
        self.request: ResponseRequest | None = None
        self.responding = False
        self.unconfirmed: set[str] = set()
        self.owed = False
        self.tools = 0
        self.filled = False
        self.ending: End | None = None
        self.ended = False
        self.check_ins = 0
        self.greeted = False
        self.caller_speaking = False
        self.requests_sent = 0
        self.items_added = 0

    @property
    def state(self) -> str:
        if self.ended:
            return "ENDED"
        if self.request or self.responding or self.tools:
            return "BUSY"
        return "FREE" if self.session else "NO_SESSION"

    @property
    def owes_answer(self) -> bool:
        """The agent was speaking, about to, or had something to answer."""
        return self.owed or self.responding or self.request is not None

    @property
    def quiet(self) -> bool:
        """Nobody speaks and nothing waits: a moment to move the call to a new session."""
        return self.state in ("FREE", "NO_SESSION") and not (self.owed or self.caller_speaking)

    @property
    def silence(self) -> str:
        """Whose silence it is, if nothing is being said or asked: "caller", "tool", "owed", or ""."""
        if self.ended or self.ending or not self.session or self.request or self.responding or self.caller_speaking:
            return ""
        if self.tools:
            return "" if self.filled else "tool"
        return "owed" if self.owed else "caller"

    def next(self) -> Decision:
        """What happens now: the one place where the call is ended or an answer asked for."""
        state = self.state
        if state in ("ENDED", "BUSY"):
            return None
        if self.ending is not None:
            self.ended = True
            return self.ending
        if state == "FREE" and self.owed and not self.caller_speaking:
            return self.ask("")
        return None

    def ask(self, instructions: str) -> dict[str, Any]:
        """A request that sees everything sent before it, so nothing is left owed."""
        request = self.new_request(instructions, covered=self.owed)
        self.owed = False
        self.unconfirmed.clear()
        return request

    def new_request(self, instructions: str, covered: bool) -> dict[str, Any]:
        self.requests_sent += 1
        self.request = ResponseRequest(f"relay_response_{self.requests_sent}", instructions, covered)
        return response_request(self.request.event_id, instructions)

    def say(self, instructions: str) -> dict[str, Any] | None:
        if self.ended or not self.session or self.request or self.responding:
            return None
        return self.ask(instructions)

    def greet(self, instructions: str) -> dict[str, Any] | None:
        if self.greeted or not self.session:
            return None
        self.greeted = True
        return self.say(instructions)

    def pick_up(self, line: str) -> dict[str, Any]:
        return self.new_request(line, covered=False)

    def new_item(self) -> str:
        self.items_added += 1
        item_id = f"relay_{self.items_added}"
        self.unconfirmed.add(item_id)
        self.owed = True
        return item_id

    def confirmed(self, item_id: str) -> None:
        self.unconfirmed.discard(item_id)

    def owe(self) -> None:
        self.owed = True

    def created(self) -> None:
        self.responding = True
        if self.request is not None:
            self.request = dataclasses.replace(self.request, started=True)
        if not self.unconfirmed:  # it sees everything the relay added (OpenAI keeps the order)
            self.owed = False

    def done(self) -> Decision:
        self.responding = False
        if self.request is not None and self.request.started:
            self.request = None
        return self.next()

    def refused(self, event_id: str, code: str) -> Decision:
        request = self.request
        if request is None or event_id != request.event_id:
            return None
        self.request = None
        if code == ACTIVE_RESPONSE or request.instructions:
            self.owed = self.owed or request.covered
        return self.next()

    def tool_started(self) -> None:
        self.tools += 1

    def tool_finished(self) -> None:
        self.tools -= 1  # the decision comes with the output it brings: new_item(), then next()
        self.filled = self.filled and self.tools > 0

    def speech_started(self) -> None:
        self.caller_speaking = True
        self.caller_is_there()

    def speech_stopped(self) -> None:
        self.caller_speaking = False

    def caller_is_there(self) -> None:
        self.check_ins = 0
        if self.ending is not None and self.ending.cause == "silence" and not self.ended:
            self.ending = None

    def silent(self, whose: str) -> Decision:
        if not whose or whose != self.silence:
            return None  # something happened meanwhile, and the call times the new silence
        if whose == "tool":
            self.filled = True
            return self.ask(TOOL_FILLER)
        if whose == "owed":
            return self.ask("")
        if self.check_ins < self.idle_prompts:
            self.check_ins += 1
            return self.ask(IDLE_CHECK_IN)
        self.end("hang_up", f"the caller said nothing after {self.check_ins} check-in(s)", "silence")
        return self.ask(IDLE_GOODBYE)

    def end(self, kind: str, reason: str, cause: str) -> None:
        if self.ending is None:
            self.ending = End(kind, reason, cause)

    def end_now(self, kind: str, reason: str, cause: str) -> Decision:
        if self.ended:
            return None
        self.end(kind, reason, cause)
        self.ended = True
        return self.ending

    def ending_failed(self) -> None:
        self.ending, self.ended = None, False

    def lost(self, kept: set[str]) -> Decision:
        self.session = False
        self.request = None
        self.responding = False
        self.caller_speaking = False
        self.unconfirmed = set(kept)
        self.owed = bool(kept)
        return self.next()

    def ready(self) -> Decision:
        self.session = True
        return self.next()


class BadInput(Exception):
    """A Twilio frame the relay cannot use: what is wrong with it, and an excerpt."""

    def __init__(self, problem: str, detail: str) -> None:
        super().__init__(problem)
        self.problem, self.detail = problem, detail


def read_twilio_frame(message: str | bytes) -> dict[str, Any]:
    """One Media Streams frame as a JSON object with an ``event`` name, or BadInput."""
    if isinstance(message, bytes):
        raise BadInput("binary frame", f"{len(message)} bytes")
    try:
        event = json.loads(message)
    except (ValueError, RecursionError):  # RecursionError: nested too deep
        raise BadInput("non-JSON text", repr(message[:80])) from None
    if not isinstance(event, dict):
        raise BadInput("JSON that is not an object", repr(message[:80]))
    if not isinstance(event.get("event"), str):
        raise BadInput("event without a valid 'event' field", repr(event)[:80])
    return event


def nested(event: dict[str, Any], outer: str, inner: str) -> Any:
    """``event[outer][inner]``, or None where either is missing or not an object."""
    value = event.get(outer)
    return value.get(inner) if isinstance(value, dict) else None


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
        self.playing_until = 0.0  # when the phone will have played all it was sent, in real time

    def sent(self, item_id: str, content_index: int, size: int) -> str | None:
        """Record a chunk sent to Twilio; return the name of a mark to send after it, if due."""
        if item_id != self.item_id:
            self.item_id, self.content_index, self.item_bytes, self.marked_bytes = item_id, content_index, 0, 0
        self.item_bytes += size
        self.drained.clear()
        self.playing_until = max(self.playing_until, time.monotonic()) + size / (BYTES_PER_MS * 1000)
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

    def played(self, name: str) -> bool:
        """Twilio echoed a mark: playback reached it. Return whether all that was sent is heard now."""
        mark = self.pending.pop(name, None)
        if mark is None:
            return False  # a late echo after a clear, or a mark we never sent
        self.heard_item, _, self.heard_bytes = mark
        self.heard_at = time.monotonic()
        if not self.pending and self.marked_bytes == self.item_bytes:
            self.drained.set()
            return True
        return False

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
        self.playing_until = 0.0
        return Interruption(item_id, content_index, heard // BYTES_PER_MS, sent // BYTES_PER_MS)


class Phone:
    """The Twilio side as the relay speaks to it: what its "start" named, and the agent's audio.

    The agent's audio goes out with its marks, and ``playback`` says how much of it the
    caller has heard. On the browser phone (``browser``), the page is also shown what
    Twilio's protocol has no event for: the transcript and the tool calls.
    """

    def __init__(self, twilio: ServerConnection, stats: Stats, browser: bool) -> None:
        self.twilio = twilio
        self.stats = stats
        self.browser = browser  # the browser phone (/phone), not Twilio: no REST, and the page is shown more
        self.stream_sid = ""
        self.sid_json = '""'  # the streamSid as a JSON string, for the hand-written messages
        self.call_sid = ""
        self.parameters: dict[str, str] = {}  # the stream's <Parameter>s
        self.started = asyncio.Event()  # Twilio's "start" has named the stream
        self.playback = Playback()

    def start(self, start: Any) -> None:
        """Twilio's "start": the stream, the call and its parameters."""
        if not isinstance(start, dict) or not isinstance(start.get("streamSid"), str):
            raise BadInput("start without start.streamSid", repr(start)[:120])
        self.stream_sid = start["streamSid"]
        self.sid_json = json.dumps(self.stream_sid)
        self.call_sid = str(start.get("callSid", ""))
        parameters = start.get("customParameters")
        if isinstance(parameters, dict):
            self.parameters = {str(name): str(value) for name, value in parameters.items()}
        self.started.set()

    @property
    def direction(self) -> str:
        """inbound, outbound (relay.py call) or browser (/phone): never anything else, as a label."""
        if self.browser:
            return "browser"
        return "outbound" if self.parameters.get("direction") == "outbound" else "inbound"

    @property
    def rest_sid(self) -> str:
        """The Call SID that Twilio's REST API controls, if there is one: the browser phone has none."""
        return "" if self.browser else self.call_sid

    async def show(self, event: dict[str, Any]) -> None:
        """On the browser phone, tell the page what happened."""
        if self.browser:
            with contextlib.suppress(ConnectionClosed):
                await self.twilio.send(json.dumps(event))

    async def show_turn(self, key: str, turn: Turn | None) -> None:
        """On the browser phone, show a turn of the conversation once it has words."""
        if turn is not None and turn.text:
            await self.show({"event": "transcript", "id": key, **turn.said()})

    async def play(self, event: dict[str, Any]) -> bool:
        """Forward one chunk of the agent's voice, with a mark to learn when it has been heard.

        Return whether it went to the phone.
        """
        delta, item_id = event.get("delta"), event.get("item_id")
        if not isinstance(delta, str) or not isinstance(item_id, str) or not self.stream_sid:
            return False
        if item_id in self.playback.muted:
            self.stats.count("relay_frames_dropped_total", "interrupted_answer")
            return False  # the rest of an answer the caller has already interrupted
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
        return True

    async def finish_item(self) -> None:
        """The agent's item is complete (or no more of it will come): mark its unmarked tail."""
        tail = self.playback.finish()
        if tail:
            await self.send_mark(tail)

    async def send_mark(self, name: str) -> None:
        await self.twilio.send(f'{{"event":"mark","streamSid":{self.sid_json},"mark":{{"name":"{name}"}}}}')

    async def clear(self) -> Interruption | None:
        """Stop the phone playing the agent's audio; say what was cut off, if anything was playing."""
        cut = self.playback.interrupt()
        if cut is not None:
            await self.twilio.send(f'{{"event":"clear","streamSid":{self.sid_json}}}')
        return cut


class CallerAudio:
    """The caller's frames on their way to OpenAI, joined in pairs while the relay runs late.

    Twilio stamps each frame with its position in the stream. The smallest gap seen
    between that and our clock is the network's delay; anything above it is the relay
    running late. Then two frames are joined into one message (40 ms of audio), halving
    the messages per call until the relay has caught up.
    """

    def __init__(self, send: Callable[[str], Awaitable[None]], spawn: Callable[[Awaitable[None]], Any]) -> None:
        self.send = send
        self.spawn = spawn
        self.held = b""  # a frame waiting to be joined with the next one
        self.timer: asyncio.TimerHandle | None = None  # sends it alone if no next frame comes
        self.least_lag = float("inf")

    async def frame(self, payload: str, audio: bytes, media: dict[str, Any]) -> None:
        if self.held:
            self.timer.cancel()  # type: ignore[union-attr]
            audio, self.held = self.held + audio, b""
            payload = binascii.b2a_base64(audio, newline=False).decode()
        elif self.falling_behind(media):
            self.held = audio  # sent with the next frame, which is most likely already here
            self.timer = asyncio.get_running_loop().call_later(FRAME_SECONDS, lambda: self.spawn(self.flush()))
            return
        await self.forward(payload)

    async def flush(self) -> None:
        """Send a held frame on its own: no next frame came to join it within a frame's time."""
        if self.held:
            audio, self.held = self.held, b""
            await self.forward(binascii.b2a_base64(audio, newline=False).decode())

    async def forward(self, payload: str) -> None:
        # The payload is valid base64, so it can go into the JSON as it is.
        await self.send(f'{{"type":"input_audio_buffer.append","audio":"{payload}"}}')

    def falling_behind(self, media: dict[str, Any]) -> bool:
        """Is this frame being handled more than a frame later than Twilio's clock allows?"""
        try:
            lag = time.monotonic() - float(media["timestamp"]) / 1000
        except (KeyError, TypeError, ValueError):
            return False
        if lag < self.least_lag:
            self.least_lag = lag
        return lag - self.least_lag > COALESCE_WHEN_LATE

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()


@dataclasses.dataclass
class Turn:
    """One turn of the conversation, as text."""

    role: str  # "user" (the caller), "assistant" (the agent) or "system" (a note, such as a tool result)
    text: str = ""
    heard: float | None = None  # for an agent turn the caller cut off: the share of it they heard
    note: bool = False  # written by the relay (a keypad press, a tool result), not spoken

    @property
    def heard_text(self) -> str:
        """What the caller heard of it: all of it, or the words before they cut the agent off."""
        if self.heard is None:
            return self.text
        words = self.text.split()[: round(len(self.text.split()) * self.heard)]
        return " ".join(words) + " [cut off: the caller interrupted here]" if words else ""

    def said(self) -> dict[str, Any]:
        """The turn as the call's report and the browser phone show it."""
        return {"role": "caller" if self.role == "user" else "agent", "text": self.text,
                "interrupted": self.heard is not None}

    def as_item(self) -> dict[str, Any]:
        """The turn as a conversation item for a new session."""
        item = text_message(self.heard_text, self.role)
        if self.role == "assistant":
            item["content"][0]["type"] = "output_text"
        return {"type": "conversation.item.create", "item": item}


class Transcript:
    """The call's conversation as text, so that a new OpenAI session can carry it on.

    Turns keep the order in which they began (a caller's turn when their speech starts,
    the agent's when its answer starts), though their text comes later, from the
    transcripts. Memory only, and bounded (TRANSCRIPT_*): the oldest turns go first, and
    all of it goes when the call's report is made.
    """

    def __init__(self) -> None:
        self.turns: collections.OrderedDict[str, Turn] = collections.OrderedDict()
        self.chars = 0
        self.notes = 0

    def begin(self, key: str, role: str) -> Turn:
        """Keep a turn's place in the conversation; its text may come later."""
        turn = self.turns.get(key)
        if turn is None:
            turn = self.turns[key] = Turn(role)
            self.forget_the_oldest()
        return turn

    def write(self, key: str, role: str, text: str) -> None:
        turn = self.begin(key, role)
        text = text[:MEMORY_TURN_CHARS]
        self.chars += len(text) - len(turn.text)
        turn.text = text
        self.forget_the_oldest()

    def forget_the_oldest(self) -> None:
        while self.chars > TRANSCRIPT_CHARS or len(self.turns) > TRANSCRIPT_TURNS:
            self.chars -= len(self.turns.popitem(last=False)[1].text)

    def note(self, role: str, text: str) -> None:
        """A turn that has no item of its own: a keypad press, a tool result."""
        self.notes += 1
        key = f"note {self.notes}"
        self.begin(key, role).note = True
        self.write(key, role, text)

    def cut_off(self, key: str, heard_ms: int, sent_ms: int) -> None:
        if key in self.turns and sent_ms > 0:
            self.turns[key].heard = min(1.0, heard_ms / sent_ms)

    def items(self) -> list[dict[str, Any]]:
        """The newest of the conversation (MEMORY_*) as items for a new session, oldest first."""
        kept: list[Turn] = []
        chars = 0
        for turn in reversed(self.turns.values()):
            chars += len(turn.heard_text)
            if len(kept) == MEMORY_TURNS or chars > MEMORY_CHARS:
                break
            if turn.heard_text:
                kept.append(turn)
        return [turn.as_item() for turn in reversed(kept)]

    def spoken(self) -> list[dict[str, Any]]:
        """What the caller and the agent said, in order, for the call's report."""
        return [turn.said() for turn in self.turns.values() if not turn.note and turn.text]

    def caller_waits(self) -> bool:
        """Did the caller say something the agent has not begun to answer?"""
        return bool(self.turns) and next(reversed(self.turns.values())).role == "user"


class Outbox:
    """Everything the call sends OpenAI: straight to the live session, or kept while there is none.

    At call start and during a gap, the caller's audio waits here, and apart from it, so
    that audio cannot push them out, the other events. Both are bounded; the oldest go first.
    """

    def __init__(self, stats: Stats, log: CallLog) -> None:
        self.live: OpenAISession | None = None
        self.audio: collections.deque[str] = collections.deque(maxlen=EARLY_AUDIO_LIMIT)
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EARLY_EVENT_LIMIT)
        self.stats = stats
        self.log = log

    async def send(self, event: dict[str, Any] | str) -> None:
        """Send an event (a string is caller audio), or keep it until a session is live."""
        session = self.live
        if session is not None:
            try:
                await session.send(event)
                return
            except ConnectionClosed:  # the OpenAI pump decides whether a new session takes over
                if not isinstance(event, str) and not carries_over(event):
                    return
                if self.live is not session:  # it has, while this send waited: the event goes there
                    await self.send(event)
                    return
                self.live = None
        kept: collections.deque[Any] = self.audio if isinstance(event, str) else self.events
        if len(kept) == kept.maxlen:
            what = "audio" if kept is self.audio else "event"
            self.stats.count("relay_frames_dropped_total", f"early_{what}_overflow")
            self.log.warn_once(what, "OpenAI is slow to connect: dropping the oldest caller %s kept for it", what)
        kept.append(event)

    async def go_live(self, session: OpenAISession) -> None:
        """Send what was kept, events first, then send everything at once.

        The Twilio pump keeps queueing while this awaits, so nothing overtakes; each
        message leaves the queue only once sent, so a session that dies meanwhile loses none.
        """
        while self.events or self.audio:
            if self.events:
                await session.send(self.events[0])
                self.events.popleft()
            else:
                await session.send(self.audio[0])
                self.audio.popleft()
        self.live = session

    def pause(self) -> set[str]:
        """No session for now: keep what still means something to the next; return those items' ids."""
        self.live = None
        self.events = collections.deque(filter(carries_over, self.events), maxlen=EARLY_EVENT_LIMIT)
        return {event["item"]["id"] for event in self.events}


class OpenAILink:
    """The call's way to OpenAI: one session after another, with the outbox in front of them.

    It takes a warm session or dials one, configures it, and tells it the conversation so
    far. With SESSION_CONTINUITY a session that ends is replaced within RECONNECT_SECONDS.
    """

    def __init__(self, call: Call) -> None:
        self.call = call  # whose persona each session is told
        self.config = call.config
        self.relay = call.relay
        self.log = call.log
        self.on_due = lambda session: call.spawn(call.continuity.roll_over(session))  # the planned rollover
        self.outbox = Outbox(call.relay.stats, call.log)
        self.session: OpenAISession | None = None  # the newest; None before the first
        self.failed = False  # OpenAI failed the call: Twilio then runs the TwiML after <Connect>

    async def open(self, deadline: float | None, history: list[dict[str, Any]]) -> bool:
        """Get a configured session that has been told ``history``.

        Without a ``deadline`` the first failure ends the call. With one, failures are
        retried with a short backoff until then, except a 401 or 403: a key problem that
        retrying cannot mend. A failure is logged, counted, and hands the call back to Twilio.
        """
        backoff = 0.1
        while True:
            problem, retry = await self.try_session(deadline, history)
            if not problem:
                return True
            if not retry or deadline is None or time.monotonic() + backoff >= deadline:
                self.fail(problem)
                return False
            self.log.warning("OpenAI %s: trying again", problem)
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, 1.0)

    async def try_session(self, deadline: float | None, history: list[dict[str, Any]]) -> tuple[str, bool]:
        """One attempt at a configured session; returns what went wrong and whether to retry."""
        timeout = self.config.openai_connect_timeout
        try:
            session = self.relay.warm.take()
            if session is not None:
                self.log.info("OpenAI connected: using a warm session")
            else:
                if deadline is not None:
                    timeout = max(0.1, min(timeout, deadline - time.monotonic()))
                session = await OpenAISession.dial(self.config, timeout)
                seconds = time.monotonic() - session.opened_at
                self.relay.stats.observe("relay_openai_connect_seconds", seconds)
                self.log.info("OpenAI connected in %.0f ms", seconds * 1000)
            self.session = session
            self.call.record.sessions += 1
            await session.configure(self.config, self.call.persona, self.relay.tools)
            for event in history:
                await session.send(event)
        except InvalidStatus as refused:
            status = refused.response.status_code
            return f"refused the connection: HTTP {status}", status not in (401, 403)
        except TimeoutError:
            return f"did not answer within {timeout:g} s", True
        except ConnectionClosed as closed:
            return f"closed the new session at once: {closed}", True
        except (OSError, InvalidHandshake) as error:
            return f"could not be reached: {error}", True
        if self.config.session_continuity:
            due = session.opened_at + self.config.session_rollover_seconds
            session.roll_over_after(due - time.monotonic(), lambda: self.on_due(session))
        return "", False

    def fail(self, what: str) -> None:
        """Log and count an OpenAI failure; the call then ends and goes back to Twilio."""
        self.relay.count_error("openai_connection")
        self.failed = True
        self.log.error("OpenAI %s", what)

    async def summary(self, speaking: bool) -> str:
        """Ask the model, out of band, to sum the call up, waiting at most SUMMARY_TIMEOUT.

        The caller has gone: an answer the agent is still ``speaking`` is cancelled first.
        """
        session = self.session
        if session is None or not session.is_open:
            return ""
        try:
            async with asyncio.timeout(SUMMARY_TIMEOUT):
                if speaking:
                    await session.send({"type": "response.cancel"})
                await session.send(summary_request())
                async for message in session.socket:
                    event = json.loads(message)
                    if event.get("type") == "response.done":
                        self.call.record.response_done(event.get("response"))
                        if nested(event, "response", "metadata") == {"relay": "summary"}:
                            return response_text(event.get("response"))
                    elif event.get("type") == "error" and nested(event, "error", "event_id") == "relay_summary":
                        self.log.warning("OpenAI refused the summary: %s", nested(event, "error", "message"))
                        return ""
        except (TimeoutError, ConnectionClosed, ValueError, AttributeError, RecursionError) as problem:
            self.log.warning("no summary of the call: %s", type(problem).__name__)
        return ""

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class Continuity:
    """What happens when an OpenAI session ends mid-call.

    The call ends as the agent asked, if it asked; otherwise, with SESSION_CONTINUITY,
    a new session takes over within RECONNECT_SECONDS and is told the conversation so far.
    """

    def __init__(self, call: Call) -> None:
        self.call = call
        self.gap_deadline: float | None = None  # when a call between two sessions gives up

    async def after_session(self, session: OpenAISession) -> bool:
        """A session has ended: end the call as the agent asked, or carry it on in a new one.

        No more of the agent's audio can come, so what was sent is marked to the end and
        the ending waits only for it to play. With SESSION_CONTINUITY off, the call ends.
        """
        call = self.call
        session.stop_rollover()
        if call.floor.ending is not None:
            with contextlib.suppress(ConnectionClosed):
                await call.phone.finish_item()
            await call.carry_out(call.floor.lost(set()))
            if call.control.task is not None:
                await asyncio.wait({call.control.task})
            if call.floor.ended:
                return False  # hung up or transferred; a failed transfer carries on
        reason = session.end_reason or "dropped"
        what = f"closed the session mid-call: code {session.socket.close_code} {session.socket.close_reason!r}"
        if not call.config.session_continuity:
            call.link.fail(what)
            return False
        if reason == "dropped":
            call.relay.count_error("openai_connection")
            call.log.warning("OpenAI %s: carrying the call over to a new session", what)
        return await self.restore(reason)

    async def restore(self, reason: str) -> bool:
        """Carry the call over to a new OpenAI session, within RECONNECT_SECONDS.

        The phone is cleared of the old session's audio (its items are gone with it). The
        caller's audio waits in the outbox meanwhile, as at call start, and goes to the new
        session after the conversation so far (as text) and, if the agent owed an answer,
        one response.create: if the caller spoke during the gap, that speech interrupts
        the pick-up line as any barge-in does, and the agent answers it.
        """
        call = self.call
        gap_started = time.monotonic()
        waiting = (call.floor.owes_answer or not call.phone.playback.drained.is_set()
                   or call.transcript.caller_waits())
        with contextlib.suppress(ConnectionClosed):  # if Twilio is gone too, its pump ends the call
            cut = await call.phone.clear()
            if cut is not None:
                call.transcript.cut_off(cut.item_id, cut.heard_ms, cut.sent_ms)
        history = call.transcript.items()
        # What was kept for a session since the drop follows the pick-up if it still means
        # something (see carries_over), and stays owed until a response sees it.
        await call.carry_out(call.floor.lost(call.link.outbox.pause()))
        line = CARRY_ON_AFTER_ROLLOVER if reason == "rollover" else PICK_UP_AFTER_DROP
        pick_up = [call.floor.pick_up(line)] if waiting else []
        if not await self.pace_redials(reason, gap_started):
            return False
        if not await call.link.open(self.gap_deadline, history + pick_up):
            return False
        await call.carry_out(call.floor.ready())
        call.relay.stats.count("relay_openai_reconnects_total", reason)
        call.record.reconnects += 1
        call.log.info("OpenAI session %s after %.1f s: %d turn(s) of conversation restored%s",
                      "rolled over" if reason == "rollover" else "replaced", time.monotonic() - gap_started,
                      len(history), ", the agent picks up" if waiting else "")
        return True

    async def roll_over(self, session: OpenAISession) -> None:
        """Move the call to a fresh session before OpenAI's 60-minute limit ends this one.

        It waits for a moment when nobody speaks and nothing is owed, if one comes within
        a minute, then closes the session; ``restore`` carries the call on.
        """
        call = self.call
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ROLLOVER_QUIET_WAIT):
                while not (call.floor.quiet and call.phone.playback.drained.is_set()):
                    await asyncio.sleep(0.1)
        if session is not call.link.session or not session.is_open:
            return  # it ended meanwhile, and the call is carried over already
        call.log.info("moving the call to a new OpenAI session before this one reaches its time limit")
        await session.close("rollover")

    async def pace_redials(self, reason: str, gap_started: float) -> bool:
        """Give the gap its RECONNECT_SECONDS, unless it goes on from a session that never worked.

        A new session that OpenAI closed before it did anything (no answer, no speech
        heard) did not end the gap: the relay pauses before the next one and gives up at
        the same deadline.
        """
        call = self.call
        session = call.link.session
        assert session is not None
        lived = gap_started - session.opened_at
        if (reason != "dropped" or self.gap_deadline is None or session.worked
                or lived >= call.config.reconnect_seconds):
            self.gap_deadline = gap_started + call.config.reconnect_seconds
        elif gap_started + REDIAL_PAUSE < self.gap_deadline:
            await asyncio.sleep(REDIAL_PAUSE)
        else:
            call.link.fail(f"closed every new session within {call.config.reconnect_seconds:g} s")
            return False
        return True


class DeadAir:
    """Times the silence on the line; the floor decides what it means (see Floor.silence).

    A silence begins when the caller has heard the agent's last words, as the marks
    tell, and nothing else is going on; not at response.done, while the phone may still
    be playing seconds of audio. Anything that happens on the line times it afresh.
    """

    def __init__(self, call: Call) -> None:
        self.call = call
        self.timer: asyncio.TimerHandle | None = None

    def restart(self) -> None:
        """Something happened on the line: time the silence that follows it, if one does."""
        self.stop()
        call = self.call
        if not (call.phone.started.is_set() and call.phone.playback.drained.is_set()):
            return
        whose = call.floor.silence
        seconds = {"caller": call.config.idle_seconds, "tool": call.config.tool_filler_seconds,
                   "owed": TURN_ANSWER_WAIT}.get(whose)
        if seconds:  # 0 turns it off
            self.timer = asyncio.get_running_loop().call_later(seconds, lambda: call.spawn(self.fill(whose)))

    async def fill(self, whose: str) -> None:
        """The silence lasted: let the floor decide, and say so in the log."""
        call = self.call
        if not call.phone.playback.drained.is_set():
            return  # the phone plays again: its last mark will time the next silence
        decision = call.floor.silent(whose)
        if decision is None:
            return
        stats = call.relay.stats
        if whose == "owed":
            call.log.warning("no answer to the caller's turn came within %g s: the relay asks for one",
                             TURN_ANSWER_WAIT)
        elif whose == "tool":
            stats.count("relay_tool_fillers_total")
            call.log.info("a tool is still running %g s after the agent's last words: the agent fills the wait",
                          call.config.tool_filler_seconds)
        elif call.floor.ending is None:
            stats.count("relay_idle_check_ins_total")
            call.log.info("the caller has said nothing for %g s: the agent checks in (%d of %d)",
                          call.config.idle_seconds, call.floor.check_ins, call.floor.idle_prompts)
        else:
            call.log.info("the caller has said nothing for %g s after %d check-in(s): the agent says goodbye",
                          call.config.idle_seconds, call.floor.check_ins)
        await call.carry_out(decision)

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class CallControl:
    """The call's ending, its time limits, and Twilio's REST API for this call.

    Once the last words have played, the relay hangs up or transfers. With REST call
    control, Twilio is asked to complete (or redirect) the call, so the caller hears
    nothing after the agent. Otherwise, or if Twilio refuses a hang-up, closing the
    socket makes Twilio run the TwiML after ``<Connect>``.
    """

    def __init__(self, call: Call) -> None:
        self.call = call
        self.task: asyncio.Task[None] | None = None  # the hang-up or transfer under way
        self.asked = ""  # what the relay last asked of Twilio's REST API: "hang up", "transfer"...

    async def watch_the_clock(self) -> None:
        """Drop sockets that never start a stream; end calls at MAX_CALL_SECONDS."""
        call = self.call
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await call.phone.started.wait()
        except TimeoutError:
            call.relay.count_error("no_start")
            call.log.warning("no 'start' from Twilio within %g s: closing the socket", START_TIMEOUT)
            await call.phone.twilio.close(1008, "no start event")
            return
        await asyncio.sleep(call.config.max_call_seconds)
        reason = f"the call reached MAX_CALL_SECONDS ({call.config.max_call_seconds:g} s)"
        goodbye = call.floor.say(TIME_LIMIT_GOODBYE)
        call.floor.end("hang_up", reason, "time_limit")
        if goodbye is not None:
            call.log.info("time limit reached: asking the agent to say goodbye")
            await call.carry_out(goodbye)
        else:
            call.log.info("time limit reached: hanging up when the current answer ends")
            await call.carry_out(call.floor.next())
        while True:  # until the call ends: a transfer under way that fails does not keep it going
            await asyncio.sleep(GOODBYE_PLAYBACK_LIMIT)  # no goodbye came: hang up anyway
            ending = call.floor.end_now("hang_up", reason, "time_limit")
            if ending is not None:
                await call.carry_out(ending)

    def begin(self, end: End) -> None:
        """End the call as the floor decided, beside the pumps, once the last words have played."""
        self.task = self.call.spawn(self.carry_out(end))

    async def carry_out(self, end: End) -> None:
        call = self.call
        await self.let_playback_finish("the handover line" if end.kind == "transfer" else "the goodbye")
        if call.record.twilio_stopped:  # the caller hung up while it played: nothing is left to end or move
            call.floor.ending_failed()
            return
        if end.kind == "hang_up":
            await self.hang_up(end)
            return
        failure = await self.transfer()
        if failure:  # the agent is told, so it can apologise and carry on: never silence
            call.floor.ending_failed()
            note = f"The transfer failed: {failure}. Apologise to the caller and go on helping them yourself."
            await call.add_to_conversation(text_message(note, role="system"))

    def why_twilio_stopped(self) -> str:
        """Twilio said "stop": for the log, what that means."""
        if self.asked == "transfer":
            return "Twilio stopped the stream: the call is being transferred"
        if self.asked == "hang up":
            return "Twilio stopped the stream: the relay is hanging up"
        return "the caller hung up (Twilio stopped the stream)"

    async def let_playback_finish(self, what: str) -> None:
        """Wait until the caller has heard the agent's last words: as long as they take to play.

        A voicemail message can be many seconds of audio still queued on the phone.
        """
        playback = self.call.phone.playback
        try:
            async with asyncio.timeout(max(0.0, playback.playing_until - time.monotonic()) + PLAYBACK_SLACK):
                await playback.drained.wait()
        except TimeoutError:
            self.call.log.warning("%s is still playing %g s after it should have ended", what, PLAYBACK_SLACK)

    async def hang_up(self, end: End) -> None:
        call = self.call
        call.relay.stats.count("relay_hang_ups_total", end.cause)
        call.log.info("hanging up: %s", end.reason)
        try:
            if call.config.twilio_rest and call.phone.rest_sid:
                with contextlib.suppress(TwilioError):
                    await self.twilio_rest("hang up", "", {"Status": "completed"})
        finally:  # whatever Twilio's REST API did, the call ends
            await call.phone.twilio.close(1000, "call ended")

    async def transfer(self) -> str:
        """Have Twilio dial TRANSFER_TO for this caller; Twilio then stops the stream."""
        call = self.call
        target = masked(call.config.transfer_to)
        if call.phone.browser:
            return "the browser phone cannot be transferred to a phone number"
        call.log.info("transferring to %s", target)
        try:
            await self.twilio_rest("transfer", "", {"Twiml": transfer_twiml(call.config)})
        except TwilioError as error:
            call.relay.stats.count("relay_transfers_total", "failed")
            return str(error)
        call.relay.stats.count("relay_transfers_total", "ok")
        call.log.info("transferred to %s", target)
        return ""

    async def record(self) -> None:
        """Start recording the call, caller and agent on separate channels."""
        with contextlib.suppress(TwilioError):
            reply = await self.twilio_rest("start recording", "/Recordings", {"RecordingChannels": "dual"})
            self.call.record.recording_sid = str(reply.get("sid") or "")
            self.call.log.info("recording the call: %s", reply.get("sid"))

    async def twilio_rest(self, what: str, resource: str, fields: Mapping[str, str]) -> dict[str, Any]:
        """POST to ``Calls/{CallSid}{resource}.json`` off the event loop; a failure is logged and counted."""
        self.asked = what
        try:
            if not self.call.call_sid:
                raise TwilioError("the stream has no callSid")
            path = f"Calls/{self.call.call_sid}{resource}.json"
            return await asyncio.to_thread(twilio_post, self.call.config.twilio_rest, path, fields)  # type: ignore[arg-type]
        except TwilioError as error:
            self.call.relay.count_error("twilio_rest")
            self.call.log.error("Twilio did not %s: %s", what, error)
            raise


class ToolRunner:
    """The model's function calls, run beside the pumps, and what the remote MCP server did."""

    def __init__(self, call: Call) -> None:
        self.call = call

    async def on_output_item(self, item: Any) -> None:
        """The model finished an output item: run function calls, note MCP calls."""
        if not isinstance(item, dict):
            return
        if item.get("type") == "function_call":
            self.call.floor.tool_started()
            self.call.spawn(self.run(item))
        elif item.get("type") == "mcp_call":
            self.call.floor.owe()  # OpenAI ran it, but does not answer with its result by itself
            error = item.get("error")
            entry = self.call.record.tool(str(item.get("name")), "error" if error else "ok", None,
                                          str(item.get("server_label")))
            await self.call.phone.show({"event": "tool", **entry})
            outcome = f"error ({str(error.get('message') if isinstance(error, dict) else error)[:200]})"
            self.call.log.info("MCP tool %s on %s: %s", item.get("name"), item.get("server_label"),
                          outcome if error else "ok")
            self.call.transcript.note("system", tool_note(item.get("name"), item.get("arguments"),
                                                      outcome if error else item.get("output")))

    async def run(self, item: dict[str, Any]) -> None:
        """Run one function call, give the model its output, then let the floor decide who speaks."""
        name, session, started = str(item.get("name")), self.call.link.outbox.live, time.monotonic()
        try:
            outcome, output = await self.call_tool(name, item.get("arguments"))
        finally:  # the floor must never wait for a tool that is gone
            self.call.floor.tool_finished()
        seconds = time.monotonic() - started
        known = name if name in self.call.relay.tools else "unknown"  # a label's values must stay few
        self.call.relay.stats.count("relay_tool_calls_total", known, outcome)
        self.call.relay.stats.observe("relay_tool_call_seconds", seconds)
        await self.call.phone.show({"event": "tool", **self.call.record.tool(name, outcome, seconds)})
        self.call.log.info("tool %s: %s in %.0f ms", name[:64], outcome, seconds * 1000)
        summary = tool_note(name, item.get("arguments"), output)
        self.call.transcript.note("system", summary)
        if self.call.link.outbox.live is session:
            await self.call.add_to_conversation(
                {"type": "function_call_output", "call_id": item.get("call_id"), "output": output})
        else:  # the call has moved to a new session (or is between two), which never saw the function call
            await self.call.add_to_conversation(text_message(summary, role="system"))

    async def on_conversation_item(self, item: Any) -> None:
        """MCP items that come outside a response: the server's tool list, approval requests."""
        if not isinstance(item, dict):
            return
        if item.get("type") == "mcp_list_tools":
            tools = item.get("tools")
            self.call.log.info("MCP server %s offers %d tool(s)", item.get("server_label"),
                          len(tools) if isinstance(tools, list) else 0)
        elif item.get("type") == "mcp_approval_request":
            # require_approval is "never", so this should not come; deny it so the answer goes on.
            self.call.log.warning("MCP server %s asked to approve %s: denied (nobody on a phone line can approve)",
                             item.get("server_label"), item.get("name"))
            await self.call.add_to_conversation(
                {"type": "mcp_approval_response", "approval_request_id": item.get("id"), "approve": False,
                 "reason": "Tool calls cannot be approved during a phone call."})

    def on_mcp_event(self, kind: str, event: dict[str, Any]) -> None:
        """Say what the remote MCP server did; its tools are called by OpenAI, not by the relay."""
        if kind == "mcp_list_tools.failed":
            self.call.relay.count_error("mcp_list_tools")
            self.call.log.error("OpenAI could not list the tools of MCP server %s at %s: the call goes on without them",
                           self.call.config.mcp_server_label, self.call.config.mcp_server_url)
        else:
            self.call.log.warning("an MCP tool call on %s failed (item %s)", self.call.config.mcp_server_label,
                             event.get("item_id"))

    async def call_tool(self, name: str, arguments: Any) -> tuple[str, str]:
        """Call a tool with the model's arguments; return the outcome and the JSON output.

        Nothing the model or the tool does raises here: every failure becomes an
        ``{"error": ...}`` output the model can read and talk about.
        """
        tool = self.call.relay.tools.get(name)
        if tool is None or not tool.offered_if(self.call.config):
            self.call.log.warning("the model called an unknown tool %r", name[:64])
            return "unknown_tool", json.dumps({"error": f"There is no tool named {name!r}."})
        try:
            parsed = json.loads(arguments or "{}")
            if not isinstance(parsed, dict):
                raise ValueError("the arguments must be a JSON object")
            bound = inspect.signature(tool.function).bind(self.call, **parsed)
        except (ValueError, TypeError, RecursionError) as error:  # RecursionError: JSON nested too deep
            self.call.log.warning("tool %s: bad arguments from the model: %s", name, error)
            return "bad_arguments", json.dumps({"error": f"Bad arguments: {error}"})
        self.call.log.debug("tool %s arguments: %s", name, parsed)  # DEBUG only: they may be personal data
        try:
            async with asyncio.timeout(tool.timeout):
                result = await tool.function(*bound.args, **bound.kwargs)
            return "ok", json.dumps(result)
        except TimeoutError:
            self.call.log.warning("tool %s did not finish within %g s", name, tool.timeout, exc_info=True)
            return "timeout", json.dumps({"error": f"The tool did not finish within {tool.timeout:g} seconds."})
        except Exception as error:  # a tool's bug must not end the call
            self.call.log.warning("tool %s failed", name, exc_info=True)
            return "error", json.dumps({"error": f"{type(error).__name__}: {error}"})
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise  # the call is ending
            self.call.log.warning("tool %s was cancelled by something it awaited", name, exc_info=True)
            return "error", json.dumps({"error": "The tool was cancelled."})


def how_it_ended(ending: End | None, ended: bool, openai_failed: bool, twilio_stopped: bool,
                 shutting_down: bool) -> str:
    """The call's ending in one word, for its report and its last log line (README, After the call).

    An ending the relay began says it all. Otherwise OpenAI failed the call, or Twilio said
    "stop" (the caller hung up), or Twilio's connection closed without it: the relay's own
    shutdown, or a lost connection.
    """
    if ending is not None and ended:
        return ending.cause  # agent_hung_up, voicemail, time_limit, silence or transferred
    if openai_failed:
        return "openai_failed"
    if twilio_stopped:
        return "caller_hung_up"
    return "shutdown" if shutting_down else "twilio_lost"


class CallRecord:
    """What the call's report will say, gathered as the call goes; the words are the Transcript's.

    Facts only, no I/O: the tool calls (name, outcome, duration; never their arguments or
    output), barge-ins, sessions, reconnects, the recording, and the tokens of every response.
    """

    def __init__(self, stats: Stats) -> None:
        self.stats = stats  # the relay's, which counts tokens too
        self.started_at = datetime.datetime.now(datetime.timezone.utc)
        self.twilio_stopped = False  # Twilio said "stop": someone hung up
        self.tools: list[dict[str, Any]] = []
        self.barge_ins = 0
        self.sessions = 0
        self.reconnects = 0
        self.recording_sid = ""
        self.responses = 0
        self.tokens: collections.Counter[str] = collections.Counter()  # see token_counts
        self.summary = ""
        self.caller_done_at: float | None = None  # the caller's last end of speech, until audio answers it

    def tool(self, name: str, outcome: str, seconds: float | None, server: str = "") -> dict[str, Any]:
        """Note a tool call; return the entry."""
        call = {"name": name[:64], "outcome": outcome, "durationMs": None if seconds is None else round(seconds * 1000)}
        self.tools.append({**call, "server": server} if server else call)
        return self.tools[-1]

    def response_done(self, response: Any) -> None:
        """A response is done: add its tokens to the call's and the relay's."""
        counts = token_counts(response.get("usage") if isinstance(response, dict) else None)
        self.responses += 1
        self.tokens.update(counts)
        for direction, kind in TOKEN_KINDS:
            self.stats.count("relay_tokens_total", direction, kind, n=counts.get(f"{direction}_{kind}", 0))

    def answered(self) -> float:
        """The agent's answer reached the phone: seconds since the caller stopped speaking."""
        waited = time.monotonic() - (self.caller_done_at or 0.0)
        self.caller_done_at = None
        return waited

    def report(self, call: Call, how: str, ended_at: datetime.datetime) -> dict[str, Any]:
        """The call's report, for CALL_REPORT_URL; every field is in README, After the call."""
        parameters, tokens = call.parameters, self.tokens
        return {
            "callSid": call.call_sid,
            "streamSid": call.stream_sid,
            "direction": call.phone.direction,
            "from": parameters.get("from"),
            "to": parameters.get("to"),
            "answeredBy": parameters.get("answered_by"),
            "parameters": parameters,
            "startedAt": iso_utc(self.started_at),
            "endedAt": iso_utc(ended_at),
            "durationSeconds": round((ended_at - self.started_at).total_seconds(), 3),
            "ending": how,
            "transferredTo": masked(call.config.transfer_to) if how == "transferred" else None,
            "transcript": call.transcript.spoken(),
            "tools": self.tools,
            "bargeIns": self.barge_ins,
            "openaiSessions": self.sessions,
            "reconnects": self.reconnects,
            "recordingSid": self.recording_sid or None,
            "usage": {"responses": self.responses, "inputTokens": tokens["input"], "outputTokens": tokens["output"],
                      "input": {"text": tokens["input_text"], "audio": tokens["input_audio"],
                                "cached": tokens["input_cached"], "cachedText": tokens["input_cached_text"],
                                "cachedAudio": tokens["input_cached_audio"]},
                      "output": {"text": tokens["output_text"], "audio": tokens["output_audio"]}},
            "summary": self.summary or None,
        }


class CallLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefix every line with the call it belongs to, so busy logs stay readable."""

    def __init__(self, number: int, phone: Phone) -> None:
        super().__init__(logger)
        self.number = number  # the relay's count of calls, for the lines before Twilio names the call
        self.phone = phone
        self.warned: set[str] = set()

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        phone = self.phone
        return f"[call {self.number} {phone.call_sid or '-'} {phone.stream_sid or '-'}] {msg}", kwargs

    def warn_once(self, kind: str, msg: str, *args: Any) -> None:
        """Warn about a kind of problem the first time it happens in this call."""
        if kind not in self.warned:
            self.warned.add(kind)
            self.warning(msg, *args)


class Call:
    """One phone call: the two pumps, handing each event to the part it belongs to.

    Tools get the call too: ``call_sid``, ``stream_sid``, ``started_at`` and ``parameters``
    (the ``<Parameter>``s of the TwiML) say which call it is, and ``log`` names it.
    """

    def __init__(self, relay: Relay, twilio: ServerConnection, number: int, browser: bool = False) -> None:
        self.relay = relay
        self.persona = persona_for_call(relay.config, {})  # made the call's own at "start"
        self.tasks: set[asyncio.Task[None]] = set()  # everything the call runs beside its pumps
        self.floor = Floor(relay.config.idle_prompts)
        self.phone = Phone(twilio, relay.stats, browser)
        self.log = CallLog(number, self.phone)
        self.transcript = Transcript()  # the conversation as text, for a new session to carry on
        self.record = CallRecord(relay.stats)
        self.link = OpenAILink(self)
        self.continuity = Continuity(self)
        self.dead_air = DeadAir(self)
        self.caller_audio = CallerAudio(self.link.outbox.send, self.spawn)
        self.control = CallControl(self)
        self.tool_runner = ToolRunner(self)

    @property
    def config(self) -> Config:
        return self.relay.config

    @property
    def call_sid(self) -> str:
        return self.phone.call_sid

    @property
    def stream_sid(self) -> str:
        return self.phone.stream_sid

    @property
    def parameters(self) -> dict[str, str]:
        return self.phone.parameters

    @property
    def started_at(self) -> datetime.datetime:
        return self.record.started_at

    async def run(self) -> None:
        """Run both pumps until either side ends, then close both sockets."""
        pumps = [asyncio.create_task(self.twilio_to_openai()), asyncio.create_task(self.openai_to_twilio())]
        clock = asyncio.create_task(self.control.watch_the_clock())
        try:
            done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is not None:
                    self.relay.count_error("relay_bug")
                    self.log.error("pump failed", exc_info=task.exception())
        finally:
            self.phone.playback.drained.set()  # the phone has stopped playing: an ending need not wait for it
            if self.control.task is not None:  # let a hang-up or transfer that Twilio has begun finish
                await asyncio.wait({self.control.task}, timeout=TWILIO_REST_TIMEOUT)
            self.caller_audio.stop()
            tasks = [*pumps, clock, *self.tasks]
            for task in tasks:
                task.cancel()
            if self.link.session is not None:  # no rollover now: the session is kept for the summary
                self.link.session.stop_rollover()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.dead_air.stop()  # after the pumps, which may have timed a silence as they ended
            await self.phone.twilio.close(1011 if self.link.failed else 1000)

    async def wrap_up(self, active: int) -> None:
        """After the call: the summary if asked for, then close OpenAI, log the call, send its report.

        The caller has gone; OpenAI is still open, for a summary to be asked of it.
        """
        try:
            if self.config.call_summary and self.stream_sid:
                self.record.summary = await self.link.summary(speaking=self.floor.responding)
        finally:
            await self.link.close()
        ended_at = datetime.datetime.now(datetime.timezone.utc)
        how = how_it_ended(self.floor.ending, self.floor.ended, self.link.failed, self.record.twilio_stopped,
                           self.relay.draining)
        tokens = self.record.tokens
        self.log.info("call ended: %s, %.0f s, %d turn(s), tokens in %d out %d (%d active)", how,
                      (ended_at - self.started_at).total_seconds(), len(self.transcript.spoken()),
                      tokens["input"], tokens["output"], active)
        if self.config.call_report_url and self.call_sid:
            self.relay.reports.send(self.log, self.call_sid, self.record.report(self, how, ended_at))

    def spawn(self, work: Awaitable[None]) -> asyncio.Task[None]:
        """Run ``work`` beside the pumps, as part of this call: it ends with the call."""
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.task_done)
        return task

    def task_done(self, task: asyncio.Task[None]) -> None:
        """Forget a finished task; a failure is a bug of the relay's, and gets its line at once."""
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.relay.count_error("relay_bug")
            self.log.error("a task of the call failed", exc_info=task.exception())

    async def carry_out(self, decision: Decision) -> None:
        """Do what the floor decided: ask for a response, or begin the hang-up or transfer.

        The floor is told of everything that happens on the line before this is called,
        so it is also where a silence that follows is timed.
        """
        if isinstance(decision, End):
            self.control.begin(decision)
        elif decision is not None:
            await self.link.outbox.send(decision)
        self.dead_air.restart()

    async def add_to_conversation(self, item: dict[str, Any]) -> None:
        """Give the model something to answer (a tool's output, a keypad press, a note).

        The item gets an id of the relay's own, so that OpenAI's confirmation tells
        the floor whether a response that starts meanwhile has seen it.
        """
        item["id"] = self.floor.new_item()
        await self.link.outbox.send({"type": "conversation.item.create", "item": item})
        await self.carry_out(self.floor.next())

    # For tools such as end_call: the call ends once the current answer has been played.

    def end_after_answer(self, reason: str) -> None:
        self.floor.end("hang_up", reason, "agent_hung_up")

    def transfer_after_answer(self) -> None:
        self.floor.end("transfer", "the agent transferred the call", "transferred")

    # Twilio -> OpenAI

    async def twilio_to_openai(self) -> None:
        """Forward the caller's audio to OpenAI until Twilio says ``stop`` or hangs up."""
        try:
            async for message in self.phone.twilio:
                try:
                    if not await self.on_twilio_event(read_twilio_frame(message)):
                        return
                except BadInput as bad:  # counted each time, logged once per kind of problem
                    self.relay.count_error("bad_twilio_input")
                    self.log.warn_once(bad.problem, "ignoring bad input from Twilio: %s (%s)", bad.problem, bad.detail)
        except ConnectionClosed as closed:
            if closed.sent is not None and closed.sent.code == 1009:
                self.relay.count_error("twilio_frame_too_big")
                self.log.warning("Twilio sent a frame over %d bytes: closing the call (1009)", MAX_FRAME_BYTES)
            else:
                self.relay.count_error("twilio_connection_lost")
                self.log.warning("Twilio connection lost: %s", closed)

    async def on_twilio_event(self, event: dict[str, Any]) -> bool:
        """Handle one Twilio event; return False when the stream is over."""
        kind = event["event"]
        if kind == "media":
            await self.on_media(event)
        elif kind == "mark":
            name = nested(event, "mark", "name")
            if not isinstance(name, str):
                raise BadInput("mark without mark.name", repr(event)[:120])
            if self.phone.playback.played(name):
                self.dead_air.restart()  # the caller has heard the agent's last words
        elif kind == "start":
            await self.on_start(event)
        elif kind == "dtmf":
            await self.on_dtmf(event)
        elif kind == "stop":
            self.record.twilio_stopped = True
            self.log.info("%s", self.control.why_twilio_stopped())
            await self.caller_audio.flush()
            return False
        elif kind == "connected":
            self.log.debug("Twilio connected")
        else:
            self.log.debug("ignoring unknown Twilio event %r", kind)
        return True

    async def on_start(self, event: dict[str, Any]) -> None:
        self.phone.start(event.get("start"))
        self.relay.stats.count("relay_calls_started_total", self.phone.direction)
        # Names only: the values may be personal data.
        self.log.info("stream started (direction %s, custom parameters: %s)", self.phone.direction,
                      ", ".join(sorted(self.parameters)) or "none")
        voice = self.parameters.get("voice")
        if voice is not None and voice not in VOICES:
            self.log.warning("ignoring the voice parameter: %r is not one of %s", voice[:40], ", ".join(VOICES))
        self.persona = persona_for_call(self.config, self.parameters)
        self.dead_air.restart()  # the line is open: a caller who says nothing is timed from now
        if self.config.record_calls and self.phone.rest_sid:
            self.spawn(self.control.record())
        session = self.link.session
        if session is not None and session.told is not None:  # the session was configured before "start"
            with contextlib.suppress(ConnectionClosed):  # it dropped: the next session is told anyway
                await session.configure(self.config, self.persona, self.relay.tools)
        await self.greet()

    async def on_media(self, event: dict[str, Any]) -> None:
        if not self.stream_sid:
            raise BadInput("media before start", "dropped")
        payload = nested(event, "media", "payload")
        if not isinstance(payload, str):
            raise BadInput("media without media.payload", repr(event)[:120])
        try:
            audio = binascii.a2b_base64(payload, strict_mode=True)
        except binascii.Error:
            raise BadInput("media payload that is not base64", repr(payload[:40])) from None
        self.relay.stats.frames_in += 1
        self.relay.stats.bytes_in += len(audio)
        await self.caller_audio.frame(payload, audio, event["media"])

    async def on_dtmf(self, event: dict[str, Any]) -> None:
        """A keypad press becomes a line of text for the model, so it can run menus."""
        digit = nested(event, "dtmf", "digit")
        if not isinstance(digit, str) or len(digit) != 1 or digit not in "0123456789*#ABCD":
            raise BadInput("dtmf without a valid dtmf.digit", repr(event)[:120])
        self.floor.caller_is_there()
        self.dead_air.restart()
        if not self.config.dtmf:
            return
        self.log.info("the caller pressed a key")  # not which one: it may be a PIN
        press = f"The caller pressed {digit} on the keypad."
        await self.add_to_conversation(text_message(press))
        self.transcript.note("user", press)

    # OpenAI -> Twilio

    async def openai_to_twilio(self) -> None:
        """Forward the agent's audio to Twilio, from one OpenAI session after another."""
        if not await self.link.open(deadline=None, history=[]):  # a refusal at call start fails fast
            return
        await self.carry_out(self.floor.ready())
        while True:
            session = self.link.session
            assert session is not None
            try:
                await self.link.outbox.go_live(session)
                async for message in session.socket:
                    await self.on_openai_message(session, message)
            except ConnectionClosed:
                if session.is_open:
                    return  # Twilio went away while we were sending: its pump ends the call
            if not await self.continuity.after_session(session):
                return

    async def on_openai_message(self, session: OpenAISession, message: str | bytes) -> None:
        try:
            event = json.loads(message)
            kind = event["type"]
        except (ValueError, TypeError, KeyError, RecursionError):
            self.log.warning("ignoring unreadable message from OpenAI: %r", message[:80])
            return
        if kind == "response.output_audio.delta":
            if await self.phone.play(event) and self.record.caller_done_at is not None:
                self.relay.stats.observe("relay_reply_seconds", self.record.answered())
        elif kind == "input_audio_buffer.speech_started":
            session.worked = True
            self.floor.speech_started()
            self.dead_air.restart()
            if isinstance(event.get("item_id"), str):
                self.transcript.begin(event["item_id"], "user")
            await self.on_caller_speech()
        elif kind == "input_audio_buffer.speech_stopped":
            self.record.caller_done_at = time.monotonic()
            self.floor.speech_stopped()
            self.dead_air.restart()
        elif kind == "response.output_item.added":
            item = event.get("item")
            if isinstance(item, dict) and item.get("role") == "assistant" and isinstance(item.get("id"), str):
                self.transcript.begin(item["id"], "assistant")
        elif kind == "response.created":
            session.worked = True
            self.floor.created()
            self.dead_air.restart()
        elif kind in ("conversation.item.added", "conversation.item.created"):
            if isinstance(item_id := nested(event, "item", "id"), str):
                self.floor.confirmed(item_id)
        elif kind == "response.output_item.done":
            await self.tool_runner.on_output_item(event.get("item"))
        elif kind in ("response.output_audio.done", "response.done"):
            await self.phone.finish_item()
            if kind == "response.done":
                self.record.response_done(event.get("response"))
                await self.carry_out(self.floor.done())
        elif kind == "error":
            await self.on_openai_error(session, event)
        elif kind == "session.updated":
            session.update_answered()
            self.log.info("session configured: voice %s", session.told.voice if session.told else "?")
            await self.greet()
        elif kind == "conversation.item.done":
            await self.tool_runner.on_conversation_item(event.get("item"))
        elif kind in MCP_EVENTS:
            self.tool_runner.on_mcp_event(kind, event)
        elif kind == "conversation.item.input_audio_transcription.completed":
            await self.on_transcript("user", "caller", event)
        elif kind == "response.output_audio_transcript.done":
            await self.on_transcript("assistant", "agent", event)

    async def on_caller_speech(self) -> None:
        """Barge-in: stop the phone playing the agent, and tell OpenAI what the caller heard."""
        cut = await self.phone.clear()
        if cut is None:
            return  # nothing is playing: there is nothing to stop
        await self.link.outbox.send({"type": "conversation.item.truncate", "item_id": cut.item_id,
                                     "content_index": cut.content_index, "audio_end_ms": cut.heard_ms})
        self.transcript.cut_off(cut.item_id, cut.heard_ms, cut.sent_ms)
        await self.phone.show_turn(cut.item_id, self.transcript.turns.get(cut.item_id))
        self.relay.stats.count("relay_barge_ins_total")
        self.record.barge_ins += 1
        self.log.info("the caller interrupted: heard %d ms of %d ms sent", cut.heard_ms, cut.sent_ms)

    async def greet(self) -> None:
        """Have the agent speak first, once the session is configured and the stream has started.

        On an answering machine, the first words are the whole call: it ends once they have played.
        """
        session = self.link.session
        persona = self.persona
        if not (persona.greeting or persona.voicemail) or not self.stream_sid or session is None or not session.configured:
            return
        request = self.floor.greet(greeting_instructions(persona))
        if request is not None and persona.voicemail:
            self.log.info("leaving the voicemail message")
            self.floor.end("hang_up", "the voicemail message has been left", "voicemail")
        await self.carry_out(request)

    async def on_openai_error(self, session: OpenAISession, event: dict[str, Any]) -> None:
        """Errors mean OpenAI ignored something we sent (a bad field keeps the old config)."""
        error = event["error"] if isinstance(event.get("error"), dict) else {}
        about = str(error.get("event_id") or "")  # the relay's event it is about, if any
        self.relay.count_error("openai_error")
        self.log.error("OpenAI error: type=%s code=%s message=%s param=%s%s", error.get("type"), error.get("code"),
                       error.get("message"), error.get("param"), f" (about {about})" if about else "")
        if about.startswith("session_update_"):
            session.update_answered()  # a refused update is an answer too: the old settings stay
            await self.greet()
        if error.get("code") == "session_expired":
            if self.config.session_continuity:  # the planned rollover came too late: carry on anyway
                await session.close("expired")
                return
            await self.phone.finish_item()  # no more audio comes: the ending waits only for what was sent
            await self.carry_out(self.floor.end_now("hang_up", "the OpenAI session expired", "time_limit"))
            return
        await self.carry_out(self.floor.refused(about, str(error.get("code"))))

    async def on_transcript(self, role: str, who: str, event: dict[str, Any]) -> None:
        """Keep what was said for a new session; log it only if LOG_TRANSCRIPTS asks."""
        text, item_id = event.get("transcript"), event.get("item_id")
        if not isinstance(text, str) or not isinstance(item_id, str):
            return
        self.transcript.write(item_id, role, text)
        if self.config.log_transcripts:
            self.log.info("%s: %s", who, text)
        await self.phone.show_turn(item_id, self.transcript.turns.get(item_id))


# 5. The relay: HTTP routes and shared bookkeeping --------------------------------


# What /metrics shows, in this order: each metric's name, type and help, then the labels it is
# counted by (Stats.count) or, for a histogram, the upper bounds of its buckets (Stats.observe).
METRICS: tuple[tuple[str, str, str, tuple[Any, ...]], ...] = (
    ("relay_calls_active", "gauge", "Calls in progress.", ()),
    ("relay_calls_total", "counter", "Calls accepted.", ()),
    ("relay_calls_started_total", "counter", "Streams started, by direction (browser: /phone).", ("direction",)),
    ("relay_calls_refused_total", "counter", "Handshakes refused, by reason.", ("reason",)),
    ("relay_call_duration_seconds", "histogram", "Length of finished calls.", (10, 30, 60, 120, 300, 600, 1800, 3600)),
    ("relay_openai_connect_seconds", "histogram", "Time to open the OpenAI WebSocket.",
     (0.1, 0.25, 0.5, 1, 2.5, 5, 10)),
    ("relay_errors_total", "counter", "Errors, by kind.", ("kind",)),
    ("relay_audio_frames_total", "counter", "Audio messages forwarded, by direction.", ("direction",)),
    ("relay_audio_bytes_total", "counter", "Audio bytes (mu-law) forwarded, by direction.", ("direction",)),
    ("relay_barge_ins_total", "counter", "Times the caller interrupted the agent.", ()),
    ("relay_frames_dropped_total", "counter", "Audio messages dropped, by reason.", ("reason",)),
    ("relay_tool_calls_total", "counter", "Tool calls run by the relay, by tool and outcome.", ("tool", "outcome")),
    ("relay_tool_call_seconds", "histogram", "Time tools took, timeouts included.",
     (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)),
    ("relay_transfers_total", "counter", "Transfers to TRANSFER_TO, by outcome.", ("outcome",)),
    ("relay_openai_reconnects_total", "counter", "Calls carried over to a new OpenAI session, by reason.", ("reason",)),
    ("relay_hang_ups_total", "counter", "Calls the relay hung up, by cause (silence: an idle caller).", ("cause",)),
    ("relay_idle_check_ins_total", "counter", "Times the agent asked a silent caller if they are there.", ()),
    ("relay_tool_fillers_total", "counter", "Lines the agent said to fill a slow tool's wait.", ()),
    ("relay_tokens_total", "counter", "OpenAI tokens, from every response.done (cached: part of input).",
     ("direction", "kind")),
    ("relay_reply_seconds", "histogram", "From the caller's end of speech to the answer's first audio.",
     (0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10)),
    ("relay_outbound_answered_total", "counter", "Outbound calls by who answered (AnsweredBy).", ("answered_by",)),
    ("relay_call_reports_total", "counter", "Call reports sent to CALL_REPORT_URL, by outcome.", ("outcome",)),
)
TOKEN_KINDS = (("input", "text"), ("input", "audio"), ("input", "cached"), ("output", "text"), ("output", "audio"))


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


class Stats:
    """What the relay has done since it started, for /health and /metrics (see METRICS)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.calls = 0  # accepted so far: each call's number
        # Plain numbers, not counts by label: they change with every audio message.
        self.frames_in = self.bytes_in = 0  # caller audio forwarded to OpenAI
        self.frames_out = self.bytes_out = 0  # agent audio forwarded to Twilio
        self.counts: collections.Counter[tuple[str, ...]] = collections.Counter()  # (metric, *labels) -> n
        self.counts.update({("relay_tokens_total", *kind): 0 for kind in TOKEN_KINDS})  # shown from the start
        self.histograms = {name: Histogram(bounds) for name, kind, _, bounds in METRICS if kind == "histogram"}

    def count(self, metric: str, *labels: str, n: int = 1) -> None:
        self.counts[(metric, *labels)] += n

    def observe(self, metric: str, value: float) -> None:
        self.histograms[metric].observe(value)

    def errors(self, kind: str | None = None) -> int:
        """Errors of one kind, or of every kind."""
        if kind is not None:
            return self.counts["relay_errors_total", kind]
        return sum(n for key, n in self.counts.items() if key[0] == "relay_errors_total")

    def lines(self, active: int) -> list[str]:
        """Every metric in Prometheus' text format, with ``active`` calls in progress."""
        samples: dict[str, list[tuple[tuple[str, ...], int]]] = collections.defaultdict(list)
        current = {("relay_calls_active",): active, ("relay_calls_total",): self.calls,
                 ("relay_audio_frames_total", "caller_to_openai"): self.frames_in,
                 ("relay_audio_frames_total", "openai_to_caller"): self.frames_out,
                 ("relay_audio_bytes_total", "caller_to_openai"): self.bytes_in,
                 ("relay_audio_bytes_total", "openai_to_caller"): self.bytes_out}
        for (name, *values), n in sorted({**self.counts, **current}.items()):
            samples[name].append((tuple(values), n))
        lines: list[str] = []
        for name, kind, help_text, labels in METRICS:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            if kind == "histogram":
                lines += self.histograms[name].lines(name)
            elif not labels:
                lines.append(f"{name} {dict(samples[name]).get((), 0)}")
            else:
                lines += [f"{name}{{{label_pairs(labels, values)}}} {n}" for values, n in samples[name]]
        return lines


def label_pairs(labels: tuple[str, ...], values: tuple[str, ...]) -> str:
    """Prometheus labels, their values escaped: a tool's name, say, must not break the format."""
    escaped = (value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n") for value in values)
    return ",".join(f'{label}="{value}"' for label, value in zip(labels, escaped, strict=True))


def report_signature(secret: str, body: bytes, timestamp: int) -> str:
    """X-Relay-Signature, as Stripe signs webhooks: the time, and an HMAC-SHA256 of "<time>.<body>"."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def post_report(config: Config, call_sid: str, body: bytes) -> tuple[str, bool]:
    """One try at delivering a report; return what went wrong ("" for nothing) and whether to retry.

    Blocking (urllib): run it with ``in_a_thread_of_its_own``. Signed afresh for each try,
    so that a receiver may refuse an old timestamp.
    """
    headers = {"Content-Type": "application/json", "Idempotency-Key": call_sid, "User-Agent": "relay.py"}
    if config.call_report_secret:
        headers["X-Relay-Signature"] = report_signature(config.call_report_secret, body, int(time.time()))
    request = urllib.request.Request(config.call_report_url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=REPORT_TIMEOUT) as reply:
            reply.read()
        return "", False
    except urllib.error.HTTPError as error:
        return f"HTTP {error.code}", error.code == 429 or error.code >= 500
    except (OSError, ValueError, http.client.HTTPException) as error:  # refused, unreachable, timed out, cut off
        return f"no answer ({error})", True


async def in_a_thread_of_its_own(function: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking ``function`` in a daemon thread, which never holds up the relay's exit.

    The threads of ``asyncio.to_thread`` are waited for at exit: a report to a receiver that
    hangs would keep a stopping relay alive for the whole REPORT_TIMEOUT after its drain.
    """
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if finished.done():  # cancelled meanwhile
            return
        if error is None:
            finished.set_result(result)
        else:
            finished.set_exception(error)

    def work() -> None:
        result, error = None, None
        try:
            result = function(*args)
        except BaseException as problem:  # handed to the awaiting task, as to_thread does
            error = problem
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, daemon=True).start()
    return await finished


class CallReports:
    """Each call's report, on its way to CALL_REPORT_URL: signed, retried, never in a call's way."""

    def __init__(self, config: Config, stats: Stats) -> None:
        self.config = config
        self.stats = stats
        self.sending: dict[asyncio.Task[None], str] = {}  # each delivery, and its call's SID

    def send(self, log: CallLog, call_sid: str, report: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self.deliver(log, call_sid, json.dumps(report).encode()))
        self.sending[task] = call_sid
        task.add_done_callback(self.sending.pop)

    async def deliver(self, log: CallLog, call_sid: str, body: bytes) -> None:
        """Try, and try again after a network error, a timeout, 429 or 5xx; never log the body."""
        pauses = iter(REPORT_RETRY_DELAYS)
        while True:
            problem, retry = await in_a_thread_of_its_own(post_report, self.config, call_sid, body)
            if not problem:
                self.stats.count("relay_call_reports_total", "delivered")
                log.info("call report delivered")
                return
            pause = next(pauses, None) if retry else None
            if pause is None:
                break
            log.warning("call report not delivered yet: %s; trying again in %g s", problem, pause)
            await asyncio.sleep(pause)
        self.stats.count("relay_call_reports_total", "failed")
        log.error("call report for %s could not be delivered: %s", call_sid, problem)

    async def drain(self, seconds: float) -> None:
        """At shutdown: give the reports on their way up to ``seconds``; log those that cannot go."""
        if not self.sending:
            return
        logger.info("delivering %d call report(s), for up to %g s", len(self.sending), seconds)
        _, late = await asyncio.wait(list(self.sending), timeout=seconds)
        for task in late:
            self.stats.count("relay_call_reports_total", "failed")
            logger.error("call report for %s could not be delivered before shutdown", self.sending[task])
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)


class Relay:
    """Accepts Twilio's WebSockets, answers plain HTTP routes, and counts what happens."""

    def __init__(self, config: Config, tools: Mapping[str, Tool] = TOOLS,
                 agents: Mapping[str, Mapping[str, str]] = AGENTS) -> None:
        self.config = config
        self.tools = tools  # the agent's tools: relay.py's own, unless a test brings its set
        self.agents = agents  # the agent of each number (AGENTS), for /twiml
        self.stats = Stats()
        self.calls: set[Call] = set()
        self.warm = WarmSessions(config, tools)
        self.reports = CallReports(config, self.stats)
        self.draining = False  # set at shutdown: running calls finish, new ones are refused

    def count_error(self, kind: str) -> None:
        self.stats.count("relay_errors_total", kind)

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Answer the plain HTTP routes; check every other request before it becomes a call.

        Everything here happens before any OpenAI connection is opened, so a refused
        request costs nothing.
        """
        path = urllib.parse.urlsplit(request.path).path
        if request.method not in ("GET", "HEAD") and (request.method, path) != ("POST", "/twiml"):
            response = self.refuse(connection, request, "method", 405,
                                   "Only GET here; POST is for /twiml, Twilio's webhook.\n")
            response.headers["Allow"] = "GET, POST" if path == "/twiml" else "GET, HEAD"
            return response
        form: list[tuple[str, str]] = []
        if request.method == "POST":
            form_or_refusal = self.posted_form(connection, request)
            if isinstance(form_or_refusal, Response):
                return form_or_refusal
            form = form_or_refusal
        if path == "/health":
            return json_response(self.health(), head=request.method == "HEAD")
        if path == "/metrics":
            return text_response(self.metrics(), "text/plain; version=0.0.4; charset=utf-8")
        if path == "/ready":
            readiness = self.readiness()
            status = 200 if readiness["status"] == "ready" else 503
            return json_response(readiness, status, head=request.method == "HEAD")
        websocket = request.method == "GET" and header(request, "Upgrade").lower() == "websocket"
        if path in ("/phone", "/browser-phone"):
            refusal = self.browser_phone_refusal(connection, request, path, websocket)
            if refusal is not None:
                return refusal
            if path == "/phone":
                return text_response(PHONE_PAGE, "text/html; charset=utf-8")
        elif path != "/twiml" and not websocket:
            return connection.respond(
                426,
                "This is a Twilio Media Streams endpoint: point <Stream url=\"wss://...\"> "
                "at it. TwiML: /twiml  Health check: /health\n",
            )
        if path != "/browser-phone" and self.config.twilio_auth_token and not self.signed_by_twilio(
                request, websocket, form):
            return self.refuse(connection, request, "signature", 403, "Invalid Twilio signature.\n")
        if path == "/twiml" and not websocket:
            query = urllib.parse.parse_qsl(urllib.parse.urlsplit(request.path).query, keep_blank_values=True)
            fields = dict(form if request.method == "POST" else query)
            return text_response(self.twiml(request, fields, dict(query)), "text/xml")
        if self.draining or len(self.calls) >= self.config.max_calls:
            reason, why = ("draining", "The relay is shutting down") if self.draining else ("capacity", "Too many calls")
            response = self.refuse(connection, request, reason, 503, f"{why}; try again soon.\n")
            response.headers["Retry-After"] = "5"
            return response
        return None

    def browser_phone_refusal(self, connection: ServerConnection, request: Request, path: str,
                              websocket: bool) -> Response | None:
        """The browser phone's page and its call need BROWSER_PHONE=on and the token, checked in constant time.

        A refusal comes before any OpenAI dial: the token is all that stands between the
        page and the owner's OpenAI key. Twilio's path keeps its own signature check.
        """
        if not self.config.browser_phone:
            return connection.respond(404, "The browser phone is off: set BROWSER_PHONE=on to serve /phone.\n")
        token = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(request.path).query)).get("token", "")
        if not hmac.compare_digest(token.encode(), self.config.browser_phone_token.encode()):
            status = 403 if websocket else 401
            return self.refuse(connection, request, "token", status, "A wrong or missing token: open the URL the "
                               "relay logged at start-up.\n")
        if path == "/browser-phone" and not websocket:
            return connection.respond(426, "This is the browser phone's WebSocket: open /phone in a browser.\n")
        return None

    def posted_form(self, connection: ServerConnection, request: Request) -> list[tuple[str, str]] | Response:
        """The form of POST /twiml (read by WebhookConnection), or why it is refused."""
        assert isinstance(connection, WebhookConnection)  # serve_calls makes every connection one
        if connection.form_problem is not None:
            status, problem = connection.form_problem
            return self.refuse(connection, request, "form", status, problem + "\n")
        assert connection.form is not None  # a POST reaches the parser with one or the other
        if not header(request, "Content-Type").lower().startswith("application/x-www-form-urlencoded"):
            return self.refuse(connection, request, "form", 415,
                               "POST /twiml takes a form (application/x-www-form-urlencoded), as Twilio sends.\n")
        return connection.form

    def refuse(self, connection: ServerConnection, request: Request, reason: str, status: int, text: str) -> Response:
        self.stats.count("relay_calls_refused_total", reason)
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

    def signed_by_twilio(self, request: Request, websocket: bool, form: list[tuple[str, str]]) -> bool:
        """Check X-Twilio-Signature: base64 HMAC-SHA1, keyed by the auth token, of the URL.

        For a POST, Twilio signs the URL followed by each form field's name and value,
        sorted by name. Like Twilio's own validator, accept the URL with and without its
        default port.
        """
        signature = header(request, "X-Twilio-Signature")
        if not signature:
            return False
        key = self.config.twilio_auth_token.encode()
        given = signature.encode("utf-8", "replace")  # headers may hold any bytes
        fields = "".join(name + value for name, value in sorted(form))
        for url in url_forms(self.public_origin(request, websocket) + request.path):
            digest = hmac.new(key, (url + fields).encode("utf-8", "replace"), hashlib.sha1).digest()
            if hmac.compare_digest(base64.b64encode(digest), given):
                return True
        return False

    def twiml(self, request: Request, fields: Mapping[str, str], query: Mapping[str, str]) -> str:
        """TwiML for a call: connect it to this relay, or hang up on a machine (GET or POST).

        Twilio's webhook fields (the query of a GET, the form of a POST) say who is calling
        whom, and for an outbound call with answering machine detection who answered.
        Passed on as ``<Parameter>``s, with the number's entry in AGENTS and the URL's own
        fields (``relay.py call`` writes them; Twilio's own start with a capital), they let
        the agent and the tools know it too.
        """
        call_sid = fields.get("CallSid", "")
        call = call_sid if re.fullmatch(r"CA[0-9a-f]{32}", call_sid) else "-"
        own = {name: value for name, value in query.items() if name[:1].islower()}
        voicemail = own.pop("voicemail", "")
        answered_by = fields.get("AnsweredBy", "")
        if answered_by:
            self.stats.count("relay_outbound_answered_total", answered_by if answered_by in ANSWERED_BY else "other")
        machine = answered_by.startswith("machine") and bool(voicemail)
        answer = f", answered by {answered_by[:40]}" if answered_by else ""
        if answered_by == "fax" or (machine and voicemail == "hangup"):
            logger.info("TwiML for call %s (%s /twiml)%s: hanging up", call, request.method, answer)
            return '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Hangup/></Response>\n'
        logger.info("TwiML for call %s (%s /twiml)%s%s", call, request.method, answer,
                    ": the agent leaves the voicemail message" if machine else "")
        ours = fields.get("From" if own.get("direction") == "outbound" else "To", "")
        parameters = {**self.agents.get(ours, {}),
                      **{name: fields[field] for name, field in WEBHOOK_PARAMETERS if field in fields},
                      **own, **({"voicemail": voicemail} if machine else {})}
        stream_url = self.public_origin(request, websocket=True) + "/media-stream"
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Response>\n'
            f"  {connect_stream(stream_url, parameters)}\n"
            f"  <Say>{xml.sax.saxutils.escape(self.stream_end_message)}</Say>\n"
            "  <Hangup/>\n</Response>\n"
        )

    @property
    def stream_end_message(self) -> str:
        """What the caller hears if the stream ends without the relay hanging up through REST."""
        return CUT_OFF_MESSAGE if self.config.twilio_rest else STREAM_END_MESSAGE

    def health(self) -> dict[str, Any]:
        now = datetime.datetime.now(datetime.timezone.utc)
        return {
            "status": "healthy",
            "uptime": f"{time.monotonic() - self.stats.started:.0f}s",
            "timestamp": iso_utc(now),
            "connections": {"active": len(self.calls), "total": self.stats.calls},
            "errors": self.stats.errors(),
            "openai_configured": True,
        }

    def readiness(self) -> dict[str, Any]:
        """For a load balancer: may this instance be sent another call? 503 when it may not."""
        if self.draining:
            state = "draining"
        elif len(self.calls) >= self.config.max_calls:
            state = "full"
        else:
            state = "ready"
        return {"status": state, "calls": len(self.calls), "max_calls": self.config.max_calls}

    def metrics(self) -> str:
        """The Prometheus text format, written by hand: it is a few lines of text."""
        return "\n".join(self.stats.lines(len(self.calls))) + "\n"

    async def handle(self, twilio: ServerConnection) -> None:
        """Carry one call from accept to hang-up."""
        self.stats.calls += 1
        browser = twilio.request is not None and urllib.parse.urlsplit(twilio.request.path).path == "/browser-phone"
        call = Call(self, twilio, self.stats.calls, browser)
        self.calls.add(call)
        call.log.info("%s connected from %s (%d active)", "The browser phone" if browser else "Twilio",
                      remote_address(twilio), len(self.calls))
        started = time.monotonic()
        try:
            await call.run()
        finally:
            self.calls.discard(call)
            self.stats.observe("relay_call_duration_seconds", time.monotonic() - started)
            await call.wrap_up(len(self.calls))


# Twilio's answers to answering machine detection; anything else is counted as "other".
ANSWERED_BY = ("human", "machine_start", "machine_end_beep", "machine_end_silence", "machine_end_other", "fax",
               "unknown")
# Twilio's webhook fields the TwiML passes on to the call, as <Parameter name=...>s.
WEBHOOK_PARAMETERS = (("from", "From"), ("to", "To"), ("answered_by", "AnsweredBy"))


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


def media_stream_url(public_url: str) -> str:
    """Where Twilio streams a call to: PUBLIC_URL as wss:// (ws:// for a loopback trial)."""
    return public_url.replace("http", "ws", 1) + "/media-stream"


def connect_stream(url: str, parameters: Mapping[str, str]) -> str:
    """TwiML's ``<Connect><Stream>`` to ``url``, with the call's ``<Parameter>``s."""
    quote = xml.sax.saxutils.quoteattr
    inner = "".join(f"<Parameter name={quote(name)} value={quote(value)} />" for name, value in parameters.items())
    if not inner:
        return f"<Connect><Stream url={quote(url)} /></Connect>"
    return f"<Connect><Stream url={quote(url)}>{inner}</Stream></Connect>"


def text_response(body: str, content_type: str, status: int = 200) -> Response:
    data = body.encode()
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
            ("Connection", "close"),
        ]
    )
    return Response(status, http.HTTPStatus(status).phrase, headers, data)


def json_response(body: dict[str, Any], status: int = 200, head: bool = False) -> Response:
    response = text_response(json.dumps(body), "application/json", status)
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


class WebhookConnection(ServerConnection):
    """A connection that also reads an HTTP POST: what Twilio sends a number's webhook by default.

    websockets parses a request's head itself and gives a request with a body (as a POST
    has) an empty reply. So this class stands before its parser. A GET (the media
    stream's handshake, a health check) goes to the parser as it arrives, untouched. Any
    other request goes to it line by line, all but its Content-Length and
    Transfer-Encoding; for a POST, the form body that follows (at most MAX_FORM_BYTES,
    within FORM_TIMEOUT seconds) is read here into ``self.form``; then the blank line
    that ends the head goes to the parser. No other body is read. process_request answers
    the request like any other, the POST from ``self.form``, or from ``self.form_problem``
    if its form could not be read.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.held: bytearray | None = bytearray()  # what this class has yet to handle; None: a GET
        self.method = b""  # the request's method, once known, unless it is GET
        self.body_headers: list[bytes] = []  # the Content-Length and Transfer-Encoding lines
        self.form_length: int | None = None  # set once the head has been read: 0 but for a POST
        self.form: list[tuple[str, str]] | None = None  # a POST's form, in the order sent
        self.form_problem: tuple[int, str] | None = None  # or why it was not read: status, text
        self.form_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        if self.held is None:  # a GET, and every frame of a call
            super().data_received(data)
            return
        if self.form is not None or self.form_problem is not None:
            return  # the request is handed on: a body after it is not read
        self.held += data
        if not self.method:
            method, space, _ = self.held.partition(b" ")
            if not space and len(self.held) <= MAX_HEAD_LINE_BYTES:
                return  # the method has yet to arrive in full
            if method == b"GET" or not space:  # websockets reads it, and refuses it if it must
                self.step_aside()
                return
            self.method = bytes(method)
        self.read_request()

    def read_request(self) -> None:
        """Pass on the head's lines as they come, then wait for a POST's form."""
        assert self.held is not None
        while self.form_length is None:
            end = self.held.find(b"\n")
            if end < 0:
                if len(self.held) > MAX_HEAD_LINE_BYTES:  # too long for websockets: let it refuse it
                    self.step_aside()
                return
            line, self.held = bytes(self.held[: end + 1]), self.held[end + 1 :]
            if line == b"\r\n":
                self.form_length = self.length_of_form() if self.method == b"POST" else 0
            elif re.match(rb"(?i)(content-length|transfer-encoding)[ \t]*:", line):
                self.body_headers.append(line)
            else:
                super().data_received(line)
        if self.form_length < 0:
            self.hand_on(411, "A POST here needs a Content-Length (and no Transfer-Encoding).")
        elif self.form_length > MAX_FORM_BYTES:
            self.hand_on(413, f"The form is larger than {MAX_FORM_BYTES} bytes.")
        elif len(self.held) >= self.form_length:
            body = bytes(self.held[: self.form_length]).decode("utf-8", "replace")
            self.form = urllib.parse.parse_qsl(body, keep_blank_values=True)
            self.hand_on()
        elif self.form_timer is None:
            self.form_timer = self.loop.call_later(FORM_TIMEOUT, self.hand_on, 408, "The form came too slowly.")

    def step_aside(self) -> None:
        """Give websockets' parser what is held, and from now on all that comes."""
        held, self.held = bytes(self.held or b""), None
        super().data_received(held)

    def length_of_form(self) -> int:
        """The body's size, from its Content-Length; -1 if it has none, two, or a Transfer-Encoding."""
        fields = {tuple(part.strip().lower() for part in line.split(b":", 1)) for line in self.body_headers}
        if len(fields) != 1:
            return -1
        ((name, value),) = fields
        if name != b"content-length" or not value.isdigit():
            return -1
        return int(value) if len(value) < 10 else MAX_FORM_BYTES + 1  # too long a number to read is too large

    def hand_on(self, status: int = 0, problem: str = "") -> None:
        """End the head for websockets' parser: process_request then answers the POST."""
        self.stop_form_timer()
        if status:
            self.form_problem = (status, problem)
        self.held = bytearray()
        super().data_received(b"\r\n")

    def stop_form_timer(self) -> None:
        if self.form_timer is not None:
            self.form_timer.cancel()

    def eof_received(self) -> None:
        self.stop_form_timer()  # the parser is told the request ended: nothing is handed on after it
        super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_form_timer()
        super().connection_lost(exc)


@contextlib.asynccontextmanager
async def serve_calls(relay: Relay, host: str, port: int) -> AsyncIterator[Server]:
    """The WebSocket server Twilio connects to, with the limits a phone call needs.

    A HOST that does not resolve, or a PORT another program holds, is a ConfigError.
    """
    try:
        server = await serve(
            relay.handle,
            host,
            port,
            process_request=relay.process_request,
            create_connection=WebhookConnection,  # reads Twilio's POST webhook, see there
            compression=None,  # base64 audio barely compresses; deflate only costs CPU
            close_timeout=CLOSE_TIMEOUT,
            max_size=MAX_FRAME_BYTES,  # a larger frame closes that call with 1009
        )
    except OSError as error:
        raise ConfigError(cannot_listen(host, port, error)) from None
    async with server:
        warming = asyncio.create_task(relay.warm.keep_ready()) if relay.config.warm_sessions else None
        try:
            yield server
        finally:
            if warming is not None:
                warming.cancel()
                await asyncio.gather(warming, return_exceptions=True)
                await relay.warm.close()


def cannot_listen(host: str, port: int, error: OSError) -> str:
    """Why the relay cannot listen, as a setting to change."""
    if isinstance(error, socket.gaierror):
        return (f"HOST {host!r} is not an address of this machine ({error.strerror}): set HOST=0.0.0.0 to "
                "listen on every interface, or 127.0.0.1 for this machine only")
    if error.errno == errno.EADDRINUSE:
        return f"PORT {port} is in use by another program: stop that program, or set PORT to a free port"
    return f"cannot listen on HOST {host!r}, PORT {port}: {error.strerror or error}; check both settings"


# 6. Start-up and shutdown ----------------------------------------------------------


class UTCFormatter(logging.Formatter):
    """ISO-8601 UTC timestamps, so logs from several machines line up."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        moment = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        return iso_utc(moment)


def setup_logging(level: str) -> None:
    """The relay's own lines at LOG_LEVEL; websockets' only at DEBUG, or when something is wrong.

    websockets logs every connection and every HTTP answer at INFO: two lines per health
    probe, which a load balancer sends every few seconds.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(UTCFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    logging.getLogger("websockets").setLevel(level if level == "DEBUG" else "WARNING")


async def drain(relay: Relay) -> None:
    """Stop taking calls, give running calls DRAIN_SECONDS to finish, then close the rest.

    The relay goes on answering meanwhile: /ready says 503 and new calls are refused
    with 503, so a load balancer sends them elsewhere.
    """
    relay.draining = True
    logger.info(
        "shutting down: no new calls; waiting up to %g s for %d active call(s)",
        relay.config.drain_seconds, len(relay.calls),
    )
    running = [call.phone.twilio for call in relay.calls]
    try:
        async with asyncio.timeout(relay.config.drain_seconds):
            await asyncio.gather(*(twilio.wait_closed() for twilio in running))
    except TimeoutError:
        remaining = [twilio for twilio in running if twilio.state is not State.CLOSED]
        logger.info("closing %d call(s) that are still running", len(remaining))
        await asyncio.gather(*(twilio.close(1012, "relay restarting") for twilio in remaining))


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


def tool_names(tools: list[dict[str, Any]]) -> list[str]:
    """What start-up names the offered tools by: a function's name, an MCP server's label."""
    return [tool["name"] if "name" in tool else f"{tool['server_label']} (MCP server)" for tool in tools]


def say_what_to_do_next(relay: Relay, port: int) -> None:
    """The start-up lines: where the relay listens, what to give Twilio, what the agent is.

    Plus a warning when nothing checks that calls come from Twilio.
    """
    config = relay.config
    if not config.twilio_auth_token:
        logger.warning(
            "TWILIO_AUTH_TOKEN is not set: anyone who knows this relay's URL can open calls on "
            "your OpenAI account. Set it to check Twilio's signature on every call."
        )
    for warning in config.warnings:
        logger.warning("%s", warning)
    local_host = "localhost" if config.host in ("0.0.0.0", "::") else config.host
    logger.info("relay listening on port %d: health check http://%s:%d/health",
                port, f"[{local_host}]" if ":" in local_host else local_host, port)
    if config.public_url:
        logger.info("Twilio: set your number's \"A call comes in\" webhook to %s/twiml (GET or POST); "
                    "calls then stream to %s", config.public_url, media_stream_url(config.public_url))
    else:
        logger.info("Twilio: set your number's \"A call comes in\" webhook to https://<public address>/twiml "
                    "(GET or POST), where <public address> reaches port %d (e.g. ngrok http %d); calls then "
                    "stream to wss://<public address>/media-stream. Set PUBLIC_URL to see it here", port, port)
    if config.browser_phone:
        phone = f"/phone?token={config.browser_phone_token}"
        logger.info("browser phone: open http://localhost:%d%s to talk to the agent (for trying and debugging, "
                    "not for the public)%s", port, phone, f", or {config.public_url}{phone}" if config.public_url else "")
    tools = ", ".join(tool_names(offered_tools(config, relay.tools))) or "none"
    logger.info("agent: model %s, voice %s, tools: %s", config.openai_model, config.voice, tools)


async def main() -> None:
    load_dotenv()
    try:
        config = load_config(os.environ)
        check_agents(AGENTS)
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

    try:
        async with serve_calls(relay, config.host, config.port) as server:
            say_what_to_do_next(relay, server.sockets[0].getsockname()[1])
            await stop.wait()
            await drain(relay)
    except ConfigError as error:  # only the binding raises it: nothing has been served yet
        sys.exit(f"relay: configuration error: {error}")
    await relay.reports.drain(config.drain_seconds)  # the server has closed: every call has sent its report
    stats = relay.stats
    logger.info(
        "stopped: %d call(s) served, %d error(s), up %.0f s",
        stats.calls, stats.errors(), time.monotonic() - stats.started,
    )


def place_call(to: str, greeting: str | None, instructions: str | None, params: list[str],
               voicemail: str | None) -> None:
    """``relay.py call``: have Twilio dial ``to`` and connect the answered call to this relay.

    The running relay (wherever PUBLIC_URL points) takes the call like any other; the
    ``<Parameter>``s tell it the call is outbound and carry the per-call values. With
    ``voicemail``, Twilio first finds out who answered (see outbound_call_fields).
    """
    load_dotenv()
    try:
        account = twilio_account(os.environ)
        if account is None:
            raise ConfigError("outbound calls need TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN "
                              "(or TWILIO_API_KEY and TWILIO_API_SECRET)")
        caller_id = os.environ.get("TWILIO_PHONE_NUMBER", "").strip()
        if not caller_id:
            raise ConfigError("outbound calls need TWILIO_PHONE_NUMBER, the Twilio number to call from")
        caller_id = PHONE_NUMBER("TWILIO_PHONE_NUMBER", caller_id)
        public_url = os.environ.get("PUBLIC_URL", "").strip()
        if not public_url:
            raise ConfigError("outbound calls need PUBLIC_URL, the relay's address Twilio connects the call to")
        public_url = _public_url("PUBLIC_URL", public_url)
        to = PHONE_NUMBER("the number to call", to)
        parameters = {"direction": "outbound"}
        for param in params:
            name, equals, value = param.partition("=")
            if not equals or not name.strip():
                raise ConfigError(f"--param takes NAME=VALUE, got {param!r}")
            parameters[name.strip()] = value
        parameters.update({name: value for name, value in (("greeting", greeting), ("instructions", instructions))
                           if value is not None})
        fields = {"To": to, "From": caller_id, **outbound_call_fields(public_url, parameters, voicemail)}
    except ConfigError as error:
        sys.exit(f"relay: {error}")
    try:
        reply = twilio_post(account, "Calls.json", fields)
    except TwilioError as error:
        sys.exit(f"relay: Twilio did not place the call: {error}")
    sid = reply.get("sid")
    if not isinstance(sid, str) or not sid:
        sys.exit("relay: Twilio's answer has no Call SID, so the call may not have been placed: "
                 "check the call log in the Twilio console (and TWILIO_API_BASE_URL)")
    sys.stdout.write(f"{sid}\n")


TWILIO_URL_LIMIT = 4000  # characters Twilio takes in a call's Url, and in its inline Twiml


def outbound_call_fields(public_url: str, parameters: dict[str, str], voicemail: str | None) -> dict[str, str]:
    """What Twilio is told to do once the call is answered.

    Without ``voicemail``: connect the stream at once (inline ``Twiml``). With it, Twilio
    runs answering machine detection first, waiting for the end of a machine's greeting,
    then fetches ``/twiml`` with the call's parameters in the query and adds ``AnsweredBy``:
    the relay then connects a person, leaves the message on a machine (or hangs up on it
    with ``hangup``), and needs no state of its own. Twilio's POST callback of asynchronous
    detection is not used: it would have to reach the very instance that holds the call.
    """
    if voicemail is None:
        twiml = (f"<Response>{connect_stream(media_stream_url(public_url), parameters)}"
                 f"<Say>{xml.sax.saxutils.escape(CUT_OFF_MESSAGE)}</Say><Hangup/></Response>")
        if len(twiml) > TWILIO_URL_LIMIT:
            raise ConfigError(f"the call's TwiML would be {len(twiml)} characters, and Twilio takes at most "
                              f"{TWILIO_URL_LIMIT}: shorten --instructions, --greeting or the --params")
        return {"Twiml": twiml}
    if not voicemail.strip():
        raise ConfigError('--voicemail takes the message to leave, or "hangup"')
    for name in parameters:
        if not name[:1].islower():
            raise ConfigError(f"with --voicemail, a --param name must start with a lowercase letter (Twilio's own "
                              f"fields start with a capital); got {name!r}")
    url = f"{public_url}/twiml?{urllib.parse.urlencode({**parameters, 'voicemail': voicemail.strip()})}"
    if len(url) > TWILIO_URL_LIMIT:
        raise ConfigError(f"the call's /twiml URL would be {len(url)} characters, and Twilio takes at most "
                          f"{TWILIO_URL_LIMIT}: shorten --instructions, --greeting, --voicemail or the --params")
    return {"Url": url, "Method": "GET", "MachineDetection": "DetectMessageEnd"}


def command_line(argv: list[str]) -> None:
    """``python relay.py`` serves calls; ``python relay.py call NUMBER`` places one."""
    parser = argparse.ArgumentParser(
        prog="relay.py",
        usage="python relay.py [-h] [call NUMBER [options]]",
        description="Relay phone calls between Twilio Media Streams and the OpenAI Realtime API. "
        "Without a command, serve calls (settings come from the environment and .env).",
    )
    commands = parser.add_subparsers(dest="command", metavar="call")
    call = commands.add_parser(
        "call",
        prog="python relay.py call",
        help="place an outbound call through Twilio's REST API, print its Call SID and exit",
        description="Have Twilio call NUMBER from TWILIO_PHONE_NUMBER and connect the answered call to "
        "the relay at PUBLIC_URL (which must be running). Needs TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN "
        "(or TWILIO_API_KEY and TWILIO_API_SECRET).",
    )
    call.add_argument("number", help="the number to call, in E.164 form: +15551234567")
    call.add_argument("--greeting", help="what the agent says first on this call")
    call.add_argument("--instructions", help="the agent's instructions for this call")
    call.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                      help="a call detail for the agent and the tools (repeatable)")
    call.add_argument("--voicemail", metavar='"MESSAGE"|hangup',
                      help="detect answering machines (Twilio AMD, about 2-4 s of silence for a person who "
                      "answers): leave MESSAGE after the beep, or hang up on them with hangup")
    args = parser.parse_args(argv)
    if args.command == "call":
        place_call(args.number, args.greeting, args.instructions, args.param, args.voicemail)
    else:
        asyncio.run(main())


# The browser phone (BROWSER_PHONE=on): one page, served at /phone, that calls the agent from the
# microphone through the very path a phone call takes, speaking Twilio's Media Streams protocol.
PHONE_PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Browser phone</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; max-width: 640px; margin: 2em auto; padding: 0 1em; color: #222; }
  .note { color: #666; }
  label { display: block; margin: 0.8em 0 0.2em; font-size: 0.9em; color: #444; }
  input, textarea { width: 100%; box-sizing: border-box; font: inherit; padding: 0.4em; border: 1px solid #bbb; border-radius: 4px; }
  button { font: inherit; padding: 0.5em 1.2em; border: 1px solid #999; border-radius: 4px; background: #f4f4f4; cursor: pointer; }
  button:disabled { opacity: 0.4; cursor: default; }
  #call { background: #2a7; color: #fff; } #hangup { background: #c33; color: #fff; }
  .row { display: flex; gap: 0.6em; align-items: center; margin: 1em 0; }
  .keypad { display: grid; grid-template-columns: repeat(3, 3.5em); gap: 0.4em; }
  .meter { flex: 1; height: 0.7em; border-radius: 4px; --level: 0;
           background: linear-gradient(to right, #2a7 calc(var(--level) * 100%), #e4e4e4 0); }
  .row > span:first-child { width: 3.5em; font-size: 0.85em; color: #555; }
  #transcript { border: 1px solid #ddd; border-radius: 4px; padding: 0.5em; height: 16em; overflow-y: auto; }
  .line { margin: 0.2em 0; } .caller { color: #135; } .agent { color: #262; }
  .tool { color: #777; font: 0.85em ui-monospace, monospace; }
</style>
</head>
<body>
<h1>Browser phone</h1>
<p class="note">Calls the voice agent from your microphone, like a phone call. For trying and debugging the agent, not for the public.</p>
<label for="caller">caller number</label>
<input id="caller" placeholder="+15550001111">
<label for="params">parameters (name=value per line)</label>
<textarea id="params" rows="3"></textarea>
<div class="row">
  <button id="call">Call</button> <button id="hangup" disabled>Hang up</button> <b id="state">idle</b>
</div>
<div class="keypad">
  <button class="key" data-digit="1">1</button><button class="key" data-digit="2">2</button><button class="key" data-digit="3">3</button>
  <button class="key" data-digit="4">4</button><button class="key" data-digit="5">5</button><button class="key" data-digit="6">6</button>
  <button class="key" data-digit="7">7</button><button class="key" data-digit="8">8</button><button class="key" data-digit="9">9</button>
  <button class="key" data-digit="*">*</button><button class="key" data-digit="0">0</button><button class="key" data-digit="#">#</button>
</div>
<div class="row"><span>mic</span><div class="meter" id="mic-level"></div></div>
<div class="row"><span>agent</span><div class="meter" id="agent-level"></div></div>
<div id="transcript"></div>

<script>
// Audio worklets run on the audio thread; they are loaded from this string via a Blob URL.
const WORKLET_CODE = `
const OUT_RATE = 8000; // G.711 telephone rate
const TAPS = 47;       // low-pass filter length

// Windowed-sinc low-pass at ~3.4 kHz, so decimating to 8 kHz does not alias.
function makeLowPass(rate) {
  const fc = 3400 / rate, mid = (TAPS - 1) / 2, h = new Float32Array(TAPS);
  for (let i = 0; i < TAPS; i++) {
    const n = i - mid;
    const sinc = n === 0 ? 2 * fc : Math.sin(2 * Math.PI * fc * n) / (Math.PI * n);
    h[i] = sinc * (0.54 - 0.46 * Math.cos(2 * Math.PI * i / (TAPS - 1))); // Hamming window
  }
  const sum = h.reduce((a, b) => a + b);
  return h.map((v) => v / sum); // unity gain at DC
}

// Standard G.711 mu-law encoder: float in [-1, 1] -> one byte.
function muLawEncode(sample) {
  let pcm = Math.round(Math.max(-1, Math.min(1, sample)) * 32767);
  const sign = pcm < 0 ? 0x80 : 0;
  pcm = Math.min(Math.abs(pcm), 32635) + 0x84;
  let exponent = 7;
  for (let mask = 0x4000; (pcm & mask) === 0 && exponent > 0; mask >>= 1) exponent--;
  const mantissa = (pcm >> (exponent + 3)) & 0x0f;
  return ~(sign | (exponent << 4) | mantissa) & 0xff;
}

// Microphone -> filter -> 8 kHz -> 160-byte mu-law frames (20 ms) posted to the page.
class Capture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.taps = makeLowPass(sampleRate);
    this.history = new Float32Array(TAPS); // ring buffer of recent input samples
    this.pos = 0;
    this.step = sampleRate / OUT_RATE;     // input samples per output sample
    this.t = 0;                            // next output time, in input samples after this.prev
    this.prev = 0;                         // previous filtered sample
    this.frame = new Uint8Array(160);
    this.count = this.sumSq = this.levelCount = 0;
  }
  filter(x) {
    this.history[this.pos] = x;
    this.pos = (this.pos + 1) % TAPS;
    let y = 0;
    for (let i = 0; i < TAPS; i++) y += this.taps[i] * this.history[(this.pos + i) % TAPS];
    return y;
  }
  emit(s) {
    this.frame[this.count++] = muLawEncode(s);
    if (this.count === 160) {
      this.port.postMessage({ frame: this.frame }, [this.frame.buffer]);
      this.frame = new Uint8Array(160);
      this.count = 0;
    }
    this.sumSq += s * s;
    if (++this.levelCount === OUT_RATE / 10) { // ~10 level updates per second
      this.port.postMessage({ level: Math.sqrt(this.sumSq / this.levelCount) });
      this.sumSq = this.levelCount = 0;
    }
  }
  process(inputs) {
    const input = inputs[0][0];
    for (let i = 0; input && i < input.length; i++) {
      const y = this.filter(input[i]);
      // Emit every output sample that falls between prev (t = 0) and y (t = 1).
      for (; this.t < 1; this.t += this.step) this.emit(this.prev + (y - this.prev) * this.t);
      this.t -= 1;
      this.prev = y;
    }
    return true;
  }
}

// Queue of 8 kHz agent audio, played at the context rate, with marks at queue positions.
class Playback extends AudioWorkletProcessor {
  constructor() {
    super();
    this.chunks = [];                   // Float32Arrays, in arrival order
    this.offset = 0;                    // read index in chunks[0]
    this.written = this.taken = 0;      // total samples ever queued / ever played
    this.marks = [];                    // { name, at }: reached once taken >= at
    this.step = OUT_RATE / sampleRate;
    this.frac = this.a = this.b = 0;    // output position between 8 kHz samples a and b
    this.sumSq = this.levelCount = 0;
    this.port.onmessage = (e) => this.receive(e.data);
  }
  receive(msg) {
    if (msg.samples) {
      this.chunks.push(msg.samples);
      this.written += msg.samples.length;
    } else if (msg.mark !== undefined) {
      this.marks.push({ name: msg.mark, at: this.written });
      this.postReachedMarks(); // nothing queued: echo at once
    } else if (msg.clear) {
      this.chunks = [];
      this.offset = 0;
      this.written = this.taken;
      for (const mark of this.marks) this.port.postMessage({ played: mark.name }); // all at once, in order
      this.marks = [];
    }
  }
  postReachedMarks() {
    while (this.marks.length && this.marks[0].at <= this.taken) {
      this.port.postMessage({ played: this.marks.shift().name });
    }
  }
  nextSample() {
    while (this.chunks.length) {
      if (this.offset < this.chunks[0].length) {
        this.taken++;
        return this.chunks[0][this.offset++];
      }
      this.chunks.shift();
      this.offset = 0;
    }
    return 0; // queue empty: silence
  }
  process(inputs, outputs) {
    const out = outputs[0][0];
    for (let i = 0; i < out.length; i++) {
      out[i] = this.a + (this.b - this.a) * this.frac; // linear interpolation
      for (this.frac += this.step; this.frac >= 1; this.frac -= 1) {
        this.a = this.b;
        this.b = this.nextSample();
      }
      this.sumSq += out[i] * out[i];
    }
    this.postReachedMarks();
    this.levelCount += out.length;
    if (this.levelCount >= sampleRate / 10) {
      this.port.postMessage({ level: Math.sqrt(this.sumSq / this.levelCount) });
      this.sumSq = this.levelCount = 0;
    }
    return true;
  }
}

registerProcessor("capture", Capture);
registerProcessor("playback", Playback);
`;
const WORKLET_URL = URL.createObjectURL(new Blob([WORKLET_CODE], { type: "application/javascript" }));

const ACCOUNT_SID = "AC" + "0".repeat(32);
const $ = (id) => document.getElementById(id);
window.phone = { marksEchoed: [], framesSent: 0, state: "idle" };
let call = null;                 // current call: { ws, ctx, stream, player, streamSid, callSid, seq, chunk, error }
let transcriptLines = new Map(); // transcript id -> line element

// G.711 mu-law byte -> float sample, precomputed for all 256 bytes.
function muLawDecode(byte) {
  const u = ~byte & 0xff;
  const exponent = (u >> 4) & 7, mantissa = u & 0x0f;
  const magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84;
  return (u & 0x80 ? -magnitude : magnitude) / 32768;
}
const MULAW_TABLE = Float32Array.from({ length: 256 }, (_, b) => muLawDecode(b));

const randomHex = (n) => Array.from(crypto.getRandomValues(new Uint8Array(n / 2)), (b) => b.toString(16).padStart(2, "0")).join("");
const toBase64 = (bytes) => btoa(String.fromCharCode(...bytes));
const fromBase64 = (text) => Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
const isLive = () => call && call.seq > 0 && call.ws.readyState === WebSocket.OPEN; // "start" was sent

function setState(text) {
  $("state").textContent = window.phone.state = text;
  const busy = text === "connecting" || text === "in call";
  $("call").disabled = busy;
  $("hangup").disabled = !busy;
}

function setLevel(id, rms) {
  $(id).style.setProperty("--level", Math.min(1, Math.sqrt(rms) * 1.5)); // sqrt: speech is quiet
}

// Every event after "connected" carries a string sequence number and the stream id.
function send(event, body) {
  call.ws.send(JSON.stringify({ event, sequenceNumber: String(++call.seq), streamSid: call.streamSid, ...body }));
}

function customParameters() {
  const params = {};
  const from = $("caller").value.trim();
  if (from) params.from = from;
  for (const line of $("params").value.split("\n")) {
    const eq = line.indexOf("=");
    const name = line.slice(0, Math.max(eq, 0)).trim();
    if (name) params[name] = line.slice(eq + 1).trim();
  }
  return params;
}

function sendStart() {
  call.ws.send(JSON.stringify({ event: "connected", protocol: "Call", version: "1.0.0" }));
  send("start", { start: {
    streamSid: call.streamSid, callSid: call.callSid, accountSid: ACCOUNT_SID, tracks: ["inbound"],
    customParameters: customParameters(),
    mediaFormat: { encoding: "audio/x-mulaw", sampleRate: 8000, channels: 1 },
  } });
  setState("in call");
}

function sendFrame(frame) {
  if (!isLive()) return;
  const k = ++call.chunk;
  send("media", { media: { track: "inbound", chunk: String(k), timestamp: String(k * 20), payload: toBase64(frame) } });
  window.phone.framesSent++;
}

function echoMark(name) {
  if (!isLive()) return;
  send("mark", { mark: { name } });
  window.phone.marksEchoed.push(name);
}

function addLine(kind, text) {
  const line = document.createElement("div");
  line.className = "line " + kind;
  line.textContent = text;
  $("transcript").append(line);
  $("transcript").scrollTop = $("transcript").scrollHeight;
  return line;
}

// A transcript line is updated in place while the model is still speaking/transcribing.
function showTranscript({ id, role, text, interrupted }) {
  const kind = role === "agent" ? "agent" : "caller";
  let line = transcriptLines.get(String(id));
  if (!line) {
    line = addLine(kind, "");
    line.dataset.id = id;
    transcriptLines.set(String(id), line);
  }
  line.textContent = kind + ": " + (text || "") + (interrupted ? " — cut off" : "");
}

function showTool({ name, outcome, durationMs }) {
  addLine("tool", `tool ${name}: ${outcome}` + (durationMs != null ? ` in ${durationMs} ms` : ""));
}

function onRelayMessage(event) {
  const msg = JSON.parse(event.data);
  const player = call.player.port;
  if (msg.event === "media") {
    const samples = Float32Array.from(fromBase64(msg.media.payload), (b) => MULAW_TABLE[b]);
    player.postMessage({ samples }, [samples.buffer]);
  } else if (msg.event === "mark") player.postMessage({ mark: msg.mark.name });
  else if (msg.event === "clear") player.postMessage({ clear: true });
  else if (msg.event === "transcript") showTranscript(msg);
  else if (msg.event === "tool") showTool(msg);
  // other events are ignored
}

async function setUpAudio(ctx) {
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
  });
  await ctx.audioWorklet.addModule(WORKLET_URL);
  const capture = new AudioWorkletNode(ctx, "capture", { channelCount: 1, channelCountMode: "explicit" });
  const player = new AudioWorkletNode(ctx, "playback", { numberOfInputs: 0, outputChannelCount: [1] });
  ctx.createMediaStreamSource(stream).connect(capture);
  capture.connect(ctx.destination); // outputs silence; connected so the browser keeps it running
  player.connect(ctx.destination);
  capture.port.onmessage = (e) => (e.data.frame ? sendFrame(e.data.frame) : setLevel("mic-level", e.data.level));
  player.port.onmessage = (e) => (e.data.played !== undefined ? echoMark(e.data.played) : setLevel("agent-level", e.data.level));
  return { stream, player };
}

async function startCall() {
  const ctx = new AudioContext(); // device's default rate (Firefox needs that); the worklets resample
  ctx.resume();                   // inside the click handler, so autoplay rules allow sound
  setState("connecting");
  $("transcript").replaceChildren();
  transcriptLines = new Map();
  let audio;
  try {
    audio = await setUpAudio(ctx);
  } catch (err) {
    ctx.close();
    return setState("error: " + err.message);
  }
  const token = new URLSearchParams(location.search).get("token") || "";
  const ws = new WebSocket((location.protocol === "https:" ? "wss:" : "ws:") + "//" + location.host +
    "/browser-phone?token=" + encodeURIComponent(token));
  call = { ws, ctx, ...audio, streamSid: "MZ" + randomHex(32), callSid: "CA" + randomHex(32), seq: 0, chunk: 0, error: null };
  const current = () => call && call.ws === ws; // ignore late events from an earlier call's socket
  ws.onopen = () => current() && sendStart();
  ws.onmessage = (e) => current() && onRelayMessage(e);
  ws.onerror = () => { if (current() && call.seq === 0) call.error = "could not connect to the relay"; };
  ws.onclose = () => current() && endCall(false); // the relay (agent) hung up, or the connection dropped
}

function endCall(byUser) {
  if (!call) return;
  if (byUser && isLive()) send("stop", { stop: { accountSid: ACCOUNT_SID, callSid: call.callSid } });
  const { ws, ctx, stream, error } = call;
  call = null;
  ws.close();
  stream.getTracks().forEach((track) => track.stop());
  ctx.close();
  setLevel("mic-level", 0);
  setLevel("agent-level", 0);
  setState(error ? "error: " + error : "ended");
}

$("call").addEventListener("click", startCall);
$("hangup").addEventListener("click", () => endCall(true));
window.addEventListener("pagehide", () => endCall(true));
for (const key of document.querySelectorAll(".key")) {
  key.addEventListener("click", () => isLive() && send("dtmf", { dtmf: { track: "inbound_track", digit: key.dataset.digit } }));
}
</script>
</body>
</html>
"""


if __name__ == "__main__":
    command_line(sys.argv[1:])
