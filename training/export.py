"""Export a checkpoint to ONNX and prove the graph computes what PyTorch does (``siam export``).

The graph carries the smoothing noise inside (see :mod:`models.onnx`). Parity is checked on the same
noise-free input (``sigma = 0``) at several batch sizes, which also exercises the dynamic batch
axis; then the noisy graph is run twice to show that it really draws fresh noise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import Manifest, load_checkpoint
from models.cli_types import non_negative_int, positive_int
from models.onnx import default_providers, export_onnx
from models.pni import has_weight_noise


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="siam export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint folder")
    p.add_argument("--output", default=None, help="ONNX file (default: <checkpoint>/model.onnx)")
    p.add_argument("--atol", type=float, default=1e-3, help="largest allowed |logit difference| (default: %(default)s)")
    p.add_argument("--provider", default=None, help="ONNX Runtime provider for the check (default: best available)")
    p.add_argument("--canary", type=non_negative_int, default=0, metavar="N",
                   help="also write <checkpoint>/canary.safetensors: N test images, clean and EOT-PGD-attacked, "
                        "that the service re-scores when SIAM_CANARY_INTERVAL_S > 0 (default: none)")
    p.add_argument("--data", default=None, help="CIFAR source for --canary and --int8 (default: as siam train)")
    p.add_argument("--int8", action="store_true",
                   help="also write <checkpoint>/model-int8.onnx: ONNX Runtime static quantization (QDQ, per-channel "
                        "int8 weights), calibrated on the checkpoint's held-out validation images; serve it with "
                        "SIAM_PRECISION=int8")
    p.add_argument("--cache-dir", default="data-cache", help="where decoded data is cached (default: %(default)s)")
    p.add_argument("--calibration-images", type=positive_int, default=512,
                   help="validation images for --int8's activation ranges (default: %(default)s)")
    return p


def export_int8(checkpoint: str, fp32: Path, manifest: Manifest, data: str, images: int, cache_dir: str) -> Path:
    """Quantize ``fp32`` on the checkpoint's own validation images (never test images)."""
    from models.quantize import INT8_FILE, quantize_int8
    from training.data import load_split, to_float

    config = (manifest.training or {}).get("config", {})
    val_images, val_seed = int(config.get("val_images") or 0), int(config.get("val_seed") or 0)
    if val_images == 0:
        raise SystemExit(f"{checkpoint} was trained without held-out validation images: nothing to calibrate on "
                         "that is neither training nor test data")
    validation, _ = load_split(data, "train", cache_dir).hold_out(val_images, val_seed)
    calibration = validation.subset(min(images, len(validation)), seed=0)
    return quantize_int8(fp32, Path(checkpoint) / INT8_FILE, to_float(calibration.images).numpy(),
                         manifest.spec.smoothing.sigma,
                         {"split": "validation", "val_images": val_images, "val_seed": val_seed})


def check_parity(model: torch.nn.Module, onnx_path: Path, sigma: float, atol: float,
                 provider: str | None = None, batch_sizes: tuple[int, ...] = (1, 7, 64)) -> dict[str, object]:
    """Max |ONNX - PyTorch| logit difference at sigma = 0, plus a check that sigma > 0 adds noise."""
    import onnxruntime as ort

    providers = [provider] if provider else default_providers()
    session = ort.InferenceSession(str(onnx_path), providers=providers)
    size = session.get_inputs()[0].shape[2]
    worst = 0.0
    zero = np.zeros(1, dtype=np.float32)
    gen = torch.Generator().manual_seed(0)
    for n in batch_sizes:
        x = torch.rand(n, 3, size, size, generator=gen)
        with torch.inference_mode():
            expected = model(x).numpy()
        got = session.run(["logits"], {"images": x.numpy(), "sigma": zero})[0]
        worst = max(worst, float(np.abs(got - expected).max()))
    x = torch.rand(4, 3, size, size, generator=gen).numpy()
    s = np.array([max(sigma, 0.1)], dtype=np.float32)
    draws_differ = not np.allclose(session.run(["logits"], {"images": x, "sigma": s})[0],
                                   session.run(["logits"], {"images": x, "sigma": s})[0])
    result = {"max_abs_diff": worst, "atol": atol, "batch_sizes": list(batch_sizes),
              "provider": session.get_providers()[0], "noise_in_graph": draws_differ}
    if worst > atol:
        raise SystemExit(f"ONNX parity check failed: max |diff| {worst:.2e} > {atol:.0e} ({result})")
    if not draws_differ:
        raise SystemExit("ONNX graph gave identical outputs for two noisy runs: noise is not in the graph")
    return result


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    model, manifest = load_checkpoint(args.checkpoint, "cpu")
    out = Path(args.output) if args.output else Path(args.checkpoint) / "model.onnx"
    if has_weight_noise(model):
        # Per-row PNI-W weight noise has no faithful ONNX form; the service runs these on the torch backend.
        message = f"{args.checkpoint} has PNI-W weight noise: no ONNX export (the service serves it with PyTorch)"
        if not args.canary:
            raise SystemExit(message)
        print(f"skipped ONNX: {message}")
    else:
        export_onnx(model, manifest.spec, out, manifest.weights.sha256)
        result = check_parity(model, out, manifest.spec.smoothing.sigma, args.atol, args.provider)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
        print(f"parity at sigma=0 on batches {result['batch_sizes']}: max |logit diff| "
              f"{result['max_abs_diff']:.2e} (<= {args.atol:g}); provider that ran: {result['provider']}; "
              f"noise drawn in graph: {result['noise_in_graph']}")
        if args.int8:
            from training.data import DEFAULT_DATA

            path = export_int8(args.checkpoint, out, manifest, args.data or DEFAULT_DATA, args.calibration_images,
                               args.cache_dir)
            print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB; int8, calibrated on "
                  f"{args.calibration_images} validation images); serve with SIAM_PRECISION=int8")
    if args.canary:
        from training.canary import make_canary
        from training.data import DEFAULT_DATA

        path = make_canary(args.checkpoint, args.data or DEFAULT_DATA, args.canary)
        print(f"wrote {path} ({args.canary} images, clean and EOT-PGD-attacked)")


if __name__ == "__main__":
    main()
