"""Baseline: the obvious FastAPI service, one request -> one forward of its m noisy copies.

No cross-request batching: each request runs its own forward. ``--mode sync`` is FastAPI's advice for
blocking work (a ``def`` endpoint, run in the threadpool, so requests compute concurrently and compete
for the cores); ``--mode async`` runs the model inside an ``async def`` endpoint, one request at a time.
``--backend torch`` runs ``Smooth.predict_batch`` (what a user of ``models`` would write);
``--backend onnx`` runs the service's own exported graph (noise inside) on the m copies and the same
aggregation, so the service can be compared with a plain service on the same runtime.

``python -m benchmarks.baselines.plain_fastapi CHECKPOINT --port 8001 --threads 2``
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from benchmarks.baselines.common import decode_png, default_device, load_smooth, to_json
from models.checkpoint import load_checkpoint
from models.smooth import Prediction, summarize


class Body(BaseModel):
    image: str


def torch_predictor(checkpoint: Path, threads: int, device: str) -> tuple[Callable[..., Prediction], int]:
    smooth = load_smooth(checkpoint, threads, device)

    def predict(image: torch.Tensor, samples: int) -> Prediction:
        return smooth.predict_batch(image.unsqueeze(0).to(device), samples)[0]

    return predict, smooth.smoothing.default_samples


def onnx_predictor(checkpoint: Path, threads: int, device: str, cache: Path) -> tuple[Callable[..., Prediction], int]:
    import onnxruntime as ort

    from service.backends import onnx_graph

    model, manifest = load_checkpoint(checkpoint, "cpu")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    providers: list[object] = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(onnx_graph(model, manifest, checkpoint, cache)), options, providers=providers)
    sigma = np.array([manifest.spec.smoothing.sigma], dtype=np.float32)
    rule = manifest.spec.smoothing.aggregation

    def predict(image: torch.Tensor, samples: int) -> Prediction:
        rows = np.ascontiguousarray(np.broadcast_to(image.numpy(), (samples, *image.shape)))
        logits = session.run(["logits"], {"images": rows, "sigma": sigma})[0]
        return summarize(torch.from_numpy(logits), [samples], rule)[0]

    return predict, manifest.spec.smoothing.default_samples


def create_app(checkpoint: Path, threads: int, device: str, mode: str, backend: str = "torch",
               onnx_cache: Path = Path(".siam-cache/onnx")) -> FastAPI:
    if backend == "onnx":
        predict_one, default_m = onnx_predictor(checkpoint, threads, device, onnx_cache)
    else:
        predict_one, default_m = torch_predictor(checkpoint, threads, device)
    app = FastAPI(title="plain FastAPI baseline")

    if mode == "sync":
        @app.post("/predict")
        def predict(body: Body, samples: int = default_m) -> dict[str, object]:
            return to_json(predict_one(decode_png(body.image), samples))
    else:
        @app.post("/predict")
        async def predict_async(body: Body, samples: int = default_m) -> dict[str, object]:
            return to_json(predict_one(decode_png(body.image), samples))

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default=default_device())
    p.add_argument("--mode", choices=["sync", "async"], default="sync")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    p.add_argument("--onnx-cache", type=Path, default=Path(".siam-cache/onnx"))
    args = p.parse_args(argv)
    app = create_app(args.checkpoint, args.threads, args.device, args.mode, args.backend, args.onnx_cache)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
