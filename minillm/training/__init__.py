"""minillm.training: data splitting and loaders, the Trainer, checkpoints, extraction."""
from minillm.training.callbacks import Callback, EarlyStopping
from minillm.training.collate import Collator, mask_tokens
from minillm.training.data import create_dataloaders, load_and_split_data, split_text
from minillm.training.extraction import continue_training, extract_model_for_inference, load_model_and_tokenizer
from minillm.training.tokens import TokenDataset
from minillm.training.trainer import Trainer

__all__ = ["load_and_split_data", "create_dataloaders", "split_text", "Collator", "mask_tokens", "Trainer",
           "TokenDataset", "Callback", "EarlyStopping", "load_model_and_tokenizer", "continue_training",
           "extract_model_for_inference"]
