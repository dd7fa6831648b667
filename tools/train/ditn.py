"""Train the DITN-style x2 super-resolution model on patches of the skimage.data images (CPU).

    python -m tools.train.ditn [--steps 2000] [--norm layernorm] [--out models/weights/ditn_x2.safetensors]

Training images: every colour and greyscale picture that skimage ships except the two held out
for evaluation (chelsea and rocket, see ``tools.quality.sr``). LR inputs are bicubic (antialiased)
x2 downscales of random 64 x 64 HR crops, with flips and 90-degree rotations; L1 loss, Adam with
a cosine schedule, seeded. Prints PSNR against bicubic on the held-out images at the end and
stores it with the weights (safetensors metadata).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

THREADS = int(os.environ.get("EFFC_THREADS", "2"))

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

TRAIN_IMAGES = (
    "astronaut coffee hubble_deep_field immunohistochemistry retina colorwheel "
    "camera brick grass gravel moon clock coins page text"
).split()


def random_crops(images: list[torch.Tensor], n: int, size: int, g: torch.Generator) -> torch.Tensor:
    out = []
    for _ in range(n):
        img = images[int(torch.randint(len(images), (1,), generator=g))]
        _, h, w = img.shape
        y = int(torch.randint(h - size + 1, (1,), generator=g))
        x = int(torch.randint(w - size + 1, (1,), generator=g))
        crop = img[:, y : y + size, x : x + size]
        k = int(torch.randint(4, (1,), generator=g))
        crop = torch.rot90(crop, k, (1, 2))
        if torch.rand(1, generator=g) < 0.5:
            crop = crop.flip(2)
        out.append(crop)
    return torch.stack(out)


def main() -> None:
    from effc.models.ditn import DITN, DITNConfig
    from effc.models.weights import save_weights
    from tools.quality.sr import downscale, evaluate, load_image

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--norm", default="layernorm")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="models/weights/ditn_x2.safetensors")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    cfg = DITNConfig(dim=args.dim, norm=args.norm)
    model = DITN(cfg)
    images = [load_image(name) for name in TRAIN_IMAGES]
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    from tqdm import tqdm

    t0 = time.perf_counter()
    bar = tqdm(range(args.steps), desc="train DITN x2", unit="step")
    for step in bar:
        hr = random_crops(images, args.batch, 32 * cfg.scale, g)
        loss = F.l1_loss(model(downscale(hr, cfg.scale)), hr)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(l1=f"{loss.item():.4f}")
    seconds = time.perf_counter() - t0
    model.eval()
    quality = evaluate(model, cfg.scale)
    print(json.dumps(quality, indent=1))
    meta = {
        "config": json.dumps(cfg.__dict__),
        "training": json.dumps(
            {
                "steps": args.steps,
                "batch": args.batch,
                "lr": args.lr,
                "seed": args.seed,
                "seconds": round(seconds),
                "images": TRAIN_IMAGES,
            }
        ),
        "quality": json.dumps(quality),
    }
    save_weights(model, Path(args.out), meta)
    print(f"saved {args.out} ({Path(args.out).stat().st_size / 1e3:.0f} kB) after {seconds:.0f} s")


if __name__ == "__main__":
    main()
