"""Continual-learning benchmarks: the scenario builders (Avalanche streams) and their registry."""
from mambacl.benchmarks.registry import (BenchmarkSpec, benchmark_args, create_benchmark, get_benchmark,
                                         list_benchmarks, register_benchmark)
from mambacl.benchmarks import scenarios  # noqa: F401  (registers split_digits, split_cifar100, imagenet_r, domainnet)
from mambacl.benchmarks import fscil  # noqa: F401  (registers fscil_cifar100, fscil_mini_imagenet, fscil_cub200)
from mambacl.benchmarks.scenarios import (class_order, domainnet, image_transforms, imagenet_r, mambacl_transforms,
                                          read_coda_split, split_cifar100, split_digits)

__all__ = ["BenchmarkSpec", "benchmark_args", "class_order", "create_benchmark", "domainnet", "get_benchmark",
           "image_transforms", "imagenet_r", "list_benchmarks", "mambacl_transforms", "read_coda_split",
           "register_benchmark", "split_cifar100", "split_digits"]
