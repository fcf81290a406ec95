"""Request and response bodies of the native API (pydantic), as shown in the OpenAPI docs."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.spec import Aggregation


class PredictRequest(BaseModel):
    """One base64 PNG/JPEG image, or several."""

    model_config = ConfigDict(extra="forbid")
    image: str | None = Field(None, description="base64 PNG or JPEG (a data: URL prefix is allowed)")
    images: list[str] | None = Field(None, description="several base64 images, answered in order")

    @model_validator(mode="after")
    def _one_of(self) -> PredictRequest:
        if (self.image is None) == (self.images is None):
            raise ValueError('send exactly one of "image" or "images"')
        return self

    def encoded(self) -> list[str]:
        return [self.image] if self.image is not None else list(self.images or [])


class PredictionOut(BaseModel):
    """One image's smoothed answer."""

    id: str = Field(description="prediction id, for POST /feedback")
    label: int = Field(description="predicted class index; -1 when certify abstained")
    class_name: str | None
    probabilities: list[float] = Field(description="mean softmax, softmax of mean logits, or vote shares")
    vote_share: float = Field(description="share of the noisy copies whose argmax is the predicted class")
    samples: int = Field(description="noisy copies m asked for (with confidence: the budget)")
    model: str
    latency_ms: float
    aggregation: str
    abstained: bool | None = Field(None, description="certify only: Cohen's CERTIFY abstained")
    radius: float | None = Field(None, description="certify only: certified L2 radius (sigma's space)")
    p_lower: float | None = Field(None, description="certify only: lower confidence bound on the top class")
    samples_used: int | None = Field(None, description="confidence only: copies drawn before the vote was decided "
                                     "(or the whole budget)")
    decided: bool | None = Field(None, description="confidence only: the vote was settled at that confidence "
                                 "before the budget ran out")


class PredictionsOut(BaseModel):
    predictions: list[PredictionOut]


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(description="the id of an earlier prediction")
    label: int = Field(ge=0, description="the true class index")


class FeedbackOut(BaseModel):
    id: str
    correct: bool


class ErrorOut(BaseModel):
    detail: str | list[dict[str, object]]
    retry_after_s: float | None = Field(None, description="429 only: the exact seconds until the rate limit lets "
                                       "this client in again (``Retry-After`` rounds them up to whole seconds)")


class PredictParams(BaseModel):
    """The query parameters of ``POST /predict``, validated as one model (one pydantic call per request
    instead of one dependency-solver pass per parameter)."""

    samples: int | None = Field(None, description="noisy copies m (default: the checkpoint's)")
    aggregation: Aggregation | None = Field(None, description="vote, softmax or logits (default: the checkpoint's)")
    certify: bool = Field(False, description="also run Cohen's CERTIFY (abstain / L2 radius)")
    alpha: float = Field(0.001, gt=0, lt=0.5, description="certify: failure probability")
    seed: int | None = Field(None, ge=0, lt=2**63, description="fix the noise (only if the server allows it)")
    confidence: float | None = Field(None, gt=0.5, lt=1, description="sequential sampling: `samples` becomes a "
                                     "budget; each image stops once its vote is decided at this confidence "
                                     "(answers add `samples_used`, `decided`)")
