"""Data sets: Fashion-MNIST (default task) and the tasks' loaders."""

from hawq.data.fashion_mnist import TensorDataset, batches, find_data_dir, load_split, read_idx

__all__ = ["TensorDataset", "batches", "find_data_dir", "load_split", "read_idx"]
