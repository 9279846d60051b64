"""Efficient-CapsNet on MNIST (Mazzia, Salvetti & Chiaberge, Sci. Rep. 2021: 99.74% mean test accuracy).

Reproduce:
    capsnet train --config configs/mnist_efficient.py            # the paper's recipe and augmentation, 150 epochs (target 99.74%)
    capsnet train --config configs/mnist_efficient.py:epoch10    # CPU budget: 10 epochs (target >= 99.5%, issue 17)
    capsnet train --config configs/mnist_efficient.py:epoch3     # any epochN: the same recipe over N epochs
    capsnet train --config configs/mnist_efficient.py:smoke      # seconds, synthetic data (tests)
    CAPSNET_MALLOC=compact capsnet train --config configs/mnist_efficient.py:epoch10
        # in less memory: freed blocks go back to the system (float32 training at batch 128 peaks
        # at 385 MB instead of 462 MB in benchmarks/run.py, at 30% more time: docs/performance.md)

Recipe (the authors' published code, github.com/EscVM/Efficient-CapsNet, config.json and
utils/tools.py): Adam at lr 5e-4 decayed by 0.97 per epoch, floored at 5e-5; batch 16;
150 epochs; margin loss (m+ 0.9, m- 0.1, lambda 0.5) + 0.392 x the mean squared pixel error of
the reconstruction, which is 0.0005 x the summed error used here. Here the 55,000 / 5,000
train/validation split selects the checkpoint and the test set is used once at the end
(the authors select on the test set).

Augmentation (default variant): the paper's, in the authors' order and ranges
(utils/pre_process_mnist.py; capsnet.data.transforms.efficient_capsnet_augment): half the
images rotated by 30 degrees x clip(N(0, 0.33)), every image shifted within its digit's
margins, squeezed horizontally by 1 to 7 columns and a 4 x 4 patch erased; no other shift.
The epochN CPU budgets keep the 2-pixel random shift of Sabour et al. instead (what the
docs/results.md rows were trained with): over a few epochs the heavier augmentation is our
guess to cost more accuracy than it buys; it is one override away
(--set dataset_kwargs.efficient_capsnet_augment=True --set dataset_kwargs.shift=0).
"""

#: Training images per epoch with the 5,000-image validation split.
TRAIN_IMAGES = 55_000


def get_config(variant: str = "default") -> dict:
    batch_size = 16
    config = dict(
        model="efficient_capsnet_mnist",
        model_kwargs=dict(),
        dataset="mnist",
        dataset_kwargs=dict(val_size=5000, shift=0, efficient_capsnet_augment=True),
        objective="margin",
        objective_kwargs=dict(recon_weight=0.0005),
        batch_size=batch_size,
        lr=5e-4,
        lr_decay_rate=0.97,
        lr_decay_steps=-(-TRAIN_IMAGES // batch_size),  # one epoch: the authors decay per epoch
        lr_min=5e-5,
        epochs=150,
        eval_every=-(-TRAIN_IMAGES // batch_size),
        checkpoint_every=500,
    )
    if variant == "default":
        return config
    if variant.startswith("epoch") and variant[5:].isdigit() and int(variant[5:]) >= 1:
        # A CPU budget (issue 17: >= 99.5% test within 10 epochs on 2 cores). The tiny model
        # trains at ~270 images/s on one loaded core (~3.5 min per epoch), nearly the same at
        # batch 16 and 128 (docs/results.md), so a larger batch costs little: batch 32 at a
        # peak lr of 2e-3 after a 200-step linear warm-up, then half a cosine to lr_min over
        # the run, as the short capsnet_mnist runs of configs/mnist.py.
        epochs = int(variant[5:])
        steps = -(-TRAIN_IMAGES // 32)
        return dict(config, dataset_kwargs=dict(val_size=5000, shift=2), batch_size=32, epochs=epochs, lr=2e-3,
                    lr_schedule="cosine", lr_warmup_steps=200, lr_decay_steps=None, lr_min=1e-6, eval_every=-(-steps // 2),
                    checkpoint_every=200)
    if variant == "smoke":
        return dict(
            config,
            dataset="synthetic",
            dataset_kwargs=dict(train_size=64, val_size=32, test_size=32),
            batch_size=16,
            lr_decay_steps=4,
            epochs=2,
            eval_every=None,
            checkpoint_every=2,
            log_every=1,
        )
    raise ValueError(f"unknown variant {variant!r} of configs/mnist_efficient.py; expected default, epochN (N >= 1) or smoke")
