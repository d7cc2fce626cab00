"""One settings model for ``jvlm serve``: its fields are the CLI flags (see ``cli.add_serve_arguments``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..hub import DEFAULT_MODEL
from ..images.safe_http import UrlPolicy


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str = Field(DEFAULT_MODEL, description="Hub repo id or local snapshot directory to serve.")
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on (0 = any free port).")
    api_key: str | None = Field(
        None, description="Require 'Authorization: Bearer KEY' on /v1/* (default: the JVLM_API_KEY environment "
                          "variable, else no key).")
    served_model_name: str = Field(
        "jina-vlm", description="Model name reported by /v1/models; requests may also name --model as given.")
    dtype: Literal["float32", "bfloat16", "float16", "int8"] = Field("float32", description="Weight format.")
    threads: int | None = Field(None, ge=1, description="CPU threads for the model (default: the physical cores).")
    max_batch: int = Field(16, ge=1, description="Most sequences decoded together in one step.")
    max_queue: int = Field(
        64, ge=1, description="Most requests waiting beyond the max_batch running ones (reading their body, loading "
                              "images or queued for a batch slot); beyond it 503 + Retry-After.")
    max_images_per_request: int = Field(8, ge=0, description="Most images in one request.")
    max_body_bytes: int = Field(32 << 20, ge=1024, description="Largest request body in bytes; beyond it 413.")
    body_timeout: float = Field(
        60.0, gt=0, description="Seconds a client may take to send its request body; beyond it 408.")
    header_timeout: float = Field(
        30.0, gt=0, description="Seconds a client may take to send a request's line and headers, from their first "
                                "byte (from connecting, for a connection's first request); beyond it 408 and the "
                                "connection is closed.")
    max_image_bytes: int = Field(20 << 20, ge=1, description="Largest single image (decoded data URI or download).")
    max_image_pixels: int = Field(
        50_000_000, ge=1, description="Most pixels (width x height) of one image, checked before decoding it.")
    max_total_image_pixels: int = Field(
        50_000_000, ge=1, description="Most decoded pixels of all the images of one request together.")
    image_fetch_timeout: float = Field(10.0, gt=0, description="Seconds allowed to download one image URL.")
    allow_private_urls: bool = Field(
        False, description="Let image URLs reach every address, loopback and private ones included.")
    allowed_hosts: list[str] = Field(
        [], description="Image URL hosts allowed although private: names, *.suffix wildcards, IPs or CIDR "
                        "networks (default: none).")
    allow_file_dir: Path | None = Field(
        None, description="Serve file: image URLs, only for files inside this directory, symlinks and '..' "
                          "resolved first (default: file: URLs refused).")
    default_max_tokens: int = Field(
        1024, ge=1, description="Completion tokens when a request sets neither max_tokens nor "
                                "max_completion_tokens (always clamped to the context).")
    request_timeout: float = Field(
        600.0, ge=0, description="Seconds a chat request may take (images, queue and generation) before it is "
                                 "cancelled with 504; 0 = no limit.")
    write_timeout: float = Field(
        30.0, gt=0, description="Seconds a stream may wait for a client that does not read it; then the request "
                                "is cancelled and the connection closed.")
    prefix_cache_bytes: int = Field(
        1 << 30, ge=0, description="Byte budget of the KV caches kept for prompt-prefix reuse (0 = off).")
    image_cache_bytes: int = Field(
        256 << 20, ge=0, description="Byte budget of the image-feature cache (0 = off).")
    shutdown_timeout: float = Field(
        30.0, ge=0, description="On SIGTERM, seconds to let in-flight requests finish before cancelling them.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="Log level.")

    @field_validator("allow_file_dir")
    @classmethod
    def _existing_directory(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"allow_file_dir {str(value)!r} is not an existing directory")
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _valid_hosts(cls, value: list[str]) -> list[str]:
        UrlPolicy(allowed_hosts=tuple(value))  # a bad entry raises InvalidRequestError (a ValueError) naming it
        return value

    @property
    def max_in_flight(self) -> int:
        """Chat requests the server holds at once (running or waiting); one more is answered 503."""
        return self.max_batch + self.max_queue

    @property
    def model_names(self) -> tuple[str, ...]:
        """Names a request's ``model`` may use."""
        return (self.served_model_name, self.model)
