"""The cost of deterministic training (`engine.configure_torch(deterministic=True)`).

Times `engine.train_one_epoch` of each architecture with the determinism settings off and on,
in one process, interleaved (off, on, on, off, ...) so that load from other processes hits
both sides alike, on random uint8 images (the timing does not depend on the pixels), and says
whether two trainings of the same seed gave the same weights.

    python bench/bench_deterministic.py                      # 64 px, all architectures
    python bench/bench_deterministic.py --archs googlenet --image-size 224 --repeats 4

Prints a markdown table (images/s off, on, ratio on/off; identical weights). Not part of the
test suite.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics

import torch

from wbc_transfer.data.sets import ImageSet, TrainAugment
from wbc_transfer.engine import (
    configure_torch,
    make_optimizer,
    pick_device,
    place_model,
    seed_everything,
    train_one_epoch,
)
from wbc_transfer.models import registry as models


def one_training(arch: str, data: ImageSet, device: torch.device, batch_size: int,
                 deterministic: bool, threads: int = 0) -> tuple[float, str]:
    """(images/s of one epoch after a warm-up epoch, digest of the final weights)."""
    configure_torch(threads, deterministic=deterministic)
    seed_everything(0)
    built = models.build(arch, len(data.classes), "none", data.size)
    model = place_model(built.model, device, channels_last=True)
    optimizer = make_optimizer(model, built.head, 1e-3, 10, 0.9)
    augment = TrainAugment(30, 224)
    seconds = 0.0
    for epoch in range(2):  # epoch 0 warms up the kernels
        torch.manual_seed(epoch)
        stats = train_one_epoch(model, data, optimizer, augment, built.mean, built.std, device,
                                batch_size, torch.Generator().manual_seed(epoch))
        seconds = stats.seconds
    digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes()
                                     for p in model.parameters())).hexdigest()[:12]
    return len(data) / seconds, digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=sorted(models.REGISTRY))
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2, help="pairs of (off, on) timings")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: default)")
    args = parser.parse_args()
    device = pick_device(args.device)
    configure_torch(args.threads)
    g = torch.Generator().manual_seed(1)
    n, size = args.images, args.image_size
    data = ImageSet(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
                    torch.arange(n) % 4, ["x"] * n, ["train"] * n, ["a", "b", "c", "d"])
    print(f"{device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
          f"{torch.get_num_threads()} threads, {size} px, batch {args.batch_size}, "
          f"{n} images, {args.repeats} pair(s) per architecture\n")
    print("| arch | img/s off | img/s on | on/off | same weights, on (off) |")
    print("| --- | ---: | ---: | ---: | --- |")
    for arch in args.archs:
        rates: dict[bool, list[float]] = {False: [], True: []}
        digests: dict[bool, set[str]] = {False: set(), True: set()}
        for i in range(args.repeats):
            for deterministic in ((False, True) if i % 2 == 0 else (True, False)):
                rate, digest = one_training(arch, data, device, args.batch_size, deterministic,
                                            args.threads)
                rates[deterministic].append(rate)
                digests[deterministic].add(digest)
        off, on = statistics.median(rates[False]), statistics.median(rates[True])
        print(f"| {arch} | {off:.1f} | {on:.1f} | {on / off:.2f} | "
              f"{len(digests[True]) == 1} ({len(digests[False]) == 1}) |")
    configure_torch(deterministic=True)


if __name__ == "__main__":
    main()
