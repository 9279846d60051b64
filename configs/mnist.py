"""Dynamic-routing CapsNet on MNIST (Sabour, Frosst & Hinton 2017, Table 1: 0.25% test error).

Reproduce:
    capsnet train --config configs/mnist.py            # paper recipe, 50 epochs
    capsnet train --config configs/mnist.py:demo       # what `make demo` runs: a CPU time budget
    capsnet train --config configs/mnist.py:smoke      # seconds, synthetic data (tests)
    capsnet train --config configs/mnist.py:epoch1     # sample efficiency: one epoch (55,000 images)
    capsnet train --config configs/mnist.py:epoch3     # sample efficiency: three epochs

Recipe (official code): Adam lr 1e-3, continuous decay 0.96 every 2,000 steps floored at
1e-6, batch 128, 3 routing iterations, margin loss + 0.0005 x reconstruction, shifts of
up to 2 pixels, 55,000 / 5,000 train/validation split, test set used once at the end.
"""


def get_config(variant: str = "default") -> dict:
    config = dict(
        model="capsnet_mnist",
        model_kwargs=dict(routing_iterations=3),
        dataset="mnist",
        dataset_kwargs=dict(val_size=5000, shift=2),
        objective="margin",
        objective_kwargs=dict(recon_weight=0.0005),
        batch_size=128,
        lr=1e-3,
        lr_decay_rate=0.96,
        lr_decay_steps=2000,
        epochs=50,
        checkpoint_every=200,
    )
    if variant == "default":
        return config
    if variant == "demo":
        # One epoch, or a fixed training-time budget on a slow machine (install + train + validation
        # + test fit in 20 minutes): a 2-core CPU trains this model at ~46 images/s with PyTorch's
        # convolution, ~130 with the DFT one (one epoch in 426 s, docs/results.md). Batch 64: twice
        # the updates per image seen, which is what a short run needs.
        return dict(config, batch_size=64, epochs=1, time_budget_s=780.0, eval_every=250, checkpoint_every=50)
    if variant in ("epoch1", "epoch3"):
        # Sample efficiency (targets: 99.0% test after one epoch, 99.4% after three). Session 2's
        # try (batch 64, the exponential decay compressed tenfold per run) reached 98.68% after one
        # epoch, no better than the demo's constant 1e-3. Here: batch 32 for four times the paper's
        # updates per image, a peak lr of 2e-3 reached by a linear warm-up over 200 steps, then half
        # a cosine down to lr_min over the run, so the last steps average at a small lr.
        # epoch1: 99.12% test, epoch3: 99.47% (docs/results.md).
        # (lr_decay_steps=None: the cosine spans the rest of the run, 1,719 steps per epoch.)
        epochs = int(variant[-1])
        return dict(config, batch_size=32, epochs=epochs, lr=2e-3, lr_schedule="cosine", lr_warmup_steps=200,
                    lr_decay_steps=None, eval_every=430 if epochs == 1 else 860, checkpoint_every=200)
    if variant == "smoke":
        return dict(
            config,
            model="capsnet_tiny",
            dataset="synthetic",
            dataset_kwargs=dict(train_size=64, val_size=32, test_size=32),
            batch_size=16,
            epochs=2,
            checkpoint_every=2,
            log_every=1,
        )
    raise ValueError(f"unknown variant {variant!r} of configs/mnist.py; expected default, demo, epoch1, epoch3 or smoke")
