"""Dynamic-routing CapsNet on Fashion-MNIST, with the MNIST recipe of Sabour et al. 2017.

Reproduce:
    capsnet train --config configs/fashion_mnist.py          # paper recipe, 50 epochs
    capsnet train --config configs/fashion_mnist.py:smoke    # seconds (tests)

The paper reports no Fashion-MNIST number; the recipe is the MNIST one, unchanged.
"""


def get_config(variant: str = "default") -> dict:
    config = dict(
        model="capsnet_mnist",
        dataset="fashion_mnist",
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
    if variant == "smoke":
        return dict(
            config,
            model="capsnet_tiny",
            dataset="synthetic",
            dataset_kwargs=dict(train_size=64, val_size=32, test_size=32),
            batch_size=16,
            epochs=1,
            checkpoint_every=2,
            log_every=1,
        )
    raise ValueError(f"unknown variant {variant!r} of configs/fashion_mnist.py; expected default or smoke")
