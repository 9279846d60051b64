"""The one convolution output-size formula (capsnet._shapes) against what F.conv2d returns."""

import itertools

import torch
import torch.nn.functional as F

from capsnet._shapes import conv_output_size


def test_conv_output_size_is_what_conv2d_returns():
    for size, kernel, stride, padding in itertools.product(range(1, 12), range(1, 6), range(1, 4), range(0, 3)):
        if size + 2 * padding < kernel:
            assert conv_output_size(size, kernel, stride, padding) < 1
            continue
        out = F.conv2d(torch.zeros(1, 1, size, size), torch.zeros(1, 1, kernel, kernel), stride=stride, padding=padding)
        assert conv_output_size(size, kernel, stride, padding) == out.shape[-1], (size, kernel, stride, padding)
