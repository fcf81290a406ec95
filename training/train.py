"""Adversarial training of a CIFAR ResNet for smoothed inference (``siam train``).

One step: craft adversarial examples against the *noisy* model (Gaussian input noise at sigma and,
with PNI-W, weight noise on while the attack runs), then minimise
``clean_weight * CE(clean) + (1 - clean_weight) * CE(adversarial)`` on noisy copies of both. The attack
is PGD-k (Madry et al.), FGSM with random start (Wong et al.'s "fast" adversarial training), or
SmoothAdv (Salman et al., 2019): PGD-k on the *smoothed* soft classifier itself, the log of the mean
softmax over ``--train-samples`` noisy copies, so training sees the attack the served model faces.
TRADES (Zhang et al., 2019) replaces both the attack and the loss: PGD-k on KL(f(x) || f(x')), then
``CE(clean) + beta * KL(clean || adversarial)``, a margin-aware loss that keeps the whole output
distribution in place rather than the true class's score alone.

``--init CHECKPOINT`` starts from a checkpoint's weights (fine-tuning, e.g. to a larger sigma); the
architecture and held-out split come from it, and the record names it.

Runs on CPU or CUDA (mixed precision and channels_last there), on one process or many under
``torchrun`` (DistributedDataParallel; gloo on CPU, NCCL on GPUs). The run folder holds ``state.pt``
(resume), ``log.jsonl`` (one line per epoch) and ``checkpoint/`` (the servable checkpoint, rewritten
after every epoch, with its training record).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import subprocess
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from models.checkpoint import Manifest, load_checkpoint, read_manifest, save_checkpoint
from models.cli_types import non_negative_float, non_negative_int, positive_int, unwritable
from models.resnet import Classifier, build_classifier
from models.smooth import Smooth
from models.spec import ArchitectureSpec, ModelSpec, NoiseLayerSpec, NormalizationSpec, SmoothingSpec
from training.attacks import fgsm, pgd, smoothed_log_probs, trades_kl, trades_pgd
from training.data import Dataset, add_data_arguments, augment, load_split, to_float

# Settings a resumed run must share with the run it resumes (the others, such as --epochs, may change).
RESUME_INVARIANTS = ("data", "train_images", "val_images", "val_seed", "arch", "width", "pni", "sigma",
                     "noise_space", "attack", "train_samples", "eps", "step", "steps", "clean_weight", "beta",
                     "batch_size", "lr", "momentum", "weight_decay", "schedule", "warmup_epochs", "seed", "init")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="siam train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    add_data_arguments(g)
    g.add_argument("--train-images", type=positive_int, default=None, help="train on a random subset of this size")
    g.add_argument("--val-images", type=non_negative_int, default=None,
                   help="hold this many training images out of training (a fixed random choice, --val-seed) and "
                        "record them in the checkpoint, so `siam evaluate --report` can pick sigma and m on images "
                        "the model never saw (default: --init's split, else 0: train on the whole split)")
    g.add_argument("--val-seed", type=int, default=None,
                   help="seed of the held-out choice (default: --init's, else 2019)")
    g.add_argument("--eval-images", type=non_negative_int, default=1000,
                   help="test images for the per-epoch clean accuracy")
    g.add_argument("--eval-attack-images", type=non_negative_int, default=200,
                   help="test images for the per-epoch PGD accuracy")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default=None, choices=["resnet20", "resnet32", "resnet44", "resnet56"],
                   help="network (default: --init's, else resnet20)")
    g.add_argument("--width", type=positive_int, default=None,
                   help="channel width multiplier, e.g. --width 4 for PNI's ResNet-20 x4 (default: --init's, else 1)")
    g.add_argument("--pni", default=None, choices=["none", "layer", "channel", "element"],
                   help="PNI-W weight noise and its granularity (default: --init's, else none)")
    g.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start from this checkpoint's weights (fine-tuning); its architecture, noise layers and "
                        "held-out split are used, and the training record names it")
    g = p.add_argument_group("smoothing (stored in the checkpoint)")
    g.add_argument("--sigma", type=non_negative_float, default=0.0625,
                   help="std of the Gaussian input noise, in training and in the stored smoothing "
                        "(default: %(default)s)")
    g.add_argument("--noise-space", default="pixel", choices=["pixel", "normalized"],
                   help="space sigma is measured in: pixel = images in [0, 1] (default), normalized = after mean/std")
    g.add_argument("--samples", type=positive_int, default=16, help="default number of noisy copies m at inference")
    g.add_argument("--aggregation", default="softmax", choices=["vote", "softmax", "logits"])
    g = p.add_argument_group("adversarial training")
    g.add_argument("--attack", default="pgd", choices=["pgd", "fgsm", "smoothadv", "trades", "none"],
                   help="pgd: PGD-k on the noisy model (Madry); fgsm: FGSM with random start (fast AT); "
                        "smoothadv: PGD-k on the smoothed soft classifier, log of the mean softmax over "
                        "--train-samples noisy copies (Salman et al.); trades: PGD-k on the KL divergence "
                        "from the clean output, loss CE(clean) + beta KL (Zhang et al.); "
                        "none: training on noisy copies only")
    g.add_argument("--train-samples", type=positive_int, default=2,
                   help="noisy copies in the smoothed classifier that smoothadv attacks (default: %(default)s)")
    g.add_argument("--eps", type=non_negative_float, default=8 / 255)
    g.add_argument("--step", type=non_negative_float, default=2 / 255, help="PGD step size (FGSM uses 1.25 * eps)")
    g.add_argument("--steps", type=positive_int, default=7, help="PGD steps (default: %(default)s)")
    g.add_argument("--clean-weight", type=float, default=None,
                   help="weight of the clean loss for pgd, fgsm and smoothadv (default: 0.5; trades has its own)")
    g.add_argument("--beta", type=float, default=None,
                   help="trades: weight of the KL term (default: 6.0, the TRADES paper's CIFAR-10 value)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=200)
    g.add_argument("--batch-size", type=positive_int, default=128, help="global batch size (split across processes)")
    g.add_argument("--lr", type=non_negative_float, default=0.1)
    g.add_argument("--momentum", type=non_negative_float, default=0.9)
    g.add_argument("--weight-decay", type=non_negative_float, default=5e-4)
    g.add_argument("--schedule", default="cosine", choices=["cosine", "step"],
                   help="cosine (after --warmup-epochs linear warm-up) or step (x0.1 at 50%% and 75%%)")
    g.add_argument("--warmup-epochs", type=non_negative_float, default=0.0)
    g = p.add_argument_group("run")
    g.add_argument("--output", default="runs/resnet20", help="run folder (default: %(default)s)")
    g.add_argument("--name", default=None, help="model name in the manifest (default: the run folder's name)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"],
                   help="mixed precision (auto: bf16 on CUDA, none on CPU)")
    g.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-resume", action="store_true", help="start over even if the run folder has a state")
    g.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many steps (smoke tests)")
    g.add_argument("--quick", action="store_true",
                   help="a tiny run for trying things out: 2000 images, 1 epoch, FGSM, small evaluation")
    return p


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> Dist:
    """Join the torchrun process group when launched by torchrun; a single process otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def apply_quick(args: argparse.Namespace) -> None:
    if args.quick:
        args.train_images = args.train_images or 2000
        args.epochs = 1
        args.attack = "fgsm"
        args.eval_images = min(args.eval_images, 200)
        args.eval_attack_images = min(args.eval_attack_images, 50)


def model_spec(args: argparse.Namespace, classes: tuple[str, ...]) -> ModelSpec:
    return ModelSpec(
        architecture=ArchitectureSpec(name=args.arch, width=args.width, num_classes=len(classes)),
        normalization=NormalizationSpec(),
        noise_layers=NoiseLayerSpec(type="none" if args.pni == "none" else "pni-w",
                                    mode="layer" if args.pni == "none" else args.pni),
        smoothing=SmoothingSpec(sigma=args.sigma, space=args.noise_space, default_samples=args.samples,
                                aggregation=args.aggregation),
        class_names=classes,
    )


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on the weights but not on PNI's noise scales: decay would pull ``alpha`` to zero and
    switch the noise off (PNI's reference code leaves ``alpha`` undecayed too)."""
    alphas = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "alpha"]
    others = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] != "alpha"]
    return [{"params": others, "weight_decay": weight_decay}, {"params": alphas, "weight_decay": 0.0}]


def learning_rate(args: argparse.Namespace, progress: float) -> float:
    """LR at ``progress`` epochs into training (fractional, updated every step)."""
    if progress < args.warmup_epochs:
        return args.lr * progress / args.warmup_epochs
    if args.schedule == "step":
        return args.lr * (0.1 ** (int(progress >= 0.5 * args.epochs) + int(progress >= 0.75 * args.epochs)))
    span = max(args.epochs - args.warmup_epochs, 1e-8)
    return 0.5 * args.lr * (1 + math.cos(math.pi * (progress - args.warmup_epochs) / span))


def resolve_amp(device: torch.device, amp: str) -> str:
    return ("bf16" if device.type == "cuda" else "none") if amp == "auto" else amp


def rng_states(device: torch.device, ddp: Dist) -> list[dict[str, torch.Tensor]]:
    """Every rank's random state (CPU, and CUDA where it runs), gathered on rank 0: a resumed run then
    draws the same noise and attack starts it would have drawn without the interruption."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if ddp.world == 1:
        return [state]
    gathered: list[Any] = [None] * ddp.world
    dist.all_gather_object(gathered, {k: v.cpu() for k, v in state.items()})
    return gathered


def restore_rng(saved: list[dict[str, torch.Tensor]] | None, device: torch.device, ddp: Dist) -> None:
    if saved is None or len(saved) != ddp.world:
        if ddp.main:
            print("random state not restored (saved by an older version or another world size): fresh streams")
        return
    torch.set_rng_state(saved[ddp.rank]["cpu"].cpu())
    if device.type == "cuda" and "cuda" in saved[ddp.rank]:
        torch.cuda.set_rng_state(saved[ddp.rank]["cuda"].cpu(), device)


def autocast(device: torch.device, amp: str) -> Any:
    amp = resolve_amp(device, amp)
    if amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def resolve_init(args: argparse.Namespace) -> Manifest | None:
    """Fill the architecture and held-out split from ``--init``'s manifest (or the plain defaults), and
    refuse a flag that contradicts the parent: its weights fit one architecture, and its held-out images
    must stay held out."""
    parent = read_manifest(args.init) if args.init else None
    inherited: dict[str, Any] = {"arch": "resnet20", "width": 1, "pni": "none", "val_images": 0, "val_seed": 2019}
    if parent is not None:
        arch, layers = parent.spec.architecture, parent.spec.noise_layers
        validation = (parent.training or {}).get("data", {}).get("validation", {})
        inherited = {"arch": arch.name, "width": arch.width,
                     "pni": "none" if layers.type == "none" else layers.mode,
                     "val_images": validation.get("images", 0), "val_seed": validation.get("seed", 2019)}
    for key, value in inherited.items():
        given = getattr(args, key)
        if given is None:
            setattr(args, key, value)
        elif parent is not None and given != value:
            flag = "--" + key.replace("_", "-")
            raise SystemExit(f"{flag} {given} contradicts --init {args.init}, which has {flag} {value}; "
                             f"leave {flag} out to use the parent's")
    return parent


def parent_record(path: str, parent: Manifest) -> dict[str, Any]:
    """What the training record says of the checkpoint a fine-tune started from."""
    return {"checkpoint": str(path), "name": parent.name, "weights_sha256": parent.weights.sha256,
            "smoothing": parent.spec.smoothing.model_dump(),
            "epochs_completed": (parent.training or {}).get("epochs_completed"),
            "git_commit": (parent.training or {}).get("environment", {}).get("git_commit")}


def check_resume(state: dict[str, Any], args: argparse.Namespace, state_path: Path) -> None:
    """Refuse to resume a run under settings that change what it trains on or how."""
    saved = json.loads(state.get("config", "{}"))
    if not saved:  # states written before configs were saved: the held-out split is all they record
        saved = {"val_images": state.get("val_images", 0)}
    changed = [f"--{k.replace('_', '-')} {saved[k]} -> {getattr(args, k)}" for k in RESUME_INVARIANTS
               if k in saved and saved[k] != getattr(args, k)]
    if changed:
        raise SystemExit(f"{state_path} was trained with other settings ({'; '.join(changed)}); resuming would mix "
                         f"two runs. Give the original settings, another --output, or --no-resume to start over")


def resolve_loss_weights(args: argparse.Namespace) -> None:
    """Fill --clean-weight / --beta for the chosen attack and refuse the one that would be ignored."""
    if args.attack == "trades":
        if args.clean_weight is not None:
            raise SystemExit("--clean-weight does not apply to --attack trades (its loss is CE(clean) + beta KL); "
                             "use --beta")
        args.beta = 6.0 if args.beta is None else args.beta
        if args.beta < 0:
            raise SystemExit("--beta must be >= 0")
        return
    if args.beta is not None:
        raise SystemExit(f"--beta applies to --attack trades only, not {args.attack}")
    args.clean_weight = 0.5 if args.clean_weight is None else args.clean_weight


def training_loss(args: argparse.Namespace, clean_logits: torch.Tensor, adv_logits: torch.Tensor,
                  y: torch.Tensor) -> torch.Tensor:
    """The step's loss on the noisy clean and adversarial halves of the batch."""
    if args.attack == "trades":
        return F.cross_entropy(clean_logits, y) + args.beta * trades_kl(clean_logits, adv_logits).mean()
    return (args.clean_weight * F.cross_entropy(clean_logits, y)
            + (1 - args.clean_weight) * F.cross_entropy(adv_logits, y))


def craft(args: argparse.Namespace, f: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if args.attack == "trades":
        return trades_pgd(f, x, eps=args.eps, step=args.step, steps=args.steps)
    if args.attack in ("pgd", "smoothadv"):  # f is the smoothed soft classifier for smoothadv
        return pgd(f, x, y, eps=args.eps, step=args.step, steps=args.steps)
    if args.attack == "fgsm":
        return fgsm(f, x, y, eps=args.eps, random_start=True)
    return x


@torch.no_grad()
def _accuracy(f: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((f(x).argmax(1) == y).float().mean()) if len(y) else float("nan")


def evaluate_epoch(args: argparse.Namespace, model: Classifier, spec: ModelSpec, test: Dataset,
                   device: torch.device) -> dict[str, float]:
    """Quick per-epoch health check: accuracy of the noisy base model (one draw), clean and under PGD-7."""
    model.eval()
    smooth = Smooth(model, spec.smoothing, spec.architecture.num_classes)
    f = smooth.forward_noisy
    clean = test.subset(args.eval_images, seed=1)
    correct = 0
    for i in range(0, len(clean), 500):
        x = to_float(clean.images[i:i + 500].to(device))
        correct += int((f(x).argmax(1) == clean.labels[i:i + 500].to(device)).sum())
    attacked = test.subset(args.eval_attack_images, seed=2)
    x, y = to_float(attacked.images.to(device)), attacked.labels.to(device)
    adv = pgd(f, x, y) if len(y) else x
    robust = _accuracy(f, adv, y)  # in eval mode: a train-mode forward would fold test images into BatchNorm
    model.train()
    return {"test_clean_acc": correct / max(len(clean), 1), "test_pgd7_acc": robust,
            "eval_images": len(clean), "eval_attack_images": len(y)}


def validation_record(validation: Dataset, seed: int) -> dict[str, Any]:
    """What the report needs to rebuild the held-out split and to check it got the same images."""
    return {"images": len(validation), "seed": seed, "split": "train",
            "images_sha256": hashlib.sha256(validation.images.numpy().tobytes()).hexdigest()}


def environment(device: torch.device) -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip() or None
        # HEAD alone does not say what ran: uncommitted changes to tracked files do too.
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, check=False).stdout.strip()) if commit else None
    except OSError:
        commit, dirty = None, None
    return {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or platform.machine(), "threads": torch.get_num_threads(), "git_commit": commit, "git_dirty": dirty}


def train(args: argparse.Namespace) -> Path:
    apply_quick(args)
    resolve_loss_weights(args)
    parent = resolve_init(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    ddp = setup_distributed(torch.device("cuda" if args.device.startswith("cuda") or
                                         (args.device == "auto" and torch.cuda.is_available()) else "cpu"))
    device = resolve_device(args.device, ddp.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed + ddp.rank)
    out = Path(args.output)
    if problem := unwritable(out):
        raise SystemExit(f"siam train: cannot write the checkpoint to {out}: {problem}")
    name = args.name or out.name

    validation, train_set = load_split(args.data, "train", args.cache_dir).hold_out(args.val_images, args.val_seed)
    train_set = train_set.subset(args.train_images, seed=args.seed)
    test_set = load_split(args.data, "test", args.cache_dir)
    spec = model_spec(args, train_set.classes)
    model = build_classifier(spec)
    if parent is not None:
        model.load_state_dict(load_checkpoint(args.init)[0].state_dict())
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(parameter_groups(model, args.weight_decay), lr=args.lr, momentum=args.momentum,
                          nesterov=True)
    # fp16 needs its loss scaled (small gradients underflow in half precision); bf16 does not.
    scaler = torch.amp.GradScaler(device.type, enabled=resolve_amp(device, args.amp) == "fp16")
    start_epoch, skip, history = 0, 0, []
    state_path = out / "state.pt"
    if state_path.is_file() and not args.no_resume:
        state = torch.load(state_path, map_location=device, weights_only=True)
        check_resume(state, args, state_path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        start_epoch, skip = state["epoch"], state.get("epoch_step", 0)
        history = [h for h in json.loads(state["history"]) if not h.get("partial")]  # redone to its end
        restore_rng(state.get("rng"), device, ddp)
        if ddp.main:
            print(f"resuming {out} from epoch {start_epoch}" + (f", step {skip} of it" if skip else ""))
    net: nn.Module = DistributedDataParallel(model) if ddp.world > 1 else model
    # The attack only needs input gradients: it runs on the bare model, outside DDP's gradient sync.
    attack_smooth = Smooth(model, spec.smoothing, spec.architecture.num_classes, per_row_weight_noise=False)
    attack_fn = (smoothed_log_probs(attack_smooth, args.train_samples) if args.attack == "smoothadv"
                 else attack_smooth.forward_noisy)
    train_fn = Smooth(net, spec.smoothing, spec.architecture.num_classes,  # type: ignore[arg-type]
                      per_row_weight_noise=False).forward_noisy

    images, labels = train_set.images.to(device), train_set.labels.to(device)
    per_rank = args.batch_size // ddp.world
    steps_per_epoch = len(train_set) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the {len(train_set)} training images")
    record_base = {
        "config": {k: v for k, v in vars(args).items()},
        "data": {"source": train_set.source, "sha256": train_set.checksum, "encoding": train_set.encoding,
                 "train_images": len(train_set), "test_images": len(test_set),
                 **({"validation": validation_record(validation, args.val_seed)} if len(validation) else {})},
        "environment": environment(device), "world_size": ddp.world,
        **({"init": parent_record(args.init, parent)} if parent is not None else {}),
    }
    step = start_epoch * steps_per_epoch + skip
    if start_epoch >= args.epochs and ddp.main:  # a finished run resumed with the same or fewer --epochs
        print(f"{out} has already trained {start_epoch} epochs (--epochs {args.epochs}): nothing to do; "
              f"raise --epochs to train on")
    for epoch in range(start_epoch, args.epochs):
        model.train()
        perm = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        perm = perm[: steps_per_epoch * args.batch_size].view(steps_per_epoch, ddp.world, per_rank)[:, ddp.rank]
        done_before = skip if epoch == start_epoch else 0  # a resumed epoch goes on where it stopped
        perm = perm[done_before:]
        bar = tqdm(perm, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not ddp.main, mininterval=2,
                   dynamic_ncols=True)
        seen, loss_sum, correct, t0 = 0, 0.0, 0, time.perf_counter()
        for idx in bar:
            idx = idx.to(device)
            for group in opt.param_groups:
                group["lr"] = learning_rate(args, step / steps_per_epoch)
            x, y = to_float(augment(images[idx])), labels[idx]
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, args.amp):
                x_adv = craft(args, attack_fn, x, y)
                logits = train_fn(torch.cat([x, x_adv]) if args.attack != "none" else x).float()
            if args.attack != "none":
                clean_logits, adv_logits = logits.chunk(2)
                loss = training_loss(args, clean_logits, adv_logits, y)
            else:
                adv_logits, loss = logits, F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            step += 1
            seen += len(y)
            loss_sum += loss.item() * len(y)
            correct += int((adv_logits.argmax(1) == y).sum())
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", adv_acc=f"{correct / seen:.3f}",
                            img_s=f"{seen * ddp.world / (time.perf_counter() - t0):.0f}",
                            lr=f"{opt.param_groups[0]['lr']:.4f}")
            if args.max_steps is not None and step >= args.max_steps:
                break
        epoch_step = done_before + seen // per_rank  # steps of this epoch done so far
        partial = epoch_step < steps_per_epoch  # stopped by --max-steps inside the epoch
        metrics = {"epoch": epoch + 1, **({"partial": True} if partial else {}), "train_loss": loss_sum / max(seen, 1),
                   "train_adv_acc" if args.attack != "none" else "train_acc": correct / max(seen, 1),
                   "images_per_s": seen * ddp.world / (time.perf_counter() - t0), "steps": step}
        if ddp.main:
            # on its own random stream, so that a run resumed from here draws what an uninterrupted one would
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                metrics.update(evaluate_epoch(args, model, spec, test_set, device))
            history.append(metrics)
            print(json.dumps(metrics), flush=True)
            out.mkdir(parents=True, exist_ok=True)
            with (out / "log.jsonl").open("a") as log:
                log.write(json.dumps(metrics) + "\n")
        rng = rng_states(device, ddp)  # a collective under DDP: every rank takes part
        if ddp.main:
            finished = epoch + 1 == args.epochs and not partial
            record = {**record_base, "epochs_completed": epoch + (0 if partial else 1), "complete": finished,
                      "history": history, **({"stopped_at_step": step} if partial else {})}
            save_checkpoint(out / "checkpoint", model, spec, name, record)
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                        "epoch": epoch + (0 if partial else 1), "epoch_step": epoch_step if partial else 0,
                        "history": json.dumps(history), "rng": rng, "val_images": args.val_images,
                        "config": json.dumps(vars(args))}, state_path)
        if args.max_steps is not None and step >= args.max_steps:
            break
    if ddp.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out / "checkpoint"


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    path = train(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"checkpoint: {path}")


if __name__ == "__main__":
    main()
