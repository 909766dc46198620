"""The seed's module name for the data helpers (`from minillm.training.data_utils import ...`)."""
from minillm.training.data import create_dataloaders, load_and_split_data, split_text

__all__ = ["load_and_split_data", "create_dataloaders", "split_text"]
