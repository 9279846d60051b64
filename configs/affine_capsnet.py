"""CapsNet trained on expanded MNIST, tested on affine-transformed digits (Sabour et al. 2017, Sec. 5.2).

Reproduce:
    capsnet train --config configs/affine_capsnet.py            # test: our seeded affine MNIST set
    capsnet train --config configs/affine_capsnet.py:affnist    # test: the official affNIST file
    capsnet train --config configs/affine_capsnet.py:short    # CPU budget: 200 steps at batch 32 (docs/results.md)
    capsnet train --config configs/affine_capsnet.py:smoke      # seconds, synthetic digits (tests)

Training data: each MNIST digit placed at random on a 40x40 black background (official
code: pad 6, shift 6), no other augmentation; the model is the MNIST CapsNet on 40x40
input (13,475,648 parameters). The paper early-stops the CapsNet at 99.23% on the
expanded MNIST test set and then reaches 79% on affNIST (the CNN: 99.22% -> 66%); here
the validation-best checkpoint (expanded MNIST validation digits) is tested. The
`affnist` variant needs <data>/affnist/test.mat (or test.mat.zip) and scipy.
"""


def get_config(variant: str = "default") -> dict:
    config = dict(
        model="capsnet_mnist",
        model_kwargs=dict(image_size=40, routing_iterations=3),
        dataset="affine_mnist",
        dataset_kwargs=dict(val_size=5000, pad=6, shift=6),
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
    if variant == "affnist":
        return dict(config, dataset="affnist")
    if variant == "short":
        # A short CPU budget for docs/results.md: 200 steps of batch 32 (6,400 training
        # samples), validated once at the end, so its number is a floor, not the paper's.
        return dict(config, batch_size=32, max_steps=200, eval_every=200, checkpoint_every=100)
    if variant == "smoke":
        return dict(
            config,
            model="capsnet_tiny",
            model_kwargs=dict(image_size=40),
            dataset_kwargs=dict(source="synthetic", train_size=64, val_size=32, test_size=32),
            batch_size=16,
            epochs=1,
            checkpoint_every=2,
            log_every=1,
        )
    raise ValueError(f"unknown variant {variant!r} of configs/affine_capsnet.py; expected default, affnist, short or smoke")
