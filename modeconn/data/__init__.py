"""Datasets as tensors, batched by index: embedded (digits, moons, spirals, mnist1d) and torchvision sets from disk."""
from modeconn.data.datasets import (DATASETS, EMBEDDED, TORCHVISION, Dataset, TensorLoader, crop_flip_transform,
                                    epoch_generator, get_dataset, normalize_transform)

__all__ = ["DATASETS", "EMBEDDED", "TORCHVISION", "Dataset", "TensorLoader", "crop_flip_transform",
           "epoch_generator", "get_dataset", "normalize_transform"]
