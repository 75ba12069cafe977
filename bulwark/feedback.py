"""Users' ratings of answers: the `POST /v1/feedback` body, its row, and the summary a
reliability report reads.

A rating is thumbs (-1, 0, 1) or stars (1..5). `scale` says which; without it, -1 and 0
are thumbs, 2..5 stars, and 1 is a thumbs-up (the common case of a chat UI's 👍). Both are
also stored on one 0..1 `score`, so a report can average them together.

Feedback is stored against the rated answer's request id (the `x-request-id` the gateway
sent), and against the client key's id once client keys are in use. Nothing checks that
the id exists: ids may be older than any retention, and the feedback is worth keeping.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Protocol

import msgspec
from msgspec import UNSET, Meta, UnsetType

if TYPE_CHECKING:
    from bulwark.bus import Bus

Scale = Literal["thumbs", "stars"]

#: Postgres text cannot hold NUL; a body carrying one is refused up front (a 400 naming
#: the field) rather than failing in the INSERT.
_NO_NUL = r"^[^\x00]*$"
#: Same rule as the ids the gateway echoes (service/edge.py): printable ASCII, ≤ 128.
RequestId = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[\x20-\x7e]+$",
                                description="The x-request-id of the rated answer.")]
#: A comment is a sentence or a paragraph; 4000 characters is a long one.
Comment = Annotated[str, Meta(max_length=4000, pattern=_NO_NUL)]
Tag = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f]+$")]
#: Tags are labels a UI offers ("wrong", "slow", "unsafe"), not free text.
Tags = Annotated[list[Tag], Meta(max_length=16)]
Rating = Annotated[int, Meta(ge=-1, le=5, description=(
    "Thumbs -1, 0, 1 or stars 1..5 (see scale)."))]

#: Largest body of a feedback request: the bounded fields above fit in well under this.
MAX_BODY_BYTES = 32 * 1024


class FeedbackRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a client sends to `POST /v1/feedback`."""

    request_id: RequestId
    rating: Rating
    #: Absent: -1 and 0 are thumbs, 2..5 stars, 1 thumbs-up.
    scale: Scale | UnsetType = UNSET
    comment: Comment | None = None
    tags: Tags = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.scale == "thumbs" and self.rating > 1:
            raise ValueError("rating: a thumbs rating is -1, 0 or 1")
        if self.scale == "stars" and self.rating < 1:
            raise ValueError("rating: a star rating is 1 to 5")

    @property
    def resolved_scale(self) -> Scale:
        if isinstance(self.scale, str):
            return self.scale
        return "thumbs" if self.rating <= 1 else "stars"

    @property
    def score(self) -> float:
        """The rating on 0..1: thumbs -1/0/1 → 0/0.5/1, stars 1..5 → 0..1."""
        if self.resolved_scale == "thumbs":
            return (self.rating + 1) / 2
        return (self.rating - 1) / 4

    #: The rule of __post_init__ in JSON Schema, merged into this type's component by
    #: service/openapi.py: a body the document calls valid is one the gateway accepts.
    json_schema_extra: ClassVar[dict[str, Any]] = {
        "if": {"required": ["scale"], "properties": {"scale": {"const": "stars"}}},
        "then": {"properties": {"rating": {"minimum": 1}}},
        "else": {
            "if": {"required": ["scale"], "properties": {"scale": {"const": "thumbs"}}},
            "then": {"properties": {"rating": {"maximum": 1}}},
        },
    }


class Feedback(msgspec.Struct, frozen=True, kw_only=True):
    """The stored feedback, as `POST /v1/feedback` answers it (201)."""

    id: str
    object: Literal["feedback"] = "feedback"
    request_id: str
    rating: int
    scale: Scale
    #: The rating on 0..1 (see the module docstring).
    score: float
    comment: str | None
    tags: list[str]
    #: Unix epoch seconds, on the database's clock.
    created_at: int


class ThumbsCounts(msgspec.Struct, frozen=True, kw_only=True):
    up: int
    neutral: int
    down: int


class StarsSummary(msgspec.Struct, frozen=True, kw_only=True):
    count: int
    mean: float | None


class TagCount(msgspec.Struct, frozen=True, kw_only=True):
    tag: str
    count: int


class FeedbackSummary(msgspec.Struct, frozen=True, kw_only=True):
    """Feedback over the last `since_sec` seconds, for the reliability report."""

    since_sec: float
    count: int
    #: Mean of every rating on the 0..1 score; None without feedback.
    score_mean: float | None
    thumbs: ThumbsCounts
    stars: StarsSummary
    with_comment: int
    #: The most used tags, most used first (at most TOP_TAGS).
    top_tags: list[TagCount]


#: A report shows the few tags that explain most feedback, not a long tail.
TOP_TAGS = 10


class Querier(Protocol):
    """An asyncpg connection or pooled connection (what `Bus.write` hands its op)."""

    async def fetchrow(self, query: str, *args: object,
                       timeout: float | None = None) -> Any: ...

    async def fetch(self, query: str, *args: object,
                    timeout: float | None = None) -> Any: ...


_INSERT = """
INSERT INTO feedback (request_id, client_key_id, scale, rating, score, comment, tags)
VALUES ($1::text, $2::text, $3::text, $4::smallint, $5::real, $6::text, $7::text[])
RETURNING id, floor(extract(epoch FROM at))::bigint AS created_at
"""


async def insert_feedback(conn: Querier, fb: FeedbackRequest, *,
                          client_key_id: str | None = None) -> Feedback:
    """Store one feedback; one INSERT."""
    scale = fb.resolved_scale
    rec = await conn.fetchrow(_INSERT, fb.request_id, client_key_id, scale, fb.rating,
                              fb.score, fb.comment, list(fb.tags))
    assert rec is not None
    return Feedback(id=f"fb_{rec['id']}", request_id=fb.request_id, rating=fb.rating,
                    scale=scale, score=fb.score, comment=fb.comment, tags=list(fb.tags),
                    created_at=int(rec["created_at"]))


class FeedbackWriter:
    """Stores feedback through the bus's write pool, one INSERT at a time.

    The pool is small (two connections) and also carries breaker transitions and error
    rows: holding at most one of them for feedback keeps the other for the bus's own
    writes under a flood of feedback. A feedback that cannot get its turn and its INSERT
    done within `timeout_sec` is not stored (None): the route answers 503.
    """

    def __init__(self, bus: Bus, *, timeout_sec: float = 2.0) -> None:
        self._bus = bus
        self._turn = asyncio.Semaphore(1)
        self.timeout_sec = timeout_sec
        #: Feedbacks waiting for their turn / being written (at most one).
        self.queued = 0
        self.writing = 0

    async def store(self, fb: FeedbackRequest, *,
                    client_key_id: str | None = None) -> Feedback | None:
        async def op(conn: Querier) -> Feedback:
            return await insert_feedback(conn, fb, client_key_id=client_key_id)

        self.queued += 1
        waiting = True
        try:
            async with asyncio.timeout(self.timeout_sec), self._turn:
                self.queued -= 1
                waiting = False
                self.writing += 1
                try:
                    return await self._bus.write("feedback", op)
                finally:
                    self.writing -= 1
        except TimeoutError:
            return None
        finally:
            if waiting:
                self.queued -= 1


_WINDOW = "at >= now() - make_interval(secs => $1::float8)"
_SUMMARY = f"""
SELECT count(*) AS n,
       avg(score)::float8 AS score_mean,
       count(*) FILTER (WHERE scale = 'thumbs' AND rating = 1) AS up,
       count(*) FILTER (WHERE scale = 'thumbs' AND rating = 0) AS neutral,
       count(*) FILTER (WHERE scale = 'thumbs' AND rating = -1) AS down,
       count(*) FILTER (WHERE scale = 'stars') AS stars,
       (avg(rating) FILTER (WHERE scale = 'stars'))::float8 AS stars_mean,
       count(*) FILTER (WHERE coalesce(comment, '') <> '') AS with_comment
FROM feedback WHERE {_WINDOW}
"""  # noqa: S608  (constants only)
_TAGS = f"""
SELECT tag, count(*) AS n FROM feedback, unnest(tags) AS tag
WHERE {_WINDOW} GROUP BY tag ORDER BY n DESC, tag LIMIT $2::int
"""  # noqa: S608  (constants only)


async def feedback_summary(conn: Querier, since_sec: float) -> FeedbackSummary:
    """Feedback of the last `since_sec` seconds (database clock), for the reliability
    report. Two indexed queries over the window; off the request path."""
    row = await conn.fetchrow(_SUMMARY, since_sec)
    assert row is not None
    tags = await conn.fetch(_TAGS, since_sec, TOP_TAGS)
    return FeedbackSummary(
        since_sec=since_sec, count=row["n"], score_mean=row["score_mean"],
        thumbs=ThumbsCounts(up=row["up"], neutral=row["neutral"], down=row["down"]),
        stars=StarsSummary(count=row["stars"], mean=row["stars_mean"]),
        with_comment=row["with_comment"],
        top_tags=[TagCount(tag=r["tag"], count=r["n"]) for r in tags])
