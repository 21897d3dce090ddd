"""How a download behaves: the options a caller tunes, and the timings its threads share.

``FetchOptions`` is the one object the rest of the program passes to ``download``; the modules of
the downloader (parts, source, receiving, writing, hashing) all read it, so it lives below them all.
"""

from __future__ import annotations

from dataclasses import dataclass

# How often a thread waiting on a queue or an event looks again whether its attempt has stopped.
TICK = 0.1
# How long the end of an attempt waits for its threads before leaving them (daemons) behind.
JOIN_GRACE = 1.0


@dataclass
class FetchOptions:
    """How to fetch. The first eight fields are the contract; the rest tune retry and part behaviour."""

    parallel_parts: int = 4            # connections per big file
    part_threshold: int = 64 << 20  # files at least this big are fetched in parallel ranged parts
    stall_timeout: float = 30.0  # no byte for this long -> the connection is retried (httpx read timeout)
    max_retries: int = 6               # per part; exponential backoff with jitter; Retry-After honoured
    token: str | None = None           # bearer token for gated hosts (HF_TOKEN style)
    allow_http: bool = False           # plain http only for loopback unless allowed
    offline: bool = False              # refuse before any network use
    timeout: float = 30.0              # connect / send / connection-pool timeout
    backoff_base: float = 1.0          # first retry waits 0.5-1x this, doubling per retry
    backoff_max: float = 60.0  # cap of one wait, Retry-After included
    min_part: int = 4 << 20  # an idle connection splits a busy part only if both halves get this much
    straggler_after: float = 3.0       # an idle connection takes over a part silent this long (or far slower)
    checkpoint_interval: float = 1.0   # seconds between resume-state saves (bytes since are lost on a kill);
                                       # longer (up to 2 s) while each save's data sync takes long
    checkpoint_bytes: int = 32 << 20   # ... and a save at least every this many bytes per busy connection
    give_up_after: float = 60.0        # no byte from the source for this long, retries included -> give up
    authorization: str | None = None   # a whole Authorization header (an OCI registry's Basic or Bearer);
                                       # sent instead of ``token``, and like it never across a redirect
