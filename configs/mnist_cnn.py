"""The paper's baseline CNN on MNIST (Sabour, Frosst & Hinton 2017, Table 1: 0.39% test error).

Reproduce:
    capsnet train --config configs/mnist_cnn.py          # paper architecture, 50 epochs
    capsnet train --config configs/mnist_cnn.py:smoke    # seconds, synthetic data (tests)

Model: conv 256, 256, 128 channels 5x5 stride 1 SAME, no pooling -> FC 328 -> FC 192 ->
dropout -> FC 10, softmax cross-entropy: 35,445,522 parameters (the paper's 35.4M).
Data as for CapsNet: shifts of up to 2 pixels, 55,000 / 5,000 train/validation split.
Optimiser: the CapsNet recipe (the paper gives none for the baseline).
"""


def get_config(variant: str = "default") -> dict:
    config = dict(
        model="cnn_mnist",
        dataset="mnist",
        dataset_kwargs=dict(val_size=5000, shift=2),
        objective="cross_entropy",
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
            model_kwargs=dict(channels=(8, 8, 4), hidden=(16, 16)),
            dataset="synthetic",
            dataset_kwargs=dict(train_size=64, val_size=32, test_size=32),
            batch_size=16,
            epochs=1,
            checkpoint_every=2,
            log_every=1,
        )
    raise ValueError(f"unknown variant {variant!r} of configs/mnist_cnn.py; expected default or smoke")
