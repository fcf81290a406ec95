"""``siam info CHECKPOINT``: show a checkpoint's manifest after verifying its weights."""

from __future__ import annotations

import argparse
import json

from models.checkpoint import CheckpointError, load_checkpoint


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="siam info", description=__doc__)
    p.add_argument("checkpoint", help="checkpoint folder")
    p.add_argument("--full", action="store_true", help="include the whole training record")
    args = p.parse_args(argv)
    try:
        model, manifest = load_checkpoint(args.checkpoint)
    except CheckpointError as e:
        raise SystemExit(f"siam info: {e}") from None
    data = manifest.model_dump(mode="json")
    if not args.full:
        history = data["training"].pop("history", [])
        data["training"].pop("config", None)
        data["training"]["last_epoch"] = history[-1] if history else None
    data["parameters"] = sum(p.numel() for p in model.parameters())
    print(json.dumps(data, indent=2))
    print("weights verified: sha256 matches the manifest")


if __name__ == "__main__":
    main()
