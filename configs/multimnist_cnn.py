"""The paper's MultiMNIST baseline CNN (Sabour, Frosst & Hinton 2017, Sec. 6: 8.1% test error).

Reproduce:
    capsnet train --config configs/multimnist_cnn.py          # paper architecture
    capsnet train --config configs/multimnist_cnn.py:short    # CPU budget: 200 steps at batch 32 (docs/results.md)
    capsnet train --config configs/multimnist_cnn.py:smoke    # seconds, synthetic digits (tests)

Model: conv 512 9x9 -> 2x2 max-pool -> conv 256 5x5 -> 2x2 max-pool -> FC 1024 -> 10
sigmoid outputs (24,563,978 parameters), sigmoid cross-entropy against both digits.
Data and scoring as in configs/multimnist_capsnet.py (correct when the two highest
outputs are exactly the two digits). Optimiser: the CapsNet recipe (the paper gives none
for the baseline).
"""


def get_config(variant: str = "default") -> dict:
    config = dict(
        model="cnn_multimnist",
        dataset="multimnist",
        dataset_kwargs=dict(val_size=5000, shift=4, combine="sum", test_pairs=10_000),
        objective="sigmoid_cross_entropy",
        batch_size=128,
        lr=1e-3,
        lr_decay_rate=0.96,
        lr_decay_steps=20_000,
        epochs=100,
        checkpoint_every=500,
    )
    if variant == "default":
        return config
    if variant == "short":
        # A short CPU budget for docs/results.md: 200 steps of batch 32 (6,400 training
        # samples), validated once at the end, so its number is a floor, not the paper's.
        return dict(config, batch_size=32, max_steps=200, eval_every=200, checkpoint_every=100)
    if variant == "smoke":
        return dict(
            config,
            model_kwargs=dict(channels=(8, 8), hidden=(16,)),
            dataset_kwargs=dict(source="synthetic", train_size=64, val_size=32, test_size=32, test_pairs=32),
            batch_size=16,
            epochs=1,
            checkpoint_every=2,
            log_every=1,
        )
    raise ValueError(f"unknown variant {variant!r} of configs/multimnist_cnn.py; expected default, short or smoke")
