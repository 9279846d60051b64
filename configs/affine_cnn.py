"""Max-pooling + dropout CNN trained on expanded MNIST, tested on affine-transformed digits (Sabour et al. 2017, Sec. 5.2).

Reproduce:
    capsnet train --config configs/affine_cnn.py            # test: our seeded affine MNIST set
    capsnet train --config configs/affine_cnn.py:affnist    # test: the official affNIST file
    capsnet train --config configs/affine_cnn.py:short    # CPU budget: 200 steps at batch 32 (docs/results.md)
    capsnet train --config configs/affine_cnn.py:smoke      # seconds, synthetic digits (tests)

Model: cnn_affine, the MNIST baseline's layers (conv 256, 256, 128 5x5 SAME; FC 328, 192,
dropout, 10) with 2x2 max-pooling after the first two convolutions, on 40x40 input:
6,728,466 parameters, close to CapsNet's 6,804,224 without its decoder (the paper gives
no architecture, only a similar parameter count). Softmax cross-entropy, the CapsNet
optimiser recipe. Paper: 99.22% on expanded MNIST, 66% on affNIST (CapsNet: 79%).
"""


def get_config(variant: str = "default") -> dict:
    config = dict(
        model="cnn_affine",
        dataset="affine_mnist",
        dataset_kwargs=dict(val_size=5000, pad=6, shift=6),
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
    if variant == "affnist":
        return dict(config, dataset="affnist")
    if variant == "short":
        # A short CPU budget for docs/results.md: 200 steps of batch 32 (6,400 training
        # samples), validated once at the end, so its number is a floor, not the paper's.
        return dict(config, batch_size=32, max_steps=200, eval_every=200, checkpoint_every=100)
    if variant == "smoke":
        return dict(
            config,
            model_kwargs=dict(channels=(8, 8, 4), hidden=(16, 16)),
            dataset_kwargs=dict(source="synthetic", train_size=64, val_size=32, test_size=32),
            batch_size=16,
            epochs=1,
            checkpoint_every=2,
            log_every=1,
        )
    raise ValueError(f"unknown variant {variant!r} of configs/affine_cnn.py; expected default, affnist, short or smoke")
