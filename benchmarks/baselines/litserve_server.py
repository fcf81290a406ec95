"""Baseline: LitServe with its own dynamic batching, over the same ``Smooth`` as the service.

LitServe gathers up to ``--max-batch-size`` requests (waiting at most ``--batch-timeout`` seconds),
and ``predict`` runs all their noisy copies in one ``Smooth.predict_batch`` call, each image with its
own m. LitServe hands ``decode_request`` the JSON body only, so ``samples`` travels inside it:
``{"image": <base64 PNG>, "samples": 16}``.

``python -m benchmarks.baselines.litserve_server CHECKPOINT --port 8002 --threads 2``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import litserve as ls
import torch

from benchmarks.baselines.common import decode_png, default_device, load_smooth, to_json
from models.smooth import Prediction


class SmoothAPI(ls.LitAPI):
    """One request: one image and its m; one batch: every waiting request's copies in one pass."""

    def __init__(self, checkpoint: Path, threads: int, max_batch_size: int, batch_timeout: float):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.checkpoint = checkpoint
        self.threads = threads

    def setup(self, device: str) -> None:
        self.device = device
        self.smooth = load_smooth(self.checkpoint, self.threads, device)

    def decode_request(self, request: dict[str, object]) -> tuple[torch.Tensor, int]:
        samples = int(request.get("samples", self.smooth.smoothing.default_samples))  # type: ignore[call-overload]
        return decode_png(str(request["image"])), samples

    def batch(self, inputs: list[tuple[torch.Tensor, int]]) -> list[tuple[torch.Tensor, int]]:
        return inputs

    def predict(self, batch: list[tuple[torch.Tensor, int]] | tuple[torch.Tensor, int]) -> list[Prediction]:
        items = batch if isinstance(batch, list) else [batch]
        images = torch.stack([image for image, _ in items]).to(self.device)
        return self.smooth.predict_batch(images, [m for _, m in items])

    def unbatch(self, output: list[Prediction]) -> list[Prediction]:
        return output

    def encode_response(self, output: Prediction | list[Prediction]) -> dict[str, object]:
        return to_json(output[0] if isinstance(output, list) else output)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--port", type=int, default=8002)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default=default_device())
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--batch-timeout", type=float, default=0.005, help="seconds")
    args = p.parse_args(argv)
    api = SmoothAPI(args.checkpoint, args.threads, args.max_batch_size, args.batch_timeout)
    accelerator = "cuda" if args.device.startswith("cuda") else "cpu"
    server = ls.LitServer(api, accelerator=accelerator, devices=1, workers_per_device=1, timeout=120)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, generate_client_file=False,
               log_level="warning")


if __name__ == "__main__":
    main()
