"""Request bodies of the index server as typed models: every field checked for type and range before a route
runs, every count capped (a documented maximum, and a 422 that names the field and the limit), no NaN or
infinity anywhere, and JSON nesting bounded by the parser. JSON fields are strict: a number is a JSON number
(never the string "0.1" or true), a count a whole JSON number (never true), a switch a JSON boolean; only the
multipart form of /v1/check converts its strings. Unknown fields are ignored, as clip-retrieval clients send
options this server does not implement.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Documented maxima (docs/checking.md, "Limits and guarantees").
MAX_NUM_IMAGES = 1000          # /knn-service num_images and num_result_ids
MAX_METADATA_IDS = 1000        # /metadata ids per call
MAX_TOP_K = 100                # /v1/check top_k
MAX_TEXT_CHARS = 2000          # /knn-service text
MAX_URL_CHARS = 2048           # /knn-service image_url
MAX_EMBEDDING_DIM = 4096       # /knn-service embedding_input
MAX_NAME_CHARS = 200           # index names
MAX_GENERATION_KEYS = 64       # /v1/check generation record fields

Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]  # a JSON number (an int is one too)
Count = Annotated[int, Field(strict=True)]
Switch = Annotated[bool, Field(strict=True)]

# clip-retrieval's front end sends "" for options left empty; they are accepted and ignored.
IgnoredNumber = Annotated[float, Field(allow_inf_nan=False)] | Annotated[str, Field(max_length=32)] | None


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", ser_json_inf_nan="null")


class KnnRequest(_Body):
    indice_name: str | None = Field(None, max_length=MAX_NAME_CHARS)
    modality: Literal["image", "text"] = "image"
    num_images: Count = Field(40, ge=1, le=MAX_NUM_IMAGES)
    num_result_ids: Count | None = Field(None, ge=1, le=MAX_NUM_IMAGES)
    text: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    image: str | None = None
    image_url: str | None = Field(None, max_length=MAX_URL_CHARS)
    # Finite numbers, checked by pydantic's own parser: a Python loop over 768 values cost a request 40 us.
    embedding_input: list[Number] | None = Field(None, min_length=1, max_length=MAX_EMBEDDING_DIM)
    deduplicate: Switch = True
    # Accepted for clip-retrieval clients and ignored: no safety model, no aesthetic mixing here.
    use_safety_model: Switch = False
    use_violence_detector: Switch = False
    aesthetic_score: IgnoredNumber = None
    aesthetic_weight: IgnoredNumber = None
    use_mclip: Switch = False


class MetadataRequest(_Body):
    indice_name: str | None = Field(None, max_length=MAX_NAME_CHARS)
    ids: list[Count] = Field(..., max_length=MAX_METADATA_IDS)


class CheckOptions(_Body):
    """/v1/check options, from a JSON body or the fields of a multipart form (strings, converted here)."""

    indices: list[str] | str | None = None
    top_k: int = Field(10, ge=1, le=MAX_TOP_K)
    warn: float | None = Field(None, ge=-1.0, le=1.0, allow_inf_nan=False)
    block: float | None = Field(None, ge=-1.0, le=1.0, allow_inf_nan=False)
    fail_mode: Literal["open", "closed"] | None = None
    verify: Literal["off", "confirm", "escalate", "confirm+escalate"] | None = None
    # whole: the image is one query; multi: also its 2 x 2 grid and centre (core.policy.VIEWS). Unset: whole.
    views: Literal["whole", "multi"] | None = None
    generation: dict[str, Any] | list[dict[str, Any] | None] | str | None = None
    user: str | None = Field(None, max_length=MAX_NAME_CHARS)

    @field_validator("warn", "block", "fail_mode", "verify", "views", "user", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        return None if value == "" else value

    @field_validator("indices")
    @classmethod
    def _names(cls, value):
        names = [n.strip() for n in value.split(",")] if isinstance(value, str) else list(value)
        if len(names) > 16 or any(len(n) > MAX_NAME_CHARS for n in names):
            raise ValueError(f"at most 16 index names of at most {MAX_NAME_CHARS} characters")
        return [n for n in names if n]

    @field_validator("generation")
    @classmethod
    def _generation(cls, value):
        records = value if isinstance(value, list) else [value]
        for record in records:
            if isinstance(record, dict) and len(record) > MAX_GENERATION_KEYS:
                raise ValueError(f"a generation record holds at most {MAX_GENERATION_KEYS} fields")
        return value


class CheckRequest(CheckOptions):
    """JSON /v1/check: images (base64), or precomputed embeddings of the bundles' model (one per image)."""

    images: list[str] | None = Field(None, min_length=1)
    embeddings: list[Annotated[list[Number], Field(min_length=1, max_length=MAX_EMBEDDING_DIM)]] | None = \
        Field(None, min_length=1, max_length=MAX_NUM_IMAGES)
    # JSON: strict (the form fields of CheckOptions arrive as strings and are converted there).
    top_k: Count = Field(10, ge=1, le=MAX_TOP_K)
    warn: Number | None = Field(None, ge=-1.0, le=1.0)
    block: Number | None = Field(None, ge=-1.0, le=1.0)

    @field_validator("warn", "block", "fail_mode", "verify", "views", "user", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):  # JSON has null for "unset": "" is no number or choice here
        return value

    @model_validator(mode="after")
    def _one_input(self):
        if (self.images is None) == (self.embeddings is None):
            raise ValueError("give either images (base64) or embeddings, not both and not neither")
        return self


def problem_of(exc: ValidationError) -> str:
    """One line naming each bad field and what is wrong with it."""
    parts = []
    for error in exc.errors(include_url=False)[:5]:
        where = ".".join(str(x) for x in error.get("loc", ())) or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)
