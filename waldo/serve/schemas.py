"""The service's response models: what the OpenAPI schema documents and clients can rely on.

Inputs are multipart uploads and query parameters declared on the routes; these are outputs.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from waldo.results import SearchHit, SearchOutcome


class SearchResponse(BaseModel):
    results: list[SearchHit] = Field(description="best first; `waldo search --json` prints the same list")
    timings: dict[str, float] = Field(
        description="milliseconds per stage: decode, extract, search, rerank, total")
    k: int
    rerank: str = Field(description="the reranker that ran (\"none\": the global ranking alone); a request "
                                    "without rerank runs the index's default (/stats default_reranker)")
    score_kind: str = Field("similarity", description="what each result's score is: similarity, "
                                                      "'similarity + geometry bonus', inliers, 'RRT probability' "
                                                      "or 'similarity + RRT probability' (/stats score_kinds "
                                                      "explains each)")
    note: str = Field("", description="what the reranker wants the user to know, e.g. why nothing was verified")
    partial: bool = Field(False, description="true when some shards of a sharded index did not answer in time "
                                             "(waldo serve --engine ray): the results are the best of the others")
    missing_shards: list[int] = Field(default_factory=list, description="the shards that did not answer")

    @classmethod
    def from_outcome(cls, outcome: SearchOutcome, k: int, timings: dict[str, float]) -> SearchResponse:
        """The body for one engine answer (``Waldo.search``), with the caller's ``timings``."""
        return cls(results=outcome.hits, timings=timings, k=k, rerank=outcome.rerank,
                   score_kind=outcome.score_kind, note=outcome.note, partial=outcome.partial,
                   missing_shards=list(outcome.missing_shards))


class AddedImage(BaseModel):
    """One uploaded file's fate: its id and whether this request added it or it was there."""

    id: int
    path: str = Field(description="where the upload is stored: INDEX/uploads/<sha256>.<ext>")
    identity: str
    name: str = Field(description="the client's file name (display only)")
    created: bool = Field(description="false when these exact bytes were already indexed")


class AddResponse(BaseModel):
    images: list[AddedImage]
    count: int = Field(description="images in the index after the add")


class RemoveResponse(BaseModel):
    removed: int
    count: int


class Health(BaseModel):
    status: str
    images: int


class MatchResponse(BaseModel):
    """Correspondences between the query and one indexed image, for drawing them side by side.

    ``lines`` are ``[xq, yq, xc, yc]`` in pixels of each image as uploaded/stored;
    ``available`` is false when no geometric verification is installed."""

    available: bool
    verified: bool = Field(False, description="enough inliers for the GV reranker to promote the image")
    id: int
    method: str
    inliers: int = 0
    matches: int = Field(0, description="tentative (pre-verification) matches")
    lines: list[list[float]] = Field(default_factory=list, description="inliers as [xq, yq, xc, yc]")
    outline: list[list[float]] = Field(
        default_factory=list, description="the query keypoints' bounding box mapped onto the image (4 [x, y])")
    query_size: list[int] = Field(default_factory=list, description="[width, height]")
    image_size: list[int] = Field(default_factory=list, description="[width, height]")
    message: str = ""


class ErrorResponse(BaseModel):
    detail: str
