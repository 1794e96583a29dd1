"""medvl: train and serve Qilin-Med-VL-style medical vision-language models on Ray."""

__version__ = "0.1.0"
